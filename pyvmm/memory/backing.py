"""Backing stores for guest memory: what a memslot's pages really are.

Each backing is a small class that creates its fd and mapping, says which
memslot flags it needs, and describes itself for reports.  ``BackingSpec`` is
the parsed form of the CLI's ``--backing`` (``anon``, ``memfd``,
``memfd-hugetlb``, ``guest-memfd``, ``udmabuf[:dmabuf|:memfd]``, ``dma-heap:NAME``,
``file:PATH``); ``BackingSpec.create(size, vm)`` makes the backing.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import stat

from .. import hostmem
from ..kvm import uapi
from ..kvm.errors import ConfigError, MissingFeature
from ..kvm.fd import close_all
from ..paths import file_kind
from ..record import Record
from ..kvm.ioctl import ioctl
from ..kvm.uapi_dmabuf import (
    DMA_BUF_IOCTL_SYNC,
    DMA_BUF_SYNC_END,
    DMA_BUF_SYNC_READ,
    DMA_BUF_SYNC_START,
    DMA_BUF_SYNC_WRITE,
    DMA_HEAP_IOCTL_ALLOC,
    UDMABUF_CREATE,
    UDMABUF_FLAGS_CLOEXEC,
    dma_buf_sync,
    dma_heap_allocation_data,
    udmabuf_create,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time
if TYPE_CHECKING:
    from typing import ClassVar

    from ..kvm.vm import VmFd

UDMABUF_DEVICE = "/dev/udmabuf"
DMA_HEAP_DIR = "/dev/dma_heap"


class BackingKind(enum.Enum):
    ANON = "anon"
    MEMFD = "memfd"
    MEMFD_HUGETLB = "memfd-hugetlb"
    GUEST_MEMFD = "guest-memfd"
    UDMABUF = "udmabuf"
    DMA_HEAP = "dma-heap"
    FILE = "file"


class Backing:
    """A host mapping (``hva``, ``size``) that a memslot points at; closes what it owns."""

    kind: ClassVar[BackingKind]
    alignment: ClassVar[int] = hostmem.PAGE_SIZE

    def __init__(self, size: int, **params):
        self.size = size
        self.hva = 0
        self._fds: list[int] = []
        try:
            self._create(**params)
        except BaseException:
            self.close()  # nothing half-made is left open
            raise

    def _create(self) -> None:
        raise NotImplementedError

    # What KVM_SET_USER_MEMORY_REGION2 needs beyond the HVA.
    slot_flags = 0
    guest_memfd: int | None = None
    guest_memfd_offset = 0

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _map(self, fd: int, **kw) -> None:
        try:
            self.hva = hostmem.mmap_fd(fd, self.size, **kw)
        except OSError as err:
            raise ConfigError(f"{self.describe()}: mmap of {self.size:#x} bytes failed: {err.strerror}") from None

    def host_io(self, write: bool, offset: int, buf) -> bool:
        """Copy between ``buf`` and the backing at ``offset`` by the backing's own means.

        Returns False when the backing has none (the accessor then uses process_vm_{read,write}v on the
        mapping, which is safe for pages that can be pinned).  PFN-mapped backings (DMA-bufs) need this:
        the kernel's GUP refuses VM_PFNMAP/VM_IO memory.
        """
        return False

    def describe(self) -> str:
        return self.kind.value

    def details(self) -> dict:
        """Facts for reports (fds, paths, sizes)."""
        return {"kind": self.kind.value, "size": self.size}

    # --- what the pages are (the kernel's rules depend on it; reports record it) ---------
    swap_backed: bool | None = True  # folio_test_swapbacked(): anonymous memory and shmem; None = unknown
    pfn_mapped = False  # the host mapping is VM_PFNMAP/VM_IO (raw PFNs: GUP cannot pin it)
    hugetlb = False  # hugetlbfs pages
    file_path: str | None = None  # a regular file behind the mapping
    shared_mapping = True  # MAP_SHARED (False: MAP_PRIVATE)

    def nature(self) -> dict:
        """What the pages are, for reports and the kernel's rules (SlotInfo.nature)."""
        return {"swap_backed": self.swap_backed, "pfn_mapped": self.pfn_mapped, "hugetlb": self.hugetlb,
                "guest_memfd": self.guest_memfd is not None, "file_path": self.file_path,
                "shared_mapping": self.shared_mapping}

    def close(self) -> None:
        """Unmap and close every fd, even when one step fails; then raise the first error."""
        hva, self.hva = self.hva, 0
        fds, self._fds = self._fds, []
        close_all([*([lambda: hostmem.munmap(hva, self.size)] if hva else []),
                   *(lambda fd=fd: os.close(fd) for fd in reversed(fds))])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AnonBacking(Backing):
    """Private anonymous memory (MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE): the default.

    MAP_NORESERVE, as other VMMs map guest RAM: only the pages the guest touches are charged, so a sparse guest
    larger than the host's RAM + swap works (the overcommit heuristic refuses such a mapping otherwise).  The shared
    backings need nothing of the kind: a memfd is made without a reservation (shmem's VM_NORESERVE) and a shared
    mapping is not charged; memfd-hugetlb keeps its reservation on purpose, so that too few huge pages fail at mmap
    and not with SIGBUS when the guest first touches one."""

    kind = BackingKind.ANON
    shared_mapping = False

    def _create(self) -> None:
        self._map(-1, shared=False, noreserve=True)


