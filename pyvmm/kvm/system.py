"""``/dev/kvm``: the system fd."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from . import uapi, uapi_x86
from ..paths import file_kind
from .errors import ConfigError, KvmError, MissingFeature
from .fd import OwnedFd
from .ioctl import ioctl
from .vm import VmFd

KVM_DEVICE = "/dev/kvm"


class Kvm(OwnedFd):
    """The KVM system fd: API version, capabilities, VM creation."""

    kind = "/dev/kvm"

    def __init__(self, path: str = KVM_DEVICE):
        try:
            mode = os.stat(path).st_mode
            if not stat.S_ISCHR(mode):  # checked first: opening a FIFO would block, a directory fails oddly
                raise ConfigError(f"{path}: {file_kind(mode)}, not the KVM device (a character device such as "
                                  f"{KVM_DEVICE})")
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise MissingFeature(
                f"{path} does not exist: this kernel has no KVM (CONFIG_KVM), the kvm module is not loaded, "
                "or virtualization is off in firmware"
            ) from None
        except PermissionError:
            raise MissingFeature(
                f"{path}: permission denied: add this user to the 'kvm' group or run as root"
            ) from None
        except OSError as err:
            raise MissingFeature(f"{path}: {err.strerror}") from None
        super().__init__(fd)
        self.path = path
        try:
            version = self.api_version()
        except KvmError as err:
            self.close()
            if err.errno == errno.ENOTTY:
                raise ConfigError(f"{path}: a character device, but not the KVM device "
                                  "(KVM_GET_API_VERSION: ENOTTY)") from None
            raise
        if version != uapi.KVM_API_VERSION:
            self.close()
            raise MissingFeature(f"KVM API version {version}, pyvmm needs {uapi.KVM_API_VERSION}")

    def api_version(self) -> int:
        return ioctl(self.fileno(), "KVM_GET_API_VERSION", uapi.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd (0 where the capability is absent)."""
        return ioctl(self.fileno(), "KVM_CHECK_EXTENSION", uapi.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fileno(), "KVM_GET_VCPU_MMAP_SIZE", uapi.KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, vm_type: int = 0) -> VmFd:
        """KVM_CREATE_VM. ``vm_type`` is passed as unsigned long (bit 31 is arm64's protected type)."""
        while True:
            try:
                fd = ioctl(self.fileno(), "KVM_CREATE_VM", uapi.KVM_CREATE_VM, vm_type)
                break
            except KvmError as err:
                if err.errno != errno.EINTR:
                    raise
        return VmFd(fd, self, vm_type)

    def supported_cpuid(self, max_entries: int = 256) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID (x86), grown until the kernel's table fits."""
        while True:
            cpuid = uapi_x86.cpuid2_with(max_entries)
            try:
                ioctl(self.fileno(), "KVM_GET_SUPPORTED_CPUID", uapi.KVM_GET_SUPPORTED_CPUID, cpuid)
                return cpuid
            except KvmError as err:
                if err.errno != errno.E2BIG or max_entries >= 4096:
                    raise
                max_entries *= 2
