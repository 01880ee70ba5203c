"""virtio for pKVM protected VMs, in the lab (scripts/lab test): the restricted DMA pool, ACCESS_PLATFORM, and
devices that touch nothing but the memory the guest shared.

- The pKVM-guest kernel (/opt/lab/pkvm-guest/Image: Debian's linux-source-7.2 with CONFIG_ARM_PKVM_GUEST and
  CONFIG_DMA_RESTRICTED_POOL, built by scripts/lab) boots as a protected and as a normal VM with every device
  at once and does the virtio tests' work: sha256 of a read disk, a pattern written to a second disk and found
  in the host file, /dev/hwrng, ping and a TCP transfer over virtio-net, a shell on hvc0.  On the protected VM
  every device access fell inside the pool (counted: none outside, none refused).
- Debian's own kernel (no pKVM-guest support) as a protected guest with a disk: nothing crashes, no private
  page is touched, the guest's I/O never completes, and pyvmm names the cause.
- firmware/arm64/virtio-pkvm.S, the smallest reproducer: a bare-metal guest that shares its queue pages with
  MEM_SHARE inside the pool; and the same guest with the share left out (rings in its private memory).
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import subprocess
import sys

import pytest

from pyvmm import hostmem
from pyvmm.outcome import ExitKind
from tests.arm64 import guest, require_arm64_kvm, require_pkvm, require_protected_linux
from tests.linux_guest import CMDLINE, IMAGE, MARK, initrd_with_script, lines, marked, require_virtio_linux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKVM_IMAGE = "/opt/lab/pkvm-guest/Image"
OUT = "pyvmm-test: "
PATTERN = b"pyvmm virtio-blk pattern 0123456789abcdef\n"
DISK_A = 16 << 20
DISK_B, WRITE_AT, WRITE_LEN = 2 << 20, 512 << 10, 1 << 20

EVERYTHING = r"""out() { echo "pyvmm-test: $*"; }
waitfor /dev/vda && waitfor /dev/vdb && waitfor /dev/hwrng && waitfor /sys/class/net/eth0 && waitfor /dev/hvc0
out "cpus $(grep -c ^processor /proc/cpuinfo)"
out "pool $(dmesg | grep -o 'created restricted DMA pool.*' | head -n 1)"
out "vda sha256 $(sha256sum /dev/vda | cut -d' ' -f1)"
yes '%(pattern)s' | head -c %(length)d | dd of=/dev/vdb bs=4096 seek=%(seek)d conv=fsync 2>/dev/null
out "dd status $?"
sync
out "rng $(cat /sys/class/misc/hw_random/rng_current | cut -d. -f1)"
out "hwrng bytes $(dd if=/dev/hwrng bs=4096 count=16 iflag=fullblock 2>/dev/null | wc -c)"
ip link set eth0 up && ip addr add 10.0.2.2/24 dev eth0
ping -c 3 -W 5 10.0.2.1 >/tmp/ping.out 2>&1
out "ping status $?"
out "ping $(grep -o '[0-9]* packets received' /tmp/ping.out)"
nc 10.0.2.1 5000 </dev/vda
out "nc status $?"
out "hvc0 shell"
drain
sh -c 'exec setsid -c sh -i' </dev/hvc0 >/dev/hvc0 2>&1
"""


def tail(console: str) -> str:
    return "\n".join(lines(console)[-80:])


def random_file(path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def require_pkvm_guest_kernel() -> None:
    require_virtio_linux()
    if not os.path.exists(PKVM_IMAGE):
        pytest.skip(f"{PKVM_IMAGE} (Linux with CONFIG_ARM_PKVM_GUEST, built from Debian's linux-source-7.2) is made "
                    "by the lab: scripts/lab test")


@pytest.mark.timeout(660)
@pytest.mark.parametrize("kind", ["protected", "normal"])
def test_pkvm_guest_kernel_runs_every_device(tmp_path, kind):
    require_pkvm_guest_kernel()
    if kind == "protected":
        require_pkvm()
        require_protected_linux()
    if not hasattr(os, "unshare"):
        pytest.skip("os.unshare needs Python 3.12 or later (the lab has 3.13)")
    disk_a = random_file(tmp_path / "a.img", DISK_A)
    before = random_file(tmp_path / "b.img", DISK_B)
    pattern = (PATTERN * (WRITE_LEN // len(PATTERN) + 1))[:WRITE_LEN]
    script = EVERYTHING % {"pattern": PATTERN.decode().strip(), "length": WRITE_LEN, "seek": WRITE_AT // 4096}
    os.replace(initrd_with_script(str(tmp_path), script), tmp_path / "initrd.cpio")
    res = subprocess.run([sys.executable, "-m", "tests.virtio_everything", str(tmp_path), PKVM_IMAGE, kind],
                         cwd=ROOT, capture_output=True, text=True, timeout=620, stdin=subprocess.DEVNULL)
    console = res.stdout
    assert res.returncode == 0, res.stderr[-4000:] + tail(console)
    host = dict(line[len("host: "):].split(" ", 1) for line in lines(console) if line.startswith("host: "))
    print(f"{kind}: {host.get('seconds')} s; exits {host.get('exits')}")
    assert MARK + "drivers built in" in "\n".join(lines(console)), tail(console)  # no modules: all built in
    got = [fact.rstrip() for fact in marked(console, OUT)]
    pool = json.loads(host["pool"])
    if kind == "protected":
        assert pool is not None
        pool_line = f"pool created restricted DMA pool at {pool[0]:#018x}, size {pool[1] >> 20} MiB"  # %pa: 16 digits
    else:
        assert pool is None  # a normal VM gets no pool unless asked (dma_pool=...)
        pool_line = "pool"
    assert got[:3] == ["cpus 2", pool_line, f"vda sha256 {hashlib.sha256(disk_a).hexdigest()}"], tail(console)
    assert got[3:] == ["dd status 0", "rng virtio_rng", "hwrng bytes 65536", "ping status 0",
                       "ping 3 packets received", "nc status 0", "hvc0 shell", "shell says 42"], tail(console)
    assert host["outcome"].startswith("power-off"), tail(console)
    assert host["shell"] == "answered"
    assert host["peer"] == "10.0.2.2" and int(host["received"]) == DISK_A
    assert host["sha256"] == hashlib.sha256(disk_a).hexdigest()
    after = (tmp_path / "b.img").read_bytes()
    assert after[WRITE_AT:WRITE_AT + WRITE_LEN] == pattern
    assert after[:WRITE_AT] == before[:WRITE_AT] and after[WRITE_AT + WRITE_LEN:] == before[WRITE_AT + WRITE_LEN:]
    memory = json.loads(host["device_memory"])
    assert len(memory) == 5 and json.loads(host["device_faults"]) == []
    if kind == "protected":  # the pool is the only guest memory a device touched
        assert all(m["outside"] == 0 and m["refused"] == 0 and m["shared"] > 0 for m in memory.values()), memory
        assert json.loads(host["forced_pages"]) == []
    else:  # no pool: the devices used the guest's own pages, and the count sees it
        assert all(m["outside"] > 0 and m["shared"] == 0 for m in memory.values()), memory
    exits = json.loads(host["exits"])
    assert "KVM_EXIT_HYPERCALL" not in exits  # MEM_SHARE is the hypervisor's own business: no exit reaches pyvmm
    assert exits.get("KVM_EXIT_MMIO", 0) > 0  # device registers outside memslots: ordinary MMIO exits


@pytest.mark.timeout(420)
def test_debian_kernel_as_protected_guest_gets_a_clear_refusal(tmp_path):
    """Debian's kernel has no CONFIG_ARM_PKVM_GUEST: its virtio rings and buffers are private pages.  pyvmm reads
    none of them; the disk never answers; the output names device, queue, GPA and the likely cause."""
    require_virtio_linux()
    require_pkvm()
    require_protected_linux()
    random_file(tmp_path / "a.img", 1 << 20)
    script = 'echo "pyvmm-test: script reached"\npoweroff -f\n'
    initrd = initrd_with_script(str(tmp_path), script)
    report = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "pyvmm", "run", IMAGE, "--initrd", initrd, "--cmdline", CMDLINE,
                          "-m", "256M", "--protected", "--disk", str(tmp_path / "a.img"), "-t", "240",
                          "--report-json", str(report)],
                         cwd=ROOT, capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    out = res.stdout + res.stderr
    data = json.loads(report.read_text())
    faults = data["outcome"]["device_faults"]
    assert faults, out[-4000:]
    first = faults[0]
    assert first["device"] == "virtio-blk@0xb000000" and first["queue"] == 0, first
    assert "CONFIG_ARM_PKVM_GUEST" in first["cause"] and "CONFIG_DMA_RESTRICTED_POOL" in first["cause"]
    page = first["gpa"] - first["gpa"] % hostmem.PAGE_SIZE  # pyvmm names the host page
    assert f"guest page {page:#x} is private to the protected guest" in first["line"], first["line"]
    assert "virtio-blk queue 0" in first["line"]
    pool = re.search(r"outside the DMA pool \[(0x[0-9a-f]+), (0x[0-9a-f]+)\)", first["line"])
    assert pool and not int(pool[1], 16) <= first["gpa"] < int(pool[2], 16), first["line"]
    assert "device request(s) refused" in res.stderr and first["line"] in res.stderr
    memory = data["outcome"]["device_memory"]["virtio-blk@0xb000000"]
    assert memory["outside"] == 0 and memory["refused"] >= 1, memory
    print("\n".join(l for l in res.stderr.splitlines() if l.startswith("pyvmm:"))[-3000:])
    print(f"outcome: {data['outcome']['kind']} ({data['outcome']['detail']}), status {res.returncode}")


# --- the bare-metal reproducer ---------------------------------------------------------------------------------
def _run_firmware(tmp_path, image: str):
    from pyvmm.vm import Vm

    disk = random_file(tmp_path / "disk.img", 1 << 20)
    with Vm(protected=True) as vm:
        vm.add_memory(64 << 20)
        vm.add_virtio_blk(str(tmp_path / "disk.img"))
        vm.add_virtio_console()
        vm.create_vcpus(1)
        vm.boot(guest(image))
        outcome = vm.run(timeout=120)
        return outcome, vm.console.text(), disk, vm


@pytest.mark.timeout(300)
def test_firmware_shares_its_queues_and_does_io(tmp_path):
    require_arm64_kvm()
    require_pkvm()
    outcome, console, disk, vm = _run_firmware(tmp_path, "virtio-pkvm")
    assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, (outcome.detail, console)
    # the granule HYP_MEMINFO gave the guest is the host's page size (16 KiB on scripts/lab --pages 16k): the
    # guest shares its 0x3000-byte region in as many granules as cover it
    granule = hostmem.PAGE_SIZE
    assert f"virtio-pkvm: shared {-(-0x3000 // granule)} pages (granule {granule:#010x})" in console, console
    assert console.count("features hi=0x00000003") == 2  # VERSION_1 and ACCESS_PLATFORM, offered by both
    assert "hello from a protected guest\n" in console
    assert f"virtio-pkvm: blk status 00 sector0 {disk[:16].hex()}" in console, console
    assert outcome.device_faults == []
    assert all(m["outside"] == 0 and m["refused"] == 0 and m["shared"] > 0 for m in outcome.device_memory.values())
    assert "KVM_EXIT_HYPERCALL" not in outcome.exits  # MEM_SHARE never reached the VMM
    assert vm.dma_pool is not None


@pytest.mark.timeout(300)
def test_firmware_without_the_share_gets_the_clear_error(tmp_path):
    require_arm64_kvm()
    require_pkvm()
    outcome, console, disk, vm = _run_firmware(tmp_path, "virtio-pkvm-noshare")
    assert "virtio-pkvm: private pages intact" in console, console
    assert "virtio-pkvm: blk needs reset" in console and "virtio-pkvm: console needs reset" in console
    assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0xA0, (outcome.detail, console)  # refused, intact
    assert outcome.device_faults, (outcome.detail, console)
    for fault in outcome.device_faults:
        assert fault.queue is not None and not vm.dma_pool.gpa <= fault.gpa < vm.dma_pool.end
        assert "outside the DMA pool" in fault.line and "likely cause:" in fault.line
    assert all(m["outside"] == 0 and m["shared"] == 0 for m in outcome.device_memory.values())
    assert not vm.memory.forced_pages