def _memfd(name: str, size: int, flags: int) -> int:
    try:
        fd = os.memfd_create(name, flags)
    except OSError as err:
        if flags & hostmem.MFD_HUGETLB and err.errno in (errno.EINVAL, errno.ENOENT):
            raise MissingFeature(
                "memfd_create(MFD_HUGETLB) failed: this kernel has no hugetlbfs (CONFIG_HUGETLBFS)"
            ) from None
        raise
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class MemfdBacking(Backing):
    """A memfd (shmem), or with ``hugetlb`` a memfd of 2 MiB huge pages; mapped MAP_SHARED."""

    kind = BackingKind.MEMFD

    def _create(self, hugetlb: bool = False, sealing: bool = False) -> None:
        size = self.size
        self.hugetlb = hugetlb
        if hugetlb:
            self.kind = BackingKind.MEMFD_HUGETLB
            self.swap_backed = False  # hugetlb folios never get PG_swapbacked (only anon and shmem do)
            self.alignment = hostmem.HUGE_PAGE_SIZE
            if size % hostmem.HUGE_PAGE_SIZE:
                raise ConfigError(f"memfd-hugetlb: size {size:#x} is not a multiple of 2 MiB")
        flags = hostmem.MFD_CLOEXEC
        flags |= hostmem.MFD_HUGETLB | hostmem.MFD_HUGE_2MB if hugetlb else 0
        flags |= hostmem.MFD_ALLOW_SEALING if sealing else 0
        self.memfd = self._own(_memfd(f"pyvmm-{self.kind.value}", size, flags))
        try:
            self._map(self.memfd)
        except ConfigError:
            if hugetlb:
                free = hostmem.huge_pages()
                raise MissingFeature(
                    f"memfd-hugetlb: cannot map {size // hostmem.HUGE_PAGE_SIZE} huge page(s) of 2 MiB: "
                    f"{free} free in {hostmem.HUGE_PAGE_POOL} (reserve them: {hostmem.HUGE_PAGE_HINT})"
                ) from None
            raise

    def details(self) -> dict:
        return {**super().details(), "memfd": self.memfd}


