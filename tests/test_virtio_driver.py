"""Test helpers for the virtio tests (a fake guest memory and a driver that behaves like Linux's
virtio_mmio + virtio_ring), and the tests of those helpers and of the ring arithmetic."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from pyvmm.devices.virtio import mmio
from pyvmm.devices.virtio.device import TRANSPORT_FEATURES, DeviceStatus
from pyvmm.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                  vring_need_event)
from pyvmm.kvm.errors import GuestMemoryError

# Fake RAM: two adjacent slots, a hole, a third slot.
SLOT_A = (0x00000, 0x10000)
SLOT_B = (0x10000, 0x10000)
SLOT_C = (0x30000, 0x10000)
HOLE = 0x20000
RING_BASE = 0x1000  # queue i's rings in the page at RING_BASE + i * 0x1000
DATA_BASE = 0x8000


@dataclass(frozen=True)
class Access:
    gpa: int
    length: int
    write: bool
    ok: bool


class FakeMemory:
    """A bytearray-backed guest memory with the accessor's contract: ``read``/``write`` raise
    GuestMemoryError for any byte outside the regions (an access may span adjacent regions, like
    pyvmm's GuestMemory).  ``record=True`` keeps every access in ``accesses``."""

    def __init__(self, regions=(SLOT_A, SLOT_B, SLOT_C), record: bool = False):
        self.regions = sorted(regions)
        self.ram = bytearray(max(gpa + size for gpa, size in self.regions))
        self.record = record
        self.accesses: list[Access] = []

    def inside(self, gpa: int, length: int) -> bool:
        for start, size in self.regions:
            if length <= 0:
                return True
            if start <= gpa < start + size:
                take = min(length, start + size - gpa)
                gpa, length = gpa + take, length - take
        return length <= 0

    def _check(self, gpa: int, length: int, write: bool) -> None:
        ok = gpa >= 0 and self.inside(gpa, length)
        if self.record:
            self.accesses.append(Access(gpa, length, write, ok))
        if not ok:
            raise GuestMemoryError(f"guest address range [{gpa:#x}, +{length:#x}) is not in RAM")

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length, False)
        return bytes(self.ram[gpa:gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data), True)
        self.ram[gpa:gpa + len(data)] = data


class Interrupts:
    """The transport's ``interrupt`` callable: records every level it is given."""

    def __init__(self):
        self.calls: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.calls.append(level)

    def raised(self) -> int:
        return self.calls.count(True)


@dataclass
class Buf:
    gpa: int
    length: int
    write: bool = False


