"""virtio-console, one port: guest output reaches the host callable, host input reaches the guest."""

from __future__ import annotations

import threading

from pyvmm.devices.virtio import VirtioConsole, VirtioMmioTransport
from pyvmm.devices.virtio.console import RECEIVEQ, TRANSMITQ, VIRTIO_CONSOLE_F_SIZE
from tests.test_virtio_driver import DATA_BASE, HOLE, Buf, Driver, FakeMemory, Interrupts


def setup(**kw):
    mem, irq, out = FakeMemory(), Interrupts(), []
    con = VirtioConsole(output=out.append, **kw)
    d = Driver(VirtioMmioTransport(con, mem, irq), mem)
    features = d.probe()
    return mem, irq, out, con, d, features


def test_output():
    mem, irq, out, con, d, features = setup()
    assert not features & 1 << VIRTIO_CONSOLE_F_SIZE
    mem.write(DATA_BASE, b"hello, ")
    mem.write(DATA_BASE + 0x100, b"world\n")
    head = d.add(TRANSMITQ, [Buf(DATA_BASE, 7), Buf(DATA_BASE + 0x100, 6)])
    d.kick(TRANSMITQ)
    assert b"".join(out) == b"hello, world\n"
    assert d.take_used(TRANSMITQ) == [(head, 0)]
    assert irq.calls == [True]


def test_input_fed_before_and_after_buffers():
    mem, irq, out, con, d, features = setup()
    con.feed(b"early")  # no buffers yet: kept
    assert d.used_idx(RECEIVEQ) == 0
    head = d.add(RECEIVEQ, [Buf(DATA_BASE, 64, write=True)])
    d.kick(RECEIVEQ)  # the driver posts a buffer: the waiting input goes in
    assert d.take_used(RECEIVEQ) == [(head, 5)]
    assert mem.read(DATA_BASE, 5) == b"early"
    heads = [d.add(RECEIVEQ, [Buf(DATA_BASE + 0x100 * i, 4, write=True)]) for i in (1, 2)]
    d.kick(RECEIVEQ)  # buffers, no input: they wait
    assert d.take_used(RECEIVEQ) == []
    con.feed(b"later!")  # from the host: split over the two 4-byte buffers
    assert d.take_used(RECEIVEQ) == [(heads[0], 4), (heads[1], 2)]
    assert mem.read(DATA_BASE + 0x100, 4) + mem.read(DATA_BASE + 0x200, 2) == b"later!"
    assert irq.raised() == 2


def test_input_from_another_thread():
    mem, irq, out, con, d, features = setup()
    head = d.add(RECEIVEQ, [Buf(DATA_BASE, 64, write=True)])
    d.kick(RECEIVEQ)
    thread = threading.Thread(target=con.feed, args=(b"typed",))
    thread.start()
    thread.join(5)
    assert d.take_used(RECEIVEQ) == [(head, 5)]


def test_input_kept_when_buffer_is_outside_ram():
    mem, irq, out, con, d, features = setup()
    d.add(RECEIVEQ, [Buf(HOLE, 64, write=True)])
    con.feed(b"abc")
    assert d.take_used(RECEIVEQ) == [(0, 0)]
    head = d.add(RECEIVEQ, [Buf(DATA_BASE, 64, write=True)])
    d.kick(RECEIVEQ)
    assert d.take_used(RECEIVEQ) == [(head, 3)]
    assert mem.read(DATA_BASE, 3) == b"abc"


def test_input_limit_without_blocking_drops_the_rest():
    mem, irq, out, con, d, features = setup(max_pending=8)
    assert con.feed(b"0123456789", block=False) == 8
    assert bytes(con.pending) == b"01234567"


def test_blocking_input_waits_for_the_guest_and_loses_nothing():
    """A feeder with more input than fits (stdin from a pipe) waits for the guest to take it: every byte
    arrives, in order, however small the buffers the guest posts."""
    import threading

    mem, irq, out, con, d, features = setup(max_pending=64)
    data = bytes(range(256)) * 16  # 4 KiB through a 64-byte window
    feeder = threading.Thread(target=con.feed, args=(data,))
    feeder.start()
    import time

    got = bytearray()
    deadline = time.monotonic() + 30
    while len(got) < len(data) and time.monotonic() < deadline:
        head = d.add(0, [Buf(DATA_BASE, 48, write=True)])  # one buffer at a time, like a slow guest
        d.kick(0)
        used = []
        while not used and time.monotonic() < deadline:
            used = d.take_used(0)
            time.sleep(0.001) if not used else None
        assert [h for h, _ in used] == [head]
        got += mem.read(DATA_BASE, used[0][1])
    feeder.join(5)
    assert not feeder.is_alive() and bytes(got) == data


def test_closing_releases_a_waiting_feeder():
    import threading

    mem, irq, out, con, d, features = setup(max_pending=4)
    result = []
    feeder = threading.Thread(target=lambda: result.append(con.feed(b"0123456789")))
    feeder.start()
    feeder.join(0.3)
    assert feeder.is_alive()  # waiting for room
    con.close()
    feeder.join(5)
    assert result == [4]


def test_size_feature_and_config():
    mem, irq, out, con, d, features = setup(cols=80, rows=24)
    assert features & 1 << VIRTIO_CONSOLE_F_SIZE
    assert d.t.read(0x100, 12) == (80).to_bytes(2, "little") + (24).to_bytes(2, "little") + (1).to_bytes(4, "little") + bytes(4)