class GuestMemfdBacking(Backing):
    """KVM guest_memfd (``KVM_CREATE_GUEST_MEMFD``), registered with ``KVM_SET_USER_MEMORY_REGION2``.

    Where the kernel lets guest_memfd be mmap-ed (``GUEST_MEMFD_FLAG_MMAP`` with
    ``INIT_SHARED``), the slot's userspace address is the guest_memfd mapping
    itself, so the VMM sees exactly the guest's pages.  Otherwise the slot keeps
    an anonymous mapping for shared accesses beside the guest_memfd.
    """

    kind = BackingKind.GUEST_MEMFD
    slot_flags = uapi.KVM_MEM_GUEST_MEMFD
    swap_backed = False  # guest_memfd folios are unevictable, not swap-backed

    def _create(self, vm: "VmFd") -> None:
        size = self.size
        if not vm.kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD):
            raise MissingFeature("guest-memfd: this KVM lacks KVM_CAP_GUEST_MEMFD (Linux >= 6.8, CONFIG_KVM_GUEST_MEMFD)")
        if not vm.check_extension(uapi.KVM_CAP_USER_MEMORY2):
            raise MissingFeature("guest-memfd: this KVM lacks KVM_CAP_USER_MEMORY2")
        supported = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        wanted = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
        self.gmem_flags = wanted if supported & wanted == wanted else 0
        self.guest_memfd = self._own(vm.create_guest_memfd(size, self.gmem_flags))
        self.mmapped = bool(self.gmem_flags)
        self.shared_mapping = self.mmapped
        # without an mmap-able guest_memfd, the shared accesses go to anonymous memory: reserved as AnonBacking's
        self._map(self.guest_memfd if self.mmapped else -1, shared=self.mmapped, noreserve=not self.mmapped)

    def details(self) -> dict:
        return {**super().details(), "guest_memfd": self.guest_memfd, "gmem_flags": self.gmem_flags,
                "hva_is_guest_memfd": self.mmapped}


def _dmabuf_missing(what: str, node: str, option: str) -> MissingFeature:
    return MissingFeature(f"{what}: {node} does not exist (kernel option {option})")


def _fd_io(fd: int, write: bool, offset: int, buf) -> bool:
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.pwritev(fd, [view[done:]], offset + done) if write else os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short read/write on the backing fd")
        done += n
    return True


class UdmabufMap(enum.Enum):
    """Which of a udmabuf's two views of the same pages the memslot maps (``udmabuf:dmabuf`` / ``udmabuf:memfd``)."""

    DMABUF = "dmabuf"  # the DMA-buf's mmap: VM_PFNMAP, a protected VM cannot pin it (EFAULT)
    MEMFD = "memfd"  # the memfd behind it: shmem pages GUP can pin; the DMA-buf fd stays for devices and users


class UdmabufBacking(Backing):
    """A DMA-buf made from a sealed memfd with ``UDMABUF_CREATE``.

    ``map=UdmabufMap.DMABUF`` (the default, ``udmabuf`` or ``udmabuf:dmabuf``): the slot maps the DMA-buf itself.
    Its mmap inserts PFNs (the VMA is VM_PFNMAP), which is what makes it interesting: a protected VM
    cannot pin such pages.  ``map=UdmabufMap.MEMFD`` (``udmabuf:memfd``): the slot maps the memfd the DMA-buf
    was made from -- the fix the DMA-buf maintainers proposed for the crosvm report -- and ``dmabuf`` stays
    open for whoever needs the buffer as a DMA-buf (``dmabuf_mmap()``: the same pages through the DMA-buf).
    """

    kind = BackingKind.UDMABUF
    pfn_mapped = True  # by default (map=DMABUF): udmabuf's mmap inserts PFNs (vmf_insert_pfn), VM_PFNMAP
    swap_backed = True  # the pages are the memfd's (shmem); through the DMA-buf mapping GUP never reaches them

    def _create(self, device: str = UDMABUF_DEVICE, map: UdmabufMap = UdmabufMap.DMABUF) -> None:
        size = self.size
        self.map = UdmabufMap(map)
        self.pfn_mapped = self.map is UdmabufMap.DMABUF
        if not os.path.exists(device):
            raise _dmabuf_missing("udmabuf", device, "CONFIG_UDMABUF=y")
        self.memfd = self._own(_memfd("pyvmm-udmabuf", size, hostmem.MFD_CLOEXEC | hostmem.MFD_ALLOW_SEALING))
        fcntl.fcntl(self.memfd, hostmem.F_ADD_SEALS, hostmem.F_SEAL_SHRINK)
        dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        try:
            arg = udmabuf_create(memfd=self.memfd, flags=UDMABUF_FLAGS_CLOEXEC, offset=0, size=size)
            self.dmabuf = self._own(ioctl(dev, "UDMABUF_CREATE", UDMABUF_CREATE, arg))
        finally:
            os.close(dev)
        self._map(self.dmabuf if self.pfn_mapped else self.memfd)

    def host_io(self, write: bool, offset: int, buf) -> bool:
        """Through the memfd the DMA-buf was made from: same pages, no GUP on the PFN mapping."""
        return _fd_io(self.memfd, write, offset, buf) if self.pfn_mapped else False

    def dmabuf_mmap(self) -> "DmabufMapping":
        """A CPU mapping of the DMA-buf (``with backing.dmabuf_mmap() as m: m.read(offset, n)``), closed on exit.

        It is the host's access to the pages: never to a protected guest's private pages once it has run
        (pKVM injects an abort into the host), only to what the guest shared."""
        if not self.hva:
            raise ConfigError("udmabuf: the backing is closed")
        return DmabufMapping(self.dmabuf, self.size)

    def describe(self) -> str:
        return "udmabuf" if self.pfn_mapped else f"udmabuf:{self.map.value}"

    def details(self) -> dict:
        return {**super().details(), "memfd": self.memfd, "dmabuf": self.dmabuf, "map": self.map.value}


