"""pyvmm's virtio-mmio devices driven by Linux's own drivers: Debian's 7.2 arm64 kernel (the lab's Image) with
Debian's virtio_mmio, virtio_blk, virtio_rng and virtio_net modules (virtio_console is built in), from the
lab's /opt/lab/virtio-initrd.cpio (scripts/lab).  One guest boot per test; each test hands the guest a busybox
script (tests/linux_guest.py appends it as a second cpio archive) and asserts on the exact lines it prints.
Lab only: elsewhere every test skips saying why."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from pyvmm.outcome import ExitKind
from tests.linux_guest import (CMDLINE, IMAGE, MARK, Cli, assert_modules_loaded, boot, initrd_with_script, lines,
                               marked, require_virtio_linux)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = "pyvmm-test: "  # what the scripts below print, one fact per line
SCRIPT_HEAD = 'out() { echo "pyvmm-test: $*"; }\n'
PATTERN = b"pyvmm virtio-blk pattern 0123456789abcdef\n"  # 42 bytes: not a divisor of any sector


def facts(console: str) -> list[str]:
    return marked(console, OUT)


def tail(console: str) -> str:
    return "\n".join(lines(console)[-80:])


def random_file(path, size: int) -> bytes:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest.mark.timeout(420)
def test_modules_load_and_bind(tmp_path):
    """Every module loads, and each device pyvmm offers is bound to Linux's driver for its device ID."""
    require_virtio_linux("add_virtio_blk", "add_virtio_rng", "add_virtio_console")
    random_file(tmp_path / "disk.img", 1 << 20)

    def devices(vm):
        vm.add_virtio_blk(str(tmp_path / "disk.img"))
        vm.add_virtio_rng()
        vm.add_virtio_console()

    outcome, console = boot(str(tmp_path), None, devices)
    assert_modules_loaded(console)
    drivers = marked(console, MARK + "virtio drivers: ")
    assert drivers and {"virtio_blk", "virtio_console", "virtio_net", "virtio_rng"} <= set(drivers[0].split()), \
        tail(console)
    bound = {tuple(line.split()[2::2]) for line in marked(console, MARK + "virtio device ")}
    # "virtioN id 0x0002 driver virtio_blk" -> ("0x0002", "virtio_blk")
    assert bound == {("0x0002", "virtio_blk"), ("0x0004", "virtio_rng"), ("0x0003", "virtio_console")}, tail(console)
    assert MARK + "no script" in lines(console), tail(console)
    assert outcome.kind is ExitKind.POWER_OFF, (outcome.detail, tail(console))


@pytest.mark.timeout(600)
def test_blk_read_matches_host_sha256(tmp_path):
    """The guest reads a 64 MiB disk of random bytes through virtio-blk: its sha256 is the host's."""
    require_virtio_linux("add_virtio_blk")
    data = random_file(tmp_path / "disk.img", 64 << 20)
    script = SCRIPT_HEAD + r"""
waitfor /dev/vda
out "vda sectors $(cat /sys/block/vda/size)"
out "vda sha256 $(sha256sum /dev/vda | cut -d' ' -f1)"
poweroff -f
"""
    outcome, console = boot(str(tmp_path), script, lambda vm: vm.add_virtio_blk(str(tmp_path / "disk.img")),
                            timeout=500)
    assert_modules_loaded(console)
    assert facts(console) == [f"vda sectors {(64 << 20) // 512}", f"vda sha256 {hashlib.sha256(data).hexdigest()}"], \
        tail(console)
    assert outcome.kind is ExitKind.POWER_OFF, (outcome.detail, tail(console))


