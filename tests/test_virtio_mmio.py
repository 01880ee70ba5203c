"""The virtio-mmio transport and the split virtqueue, driven as Linux's virtio_mmio driver would."""

from __future__ import annotations

import logging
import struct

import pytest

from pyvmm.devices.virtio import DeviceStatus, VirtioConsole, VirtioMmioTransport, VirtioRng, mmio
from pyvmm.devices.virtio.device import (TRANSPORT_FEATURES, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                                   VIRTIO_F_VERSION_1, VirtioDevice)
from pyvmm.devices.virtio.queue import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                  VIRTQ_DESC_F_WRITE)
from tests.test_virtio_driver import DATA_BASE, HOLE, Buf, Driver, FakeMemory, Interrupts

V1 = 1 << VIRTIO_F_VERSION_1


def rng_setup(features=None, queue_size=16):
    mem = FakeMemory()
    irq = Interrupts()
    t = VirtioMmioTransport(VirtioRng(queue_size=64), mem, irq)
    d = Driver(t, mem, queue_size=queue_size, features=features)
    return mem, irq, t, d


def test_identity_registers():
    _, _, t, d = rng_setup()
    assert d.r32(mmio.VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976
    assert d.r32(mmio.VIRTIO_MMIO_VERSION) == 2
    assert d.r32(mmio.VIRTIO_MMIO_DEVICE_ID) == 4
    assert d.r32(mmio.VIRTIO_MMIO_VENDOR_ID) == mmio.VENDOR_ID
    assert d.device_features() == TRANSPORT_FEATURES
    assert d.r32(mmio.VIRTIO_MMIO_SHM_LEN_LOW) == d.r32(mmio.VIRTIO_MMIO_SHM_LEN_HIGH) == 0xFFFFFFFF
    d.w32(mmio.VIRTIO_MMIO_QUEUE_SEL, 0)
    assert d.r32(mmio.VIRTIO_MMIO_QUEUE_NUM_MAX) == 64
    d.w32(mmio.VIRTIO_MMIO_QUEUE_SEL, 1)  # no such queue
    assert d.r32(mmio.VIRTIO_MMIO_QUEUE_NUM_MAX) == 0


@pytest.mark.parametrize("features", [TRANSPORT_FEATURES | 1 << 40, 1 << VIRTIO_F_EVENT_IDX])
def test_features_ok_refused(features):
    """Features not offered, or no VIRTIO_F_VERSION_1: FEATURES_OK does not stick; DRIVER_OK neither."""
    _, _, t, d = rng_setup()
    d.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    for sel in (0, 1):
        d.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
        d.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)
    d.set_status(DeviceStatus.FEATURES_OK)
    assert not d.status & DeviceStatus.FEATURES_OK
    d.set_status(DeviceStatus.DRIVER_OK)
    assert not d.status & DeviceStatus.DRIVER_OK


