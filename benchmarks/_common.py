"""What the benchmarks of benchmarks/ share: where things are, the C peer, the bench guest's device, and how a
figure is printed (min/median/max over interleaved rounds, with the ratio of medians to a peer measured in the
same run).  Not a benchmark itself (``scripts/dev bench`` runs the files without a leading underscore)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ARCH = {"x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())
BUILD = os.path.join(ROOT, "firmware", ARCH, "build")
PEER = os.path.join(BUILD, "bench-cvmm")  # benchmarks/cvmm.c, built by benchmarks/Makefile

# The bench guest (firmware/<arch>/bench.S): its register, what it answers, and the x86 port it writes.
BENCH = 0xD080_0000 if ARCH == "x86_64" else 0x0A80_0000
BENCH_SIZE = 0x1000
BENCH_PORT = 0x520
CONFIG_PIO = 1 << 32
CONFIG_TOUCH = 1 << 33

LAB_IMAGE = "/opt/lab/Image"


def in_lab() -> bool:
    return os.path.exists(LAB_IMAGE)


def guest(name: str) -> str:
    path = os.path.join(BUILD, name)
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: build the guests (make -C firmware/{ARCH}, or scripts/dev bench)")
    return path


def peer() -> str:
    """The C peer's binary for this machine, built (make -C benchmarks host) when missing and make is here."""
    if not os.path.exists(PEER) and shutil.which("make") and not in_lab():
        subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "benchmarks"), "host"], check=False)
    if not os.path.exists(PEER):
        raise SystemExit(f"{PEER} is missing: `make -C benchmarks` builds it (scripts/dev bench does); in the lab "
                         "it comes from the host's build (scripts/lab builds it before it boots)")
    return PEER


def run_peer(args: list[str]) -> dict[str, str]:
    """Run the C peer with ARGS; its ``cvmm: KEY=VALUE ...`` report lines as one dict (values as text), plus its
    user and system CPU time (``utime``, ``stime``, seconds) and peak RSS (``maxrss``, bytes) from wait4."""
    proc = subprocess.Popen([peer(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    report = parse_peer(err)
    if proc.returncode != 0:
        raise SystemExit(f"the C peer failed ({' '.join(args)}): status {proc.returncode}\n{err[-2000:]}")
    report.update(utime=str(usage.ru_utime), stime=str(usage.ru_stime), maxrss=str(usage.ru_maxrss * 1024))
    return report


def parse_peer(text: str) -> dict[str, str]:
    report: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("cvmm: "):
            report.update(re.findall(r"([a-z-]+)=(\S+)", line[6:]))
    return report


def spawn(cmd: list[str], env: dict | None = None, marker: bytes | None = None, check: bool = True) -> dict:
    """Run CMD (in ROOT) with its stdout and stderr read here.  Seconds from the spawn to its first stdout byte
    ("first"; None without output), to the first line holding MARKER ("marker"), to its exit ("exit", after
    wait4); its output ("out", "err"), exit status ("status"), and from wait4 its user and system CPU ("utime",
    "stime", seconds) and peak RSS ("maxrss", bytes); "report": a C peer's report times, made relative; "t0": the
    spawn's CLOCK_MONOTONIC time in ns, which the times count from."""
    t0 = time.monotonic_ns()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    first = mark = None
    out = bytearray()
    err = bytearray()

    def drain_stderr() -> None:  # a child that fills the stderr pipe must not stall its stdout
        while chunk := os.read(proc.stderr.fileno(), 65536):
            err.extend(chunk)

    reader = threading.Thread(target=drain_stderr, daemon=True)
    reader.start()
    fd = proc.stdout.fileno()
    while chunk := os.read(fd, 65536):
        now = time.monotonic_ns()
        if first is None:
            first = now
        out += chunk
        if marker is not None and mark is None and marker in out:
            mark = now
    _, status, usage = os.wait4(proc.pid, 0)
    t_exit = time.monotonic_ns()
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    proc.stderr.close()
    text = err.decode(errors="replace")
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit status {proc.returncode}\n{text[-2000:]}")
    report = {k: (int(v) - t0) / 1e9 for k, v in parse_peer(text).items()
              if v.isdigit() and k in ("main", "first-run", "first-exit", "end")}
    seconds = lambda t: None if t is None else (t - t0) / 1e9  # noqa: E731
    return {"t0": t0, "first": seconds(first), "marker": seconds(mark), "exit": seconds(t_exit), "out": bytes(out),
            "err": text, "status": proc.returncode, "utime": usage.ru_utime, "stime": usage.ru_stime,
            "maxrss": usage.ru_maxrss * 1024, "report": report}


class BenchDevice:
    """The bench register for pyvmm's own run loop: a read at offset 0 answers CONFIG, writes are dropped.
    The least a device can do: what is measured is pyvmm's exit path, not a device."""

    def __init__(self, config: int):
        self.config = config.to_bytes(8, "little")

    def read(self, offset: int, size: int) -> bytes:
        return self.config[offset:offset + size].ljust(size, b"\0") if offset < 8 else bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


def add_bench_device(vm, config: int) -> None:
    device = BenchDevice(config)
    vm.mmio_bus.insert(device, BENCH, BENCH_SIZE, "bench")
    if ARCH == "x86_64":
        vm.io_bus.insert(device, BENCH_PORT, 4, "bench-port")


# --- printing ---------------------------------------------------------------------------------
UNITS = {"ns": 1e-9, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "MB": 1e6, "KiB": 1024.0, "MiB": float(1 << 20), "%": 0.01}


def show(name: str, values: list[float], unit: str, peers: list[tuple[list[float], str]] = (), width: int = 50,
         note: str = "") -> None:
    """One figure: min/median/max of VALUES (in base units: seconds, bytes) shown in UNIT, then for each
    (peer values, peer name) the ratio of the medians.  An empty VALUES prints NOTE (why there is none)."""
    if not values:
        print(f"{name:<{width}} {note or 'not measured'}", flush=True)
        return
    scale = UNITS.get(unit, 1.0)
    med = statistics.median(values)
    line = (f"{name:<{width}} min {min(values) / scale:9.3f}  median {med / scale:9.3f}  "
            f"max {max(values) / scale:9.3f} {unit}")
    for peer_values, peer_name in peers:
        if peer_values:
            base = statistics.median(peer_values)
            line += f"   {med / base:6.2f}x {peer_name}" if base else f"   (no {peer_name})"
    if note:
        line += f"   {note}"
    print(line, flush=True)


def header(text: str) -> None:
    print(f"\n{text}", flush=True)


def machine() -> str:
    """One line on where this runs: architecture, cores, kernel, KVM flavour, Python."""
    kvm = "kvm"
    for module in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.exists(f"/sys/module/{module}"):
            kvm = module
            break
    if ARCH == "arm64":
        from pyvmm.hostinfo import kvm_arm_mode

        kvm = f"kvm-arm.mode={kvm_arm_mode() or '(default)'}"
    return (f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, {kvm}, "
            f"Python {platform.python_version()}{', in the lab' if in_lab() else ''}")
