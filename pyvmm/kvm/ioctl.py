"""The one place pyvmm calls ioctl(2).

``fcntl.ioctl`` passes an integer argument as a C ``int``, which cannot carry
``KVM_VM_TYPE_ARM_PROTECTED`` (bit 31) or a 64-bit guest address.  libc's
``ioctl`` through ctypes takes the argument as ``unsigned long`` (or a pointer),
releases the GIL for the duration of the call (vCPU threads block in
``KVM_RUN``), and leaves the errno for us to turn into a :class:`KvmError`.
"""

from __future__ import annotations

import ctypes

from .errors import KvmError

# The C library already loaded into this process (dlopen(NULL)): Linux only, and no ctypes.util.find_library,
# which runs ldconfig -p (or gcc) at every start.
_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

# The same libc ioctl without argtypes, for the one call made once per guest exit (KVM_RUN: VcpuFd.run): argtypes'
# conversions cost a third of the call.  Python ints then go as C ints, which libffi widens to the register with
# their sign: right for a request below 2**31 (KVM_RUN is 0xae80) and an argument of 0, not for ioctl() in general.
_ioctl_ints = _libc["ioctl"]  # a function object of its own (``_libc.ioctl`` is ``_ioctl``, argtypes and all)
_ioctl_ints.restype = ctypes.c_int


def ioctl(fd: int, name: str, request: int, arg: int | ctypes.Structure | ctypes.Array | None = None) -> int:
    """Issue ``request`` on ``fd``; ``arg`` is an int (passed as unsigned long) or a ctypes object (by reference).

    Returns the ioctl's non-negative result; raises :class:`KvmError` naming ``name`` otherwise.
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = ctypes.c_ulong(arg).value  # unsigned long, not C int
    else:
        ptr = ctypes.addressof(arg)
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        raise KvmError(name, ctypes.get_errno())
    return ret


def libc() -> ctypes.CDLL:
    """libc with errno capture, for the few other calls pyvmm makes through ctypes."""
    return _libc