def test_status_rules_and_reset():
    mem, irq, t, d = rng_setup()
    d.probe()
    d.add(0, [Buf(DATA_BASE, 8, write=True)])
    d.kick(0)
    assert d.r32(mmio.VIRTIO_MMIO_INTERRUPT_STATUS) == mmio.VIRTIO_MMIO_INT_VRING
    # clearing a bit is not allowed: ignored
    d.w32(mmio.VIRTIO_MMIO_STATUS, DeviceStatus.ACKNOWLEDGE)
    assert d.status & DeviceStatus.DRIVER_OK
    # features cannot change after FEATURES_OK
    d.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
    d.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES, 0)
    assert t.driver_features & V1
    # queue registers cannot change while the queue is ready
    d.w32(mmio.VIRTIO_MMIO_QUEUE_SEL, 0)
    d.w32(mmio.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000)
    assert t.queues[0].desc_addr == d.queues[0]["desc"]
    # writing 0 resets everything and lowers the interrupt line
    d.w32(mmio.VIRTIO_MMIO_STATUS, 0)
    assert d.status == 0
    assert d.r32(mmio.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    assert irq.calls[-1] is False
    assert d.r32(mmio.VIRTIO_MMIO_QUEUE_READY) == 0
    assert t.driver_features == 0
    # and the device works again after a new probe
    d.probe()
    d.add(0, [Buf(DATA_BASE, 8, write=True)])
    d.kick(0)
    assert d.take_used(0) == [(0, 8)]


def test_queue_ready_refused_for_bad_size_or_alignment():
    _, _, t, d = rng_setup()
    d.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    d.w32(mmio.VIRTIO_MMIO_QUEUE_SEL, 0)
    for num, desc in ((12, 0x1000), (0, 0x1000), (128, 0x1000), (16, 0x1008)):
        d.w32(mmio.VIRTIO_MMIO_QUEUE_NUM, num)
        d.w32(mmio.VIRTIO_MMIO_QUEUE_DESC_LOW, desc)
        d.w32(mmio.VIRTIO_MMIO_QUEUE_READY, 1)
        assert d.r32(mmio.VIRTIO_MMIO_QUEUE_READY) == 0, (num, desc)


def test_register_width_rules(caplog):
    _, _, t, d = rng_setup()
    caplog.set_level(logging.WARNING, "pyvmm.virtio")
    assert t.read(mmio.VIRTIO_MMIO_MAGIC_VALUE, 2) == b"\0\0"  # 16-bit register read: ignored
    assert t.read(mmio.VIRTIO_MMIO_MAGIC_VALUE + 1, 4) == bytes(4)  # unaligned
    t.write(mmio.VIRTIO_MMIO_STATUS, b"\x01")  # 8-bit write: ignored
    assert d.status == 0
    assert len([r for r in caplog.records if "32-bit" in r.getMessage()]) == 3
    # config space: any width
    con = VirtioConsole(output=lambda b: None, cols=80, rows=25)
    t = VirtioMmioTransport(con, FakeMemory(), Interrupts())
    assert t.read(0x100, 2) == struct.pack("<H", 80)
    assert t.read(0x102, 1) == b"\x19"
    assert t.read(0x100, 8) == struct.pack("<HHI", 80, 25, 1)
    assert t.read(0x1F0, 4) == bytes(4)  # past the device's config: zeros


def test_config_generation_and_config_interrupt():
    mem, irq = FakeMemory(), Interrupts()
    con = VirtioConsole(output=lambda b: None, cols=80, rows=25)
    t = VirtioMmioTransport(con, mem, irq)
    d = Driver(t, mem)
    d.probe()
    gen = d.r32(mmio.VIRTIO_MMIO_CONFIG_GENERATION)
    con.resize(132, 43)
    assert d.r32(mmio.VIRTIO_MMIO_CONFIG_GENERATION) != gen
    assert d.r32(mmio.VIRTIO_MMIO_INTERRUPT_STATUS) == mmio.VIRTIO_MMIO_INT_CONFIG
    assert irq.calls == [True]
    assert d.ack() == mmio.VIRTIO_MMIO_INT_CONFIG
    assert irq.calls == [True, False]
    assert t.read(0x100, 4) == struct.pack("<HH", 132, 43)


def test_no_buffers_used_before_driver_ok():
    mem, irq, t, d = rng_setup()
    d.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    for sel in (0, 1):
        d.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
        d.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES, V1 >> (32 * sel) & 0xFFFFFFFF)
    d.set_status(DeviceStatus.FEATURES_OK)
    d.setup_queue(0)
    d.add(0, [Buf(DATA_BASE, 16, write=True)])
    d.kick(0)
    assert d.used_idx(0) == 0 and irq.calls == []
    d.set_status(DeviceStatus.DRIVER_OK)  # the device then takes what is already there
    assert d.take_used(0) == [(0, 16)]
    assert irq.calls == [True]


