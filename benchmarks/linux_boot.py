"""Linux boot to userspace in the arm64 lab: `pyvmm run` of Debian's Image with the lab's initrd, normal and protected,
against kvmtool on the same kernel, initrd and memory when the lab has it.

    scripts/lab run -- python3 benchmarks/linux_boot.py [--rounds R]
    (on x86_64 it only says that it applies to the lab: x86 Linux guests do not boot on this kvm_pvm machine)

The guest: /opt/lab/Image (Debian's arm64 kernel, the lab's own) with /opt/lab/guest-initrd.cpio (busybox; its init
prints "pyvmm-guest: Linux ... reached userspace" and powers off), 256 MiB, 1 vCPU, the command line of
tests/test_arm64_linux.py.  Each round (rounds are interleaved) spawns, as a child of this process:

1. ``python3 -m pyvmm run IMAGE --initrd INITRD -m 256M -c 1 --cmdline ...`` (a normal VM), spawned as
   ``python3 benchmarks/_guest_rss.py run ...``: the same run in the same process, which also reports, when the VM
   closes (after the guest powered off, before its memory is unmapped), the resident size of the guest RAM's
   mappings (the Rss of the /proc/self/smaps entries at the memslots' host addresses: the guest pages touched;
   that read, one walk of the VMM's page tables, comes after the "reached userspace" line, within the time to exit);
2. the same with ``--protected`` (a pKVM protected VM; skipped on a host without kvm-arm.mode=protected);
3. the peer, kvmtool (``lkvm run``, or the binary $LKVM names) with the same kernel, initrd, memory, vCPUs and
   command line (but its own earlycon: kvmtool's UART is elsewhere); without one, "no peer in this run".

For each: wall time from the spawn to the "reached userspace" line on its stdout and to its exit, its peak RSS,
user and system CPU time (wait4 on that child: its own, not the sum of the rounds); for pyvmm also the guest RAM
resident at the end and the peak RSS less it: pyvmm's own memory at its peak (the interpreter, pyvmm, its buffers),
the figure the RSS target is about.  Figures are min/median/max over the rounds with the ratio of medians to
kvmtool's.  The issue's targets (issue 12): to userspace <= kvmtool's 6.4 s (normal VM); peak RSS <= the guest
pages touched + 25 MB (MB: 10^6 bytes, as every RSS figure here); system CPU <= 1.0 s.
"""
# bench-arches: x86_64 arm64   (scripts/dev bench runs this file on these architectures; x86_64 only says so)

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _guest_rss  # noqa: E402
from benchmarks._common import ARCH, ROOT, header, machine, show, spawn  # noqa: E402

IMAGE = "/opt/lab/Image"
INITRD = "/opt/lab/guest-initrd.cpio"
MARKER = b"reached userspace"
CMDLINE = "console=ttyS0 earlycon=uart8250,mmio,0x9000000 oops=panic panic=-1 quiet"  # tests/test_arm64_linux.py
KVMTOOL_CMDLINE = "console=ttyS0 oops=panic panic=-1 quiet"
MEMORY_MIB = 256


def pyvmm_command(protected: bool) -> list[str]:
    """``python3 -m pyvmm run ...`` through benchmarks/_guest_rss.py (the same run, plus its guest RAM's RSS)."""
    return [sys.executable, os.path.join(ROOT, "benchmarks", "_guest_rss.py"), "run", IMAGE, "--initrd", INITRD,
            "-m", f"{MEMORY_MIB}M", "-c", "1", "--cmdline", CMDLINE, "-t", "1200",
            *(["--protected"] if protected else [])]


def kvmtool() -> str | None:
    return os.environ.get("LKVM") or shutil.which("lkvm")


def kvmtool_command(lkvm: str) -> list[str]:
    return [lkvm, "run", "--kernel", IMAGE, "--initrd", INITRD, "--mem", str(MEMORY_MIB), "--cpus", "1",
            "--console", "serial", "--params", KVMTOOL_CMDLINE]


