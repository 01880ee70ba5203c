"""virtio-net over a real TAP, inside a network namespace of the test's own (never the host's network).

The driver side is tests/test_virtio_driver.Driver (what Linux's virtio_net does with the rings); the
host side is a packet socket on the TAP.  Linux's own driver is exercised in the lab."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pyvmm.devices.virtio import VirtioMmioTransport
from pyvmm.devices.virtio.net import VirtioNet, parse_mac
from tests.conftest import ROOT
from tests.test_virtio_driver import DATA_BASE, Buf, Driver, FakeMemory, Interrupts

pytestmark = pytest.mark.timeout(60)

# Runs in a fresh network namespace: TAP up, frames both ways, counts and bytes checked.
SCRIPT = r"""
import os, socket, struct, sys, time
sys.path.insert(0, os.getcwd())
from pyvmm.devices.virtio import VirtioMmioTransport
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.tap import open_tap
from tests.test_virtio_driver import DATA_BASE, Buf, Driver, FakeMemory, Interrupts

for knob in ("all", "default"):  # this namespace only: no IPv6 chatter (router solicitations) on the TAP
    with open(f"/proc/sys/net/ipv6/conf/{knob}/disable_ipv6", "w") as f:
        f.write("1")
fd, ifname = open_tap("pyvmmtest0")
net = VirtioNet(fd, bytes.fromhex("525400123456"))
mem, irq = FakeMemory(), Interrupts()
d = Driver(VirtioMmioTransport(net, mem, irq), mem)
d.probe()
host = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))  # local experimental ethertype
host.bind((ifname, 0))
host.settimeout(5)

# transmit: header (12 bytes, all zero) + a frame to broadcast
frame = b"\xff" * 6 + bytes.fromhex("525400123456") + b"\x88\xb5" + b"pyvmm tx " * 10
mem.write(DATA_BASE, bytes(12) + frame)
head = d.add(1, [Buf(DATA_BASE, 12 + len(frame))])
d.kick(1)
got = host.recv(2048)
assert got == frame, got
assert d.take_used(1) == [(head, 0)]

# receive: post a buffer, the host sends a frame, the device fills it with header + frame
rx = d.add(0, [Buf(DATA_BASE + 0x1000, 2048, write=True)])
d.kick(0)
reply = bytes.fromhex("525400123456") + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"pyvmm rx " * 10
host.send(reply)
deadline = time.monotonic() + 5
used = []
while not used and time.monotonic() < deadline:
    used = d.take_used(0)
    time.sleep(0.01)
assert used == [(rx, 12 + len(reply))], used
hdr = mem.read(DATA_BASE + 0x1000, 12)
assert hdr == bytes(10) + b"\x01\x00", hdr  # num_buffers = 1, no offloads
assert mem.read(DATA_BASE + 0x1000 + 12, len(reply)) == reply
assert (net.tx_frames, net.rx_frames, net.rx_dropped) == (1, 1, 0)
net.close()
print("NET-OK", ifname)
"""


def test_frames_both_ways_over_a_tap_in_a_private_netns():
    if os.geteuid() != 0:
        pytest.skip("TAP devices and network namespaces need root (CAP_NET_ADMIN)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun (kernel option CONFIG_TUN)")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) (util-linux) to make a network namespace")
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=50, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "NET-OK pyvmmtest0"


def test_bad_chains_are_answered_not_raised():
    """No frame after the header: answered (used, length 0), nothing sent."""
    r, w = os.pipe2(os.O_NONBLOCK)  # a write end as the backend for transmit (frames are discarded)
    net = VirtioNet(w, parse_mac("52:54:00:00:00:01"))
    mem, irq = FakeMemory(), Interrupts()
    d = Driver(VirtioMmioTransport(net, mem, irq), mem)
    d.probe()
    short = d.add(1, [Buf(DATA_BASE, 12)])
    d.kick(1)
    assert d.take_used(1) == [(short, 0)] and net.tx_frames == 0
    net.close()
    os.close(r)


def test_mac_parsing():
    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    for bad in ("52:54:00:12:34", "zz:54:00:12:34:56", "01:00:5e:00:00:01", "5254.0012.3456"):
        with pytest.raises(ValueError):
            parse_mac(bad)


def _net_on_a_socketpair():
    """VirtioNet whose backend is one end of a SOCK_SEQPACKET pair (frames kept whole, like a TAP's)."""
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    net = VirtioNet(os.dup(ours.fileno()), parse_mac("52:54:00:00:00:02"))
    ours.close()
    mem, irq = FakeMemory(), Interrupts()
    d = Driver(VirtioMmioTransport(net, mem, irq), mem)
    d.probe()
    return net, d, mem, theirs


def _used_soon(d, queue, count, limit=5.0):
    import time

    got, deadline = [], time.monotonic() + limit
    while len(got) < count and time.monotonic() < deadline:
        got += d.take_used(queue)
        time.sleep(0.005)
    return got


def test_frames_wait_for_receive_buffers():
    """Frames that arrive before the guest posts buffers are held (one) or queued (the rest) and all delivered,
    in order, once buffers come."""
    net, d, mem, host = _net_on_a_socketpair()
    frames = [bytes(12) + bytes([i]) * (60 + i) for i in range(3)]
    for f in frames:
        host.send(f)
    heads = [d.add(0, [Buf(DATA_BASE + 0x800 * i, 0x800, write=True)]) for i in range(3)]
    d.kick(0)
    used = _used_soon(d, 0, 3)
    assert [h for h, _ in used] == heads and [n for _, n in used] == [len(f) for f in frames]
    for i, f in enumerate(frames):
        got = mem.read(DATA_BASE + 0x800 * i, len(f))
        assert got[12:] == f[12:] and got[10:12] == b"\x01\x00"
    assert (net.rx_frames, net.rx_dropped) == (3, 0)
    net.close()
    host.close()


def test_transmit_refuses_offloads_that_were_not_negotiated():
    net, d, mem, host = _net_on_a_socketpair()
    gso = bytes([0x01, 0x01]) + bytes(10)  # NEEDS_CSUM, GSO_TCPV4
    mem.write(DATA_BASE, gso + b"\xff" * 60)
    head = d.add(1, [Buf(DATA_BASE, 72)])
    d.kick(1)
    assert d.take_used(1) == [(head, 0)] and net.tx_frames == 0
    host.setblocking(False)
    with pytest.raises(BlockingIOError):
        host.recv(100)  # nothing reached the host
    net.close()
    host.close()
