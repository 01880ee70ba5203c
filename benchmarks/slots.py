"""Slot set-up time against size: pyvmm's ``add_memory`` split into its own part and the kernel's, against a bare
mmap + KVM_SET_USER_MEMORY_REGION from Python.

    scripts/dev bench slots                      (x86_64)
    .venv/bin/python benchmarks/slots.py [--rounds R] [--max-mib M] [--backing anon,memfd]
    scripts/lab run -- python3 benchmarks/slots.py [--rounds R] [--max-mib M]     (arm64, in the lab)

For each size (2 MiB, 64 MiB, 1 GiB, 4 GiB, 16 GiB on x86_64; up to --max-mib, default 16 GiB here and 4 GiB on
arm64, whose lab has 2 GiB of RAM: a size the host refuses is shown as refused) and backing, in interleaved
rounds, each on a fresh VM without vCPUs, at a fixed guest address (4 GiB on x86_64, above the MMIO hole; the RAM
base on arm64):

1. pyvmm: ``vm.add_memory(size, backing, gpa=...)``, wall time of the call; within it, the time spent in the
   KVM_SET_USER_MEMORY_REGION ioctl (the call of pyvmm's ``ioctl()`` for it, timed by wrapping the name
   pyvmm/kvm/vm.py calls: the kernel's part plus a microsecond of ctypes) and in the backing's mmap
   (pyvmm.hostmem.mmap_fd, wrapped the same way); pyvmm's own part is the rest, shown before the ioctl (its
   checks, making the backing: for memfd also memfd_create and ftruncate, two system calls) and after it (its
   bookkeeping).  It must not grow with the size (the kernel's part may: KVM allocates and zeroes per-slot
   metadata that does).
2. the peer, a bare Python sequence: the same mmap (and memfd) through ctypes/os, then the ioctl through ctypes;
   its total, and the ioctl alone.  It maps as pyvmm does: anon is MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE (pyvmm's
   AnonBacking: only the pages touched are charged, so a size above RAM + swap is not refused), memfd MAP_SHARED.

A size either side refuses is shown as refused by that side; the other side's figures are still shown (without
the ratio when it is the peer that refused).

Each measured call follows an untimed one of the same size and kind (a first call after another size finds cold
caches: tens of microseconds whatever the size).  A control measures the smallest size right after the largest
(set up and torn down): when pyvmm's own part is as slow there, its growth with the size is the machine's state,
not pyvmm's code.  Figures are min/median/max over the rounds, with the ratio of
medians to the bare sequence.
"""
# bench-arches: x86_64 arm64   (scripts/dev bench runs this file on these architectures)

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import mmap
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ARCH, header, machine, show  # noqa: E402

GPA = (1 << 32) if ARCH == "x86_64" else 0x8000_0000
SIZES_MIB = [2, 64, 1024, 4096, 16384]
KVM_CREATE_VM = 0xAE01


class Region(ctypes.Structure):  # struct kvm_userspace_memory_region
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64), ("userspace_addr", ctypes.c_uint64)]


KVM_SET_USER_MEMORY_REGION = (1 << 30) | (ctypes.sizeof(Region) << 16) | (0xAE << 8) | 0x46  # _IOW(KVMIO, 0x46, ...)

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's, x86_64 and arm64 alike; in mmap from 3.13


class Refused(Exception):
    pass


def _errno_text() -> str:
    err = ctypes.get_errno()
    return f"{os.strerror(err)} ({err})"


def bare(kvm: int, size: int, backing: str) -> tuple[float, float, float]:
    """(total, ioctl, mmap) seconds: the backing made and mapped, then KVM_SET_USER_MEMORY_REGION, on a fresh
    VM."""
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    fd, addr = -1, None
    try:
        start = time.perf_counter()
        if backing == "memfd":
            fd = os.memfd_create("bench", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            flags = mmap.MAP_SHARED
        else:  # as pyvmm's AnonBacking maps it: MAP_NORESERVE, charged only for the pages touched
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        mapping = time.perf_counter()
        addr = _mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
        mapped = time.perf_counter()
        if addr in (None, MAP_FAILED):
            addr = None
            raise Refused(f"mmap: {_errno_text()}")
        region = Region(0, 0, GPA, size, addr)
        call = time.perf_counter()
        ret = _ioctl(vm, KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region))
        end = time.perf_counter()
        if ret < 0:
            raise Refused(f"KVM_SET_USER_MEMORY_REGION: {_errno_text()}")
        return end - start, end - call, mapped - mapping
    finally:
        os.close(vm)  # the slot goes with the VM; then the mapping
        if addr is not None:
            _munmap(addr, size)
        if fd >= 0:
            os.close(fd)


