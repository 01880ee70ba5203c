"""The cost of one exit: pyvmm's run loop against a bare Python loop around KVM_RUN and a C VMM, on the same guest.

    scripts/dev bench exits                       (x86_64: builds the guests and the C peer, then runs this)
    .venv/bin/python benchmarks/exits.py [--count N] [--rounds R] [--no-pio]
    scripts/lab run -- python3 benchmarks/exits.py [--count N] [--rounds R] [--protected]    (arm64, in the lab)

The guest is firmware/<arch>/bench.S: it reads its bench register (one MMIO read), makes N exits (MMIO writes to
the bench register; on x86_64 also a second series with port I/O, outl), and writes the debug-exit register: N + 2
exits a run.  Each of them is handled by, in turn, within every round (rounds are interleaved):

1. the C peer (benchmarks/cvmm.c, built by benchmarks/Makefile): the floor for the exit path;
2. a bare Python loop around KVM_RUN on a VM pyvmm set up (memory, registers): ``fcntl.ioctl``, the exit reason and
   the MMIO/PIO fields read with ``struct`` from its own mapping of ``kvm_run``, the bench register answered, and
   nothing else: the least Python can do per exit;
3. the same loop calling libc's ``ioctl`` through ctypes (no argtypes), the way pyvmm reaches the kernel;
4. pyvmm's own run loop: ``Vm.run()`` with a device on the bench register that answers the read and drops the
   writes (the least a device can do), timed from the call to its return (the vCPU thread's start and join, a
   few hundred microseconds, are spread over the N exits).

Figures are the run's wall time divided by its exits (N + 2), as min/median/max over the rounds, with the ratio of
medians to the bare loops and to C.  The issue's target (issue 12): pyvmm at most 1.15x the bare Python loop.
"""
# bench-arches: x86_64 arm64   (scripts/dev bench runs this file on these architectures)

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import mmap
import os
import resource
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (ARCH, BENCH, CONFIG_PIO, add_bench_device, guest, header, machine,  # noqa: E402
                                run_peer, show)

KVM_RUN = 0xAE80  # _IO(KVMIO, 0x80), the same on x86_64 and arm64
KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_INTR = 2, 6, 10
IO_OUT = 1
DEBUG_EXIT_PORT = 0x501  # x86_64 (an OUT)
DEBUG_EXIT_MMIO = 0x0901_0000  # arm64 (an MMIO write)
RAM = 16 << 20  # pyvmm run's default

# struct kvm_run: exit_reason at 8; the exit union at 32 (mmio: phys_addr, data[8] at 40, len at 48, is_write at 52;
# io: direction, size, port, count, data_offset)
_u32 = struct.Struct("<I").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_io = struct.Struct("<BBHIQ").unpack_from
_put_u64 = struct.Struct("<Q").pack_into


def _ctypes_ioctl():
    """libc's ioctl through ctypes, as plain as it gets: no argtypes (Python ints go as C ints: right for KVM_RUN,
    0xae80, and its argument 0); a failure returns -1 and leaves errno (bare_loop reads it)."""
    call = ctypes.CDLL(None, use_errno=True)["ioctl"]
    call.restype = ctypes.c_int
    return call


CTYPES_IOCTL = _ctypes_ioctl()


def bare_loop(fd: int, run: mmap.mmap, config: int, ioctl) -> int:
    """KVM_RUN until the guest writes the debug-exit register; returns the number of exits."""
    exits = 0
    while True:
        try:
            if ioctl(fd, KVM_RUN, 0) < 0:  # ctypes: -1 and errno (fcntl.ioctl raises instead)
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, os.strerror(err))
        except InterruptedError:
            continue
        exits += 1
        reason = _u32(run, 8)[0]
        if reason == KVM_EXIT_MMIO:
            addr = _u64(run, 32)[0]
            if run[52]:  # a write: the bench register drops it, the debug-exit register ends the run
                if addr == DEBUG_EXIT_MMIO:
                    return exits
            else:
                _put_u64(run, 40, config if addr == BENCH else 0)
        elif reason == KVM_EXIT_IO:
            direction, size, port, count, offset = _io(run, 32)
            if direction == IO_OUT:
                if port == DEBUG_EXIT_PORT:
                    return exits
            else:
                run[offset:offset + size * count] = bytes(size * count)
        elif reason != KVM_EXIT_INTR:
            raise SystemExit(f"bare loop: unexpected exit reason {reason}")


def _vm(protected: bool, config: int | None):
    from pyvmm.vm import Vm

    vm = Vm(protected=protected)
    try:
        vm.add_memory(RAM)
        vm.create_vcpus(1)
        if config is not None:
            add_bench_device(vm, config)
        vm.boot(guest("bench"))
    except BaseException:
        vm.close()
        raise
    return vm


def _utime() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime  # every thread of this process