def test_event_idx_suppresses_and_publishes_avail_event():
    mem, irq, t, d = rng_setup()
    assert d.probe() & 1 << VIRTIO_F_EVENT_IDX
    d.set_used_event(0, 2)  # interrupt only once used idx passes 2
    for _ in range(2):
        d.add(0, [Buf(DATA_BASE, 4, write=True)])
        d.kick(0)
    assert irq.raised() == 0
    assert d.avail_event(0) == 2  # the device asks to be notified at the next avail entry
    d.add(0, [Buf(DATA_BASE, 4, write=True)])
    d.kick(0)
    assert irq.raised() == 1
    assert len(d.take_used(0)) == 3


def test_no_interrupt_flag_without_event_idx():
    mem, irq, t, d = rng_setup(features=TRANSPORT_FEATURES & ~(1 << VIRTIO_F_EVENT_IDX))
    d.probe()
    mem.write(d.queues[0]["avail"], struct.pack("<H", VIRTQ_AVAIL_F_NO_INTERRUPT))
    d.add(0, [Buf(DATA_BASE, 4, write=True)])
    d.kick(0)
    assert irq.calls == [] and len(d.take_used(0)) == 1
    mem.write(d.queues[0]["avail"], struct.pack("<H", 0))
    d.add(0, [Buf(DATA_BASE, 4, write=True)])
    d.kick(0)
    assert irq.calls == [True]


def test_indirect_chain_and_nested_indirect(caplog):
    mem, irq, t, d = rng_setup()
    d.probe()
    head = d.add(0, [Buf(DATA_BASE, 8, write=True), Buf(DATA_BASE + 8, 8, write=True)], indirect_at=0x9000)
    d.kick(0)
    assert d.take_used(0) == [(head, 16)]
    # an indirect table whose entry is itself indirect
    d.write_desc(0x9100, 0, 0x9000, 32, VIRTQ_DESC_F_INDIRECT, 0)
    q = d.queues[0]
    d.write_desc(q["desc"], 5, 0x9100, 16, VIRTQ_DESC_F_INDIRECT, 0)
    caplog.set_level(logging.WARNING, "pyvmm.virtio")
    d.publish(0, 5)
    d.kick(0)
    assert d.take_used(0) == [(5, 0)]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "virtio-rng queue 0" in lines[0] and "indirect descriptor 0" in lines[0]
    assert "GPA 0x9000" in lines[0] and "nested indirect" in lines[0]
    assert not d.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_indirect_refused_when_not_negotiated():
    mem, irq, t, d = rng_setup(features=V1)
    d.probe()
    d.add(0, [Buf(DATA_BASE, 8, write=True)], indirect_at=0x9000)
    d.kick(0)
    assert d.take_used(0) == [(0, 0)]
    assert t.queues[0].faults == 1


def test_loop_and_out_of_ram_buffer_fail_one_line_each(caplog):
    mem, irq, t, d = rng_setup()
    d.probe()
    caplog.set_level(logging.WARNING, "pyvmm.virtio")
    q = d.queues[0]
    d.write_desc(q["desc"], 3, DATA_BASE, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 4)
    d.write_desc(q["desc"], 4, DATA_BASE, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 3)  # loops
    d.publish(0, 3)
    d.kick(0)
    d.add(0, [Buf(HOLE + 0x100, 32, write=True)])
    d.kick(0)
    assert [used for used in d.take_used(0)] == [(3, 0), (0, 0)]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "loops" in lines[0]
    assert "descriptor 0 GPA 0x20100" in lines[1] and "not accessible (guest address" in lines[1]
    assert t.queues[0].faults == 2
    assert not d.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_avail_index_jump_needs_reset():
    mem, irq, t, d = rng_setup()
    d.probe()
    d.publish(0, 0, bump=100)  # more than the queue size of 16
    d.kick(0)
    assert d.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert d.r32(mmio.VIRTIO_MMIO_INTERRUPT_STATUS) & mmio.VIRTIO_MMIO_INT_CONFIG
    d.kick(0)  # ignored until reset
    assert d.used_idx(0) == 0
    d.probe()
    assert not d.status & DeviceStatus.DEVICE_NEEDS_RESET
    d.add(0, [Buf(DATA_BASE, 4, write=True)])
    d.kick(0)
    assert d.take_used(0) == [(0, 4)]