def boot(cmd: list[str], what: str) -> dict:
    got = spawn(cmd, marker=MARKER, check=False)
    if got["marker"] is None:
        raise SystemExit(f"{what} never reached userspace (exit status {got['status']}): "
                         f"{' '.join(cmd)}\n{got['out'].decode(errors='replace')[-2000:]}\n{got['err'][-1000:]}")
    guest = _guest_rss.parse(got["err"])
    if guest is not None and "rss-kb" in guest:  # pyvmm's runs: the guest RAM resident when the VM closed
        got["guest"] = int(guest["rss-kb"]) * 1024
        got["own"] = got["maxrss"] - got["guest"]
    elif guest is not None:
        got["guest_error"] = guest.get("error", "?")
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    args = parser.parse_args()
    if ARCH != "arm64" or not os.path.exists(IMAGE):
        print("linux_boot: applies to the arm64 lab (Debian's arm64 Image and the lab's initrd; x86 Linux guests do "
              "not boot on this machine): scripts/lab run -- python3 benchmarks/linux_boot.py")
        return 0
    from pyvmm.hostinfo import kvm_arm_mode

    kinds = {"pyvmm, normal VM": pyvmm_command(False)}
    if kvm_arm_mode() == "protected":
        kinds["pyvmm, protected VM"] = pyvmm_command(True)
    lkvm = kvmtool()
    if lkvm:
        kinds["kvmtool (lkvm), normal VM"] = kvmtool_command(lkvm)
    print(f"linux_boot: {machine()}")
    print(f"  {IMAGE} + {INITRD}, {MEMORY_MIB} MiB, 1 vCPU; command line: {CMDLINE}")
    for name, cmd in kinds.items():
        print(f"  {name}: {' '.join(cmd)}")
    if not lkvm:
        print("  kvmtool: no peer in this run (no lkvm on PATH or in $LKVM; Debian sid has no kvmtool for arm64)")
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name, cmd in kinds.items():
            results[name].append(boot(cmd, name))
    peer = results.get("kvmtool (lkvm), normal VM", [])

    def figure(key: str) -> list[float]:
        return [r[key] for r in peer]

    for title, key, unit, target in (
            ("wall time to the 'reached userspace' line", "marker", "s", "normal VM <= kvmtool's (6.4 s)"),
            ("wall time to exit (power-off)", "exit", "s", ""),
            ("peak RSS (wait4 ru_maxrss)", "maxrss", "MB", "<= guest pages touched + 25 MB"),
            ("user CPU time", "utime", "s", ""),
            ("system CPU time", "stime", "s", "<= 1.0 s")):
        header(f"{title} ({args.rounds} interleaved rounds){': target ' + target if target else ''}")
        for name, runs in results.items():
            values = [r[key] for r in runs]
            is_peer = name.startswith("kvmtool")
            show(f"  {name}", values, unit, [] if is_peer else [(figure(key), "kvmtool")],
                 note="" if peer or is_peer else "(no peer in this run)")
        if "pyvmm, protected VM" in results and key in ("marker", "stime"):
            normal = [r[key] for r in results["pyvmm, normal VM"]]
            show("  protected against normal", [r[key] for r in results["pyvmm, protected VM"]], unit,
                 [(normal, "normal VM")])
    header(f"peak RSS against the guest pages touched ({args.rounds} interleaved rounds): target peak RSS - guest "
           "RAM resident <= 25 MB")
    print("  (guest RAM resident: the Rss of the memslots' mappings in the VMM's /proc/self/smaps when the VM closes, "
          "after\n   the power-off: what the guest touched and pyvmm loaded into it.  pyvmm's own = peak RSS - that: "
          "its memory\n   at its peak, whatever the guest holds)")
    for name, runs in results.items():
        if name.startswith("kvmtool"):
            continue
        errors = sorted({r["guest_error"] for r in runs if "guest_error" in r})
        missing = "" if all("guest" in r for r in runs) else (
            f"(not measured in every round: {', '.join(errors)})" if errors else
            "(no bench-guest-rss line from benchmarks/_guest_rss.py in some round)")
        own = [r["own"] for r in runs if "own" in r]
        verdict = ""
        if own:
            verdict = ("(target <= 25 MB: met in every round)" if max(own) <= 25e6 else
                       f"(target <= 25 MB: not met in {sum(o > 25e6 for o in own)} of {len(own)} rounds)")
        show(f"  {name}: peak RSS", [r["maxrss"] for r in runs], "MB", width=58)
        show("    guest RAM resident at the end", [r["guest"] for r in runs if "guest" in r], "MB", width=58,
             note=missing)
        show("    pyvmm's own: peak RSS - guest RAM resident", own, "MB", width=58, note=missing or verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