@pytest.mark.timeout(420)
def test_blk_write_reaches_the_host_file(tmp_path):
    """The guest writes a pattern with dd (at an offset, conv=fsync) to the second disk, vdb, and syncs: after
    power-off the host file holds exactly that pattern there and its old bytes everywhere else; vda (added
    first) is untouched."""
    require_virtio_linux("add_virtio_blk")
    first = random_file(tmp_path / "a.img", 1 << 20)
    before = random_file(tmp_path / "b.img", 2 << 20)
    offset, length = 512 << 10, 1 << 20  # seek=128 with bs=4096; the pattern repeated, cut at 1 MiB
    pattern = (PATTERN * (length // len(PATTERN) + 1))[:length]
    script = SCRIPT_HEAD + rf"""
waitfor /dev/vda && waitfor /dev/vdb
out "vda sectors $(cat /sys/block/vda/size)"
out "vdb sectors $(cat /sys/block/vdb/size)"
yes '{PATTERN.decode().strip()}' | head -c {length} | dd of=/dev/vdb bs=4096 seek={offset // 4096} conv=fsync 2>/dev/null
out "dd status $?"
sync
out "synced"
poweroff -f
"""

    def disks(vm):
        vm.add_virtio_blk(str(tmp_path / "a.img"))
        vm.add_virtio_blk(str(tmp_path / "b.img"))

    outcome, console = boot(str(tmp_path), script, disks)
    assert_modules_loaded(console)
    assert facts(console) == ["vda sectors 2048", "vdb sectors 4096", "dd status 0", "synced"], tail(console)
    assert outcome.kind is ExitKind.POWER_OFF, (outcome.detail, tail(console))
    after = (tmp_path / "b.img").read_bytes()
    assert len(after) == len(before)
    assert after[offset:offset + length] == pattern
    assert after[:offset] == before[:offset] and after[offset + length:] == before[offset + length:]
    assert (tmp_path / "a.img").read_bytes() == first


@pytest.mark.timeout(420)
def test_blk_readonly_refuses_writes(tmp_path):
    """A read-only disk (VIRTIO_BLK_F_RO): Linux marks it read-only, the guest's write fails (EPERM), a read
    still works, and the host file is unchanged."""
    require_virtio_linux("add_virtio_blk")
    data = random_file(tmp_path / "ro.img", 1 << 20)
    script = SCRIPT_HEAD + r"""
waitfor /dev/vda
out "vda ro $(cat /sys/block/vda/ro)"
dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=fsync 2>/tmp/dd.err
out "dd status $?"
out "dd error $(grep -o -e 'I/O error' -e 'Read-only file system' -e 'Operation not permitted' -e 'Permission denied' /tmp/dd.err | head -n 1)"
echo "pyvmm-info: dd said: $(cat /tmp/dd.err)"
out "vda sha256 $(sha256sum /dev/vda | cut -d' ' -f1)"
poweroff -f
"""
    outcome, console = boot(str(tmp_path), script, lambda vm: vm.add_virtio_blk(str(tmp_path / "ro.img"), readonly=True))
    print("\n".join(marked(console, "pyvmm-info: ")))  # what dd said (pytest -rP)
    assert_modules_loaded(console)
    got = facts(console)
    assert got[:1] == ["vda ro 1"], tail(console)
    assert len(got) == 4 and got[1] != "dd status 0", tail(console)
    # Linux refuses the write itself (blkdev_write_iter: EPERM for a disk its driver set read-only), so no
    # request reaches the device; pyvmm's IOERR answer to a write on a read-only disk is for drivers that try.
    assert got[2] == "dd error Operation not permitted", tail(console)
    assert got[3] == f"vda sha256 {hashlib.sha256(data).hexdigest()}", tail(console)
    assert outcome.kind is ExitKind.POWER_OFF, (outcome.detail, tail(console))
    assert (tmp_path / "ro.img").read_bytes() == data


@pytest.mark.timeout(600)
def test_rng_feeds_hwrng(tmp_path):
    """virtio-rng becomes the kernel's current hardware RNG, and /dev/hwrng gives 1 MiB of incompressible bytes."""
    require_virtio_linux("add_virtio_rng")
    script = SCRIPT_HEAD + r"""
waitfor /dev/hwrng
out "rng_current $(cat /sys/class/misc/hw_random/rng_current)"
irqs() { grep virtio /proc/interrupts | tr -s ' ' | tr '\n' ';'; }
echo "pyvmm-info: before: uptime $(cut -d' ' -f1 /proc/uptime) interrupts $(irqs)"
out "hwrng bytes $(dd if=/dev/hwrng bs=4096 count=256 iflag=fullblock 2>/dev/null | wc -c)"
echo "pyvmm-info: after: uptime $(cut -d' ' -f1 /proc/uptime) interrupts $(irqs)"
out "gzip of 64 KiB at least 64 KiB: $(test $(head -c 65536 /dev/hwrng | gzip -c | wc -c) -ge 65536 && echo yes || echo no)"
poweroff -f
"""
    # the hwrng core asks for 64 bytes at a time: 1 MiB is ~16400 virtio requests, about 130 s in the lab
    outcome, console = boot(str(tmp_path), script, lambda vm: vm.add_virtio_rng(), timeout=540)
    print("\n".join(marked(console, "pyvmm-info: ")))  # the read's time and interrupt counts (pytest -rP)
    assert_modules_loaded(console)
    got = facts(console)
    assert len(got) == 3 and re.fullmatch(r"rng_current virtio_rng\.\d+", got[0]), tail(console)
    assert got[1:] == ["hwrng bytes 1048576", "gzip of 64 KiB at least 64 KiB: yes"], tail(console)
    assert outcome.kind is ExitKind.POWER_OFF, (outcome.detail, tail(console))


# The hvc0 shell: on hvc0 and with hvc0 its controlling terminal (setsid -c in a child that is no group leader,
# so setsid needs no fork and the script waits for the shell); the console's lines go to pyvmm's stdout.
HVC_SHELL = r"""
waitfor /dev/hvc0
out "hvc0 shell"
drain  # the marker is out on ttyS0 before the shell's first words on hvc0: the two never interleave
sh -c 'exec setsid -c sh -i' </dev/hvc0 >/dev/hvc0 2>&1
out "hvc0 shell ended with status $?"
"""


def start_cli(tmp_path, script: str, *args: str) -> Cli:
    initrd = initrd_with_script(str(tmp_path), script)
    return Cli([IMAGE, "--initrd", initrd, "--cmdline", CMDLINE, "-m", "256M", "--console", "virtio", "-t", "400",
                *args], cwd=ROOT)


def shell_says(cli: Cli, command: str, answer: str, timeout: float = 60) -> None:
    """Type ``command`` into the hvc0 shell through pyvmm's stdin; wait for a line that is exactly ``answer``
    (the tty's echo of the command line is not that line)."""
    cli.send(command + "\n")
    cli.expect(lambda line: line.strip() == answer, timeout)


@pytest.mark.timeout(420)
def test_console_shell_through_pyvmm_stdin(tmp_path):
    """`pyvmm run --console virtio`: a shell on the guest's hvc0 answers what is typed on pyvmm's stdin."""
    require_virtio_linux("add_virtio_console")
    cli = start_cli(tmp_path, SCRIPT_HEAD + HVC_SHELL)
    try:
        cli.expect(lambda line: line == OUT + "hvc0 shell", 300)
        shell_says(cli, "echo $((6*7))", "42")
        shell_says(cli, "tty", "/dev/hvc0")
        cli.send("poweroff -f\n")
        status = cli.finish(60)
    finally:
        cli.kill()
    assert MARK + "virtio device virtio0 id 0x0003 driver virtio_console" in cli.seen, "\n".join(cli.seen)
    assert status == 0, "\n".join(cli.seen[-80:])


@pytest.mark.timeout(600)
def test_blk_console_rng_together_on_two_vcpus(tmp_path):
    """All three devices at once on a 2-vCPU guest: the guest sees 2 CPUs, sums its disk, reads 64 KiB from
    /dev/hwrng (the 1 MiB read is test_rng_feeds_hwrng's: about 3 minutes in the lab), then serves a shell on hvc0
    driven through pyvmm's stdin."""
    require_virtio_linux("add_virtio_blk", "add_virtio_rng", "add_virtio_console")
    data = random_file(tmp_path / "disk.img", 16 << 20)
    script = SCRIPT_HEAD + r"""
waitfor /dev/vda && waitfor /dev/hwrng
out "cpus $(nproc)"
out "vda sha256 $(sha256sum /dev/vda | cut -d' ' -f1)"
out "rng_current $(cat /sys/class/misc/hw_random/rng_current)"
out "hwrng bytes $(dd if=/dev/hwrng bs=4096 count=16 iflag=fullblock 2>/dev/null | wc -c)"
""" + HVC_SHELL
    cli = start_cli(tmp_path, script, "-c", "2", "--disk", str(tmp_path / "disk.img"), "--rng")
    try:
        cli.expect(lambda line: line == OUT + "hvc0 shell", 500)
        shell_says(cli, "echo $((6*7))", "42")
        shell_says(cli, "cat /sys/block/vda/size", str((16 << 20) // 512))
        cli.send("poweroff -f\n")
        status = cli.finish(60)
    finally:
        cli.kill()
    got = [line[len(OUT):] for line in cli.seen if line.startswith(OUT)]
    assert got[:2] == ["cpus 2", f"vda sha256 {hashlib.sha256(data).hexdigest()}"], "\n".join(cli.seen)
    assert re.fullmatch(r"rng_current virtio_rng\.\d+", got[2]), "\n".join(cli.seen)
    assert got[3:] == ["hwrng bytes 65536", "hvc0 shell"], "\n".join(cli.seen)
    assert [line for line in cli.seen if line.startswith(MARK + "insmod ")] == [
        MARK + f"insmod {m} ok" for m in ("virtio_mmio", "virtio_blk", "virtio_rng", "failover", "net_failover",
                                           "virtio_net")], "\n".join(cli.seen)
    assert status == 0, "\n".join(cli.seen[-80:])


# The host side of the network test: a network namespace of its own (os.unshare), the TAP pyvmm makes there
# with 10.0.2.1/24, a TCP listener that hashes what the guest sends.  Prints facts as "host: KEY VALUE".
NET_HOST = r"""
import os, socket, sys, threading
os.unshare(os.CLONE_NEWNET)  # this process only: the lab host's own network is never touched
sys.path.insert(0, os.getcwd())
from pyroute2 import IPRoute
from tests.linux_guest import boot
from tests.virtio_everything import listen
directory, script, expected = sys.argv[1], open(sys.argv[2]).read(), int(sys.argv[3])
result = {}

def setup(vm):
    dev = vm.add_virtio_net(tap="pyvmmnet0", mac="52:54:00:12:34:56")
    with IPRoute() as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname=dev.device.ifname)[0], address="10.0.2.1", prefixlen=24)
    sock = socket.create_server(("10.0.2.1", 5000))
    threading.Thread(target=listen, args=(sock, expected, result), daemon=True).start()
    vm.add_virtio_blk(os.path.join(directory, "payload.img"), readonly=True)
    vm.add_virtio_rng()
    vm.add_virtio_console()
    setup.net = dev.device

outcome, console = boot(directory, script, setup, vcpus=2, timeout=560)
sys.stdout.write(console)
print(f"host: outcome {outcome.kind.value}")
print(f"host: frames {setup.net.tx_frames} {setup.net.rx_frames} {setup.net.rx_dropped}")
for key, value in sorted(result.items()):
    print(f"host: {key} {value}")
"""


@pytest.mark.timeout(600)
def test_net_ping_and_tcp_to_the_host(tmp_path):
    """All four devices at once on 2 vCPUs.  virtio-net on a TAP in a network namespace the test makes: the
    guest (Linux's virtio_net) pings the host side and sends it 16 MiB over TCP, read from its virtio-blk disk;
    the host receives exactly those bytes (sha256 of the disk).  Meanwhile virtio-rng feeds /dev/hwrng and
    the guest writes a line on hvc0 (virtio-console)."""
    require_virtio_linux("add_virtio_net", "add_virtio_blk")
    if not hasattr(os, "unshare"):
        pytest.skip("os.unshare needs Python 3.12 or later (the lab has 3.13)")
    payload = random_file(tmp_path / "payload.img", 16 << 20)
    script = SCRIPT_HEAD + r"""
waitfor /sys/class/net/eth0 && waitfor /dev/vda && waitfor /dev/hvc0
out "cpus $(grep -c ^processor /proc/cpuinfo)"
out "rng $(cat /sys/class/misc/hw_random/rng_current)"
out "hwrng $(dd if=/dev/hwrng bs=1024 count=16 2>/dev/null | wc -c)"
drain  # ttyS0's lines are out before hvc0 speaks (both reach pyvmm's console: never interleave them)
echo "pyvmm-test: hello on hvc0" >/dev/hvc0
usleep 500000
out "mac $(cat /sys/class/net/eth0/address)"
ip link set eth0 up && ip addr add 10.0.2.2/24 dev eth0
ping -c 3 -W 5 10.0.2.1 >/tmp/ping.out 2>&1
out "ping status $?"
out "ping $(grep -o '[0-9]* packets received' /tmp/ping.out)"
nc 10.0.2.1 5000 </dev/vda
out "nc status $?"
poweroff -f
"""
    (tmp_path / "script.sh").write_text(script)
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", NET_HOST, str(tmp_path), str(tmp_path / "script.sh"),
                          str(len(payload))], cwd=ROOT, capture_output=True, text=True, timeout=580,
                         stdin=subprocess.DEVNULL)
    console = res.stdout
    assert res.returncode == 0, res.stderr[-4000:] + tail(console)
    assert_modules_loaded(console)
    host = dict(line[len("host: "):].split(" ", 1) for line in lines(console) if line.startswith("host: "))
    got = facts(console)
    assert "mac 52:54:00:12:34:56" in got, tail(console)
    assert "cpus 2" in got and "hwrng 16384" in got, tail(console)
    assert "pyvmm-test: hello on hvc0" in console, tail(console)  # hvc0's text arrives whole, in one write
    assert any(re.fullmatch(r"rng virtio_rng\.\d+", fact) for fact in got), tail(console)
    assert "ping status 0" in got and "ping 3 packets received" in got, tail(console)
    assert "nc status 0" in got, tail(console)
    assert host["outcome"] == "power-off"
    assert host["peer"] == "10.0.2.2"
    assert int(host["received"]) == len(payload)
    assert host["sha256"] == hashlib.sha256(payload).hexdigest()
    tx, rx, dropped = map(int, host["frames"].split())
    assert tx > 16 << 20 >> 16 and rx > 0 and dropped == 0  # at least one frame per 64 KiB sent