def test_rings_outside_ram_need_reset():
    mem, irq, t, d = rng_setup()
    d.ring_base = HOLE  # the driver puts its rings where there is no RAM
    d.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    d.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
    d.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES, 1)
    d.set_status(DeviceStatus.FEATURES_OK)
    d.w32(mmio.VIRTIO_MMIO_QUEUE_NUM, 16)
    for low in (mmio.VIRTIO_MMIO_QUEUE_DESC_LOW, mmio.VIRTIO_MMIO_QUEUE_AVAIL_LOW, mmio.VIRTIO_MMIO_QUEUE_USED_LOW):
        d.w32(low, HOLE)
    d.w32(mmio.VIRTIO_MMIO_QUEUE_READY, 1)
    d.set_status(DeviceStatus.DRIVER_OK)
    assert d.status & DeviceStatus.DEVICE_NEEDS_RESET


class Broken(VirtioDevice):
    name = "broken"
    device_id = 4

    def process(self, queue):
        raise ZeroDivisionError("device bug")


def test_device_exception_never_escapes():
    mem, irq = FakeMemory(), Interrupts()
    t = VirtioMmioTransport(Broken(), mem, irq)
    d = Driver(t, mem)
    d.probe()
    d.add(0, [Buf(DATA_BASE, 4, write=True)])
    d.kick(0)  # must not raise
    assert d.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert irq.calls == [True]
    assert d.r32(mmio.VIRTIO_MMIO_INTERRUPT_STATUS) == mmio.VIRTIO_MMIO_INT_CONFIG


def test_identical_lines_are_rate_limited(caplog):
    mem, irq, t, d = rng_setup()
    d.probe()
    caplog.set_level(logging.WARNING, "pyvmm.virtio")
    d.add(0, [Buf(HOLE, 4, write=True)])
    d.kick(0)
    for _ in range(63):  # the same bad chain again and again: identical lines
        d.publish(0, 0)
        d.kick(0)
    assert t.queues[0].faults == 64
    counts = [r.getMessage().rpartition("(seen ")[2] for r in caplog.records]
    assert len(counts) == 7 and counts[1:] == [f"{n} times)" for n in (2, 4, 8, 16, 32, 64)]
    # distinct lines: at most a burst of 20 a second
    caplog.clear()
    for i in range(64):
        d.add(0, [Buf(HOLE + 16 * i, 4, write=True)])
        d.kick(0)
    assert len(caplog.records) <= 20


def test_indirect_flag_constant_is_spec_value():
    assert (VIRTQ_DESC_F_INDIRECT, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX) == (4, 28, 29)


def test_a_failing_interrupt_line_is_logged_not_raised(caplog):
    """A host-side failure to raise the interrupt (a closed eventfd, a failed ioctl) must not escape into the
    run loop or kill a device thread: one log line, InterruptStatus keeps the bit, the next request works."""
    mem = FakeMemory()
    calls = []

    def broken(level):
        calls.append(level)
        if len(calls) == 1:
            raise OSError(9, "Bad file descriptor")

    transport = VirtioMmioTransport(VirtioRng(), mem, broken)
    d = Driver(transport, mem)
    d.probe()
    first = d.add(0, [Buf(DATA_BASE, 16, write=True)])
    d.kick(0)  # must not raise
    assert d.take_used(0) == [(first, 16)]
    assert d.r32(0x60) & 1  # InterruptStatus: the used-buffer bit is set for a polling driver
    assert sum("raising the interrupt failed: OSError" in r.message for r in caplog.records) == 1
    d.ack()
    second = d.add(0, [Buf(DATA_BASE + 0x100, 16, write=True)])
    d.kick(0)
    assert d.take_used(0) == [(second, 16)] and calls[-1] is True