class Driver:
    """Drives a VirtioMmioTransport the way Linux's virtio_mmio and virtio_ring do."""

    def __init__(self, transport: mmio.VirtioMmioTransport, memory, queue_size: int = 16,
                 features: int | None = None, ring_base: int = RING_BASE):
        self.t = transport
        self.mem = memory
        self.queue_size = queue_size
        self.want = features
        self.ring_base = ring_base
        self.queues: list[dict] = []

    # registers
    def r32(self, offset: int) -> int:
        return int.from_bytes(self.t.read(offset, 4), "little")

    def w32(self, offset: int, value: int) -> None:
        self.t.write(offset, value.to_bytes(4, "little"))

    @property
    def status(self) -> DeviceStatus:
        return DeviceStatus(self.r32(mmio.VIRTIO_MMIO_STATUS))

    def set_status(self, bits: int) -> None:
        self.w32(mmio.VIRTIO_MMIO_STATUS, self.r32(mmio.VIRTIO_MMIO_STATUS) | bits)

    def device_features(self) -> int:
        self.w32(mmio.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        high = self.r32(mmio.VIRTIO_MMIO_DEVICE_FEATURES)
        self.w32(mmio.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.r32(mmio.VIRTIO_MMIO_DEVICE_FEATURES)

    def probe(self, clear: bool = True) -> int:
        """virtio_mmio_probe + virtio_dev_probe; returns the negotiated features."""
        assert self.r32(mmio.VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976
        assert self.r32(mmio.VIRTIO_MMIO_VERSION) == 2
        assert self.r32(mmio.VIRTIO_MMIO_DEVICE_ID) == self.t.device.device_id
        self.w32(mmio.VIRTIO_MMIO_STATUS, 0)
        self.set_status(DeviceStatus.ACKNOWLEDGE)
        self.set_status(DeviceStatus.DRIVER)
        offered = self.device_features()
        features = offered if self.want is None else self.want & offered
        for sel in (0, 1):
            self.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
            self.w32(mmio.VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)
        self.set_status(DeviceStatus.FEATURES_OK)
        assert self.status & DeviceStatus.FEATURES_OK
        self.queues = []
        for index in range(len(self.t.device.queue_sizes)):
            self.setup_queue(index, clear)
        self.set_status(DeviceStatus.DRIVER_OK)
        self.features = features
        return features

    def setup_queue(self, index: int, clear: bool = True) -> None:
        self.w32(mmio.VIRTIO_MMIO_QUEUE_SEL, index)
        assert self.r32(mmio.VIRTIO_MMIO_QUEUE_READY) == 0
        size = min(self.queue_size, self.r32(mmio.VIRTIO_MMIO_QUEUE_NUM_MAX))
        desc = self.ring_base + index * 0x1000
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + 3) & ~3
        if clear:
            self.mem.write(desc, bytes(used + 6 + 8 * size - desc))
        self.w32(mmio.VIRTIO_MMIO_QUEUE_NUM, size)
        for low, addr in ((mmio.VIRTIO_MMIO_QUEUE_DESC_LOW, desc), (mmio.VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
                          (mmio.VIRTIO_MMIO_QUEUE_USED_LOW, used)):
            self.w32(low, addr & 0xFFFFFFFF)
            self.w32(low + 4, addr >> 32)
        self.w32(mmio.VIRTIO_MMIO_QUEUE_READY, 1)
        self.queues.append(dict(size=size, desc=desc, avail=avail, used=used, next_desc=0, avail_idx=0,
                                used_seen=0))

    # rings
    def write_desc(self, table: int, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, index: int, bufs: list[Buf], indirect_at: int | None = None) -> int:
        """Make a chain of ``bufs`` available (in an indirect table at ``indirect_at`` if given);
        returns its head.  Descriptors are taken round-robin, like a driver with a free list."""
        q = self.queues[index]

        def take() -> int:
            i = q["next_desc"]
            q["next_desc"] = (i + 1) % q["size"]
            return i

        if indirect_at is not None:
            for i, b in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(indirect_at, i, b.gpa, b.length,
                                (VIRTQ_DESC_F_WRITE if b.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT), i + 1)
            head = take()
            self.write_desc(q["desc"], head, indirect_at, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            ids = [take() for _ in bufs]
            for i, (d, b) in enumerate(zip(ids, bufs)):
                last = i == len(bufs) - 1
                self.write_desc(q["desc"], d, b.gpa, b.length,
                                (VIRTQ_DESC_F_WRITE if b.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else ids[i + 1])
            head = ids[0]
        self.publish(index, head)
        return head

    def publish(self, index: int, head: int, bump: int = 1) -> None:
        q = self.queues[index]
        self.mem.write(q["avail"] + 4 + 2 * (q["avail_idx"] % q["size"]), struct.pack("<H", head))
        q["avail_idx"] = (q["avail_idx"] + bump) & 0xFFFF
        self.mem.write(q["avail"] + 2, struct.pack("<H", q["avail_idx"]))

    def kick(self, index: int) -> None:
        self.w32(mmio.VIRTIO_MMIO_QUEUE_NOTIFY, index)

    def used_idx(self, index: int) -> int:
        return struct.unpack("<H", self.mem.read(self.queues[index]["used"] + 2, 2))[0]

    def take_used(self, index: int) -> list[tuple[int, int]]:
        """New used entries (id, len) since the last call; then, like Linux's virtqueue_enable_cb,
        asks (EVENT_IDX) for an interrupt at the next used entry."""
        q = self.queues[index]
        out = []
        while q["used_seen"] != self.used_idx(index):
            elem = q["used"] + 4 + 8 * (q["used_seen"] % q["size"])
            out.append(struct.unpack("<II", self.mem.read(elem, 8)))
            q["used_seen"] = (q["used_seen"] + 1) & 0xFFFF
        self.set_used_event(index, q["used_seen"])
        return out

    def set_used_event(self, index: int, value: int) -> None:
        q = self.queues[index]
        self.mem.write(q["avail"] + 4 + 2 * q["size"], struct.pack("<H", value))

    def avail_event(self, index: int) -> int:
        q = self.queues[index]
        return struct.unpack("<H", self.mem.read(q["used"] + 4 + 8 * q["size"], 2))[0]

    def ack(self) -> int:
        pending = self.r32(mmio.VIRTIO_MMIO_INTERRUPT_STATUS)
        self.w32(mmio.VIRTIO_MMIO_INTERRUPT_ACK, pending)
        return pending


# --- tests of the helpers and of the ring arithmetic ---------------------------------

def test_fake_memory_contract():
    mem = FakeMemory(record=True)
    mem.write(SLOT_B[0] - 4, b"abcdefgh")  # straddles the two adjacent slots: fine
    assert mem.read(SLOT_B[0] - 4, 8) == b"abcdefgh"
    for gpa, length in ((HOLE, 1), (SLOT_B[0] + SLOT_B[1] - 4, 8), (SLOT_C[0] + SLOT_C[1], 1), (-1, 2)):
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, length)
    assert [a.ok for a in mem.accesses] == [True, True, False, False, False, False]


def test_vring_need_event():
    # the driver asked for a notification when used idx passes 5
    assert vring_need_event(5, 6, 5)  # published entry 5
    assert vring_need_event(5, 8, 3)  # a batch that includes entry 5
    assert not vring_need_event(5, 5, 4)  # entry 4 only
    assert not vring_need_event(5, 9, 6)  # already past it
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the 16-bit wrap


def test_driver_negotiates_like_linux():
    from pyvmm.devices.virtio import VirtioRng

    mem = FakeMemory()
    t = mmio.VirtioMmioTransport(VirtioRng(queue_size=64), mem, Interrupts())
    d = Driver(t, mem)
    assert d.probe() == TRANSPORT_FEATURES
    assert d.status == (DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                        | DeviceStatus.DRIVER_OK)
    assert d.queues[0]["size"] == 16