def bare_round(config: int, protected: bool, ioctl) -> tuple[float, float, int]:
    vm = _vm(protected, None)  # pyvmm sets the VM up; the loop below is all that runs it
    try:
        fd = vm.vcpus[0].fileno()
        run = mmap.mmap(fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            user, start = _utime(), time.perf_counter()
            exits = bare_loop(fd, run, config, ioctl)
            elapsed, user = time.perf_counter() - start, _utime() - user
        finally:
            run.close()
    finally:
        vm.close()
    return elapsed, user, exits


def pyvmm_round(config: int, protected: bool) -> tuple[float, float, int]:
    from pyvmm.outcome import ExitKind

    vm = _vm(protected, config)
    try:
        user, start = _utime(), time.perf_counter()
        outcome = vm.run(timeout=3600)
        elapsed, user = time.perf_counter() - start, _utime() - user
    finally:
        vm.close()
    if outcome.kind is not ExitKind.GUEST_EXIT or outcome.status != 0:
        raise SystemExit(f"pyvmm: the bench guest ended with {outcome.kind.value} ({outcome.detail})")
    counted = sum(outcome.exits.values())  # pyvmm's own count, where it keeps one
    return elapsed, user, counted or (config & 0xFFFF_FFFF) + 2


def peer_round(config: int, protected: bool) -> tuple[float, float, int]:
    args = ["--quiet", "--count", str(config & 0xFFFF_FFFF)]
    args += ["--pio"] if config & CONFIG_PIO else []
    args += ["--protected"] if protected else []
    report = run_peer([*args, guest("bench")])
    return int(report["run-ns"]) / 1e9, float(report["utime"]), int(report["exits"])


KINDS = {
    "c": "C peer (benchmarks/cvmm.c)",
    "fcntl": "bare Python loop, fcntl.ioctl",
    "ctypes": "bare Python loop, ctypes ioctl",
    "pyvmm": "pyvmm, Vm.run()",
}


def measure(config: int, rounds: int, protected: bool) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """({kind: wall seconds per exit}, {kind: user CPU seconds per exit}), one value per round."""
    expected = (config & 0xFFFF_FFFF) + 2
    wall: dict[str, list[float]] = {k: [] for k in KINDS}
    user: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(rounds):
        for kind in KINDS:
            if kind == "c":
                elapsed, cpu, exits = peer_round(config, protected)
            elif kind == "pyvmm":
                elapsed, cpu, exits = pyvmm_round(config, protected)
            else:
                elapsed, cpu, exits = bare_round(config, protected, fcntl.ioctl if kind == "fcntl" else CTYPES_IOCTL)
            if exits != expected:
                raise SystemExit(f"{KINDS[kind]}: {exits} exits, expected {expected}")
            wall[kind].append(elapsed / exits)
            user[kind].append(cpu / exits)
    return wall, user


def report(title: str, wall: dict[str, list[float]], user: dict[str, list[float]]) -> None:
    header(title)
    c, bare, bare_ctypes = wall["c"], wall["fcntl"], wall["ctypes"]
    show(f"  {KINDS['c']}", c, "µs")
    show(f"  {KINDS['fcntl']}", bare, "µs", [(c, "C")])
    show(f"  {KINDS['ctypes']}", bare_ctypes, "µs", [(bare, "bare fcntl"), (c, "C")])
    show(f"  {KINDS['pyvmm']}", wall["pyvmm"], "µs",
         [(bare, "bare fcntl"), (bare_ctypes, "bare ctypes"), (c, "C")], note="(target: <= 1.15x bare)")
    print("  of which user CPU time (the VMM's own work; the rest is the kernel's; sampled at the tick):")
    for kind, name in KINDS.items():
        show(f"    {name}", user[kind], "µs", [] if kind in ("c", "fcntl") else [(user["fcntl"], "bare fcntl")])


def main() -> int:
    lab = ARCH == "arm64"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000 if lab else 20000,
                        help="exits per run (default 20000; 2000 on arm64, whose lab is emulated)")
    parser.add_argument("--rounds", type=int, default=5 if lab else 7, help="interleaved rounds (default 7; 5 on arm64)")
    parser.add_argument("--no-pio", action="store_true", help="x86_64: skip the port I/O series")
    parser.add_argument("--protected", action="store_true", help="arm64: protected VMs (pKVM) for all three")
    args = parser.parse_args()
    print(f"exits: {machine()}")
    print(f"guest: firmware/{ARCH}/bench, {args.count} exits + 2 a run, {RAM >> 20} MiB, 1 vCPU"
          + (", protected VMs" if args.protected else ""))
    series = [("MMIO writes", args.count)]
    if ARCH == "x86_64" and not args.no_pio:
        series.append(("port I/O writes (outl)", args.count | CONFIG_PIO))
    for name, config in series:
        wall, user = measure(config, args.rounds, args.protected)
        report(f"cost per exit, {name} ({args.rounds} interleaved rounds; wall time / exits)", wall, user)
    return 0


if __name__ == "__main__":
    sys.exit(main())
