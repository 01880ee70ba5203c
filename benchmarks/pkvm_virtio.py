"""virtio in pKVM protected VMs: what protection and bouncing cost, inside the arm64 lab:

    scripts/lab run -- python3 benchmarks/pkvm_virtio.py [--size-mib N] [--rounds R]

The guest is the lab's pKVM-guest kernel (/opt/lab/pkvm-guest/Image: CONFIG_ARM_PKVM_GUEST and
CONFIG_DMA_RESTRICTED_POOL, virtio drivers built in) with the lab's virtio initramfs.

1. Boot time to userspace: host wall-clock from ``vm.run()`` to the init's first line ("reached
   userspace"), as a protected VM and as a normal one (the peer).  A protected VM pins every page the
   guest touches (pkvm_mem_abort) and the guest shares its DMA pool page by page (MEM_SHARE) at boot.
2. virtio-blk sequential read (``dd bs=1M`` of the whole disk, timed by the guest's clock), as a normal VM
   without a pool (no bouncing), a normal VM with the pool (swiotlb bounces every buffer: the copy alone),
   and a protected VM (bouncing and pKVM); the peer is the lab host reading the same file itself, measured
   in the same run.  Ratios: each to the host's read, and bouncing to the plain normal VM.

Rounds are interleaved; each figure is printed as min/median/max with its ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.virtio import GUEST_CLOCK, host_read, show  # noqa: E402
from tests.linux_guest import CMDLINE, MARK, initrd_with_script  # noqa: E402

PKVM_IMAGE = "/opt/lab/pkvm-guest/Image"
POOL = 8 << 20


def boot_time(directory: str, protected: bool) -> float:
    """Seconds from run() to the init's "reached userspace" line."""
    from pyvmm.vm import Vm

    reached: list[float] = []
    initrd = initrd_with_script(directory, "poweroff -f\n")
    with Vm(protected=protected) as vm:
        def echo(data: bytes) -> None:  # called with each piece of console output, as it comes
            if not reached and b"reached userspace" in vm.console.buffer:
                reached.append(time.monotonic())

        vm.console.echo = echo
        vm.add_memory(256 << 20)
        vm.create_vcpus(1)
        vm.boot(PKVM_IMAGE, initrd=initrd, cmdline=CMDLINE)
        start = time.monotonic()
        outcome = vm.run(timeout=600)
        if not reached:
            raise SystemExit(f"the guest never reached userspace ({outcome.detail}):\n{vm.console.text()[-3000:]}")
        if MARK + "drivers built in" not in vm.console.text():
            raise SystemExit("not the pKVM-guest kernel's initramfs run:\n" + vm.console.text()[-3000:])
        return reached[0] - start


def blk_read(directory: str, disk: str, protected: bool, pool: int | None) -> float:
    from tests.linux_guest import boot

    script = GUEST_CLOCK + r"""
while [ ! -e /dev/vda ]; do sleep 0.1; done
t0=$(now); dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; t1=$(now)
echo "bench: blk $t0 $t1"
poweroff -f
"""
    outcome, console = boot(directory, script, lambda vm: vm.add_virtio_blk(disk, readonly=True), timeout=1800,
                            protected=protected, image=PKVM_IMAGE, dma_pool=pool)
    m = re.search(r"bench: blk ([0-9.]+) ([0-9.]+)", console)
    if not m:
        raise SystemExit(f"the guest did not report its read ({outcome.detail}):\n{console[-3000:]}")
    return float(m.group(2)) - float(m.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=32, help="disk size for the blk read (default 32)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not os.path.exists(PKVM_IMAGE):
        raise SystemExit("run inside the lab: scripts/lab run -- python3 benchmarks/pkvm_virtio.py")
    size = args.size_mib << 20
    with tempfile.TemporaryDirectory() as directory:
        boots: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for protected in (False, True):
                boots[protected].append(boot_time(directory, protected))
        print(f"boot to userspace, pKVM-guest kernel, 256 MiB, 1 vCPU ({args.rounds} interleaved rounds)")
        show("  normal VM", boots[False], "s")
        show("  protected VM", boots[True], "s", boots[False], "of the normal VM's")

        disk = os.path.join(directory, "disk.img")
        with open(disk, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        kinds = {"normal VM, no pool": (False, 0), f"normal VM, {POOL >> 20} MiB pool (bounced)": (False, POOL),
                 f"protected VM, {POOL >> 20} MiB pool (bounced)": (True, POOL)}
        host: list[float] = []
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            host.append(size / host_read(disk) / (1 << 20))
            for name, (protected, pool) in kinds.items():
                rates[name].append(size / blk_read(directory, disk, protected, pool) / (1 << 20))
        print(f"virtio-blk sequential read, {args.size_mib} MiB, dd bs=1M ({args.rounds} interleaved rounds)")
        show("  lab host reads the file itself", host, "MiB/s")
        plain = rates["normal VM, no pool"]
        for name, values in rates.items():
            show(f"  {name}", values, "MiB/s", host, "of the host's read")
            if values is not plain:
                show("    the same against the normal VM without a pool", values, "MiB/s", plain,
                     "of no bouncing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