class DmabufMapping:
    """A DMA-buf's own mmap, read or written between ``DMA_BUF_IOCTL_SYNC`` START and END (the CPU-access
    bracket the DMA-buf API asks for), unmapped on ``close()``."""

    def __init__(self, dmabuf: int, size: int):
        self.size = size
        self.fd = os.dup(dmabuf)  # its own: closing the backing first cannot leave SYNC on a reused fd number
        try:
            self.addr = hostmem.mmap_fd(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def _sync(self, flags: int) -> None:
        ioctl(self.fd, "DMA_BUF_IOCTL_SYNC", DMA_BUF_IOCTL_SYNC, dma_buf_sync(flags=flags))

    def _check(self, offset: int, length: int) -> None:
        if not self.addr:
            raise ConfigError("the DMA-buf mapping is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"[{offset:#x}, +{length:#x}) is outside the {self.size:#x}-byte DMA-buf")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        self._sync(DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ)
        try:
            return ctypes.string_at(self.addr + offset, length)
        finally:
            self._sync(DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self._sync(DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE)
        try:
            ctypes.memmove(self.addr + offset, data, len(data))
        finally:
            self._sync(DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE)

    def close(self) -> None:
        addr, self.addr = self.addr, 0
        fd, self.fd = self.fd, -1
        close_all([*([lambda: hostmem.munmap(addr, self.size)] if addr else []),
                   *([lambda: os.close(fd)] if fd >= 0 else [])])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DmaHeapBacking(Backing):
    """A buffer from ``/dev/dma_heap/<heap>`` (``DMA_HEAP_IOCTL_ALLOC``), its DMA-buf mapped as guest RAM."""

    kind = BackingKind.DMA_HEAP
    pfn_mapped = True  # the system and CMA heaps map with remap_pfn_range / vmf_insert_pfn: VM_PFNMAP
    swap_backed = False  # heap pages are the heap's own allocations (not anon, not shmem)

    def _create(self, heap: str) -> None:
        size = self.size
        self.heap = heap
        node = os.path.join(DMA_HEAP_DIR, heap)
        if not os.path.isdir(DMA_HEAP_DIR):
            raise _dmabuf_missing(f"dma-heap:{heap}", DMA_HEAP_DIR, "CONFIG_DMABUF_HEAPS=y with a heap, "
                                  "e.g. CONFIG_DMABUF_HEAPS_SYSTEM or CONFIG_DMABUF_HEAPS_CMA")
        if not os.path.exists(node):
            have = ", ".join(sorted(os.listdir(DMA_HEAP_DIR))) or "none"
            raise MissingFeature(f"dma-heap:{heap}: {node} does not exist (heaps here: {have})")
        dev = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        try:
            arg = dma_heap_allocation_data(len=size, fd_flags=os.O_RDWR | os.O_CLOEXEC, heap_flags=0)
            ioctl(dev, "DMA_HEAP_IOCTL_ALLOC", DMA_HEAP_IOCTL_ALLOC, arg)
            self.dmabuf = self._own(arg.fd)
        finally:
            os.close(dev)
        self._map(self.dmabuf)

    def host_io(self, write: bool, offset: int, buf) -> bool:
        """The heap's mapping is the only view of the buffer, and GUP refuses it: copy directly."""
        size = ctypes.sizeof(buf)
        if write:
            ctypes.memmove(self.hva + offset, buf, size)
        else:
            ctypes.memmove(buf, self.hva + offset, size)
        return True

    def describe(self) -> str:
        return f"dma-heap:{self.heap}"

    def details(self) -> dict:
        return {**super().details(), "heap": self.heap, "dmabuf": self.dmabuf}


class FileBacking(Backing):
    """A regular file mapped MAP_SHARED (created or extended to the region's size)."""

    kind = BackingKind.FILE

    def _create(self, path: str) -> None:
        size = self.size
        self.path = os.path.abspath(path)
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise ConfigError(f"file:{path}: directory {parent} does not exist")
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            mode = None  # created below
        except OSError as err:  # a name too long, a search permission missing...
            raise ConfigError(f"file:{path}: {err.strerror}") from None
        if mode is not None and not stat.S_ISREG(mode):  # /dev/null, a FIFO, a directory: nothing to map
            raise ConfigError(f"file:{path}: {file_kind(mode)}; guest RAM needs a regular file (created if missing)")
        try:  # O_NONBLOCK: a path swapped for a FIFO after the check must not block
            fd = self._own(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o600))
        except PermissionError:
            raise ConfigError(f"file:{path}: permission denied") from None
        except OSError as err:
            raise ConfigError(f"file:{path}: {err.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"file:{path}: {file_kind(st.st_mode)}; guest RAM needs a regular file")
        if st.st_size < size:
            try:
                os.ftruncate(fd, size)
            except OSError as err:  # a full or read-only filesystem, a file size limit
                raise ConfigError(f"file:{path}: cannot extend it to {size} bytes: {err.strerror}") from None
        self.fd = fd
        self._map(fd)

    @property
    def file_path(self) -> str:  # type: ignore[override]
        return self.path

    @property
    def filesystem(self) -> str | None:
        """The filesystem type of the mount holding the file (longest matching mount point)."""
        return mount_fstype(self.path)

    @property
    def swap_backed(self) -> bool | None:  # type: ignore[override]
        """Only shmem files (tmpfs) are swap-backed; other files' pages are page cache.  None: unknown."""
        fs = self.filesystem
        return None if fs is None else fs in SHMEM_FILESYSTEMS

    def nature(self) -> dict:
        return {**super().nature(), "filesystem": self.filesystem}

    def describe(self) -> str:
        return f"file:{self.path}"

    def details(self) -> dict:
        return {**super().details(), "path": self.path}


SHMEM_FILESYSTEMS = ("tmpfs", "shmem")


def mount_fstype(path: str, mounts_file: str = "/proc/self/mounts") -> str | None:
    """The type of the filesystem mounted at the longest mount point containing ``path``; None if unreadable."""
    try:
        with open(mounts_file) as f:
            mounts = [[w.replace("\\040", " ") for w in line.split()[1:3]] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    path = os.path.realpath(path)
    best = max((m for m in mounts if m[0] == "/" or path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


class BackingSpec(Record):
    """A backing the user asked for, before it is created: ``kind`` and its argument."""

    __slots__ = ("kind", "arg")
    __hash__ = Record.value_hash  # never modified

    def __init__(self, kind: BackingKind, arg: str = ""):
        self.kind = kind
        self.arg = arg

    @classmethod
    def parse(cls, text: str) -> "BackingSpec":
        name, sep, arg = text.partition(":")
        try:
            kind = BackingKind(name)
        except ValueError:
            suffix = {BackingKind.DMA_HEAP: ":NAME", BackingKind.FILE: ":PATH", BackingKind.UDMABUF: "[:memfd]"}
            choices = ", ".join(k.value + suffix.get(k, "") for k in BackingKind)
            raise ConfigError(f"unknown backing {text!r} (choose from {choices})") from None
        needs_arg = kind in (BackingKind.DMA_HEAP, BackingKind.FILE)
        if needs_arg and not arg:
            raise ConfigError(f"backing {name} needs an argument: {name}:{'NAME' if kind is BackingKind.DMA_HEAP else 'PATH'}")
        if kind is BackingKind.UDMABUF and sep:
            if arg not in {m.value for m in UdmabufMap}:
                raise ConfigError(f"backing {text!r}: udmabuf maps either its DMA-buf or its memfd "
                                  f"(udmabuf:dmabuf, the default, or udmabuf:memfd)")
            return cls(kind, "" if arg == UdmabufMap.DMABUF.value else arg)
        if not needs_arg and sep:
            raise ConfigError(f"backing {name} takes no argument (got {text!r})")
        return cls(kind, arg)

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.arg}" if self.arg else self.kind.value

    @property
    def alignment(self) -> int:
        return hostmem.HUGE_PAGE_SIZE if self.kind is BackingKind.MEMFD_HUGETLB else hostmem.PAGE_SIZE

    def create(self, size: int, vm: "VmFd") -> Backing:
        k = self.kind
        if k is BackingKind.ANON:
            return AnonBacking(size)
        if k is BackingKind.MEMFD:
            return MemfdBacking(size)
        if k is BackingKind.MEMFD_HUGETLB:
            return MemfdBacking(size, hugetlb=True)
        if k is BackingKind.GUEST_MEMFD:
            return GuestMemfdBacking(size, vm=vm)
        if k is BackingKind.UDMABUF:
            return UdmabufBacking(size, map=UdmabufMap(self.arg or UdmabufMap.DMABUF.value))
        if k is BackingKind.DMA_HEAP:
            return DmaHeapBacking(size, heap=self.arg)
        return FileBacking(size, path=self.arg)


def backing_availability(vm: "VmFd | None" = None) -> dict[str, str]:
    """For ``pyvmm caps``: each backing kind -> "usable" or why not, without allocating guest RAM."""
    out: dict[str, str] = {"anon": "usable", "memfd": "usable", "file:PATH": "usable"}
    free = hostmem.huge_pages()
    out["memfd-hugetlb"] = (
        f"usable ({free} free 2 MiB huge pages)" if free else
        f"no free 2 MiB huge pages ({hostmem.HUGE_PAGE_POOL}: {hostmem.HUGE_PAGE_HINT.split(' > ')[0]})"
    )
    if vm is None:
        out["guest-memfd"] = "unknown (no VM)"
    elif not vm.kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD):
        out["guest-memfd"] = "no KVM_CAP_GUEST_MEMFD"
    else:
        flags = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        out["guest-memfd"] = "usable" + (" (mmap-able)" if flags & uapi.GUEST_MEMFD_FLAG_MMAP else " (not mmap-able)")
    out["udmabuf"] = "usable" if os.path.exists(UDMABUF_DEVICE) else f"{UDMABUF_DEVICE} missing (CONFIG_UDMABUF)"
    if os.path.isdir(DMA_HEAP_DIR):
        heaps = sorted(os.listdir(DMA_HEAP_DIR))
        out["dma-heap:NAME"] = f"usable: {', '.join(heaps)}" if heaps else f"{DMA_HEAP_DIR} has no heaps"
    else:
        out["dma-heap:NAME"] = f"{DMA_HEAP_DIR} missing (CONFIG_DMABUF_HEAPS)"
    return out


__all__ = [
    "Backing", "BackingKind", "BackingSpec", "AnonBacking", "MemfdBacking", "GuestMemfdBacking",
    "UdmabufBacking", "UdmabufMap", "DmabufMapping", "DmaHeapBacking", "FileBacking", "backing_availability",
]
