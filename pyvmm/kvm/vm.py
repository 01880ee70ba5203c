"""A VM fd (``KVM_CREATE_VM``): memslots, vCPUs, devices, irqchip."""

from __future__ import annotations

import ctypes
import os
TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time

from . import uapi
from .device import AttrMixin, DeviceFd
from .fd import OwnedFd
from .ioctl import ioctl
from .vcpu import VcpuFd

if TYPE_CHECKING:
    from .system import Kvm


class VmFd(AttrMixin, OwnedFd):
    kind = "VM fd"

    def __init__(self, fd: int, kvm: "Kvm", vm_type: int):
        super().__init__(fd)
        self.kvm = kvm
        self.vm_type = vm_type

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd: answers for this VM's type (e.g. protected VMs)."""
        return ioctl(self.fileno(), "KVM_CHECK_EXTENSION", uapi.KVM_CHECK_EXTENSION, cap)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        size = self.kvm.vcpu_mmap_size()
        fd = ioctl(self.fileno(), "KVM_CREATE_VCPU", uapi.KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(fd, vcpu_id, size)  # owns fd from here on, closes it itself if its set-up fails

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int) -> None:
        region = uapi.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=guest_phys_addr, memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        ioctl(self.fileno(), "KVM_SET_USER_MEMORY_REGION", uapi.KVM_SET_USER_MEMORY_REGION, region)

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, guest_memfd: int = 0, guest_memfd_offset: int = 0) -> None:
        region = uapi.kvm_userspace_memory_region2(
            slot=slot, flags=flags, guest_phys_addr=guest_phys_addr, memory_size=memory_size,
            userspace_addr=userspace_addr, guest_memfd=guest_memfd, guest_memfd_offset=guest_memfd_offset,
        )
        ioctl(self.fileno(), "KVM_SET_USER_MEMORY_REGION2", uapi.KVM_SET_USER_MEMORY_REGION2, region)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD; returns a new close-on-exec fd the caller owns.

        The kernel makes the fd without O_CLOEXEC (unlike VM, vCPU and device fds), so a child process
        would keep the guest's memory alive: set FD_CLOEXEC before anyone else sees the fd."""
        arg = uapi.kvm_create_guest_memfd(size=size, flags=flags)
        fd = ioctl(self.fileno(), "KVM_CREATE_GUEST_MEMFD", uapi.KVM_CREATE_GUEST_MEMFD, arg)
        try:
            os.set_inheritable(fd, False)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        arg = uapi.kvm_memory_attributes(address=address, size=size, attributes=attributes, flags=0)
        ioctl(self.fileno(), "KVM_SET_MEMORY_ATTRIBUTES", uapi.KVM_SET_MEMORY_ATTRIBUTES, arg)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fileno(), "KVM_SET_TSS_ADDR", uapi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = ctypes.c_uint64(addr)
        ioctl(self.fileno(), "KVM_SET_IDENTITY_MAP_ADDR", uapi.KVM_SET_IDENTITY_MAP_ADDR, value)

    def create_irqchip(self) -> None:
        ioctl(self.fileno(), "KVM_CREATE_IRQCHIP", uapi.KVM_CREATE_IRQCHIP)

    def irq_line(self, irq: int, level: int) -> None:
        ioctl(self.fileno(), "KVM_IRQ_LINE", uapi.KVM_IRQ_LINE, uapi.kvm_irq_level(irq=irq, level=level))

    def irqfd(self, fd: int, gsi: int, flags: int = 0) -> None:
        ioctl(self.fileno(), "KVM_IRQFD", uapi.KVM_IRQFD, uapi.kvm_irqfd(fd=fd, gsi=gsi, flags=flags))

    def ioeventfd(self, fd: int, addr: int, length: int, flags: int = 0, datamatch: int = 0) -> None:
        arg = uapi.kvm_ioeventfd(datamatch=datamatch, addr=addr, len=length, fd=fd, flags=flags)
        ioctl(self.fileno(), "KVM_IOEVENTFD", uapi.KVM_IOEVENTFD, arg)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        arg = uapi.kvm_enable_cap(cap=cap, flags=flags)
        for i, value in enumerate(args):
            arg.args[i] = value
        ioctl(self.fileno(), "KVM_ENABLE_CAP", uapi.KVM_ENABLE_CAP, arg)

    def arm_preferred_target(self) -> uapi.kvm_vcpu_init:
        init = uapi.kvm_vcpu_init()
        ioctl(self.fileno(), "KVM_ARM_PREFERRED_TARGET", uapi.KVM_ARM_PREFERRED_TARGET, init)
        return init

    def create_device(self, dev_type: int, test: bool = False) -> DeviceFd | None:
        """KVM_CREATE_DEVICE; with ``test`` only asks whether the type is supported (returns None)."""
        arg = uapi.kvm_create_device(type=dev_type, fd=0, flags=1 if test else 0)
        ioctl(self.fileno(), "KVM_CREATE_DEVICE", uapi.KVM_CREATE_DEVICE, arg)
        return None if test else DeviceFd(arg.fd, dev_type)
