"""A KVM device fd (``KVM_CREATE_DEVICE``: in-kernel GIC, ITS...)."""

from __future__ import annotations

import ctypes
import errno

from . import uapi
from .errors import KvmError
from .fd import OwnedFd
from .ioctl import ioctl


def device_attr(group: int, attr: int, value: ctypes._SimpleCData | None = None) -> uapi.kvm_device_attr:
    return uapi.kvm_device_attr(
        flags=0, group=group, attr=attr, addr=ctypes.addressof(value) if value is not None else 0
    )


class AttrMixin:
    """KVM_{SET,GET,HAS}_DEVICE_ATTR, shared by device fds, VM fds and vCPU fds."""

    def set_device_attr(self, group: int, attr: int, value: int | None = None, width=ctypes.c_uint64) -> None:
        holder = width(value) if value is not None else None
        ioctl(self.fileno(), "KVM_SET_DEVICE_ATTR", uapi.KVM_SET_DEVICE_ATTR, device_attr(group, attr, holder))

    def get_device_attr(self, group: int, attr: int, width=ctypes.c_uint64) -> int:
        holder = width()
        ioctl(self.fileno(), "KVM_GET_DEVICE_ATTR", uapi.KVM_GET_DEVICE_ATTR, device_attr(group, attr, holder))
        return holder.value

    def has_device_attr(self, group: int, attr: int) -> bool:
        """True when the attribute exists; ENXIO (and only ENXIO) means it does not, other errors raise."""
        try:
            ioctl(self.fileno(), "KVM_HAS_DEVICE_ATTR", uapi.KVM_HAS_DEVICE_ATTR, device_attr(group, attr))
            return True
        except KvmError as err:
            if err.errno == errno.ENXIO:
                return False
            raise


class DeviceFd(AttrMixin, OwnedFd):
    kind = "KVM device fd"

    def __init__(self, fd: int, dev_type: int):
        super().__init__(fd)
        self.dev_type = dev_type
