"""Teardown: closing a 256 MiB VM whose guest touched all its memory, split into pyvmm's share and the kernel's,
against the C peer closing the same VM.

    scripts/dev bench teardown                   (x86_64: a normal VM)
    .venv/bin/python benchmarks/teardown.py [--rounds R] [--memory-mib M]
    scripts/lab run -- python3 benchmarks/teardown.py [--rounds R]        (arm64, in the lab: normal and protected)

The guest is firmware/<arch>/bench.S in its touch mode: it writes one word to every 4 KiB page of its RAM above the
first 2 MiB (which hold the image and, on x86_64, the boot tables), so every page of the guest is backed (on a
protected VM: donated to the guest, which the kernel must reclaim at teardown), then exits.  In each round
(rounds are interleaved), for each kind of VM:

1. the C peer (benchmarks/cvmm.c --touch): after the guest ends, it closes the vCPU (munmap of kvm_run, close),
   the GIC (arm64), the VM fd (the kernel destroys the VM: stage-2 tables, on pKVM the reclaim of every page the
   guest owned) and unmaps the guest RAM, pyvmm's order, and times each;
2. pyvmm: ``Vm.close()`` of the same VM after ``Vm.run()``, wall time; within it, the kernel's share is the time
   inside the system calls that free things (every ``os.close`` and every ``pyvmm.hostmem.munmap``, timed by
   wrapping those names while it closes), pyvmm's share the rest (Python: its bookkeeping, the device and vCPU
   objects; the tiny munmap of each vCPU's kvm_run goes through Python's mmap and counts as pyvmm's).  Also the
   process's user and system CPU time during the close (getrusage; sampled at the tick).

Figures are min/median/max over the rounds, with the ratio of medians to the C peer.  The issue's target (issue 12):
pyvmm's share at most 5% of the close, the rest explained (the kernel's).
"""
# bench-arches: x86_64 arm64   (scripts/dev bench runs this file on these architectures)

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ARCH, CONFIG_TOUCH, add_bench_device, guest, header, machine, run_peer, show  # noqa: E402


@contextlib.contextmanager
def timed_frees(spent: list[float], unmaps: list[float]):
    """While inside: the seconds of every os.close and pyvmm.hostmem.munmap call are appended to SPENT (and those
    of the munmaps to UNMAPS too)."""
    import pyvmm.hostmem as hostmem

    original_close, original_munmap = os.close, hostmem.munmap

    def timed(call, *into: list[float]):
        def wrapper(*args, **kw):
            start = time.perf_counter()
            try:
                return call(*args, **kw)
            finally:
                for where in into:
                    where.append(time.perf_counter() - start)
        return wrapper

    os.close, hostmem.munmap = timed(original_close, spent), timed(original_munmap, spent, unmaps)
    try:
        yield
    finally:
        os.close, hostmem.munmap = original_close, original_munmap


def pyvmm_round(memory: int, protected: bool) -> dict[str, float]:
    from pyvmm.outcome import ExitKind
    from pyvmm.vm import Vm

    vm = Vm(protected=protected)
    try:
        vm.add_memory(memory)
        vm.create_vcpus(1)
        add_bench_device(vm, CONFIG_TOUCH)
        vm.boot(guest("bench"))
        outcome = vm.run(timeout=3600)
        if outcome.kind is not ExitKind.GUEST_EXIT or outcome.status != 0:
            raise SystemExit(f"pyvmm: the bench guest ended with {outcome.kind.value} ({outcome.detail})")
    except BaseException:
        vm.close()
        raise
    spent: list[float] = []
    unmaps: list[float] = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    with timed_frees(spent, unmaps):
        start = time.perf_counter()
        vm.close()
        total = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if not unmaps:
        raise SystemExit("Vm.close() unmapped the guest RAM without pyvmm.hostmem.munmap: this benchmark's split no "
                         "longer matches pyvmm's code (timed_frees)")
    kernel = sum(spent)
    return {"total": total, "kernel": kernel, "own": total - kernel, "share": (total - kernel) / total,
            "utime": after.ru_utime - before.ru_utime, "stime": after.ru_stime - before.ru_stime}


def peer_round(memory: int, protected: bool) -> dict[str, float]:
    args = ["--quiet", "--touch", "--ram", str(memory >> 20)] + (["--protected"] if protected else [])
    report = run_peer([*args, guest("bench")])
    if report.get("status") != "0":
        raise SystemExit(f"the C peer: the bench guest ended with {report.get('outcome')} status {report.get('status')}")
    return {k: int(report[f"{k}-ns"]) / 1e9 for k in ("teardown", "vcpu", "gic", "vm", "munmap")}


def main() -> int:
    lab = ARCH == "arm64"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3 if lab else 7, help="interleaved rounds (default 7; 3 on arm64)")
    parser.add_argument("--memory-mib", type=int, default=256, help="guest RAM in MiB (default 256)")
    parser.add_argument("--kind", choices=("normal", "protected", "both"), default="both" if lab else "normal",
                        help="the VMs to close (default: normal on x86_64, both on arm64)")
    args = parser.parse_args()
    kinds = ["normal", "protected"] if args.kind == "both" else [args.kind]
    if "protected" in kinds:
        from pyvmm.hostinfo import kvm_arm_mode

        if ARCH != "arm64" or kvm_arm_mode() != "protected":
            print("teardown: no protected VMs on this host (arm64 pKVM: kvm-arm.mode=protected; run it in the lab)")
            kinds.remove("protected")
    memory = args.memory_mib << 20
    print(f"teardown: {machine()}")
    results = {k: {"c": [], "pyvmm": []} for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            results[kind]["c"].append(peer_round(memory, kind == "protected"))
            results[kind]["pyvmm"].append(pyvmm_round(memory, kind == "protected"))
    for kind in kinds:
        c, p = results[kind]["c"], results[kind]["pyvmm"]
        header(f"closing a {args.memory_mib} MiB {kind} VM after its guest touched every page ({args.rounds} "
               "interleaved rounds)")
        c_total = [r["teardown"] for r in c]
        show("  C peer, everything", c_total, "ms")
        show("    of which the vCPU (kvm_run munmap, close)", [r["vcpu"] for r in c], "ms")
        if ARCH == "arm64":
            show("    of which the GIC (close)", [r["gic"] for r in c], "ms")
        show("    of which the VM fd (close: KVM destroys the VM)", [r["vm"] for r in c], "ms")
        show("    of which the guest RAM (munmap)", [r["munmap"] for r in c], "ms")
        show("  pyvmm Vm.close()", [r["total"] for r in p], "ms", [(c_total, "C")])
        show("    of which the kernel's (close, munmap calls)", [r["kernel"] for r in p], "ms", [(c_total, "C")])
        show("    of which pyvmm's own (the rest: Python)", [r["own"] for r in p], "ms")
        show("    pyvmm's own share of Vm.close()", [r["share"] for r in p], "%", note="(target: <= 5%)")
        show("    user CPU during Vm.close() (getrusage)", [r["utime"] for r in p], "ms")
        show("    system CPU during Vm.close() (getrusage)", [r["stime"] for r in p], "ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
