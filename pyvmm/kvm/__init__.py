"""Typed bindings to /dev/kvm: one wrapper per fd kind, one method per ioctl.

``Kvm`` (system fd) -> ``VmFd`` -> ``VcpuFd`` / ``DeviceFd``.  Every failure is a
``KvmError`` carrying the ioctl's name, the errno and its meaning.
"""

from .device import DeviceFd
from .errors import ConfigError, GuestMemoryError, KvmError, MissingFeature, PyvmmError
from .system import Kvm
from .vcpu import VcpuFd
from .vm import VmFd

__all__ = [
    "Kvm", "VmFd", "VcpuFd", "DeviceFd",
    "PyvmmError", "KvmError", "MissingFeature", "ConfigError", "GuestMemoryError",
]