@contextlib.contextmanager
def timed_kernel_calls(ioctls: list[tuple[float, float]], maps: list[float]):
    """While inside: every KVM_SET_USER_MEMORY_REGION(2) pyvmm issues from pyvmm/kvm/vm.py adds its (start, end)
    perf_counter times to IOCTLS (the module's ``ioctl`` name is wrapped), every mmap of a backing
    (pyvmm.hostmem.mmap_fd) its seconds to MAPS."""
    import pyvmm.hostmem as hostmem
    import pyvmm.kvm.vm as vm_module

    original_ioctl, original_mmap = vm_module.ioctl, hostmem.mmap_fd

    def ioctl(fd, name, request, arg=None):
        if not name.startswith("KVM_SET_USER_MEMORY_REGION"):
            return original_ioctl(fd, name, request, arg)
        start = time.perf_counter()
        try:
            return original_ioctl(fd, name, request, arg)
        finally:
            ioctls.append((start, time.perf_counter()))

    def mmap_fd(*args, **kw):
        start = time.perf_counter()
        try:
            return original_mmap(*args, **kw)
        finally:
            maps.append(time.perf_counter() - start)

    vm_module.ioctl, hostmem.mmap_fd = ioctl, mmap_fd
    try:
        yield
    finally:
        vm_module.ioctl, hostmem.mmap_fd = original_ioctl, original_mmap


def with_pyvmm(size: int, backing: str) -> dict[str, float]:
    """Seconds, on a fresh VM: add_memory's total, the slot ioctl within it, the backing's mmap within it, pyvmm's
    own time before the ioctl (the mmap excluded) and after it."""
    from pyvmm.kvm.errors import PyvmmError
    from pyvmm.vm import Vm

    with Vm() as vm:
        spent: list[tuple[float, float]] = []
        maps: list[float] = []
        with timed_kernel_calls(spent, maps):
            start = time.perf_counter()
            try:
                vm.add_memory(size, backing, gpa=GPA)
            except PyvmmError as err:
                raise Refused(str(err).split("\n")[0][:120]) from None
            end = time.perf_counter()
    if len(spent) != 1 or not maps:
        raise SystemExit(f"pyvmm made {len(spent)} slot ioctls through pyvmm/kvm/vm.py's ioctl and {len(maps)} "
                         "mmaps through pyvmm.hostmem.mmap_fd for one region: this benchmark's split no longer "
                         "matches pyvmm's code (timed_kernel_calls)")
    (call, done), mapping = spent[0], sum(maps)
    return {"total": end - start, "ioctl": done - call, "mmap": mapping, "before": call - start - mapping,
            "after": end - done}


