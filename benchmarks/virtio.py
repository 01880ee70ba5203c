"""virtio benchmarks, run inside the arm64 lab (Linux guest with Debian's own virtio drivers):

    scripts/lab run -- python3 benchmarks/virtio.py [--size-mib N] [--rounds R]

1. virtio-blk sequential read: the guest reads the whole disk with ``dd bs=1M`` (timed by the guest's
   own clock); its peer is the lab host reading the same file itself (1 MiB reads, page cache dropped
   between rounds where the host allows it), measured in the same run.  Ratio = guest / host.
2. virtio notifications per second: the guest reads 64 KiB from /dev/hwrng (virtio-rng: one request,
   notification and interrupt per 64 bytes) with ioeventfd+irqfd, ioeventfd only, irqfd only, and
   neither (every QueueNotify on the vCPU's exit path, every interrupt with KVM_IRQ_LINE).

Rounds are interleaved (host, guest, host, guest...) and each figure is printed as min/median/max with
the ratio to its peer.  Timing belongs here, not in the tests.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyvmm.devices.virtio import VirtioRng  # noqa: E402
from tests.linux_guest import boot  # noqa: E402

GUEST_CLOCK = r"""
now() { cat /proc/uptime | cut -d' ' -f1; }
"""


def _guest_seconds(console: str, key: str) -> float:
    m = re.search(rf"bench: {key} ([0-9.]+) ([0-9.]+)", console)
    if not m:
        raise SystemExit(f"the guest did not report {key}:\n{console[-3000:]}")
    return float(m.group(2)) - float(m.group(1))


def _drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def host_read(path: str) -> float:
    _drop_caches()
    start = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return time.monotonic() - start


def guest_read(directory: str, path: str) -> float:
    script = GUEST_CLOCK + r"""
while [ ! -e /dev/vda ]; do sleep 0.1; done
t0=$(now); dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; t1=$(now)
echo "bench: blk $t0 $t1"
poweroff -f
"""
    outcome, console = boot(directory, script, lambda vm: vm.add_virtio_blk(path, readonly=True), timeout=1800)
    return _guest_seconds(console, "blk")


def guest_rng(directory: str, ioeventfd: bool, irqfd: bool, kib: int = 64) -> float:
    script = GUEST_CLOCK + rf"""
while [ ! -e /dev/hwrng ]; do sleep 0.1; done
t0=$(now); dd if=/dev/hwrng of=/dev/null bs=1024 count={kib} 2>/dev/null; t1=$(now)
echo "bench: rng $t0 $t1"
poweroff -f
"""
    outcome, console = boot(directory, script,
                            lambda vm: vm.add_virtio(VirtioRng(), ioeventfd=ioeventfd, irqfd=irqfd), timeout=1800)
    return _guest_seconds(console, "rng")


def show(name: str, values: list[float], unit: str, peer: list[float] | None = None, peer_name: str = "") -> None:
    med = statistics.median(values)
    line = f"{name:<44} min {min(values):9.3f}  median {med:9.3f}  max {max(values):9.3f} {unit}"
    if peer:
        line += f"   {med / statistics.median(peer):6.3f}x {peer_name}"
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64, help="disk size for the blk read (default 64)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not os.path.exists("/opt/lab/virtio-initrd.cpio"):
        raise SystemExit("run inside the lab: scripts/lab run -- python3 benchmarks/virtio.py")
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory() as directory:
        disk = os.path.join(directory, "disk.img")
        with open(disk, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        host, guest = [], []
        for _ in range(args.rounds):
            host.append(size / host_read(disk) / (1 << 20))
            guest.append(size / guest_read(directory, disk) / (1 << 20))
        print(f"virtio-blk sequential read, {args.size_mib} MiB, dd bs=1M ({args.rounds} interleaved rounds)")
        show("  lab host reads the file itself", host, "MiB/s")
        show("  guest reads /dev/vda through virtio-blk", guest, "MiB/s", host, "of the host's read")

        configs = [(True, True), (True, False), (False, True), (False, False)]
        rates: dict[tuple[bool, bool], list[float]] = {c: [] for c in configs}
        requests = 64 * 1024 // 64
        for _ in range(args.rounds):
            for c in configs:
                rates[c].append(requests / guest_rng(directory, *c))
        print(f"virtio notifications: {requests} virtio-rng requests of 64 bytes (64 KiB from /dev/hwrng)")
        base = rates[(True, True)]
        for (ioev, irq), values in rates.items():
            name = f"  ioeventfd {'on ' if ioev else 'off'} irqfd {'on ' if irq else 'off'}"
            show(name, values, "req/s", None if (ioev and irq) else base, "of ioeventfd+irqfd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
