"""virtio-rng: device-writable buffers come back full of getrandom bytes."""

from __future__ import annotations

from pyvmm.devices.virtio import VirtioMmioTransport, VirtioRng
from tests.test_virtio_driver import DATA_BASE, SLOT_B, Buf, Driver, FakeMemory, Interrupts


def setup(max_fill=None):
    mem, irq = FakeMemory(), Interrupts()
    rng = VirtioRng() if max_fill is None else VirtioRng(max_fill=max_fill)
    d = Driver(VirtioMmioTransport(rng, mem, irq), mem)
    d.probe()
    return mem, irq, d


def test_fills_buffers_with_random_bytes():
    mem, irq, d = setup()
    heads = [d.add(0, [Buf(DATA_BASE + 0x400 * i, 256, write=True)]) for i in range(4)]
    d.kick(0)
    assert d.take_used(0) == [(h, 256) for h in heads]
    blocks = [mem.read(DATA_BASE + 0x400 * i, 256) for i in range(4)]
    assert all(b.count(0) < 32 for b in blocks)  # 256 random bytes: about one zero
    assert len(set(blocks)) == 4
    assert irq.calls == [True]  # one notification for the batch


def test_buffer_across_two_slots_and_split_chain():
    mem, irq, d = setup()
    head = d.add(0, [Buf(SLOT_B[0] - 64, 128, write=True), Buf(DATA_BASE, 32, write=True)])
    d.kick(0)
    assert d.take_used(0) == [(head, 160)]
    assert mem.read(SLOT_B[0] - 64, 128).count(0) < 32


def test_fills_at_most_max_fill():
    mem, irq, d = setup(max_fill=100)
    head = d.add(0, [Buf(DATA_BASE, 4096, write=True)])
    d.kick(0)
    assert d.take_used(0) == [(head, 100)]
    assert mem.read(DATA_BASE + 100, 3996) == bytes(3996)


def test_readable_only_chain_gets_nothing():
    mem, irq, d = setup()
    head = d.add(0, [Buf(DATA_BASE, 64)])
    d.kick(0)
    assert d.take_used(0) == [(head, 0)]
    assert mem.read(DATA_BASE, 64) == bytes(64)
    assert d.t.queues[0].faults == 1
