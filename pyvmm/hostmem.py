"""Thin, explicit wrappers over the host memory system calls pyvmm needs.

mmap/munmap go through libc so that a mapping is a plain address the VMM owns
(never a Python buffer that could be touched directly); memfd_create and
process_vm_readv/writev are used by the backings and the safe accessor.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from .kvm.ioctl import libc

_libc = libc()
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

MAP_FAILED = ctypes.c_void_p(-1).value
PAGE_SIZE = mmap.PAGESIZE
HUGE_PAGE_SIZE = 2 << 20
MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
MFD_HUGETLB = 0x0004
MFD_HUGE_2MB = 21 << 26
F_ADD_SEALS = 1033
F_SEAL_SHRINK = 0x0002
# The pool memfd-hugetlb (MFD_HUGE_2MB) takes its pages from.  Not /proc/meminfo's HugePages_* nor vm.nr_hugepages:
# those are the default huge page size's, which is the PMD size, 2 MiB with 4 KiB pages but 32 MiB on a 16 KiB-page
# arm64 kernel (where 2 MiB pages are contiguous PTEs, a pool of their own).
HUGE_PAGE_POOL = f"/sys/kernel/mm/hugepages/hugepages-{HUGE_PAGE_SIZE >> 10}kB"
HUGE_PAGE_HINT = f"echo N > {HUGE_PAGE_POOL}/nr_hugepages"


def huge_pages(counter: str = "free_hugepages") -> int:
    """A counter of the 2 MiB huge page pool (free_hugepages, resv_hugepages, nr_hugepages); 0 without one."""
    try:
        with open(os.path.join(HUGE_PAGE_POOL, counter)) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def reserve_huge_pages(free: int) -> int:
    """Grow the 2 MiB pool until FREE pages are free (never shrinking it; needs root); returns the free count."""
    have = huge_pages()
    if have < free:
        try:
            with open(os.path.join(HUGE_PAGE_POOL, "nr_hugepages"), "w") as f:
                f.write(str(huge_pages("nr_hugepages") + free - have))
        except OSError:
            pass
    return huge_pages()


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong,
                                   ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes


MAP_NORESERVE = 0x4000  # Linux's, x86_64 and arm64 alike (Python's mmap module lacks it before 3.13)


def mmap_fd(fd: int, size: int, offset: int = 0, shared: bool = True, writable: bool = True,
            noreserve: bool = False) -> int:
    """Map ``size`` bytes of ``fd`` (or anonymous memory with ``fd == -1``); returns the address.

    ``noreserve``: MAP_NORESERVE, no commit charge for the whole size up front (a private writable mapping gets one
    otherwise, and the kernel's overcommit heuristic refuses one larger than RAM + swap), only for the pages touched.
    With vm.overcommit_memory=2 the kernel ignores it.  Raises OSError with the errno on failure.
    """
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
    if fd < 0:
        flags |= mmap.MAP_ANONYMOUS
    if noreserve:
        flags |= MAP_NORESERVE
    addr = _libc.mmap(None, size, prot, flags, fd, offset)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return addr


def munmap(addr: int, size: int) -> None:
    if _libc.munmap(addr, size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def mprotect(addr: int, size: int, prot: int) -> None:
    if _libc.mprotect(addr, size, prot) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def process_vm_io(write: bool, addr: int, buf: ctypes.Array) -> int:
    """Copy between ``buf`` and our own address ``addr`` with process_vm_{read,write}v.

    The kernel answers EFAULT for an address it cannot access instead of
    delivering SIGSEGV, so the VMM survives an inaccessible guest page.
    Returns the number of bytes copied (may be short); raises OSError on error.
    """
    local = iovec(ctypes.addressof(buf), ctypes.sizeof(buf))
    remote = iovec(addr, ctypes.sizeof(buf))
    call = _libc.process_vm_writev if write else _libc.process_vm_readv
    done = call(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return done
