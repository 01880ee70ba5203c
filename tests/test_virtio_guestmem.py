"""The virtio devices on pyvmm's real GuestMemory (memslots of a real VM, no guest run): buffers
straddling two adjacent memslots work; buffers running into a hole between memslots fail cleanly."""

from __future__ import annotations

import logging
import re
import struct

import pytest

from pyvmm.devices.virtio import DeviceStatus, VirtioBlock, VirtioMmioTransport, VirtioRng
from pyvmm.devices.virtio.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from tests.test_virtio_driver import Buf, Driver, Interrupts

MIB = 1 << 20
# slot 0 [0, 1M) and slot 1 [1M, 2M) adjacent; hole [2M, 3M); slot 2 [3M, 4M)
SLOT1, HOLE, SLOT2 = MIB, 2 * MIB, 3 * MIB


@pytest.fixture
def memory(kvm_device):
    from pyvmm.vm import Vm

    with Vm() as vm:
        vm.add_memory(MIB, "anon", gpa=0)
        vm.add_memory(MIB, "memfd", gpa=SLOT1)
        vm.add_memory(MIB, "anon", gpa=SLOT2)
        yield vm.memory


def test_blk_across_adjacent_memslots_and_into_a_hole(memory, tmp_path, caplog):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    irq = Interrupts()
    t = VirtioMmioTransport(VirtioBlock(str(image)), memory, irq)
    d = Driver(t, memory)
    d.probe()

    def request(kind, sector, data: Buf, status=SLOT2 + 0x10):
        memory.write(0x8000, struct.pack("<IIQ", kind, 0, sector))
        head = d.add(0, [Buf(0x8000, 16), data, Buf(status, 1, write=True)])
        d.kick(0)
        assert d.take_used(0)[0][0] == head
        return memory.read(status, 1)[0]

    payload = bytes(range(256)) * 8
    straddle = SLOT1 - 1024  # 1 KiB in slot 0, 1 KiB in slot 1
    memory.write(straddle, payload)
    assert request(VIRTIO_BLK_T_OUT, 4, Buf(straddle, 2048)) == VIRTIO_BLK_S_OK
    assert image.read_bytes()[4 * 512:8 * 512] == payload
    memory.write(SLOT2 + 0x1000, bytes(2048))
    assert request(VIRTIO_BLK_T_IN, 4, Buf(SLOT2 + 0x1000, 2048, write=True)) == VIRTIO_BLK_S_OK
    assert memory.read(SLOT2 + 0x1000, 2048) == payload

    caplog.set_level(logging.WARNING, "pyvmm.virtio")
    into_hole = HOLE - 1024  # the last 1 KiB of slot 1, then the hole
    assert request(VIRTIO_BLK_T_IN, 4, Buf(into_hole, 2048, write=True)) == VIRTIO_BLK_S_IOERR
    assert request(VIRTIO_BLK_T_OUT, 4, Buf(HOLE + 0x800, 512)) == VIRTIO_BLK_S_IOERR
    assert image.read_bytes()[4 * 512:8 * 512] == payload
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert re.search(rf"virtio-blk queue 0: chain head \d+, descriptor \d+ GPA {into_hole:#x}: buffer not accessible \(guest address",
                     lines[0])
    assert f"GPA {HOLE + 0x800:#x}" in lines[1]
    assert not d.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert irq.raised() == 4


def test_rng_and_rings_on_real_memory(memory):
    irq = Interrupts()
    t = VirtioMmioTransport(VirtioRng(), memory, irq)
    d = Driver(t, memory, ring_base=SLOT1 - 0x800)  # the rings themselves straddle slots 0 and 1
    d.probe()
    head = d.add(0, [Buf(SLOT1 - 16, 32, write=True)])
    d.kick(0)
    assert d.take_used(0) == [(head, 32)]
    assert memory.read(SLOT1 - 16, 32).count(0) < 8
    # a driver that puts its rings in the hole: the device needs a reset, nothing raises
    irq = Interrupts()
    d = Driver(VirtioMmioTransport(VirtioRng(), memory, irq), memory, ring_base=HOLE)
    d.probe(clear=False)
    assert d.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert irq.calls == [True]