def label(mib: int) -> str:
    return f"{mib >> 10} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--max-mib", type=int, default=4096 if ARCH == "arm64" else 16384,
                        help="largest size in MiB (default 16384; 4096 on arm64)")
    parser.add_argument("--backing", default="anon,memfd", help="comma-separated: anon, memfd (default both)")
    args = parser.parse_args()
    sizes = [m for m in SIZES_MIB if m <= args.max_mib]
    backings = args.backing.split(",")
    print(f"slots: {machine()}")
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        results: dict[tuple[str, int], dict[str, list[float]]] = {}
        refused: dict[tuple[str, int], str] = {}  # pyvmm refused it: nothing of that size is measured any more
        peer_refused: dict[tuple[str, int], str] = {}  # the bare sequence refused it: pyvmm's figures still are
        for _ in range(args.rounds):
            for backing in backings:
                for mib in sizes:
                    key = (backing, mib)
                    if key in refused:
                        continue
                    r = results.setdefault(key, {k: [] for k in (
                        "total", "ioctl", "mmap", "before", "after", "bare", "bare_ioctl", "bare_mmap")})
                    try:  # each after an untimed one of the same size: a first call after another size finds
                        # cold caches (tens of microseconds here, whatever the size)
                        with_pyvmm(mib << 20, backing)
                        got = with_pyvmm(mib << 20, backing)
                    except Refused as err:
                        refused[key] = str(err)
                        continue
                    for k, v in got.items():
                        r[k].append(v)
                    if key not in peer_refused:
                        try:
                            bare(kvm, mib << 20, backing)
                            bare_total, bare_ioctl, bare_mmap = bare(kvm, mib << 20, backing)
                        except Refused as err:
                            peer_refused[key] = str(err)
                        else:
                            r["bare"].append(bare_total)
                            r["bare_ioctl"].append(bare_ioctl)
                            r["bare_mmap"].append(bare_mmap)
                    if mib == sizes[-1] and len(sizes) > 1:  # the control: the smallest size, right after the largest
                        c = results.setdefault((backing, "control"), {k: [] for k in ("before", "after")})
                        with_pyvmm(mib << 20, backing)
                        got = with_pyvmm(sizes[0] << 20, backing)
                        c["before"].append(got["before"])
                        c["after"].append(got["after"])
    finally:
        os.close(kvm)
    for backing in backings:
        header(f"slot set-up, {backing} backing, one slot at {GPA:#x} on a fresh VM ({args.rounds} interleaved rounds)")
        own_medians = []
        for mib in sizes:
            key = (backing, mib)
            if key in refused:
                print(f"  {label(mib):>7}: refused by this host to pyvmm: {refused[key]}")
                continue
            r = results[key]
            show(f"  {label(mib):>7}  pyvmm add_memory", r["total"], "µs", [(r["bare"], "bare")])
            show("    of which KVM_SET_USER_MEMORY_REGION", r["ioctl"], "µs", [(r["bare_ioctl"], "bare ioctl")])
            show("    of which the backing's mmap", r["mmap"], "µs", [(r["bare_mmap"], "bare mmap")])
            show("    of which pyvmm's own part before the ioctl", r["before"], "µs")
            show("    of which pyvmm's own part after it", r["after"], "µs")
            peer_name = f"    bare {'memfd+' if backing == 'memfd' else ''}mmap+ioctl (the peer)"
            later = f" from round {len(r['bare']) + 1} on" if r["bare"] else ""
            show(peer_name, r["bare"], "µs", note=f"refused by this host to the bare sequence{later}: "
                 f"{peer_refused[key]}" if key in peer_refused else "")
            own_medians.append((mib, *(statistics.median(r[k]) if r[k] else None
                                       for k in ("before", "after", "bare_mmap"))))
        control = results.get((backing, "control"))
        if len(own_medians) > 1 and control and control["before"]:
            (small, a1, a2, a3), (large, b1, b2, b3) = own_medians[0], own_medians[-1]
            show(f"  control: {label(small)} right after a {label(large)} slot", control["before"], "µs",
                 note="(pyvmm's own part before the ioctl)")
            c1, c2 = statistics.median(control["before"]), statistics.median(control["after"])
            print(f"  {label(large)} against {label(small)} (medians): pyvmm's own part before the ioctl {b1 / a1:.2f}x "
                  f"(against the control: {b1 / c1:.2f}x), after it {b2 / a2:.2f}x (control {b2 / c2:.2f}x); the bare "
                  "mmap, the same call whatever the size, "
                  + (f"{b3 / a3:.2f}x" if a3 and b3 else "not measured at both sizes (refused to the bare sequence)"))
            print("  (flat is about 1x.  The control runs the smallest size in the state the largest leaves the machine "
                  "in:\n   when it is as slow, the growth is the machine's (cold caches after KVM allocated and zeroed "
                  "its large\n   per-slot arrays, and freed them), not pyvmm's code.  After the ioctl, the control's own "
                  "ioctl is small:\n   the large one has just zeroed tens of MiB, and pyvmm's few lines after it run "
                  "on what that left in the caches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
