"""virtio-blk on a raw image file, driven as Linux's virtio_blk would: header, data, status byte."""

from __future__ import annotations

import logging
import os
import struct

import pytest

from pyvmm.devices.virtio import DeviceStatus, VirtioBlock, VirtioMmioTransport
from pyvmm.devices.virtio.blk import (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
                                VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
                                VIRTIO_BLK_T_OUT)
from tests.test_virtio_driver import DATA_BASE, HOLE, SLOT_B, Buf, Driver, FakeMemory, Interrupts

SECTORS = 64
HDR, STATUS, DATA = DATA_BASE, DATA_BASE + 0x10, DATA_BASE + 0x100


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


class Disk:
    def __init__(self, path, readonly=False, serial=None, memory=None, queue_size=16):
        self.mem = memory or FakeMemory()
        self.irq = Interrupts()
        self.blk = VirtioBlock(str(path), readonly=readonly, serial=serial)
        self.t = VirtioMmioTransport(self.blk, self.mem, self.irq)
        self.d = Driver(self.t, self.mem, queue_size=queue_size)
        self.features = self.d.probe()

    def request(self, kind, sector, data_bufs=(), hdr=HDR, status=STATUS):
        """One request: header, data buffers, status; returns (status byte, used len)."""
        self.mem.write(hdr, struct.pack("<IIQ", kind, 0, sector))
        self.mem.write(status, b"\xee")
        head = self.d.add(0, [Buf(hdr, 16), *data_bufs, Buf(status, 1, write=True)])
        self.d.kick(0)
        (used_id, used_len), = self.d.take_used(0)
        assert used_id == head
        return self.mem.read(status, 1)[0], used_len


def test_config_and_features(image):
    disk = Disk(image)
    capacity, size_max, seg_max = struct.unpack("<QII", disk.t.read(0x100, 8) + disk.t.read(0x108, 8))
    assert (capacity, size_max, seg_max) == (SECTORS, 0, 254)
    assert struct.unpack("<I", disk.t.read(0x114, 4))[0] == 512  # blk_size
    assert disk.features & 1 << VIRTIO_BLK_F_FLUSH and not disk.features & 1 << VIRTIO_BLK_F_RO
    assert Disk(image, readonly=True).features & 1 << VIRTIO_BLK_F_RO


def test_write_then_read_back(image):
    disk = Disk(image)
    payload = os.urandom(1024)
    disk.mem.write(DATA, payload)
    assert disk.request(VIRTIO_BLK_T_OUT, 3, [Buf(DATA, 512), Buf(DATA + 512, 512)]) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[3 * 512:5 * 512] == payload
    disk.mem.write(DATA, bytes(1024))
    assert disk.request(VIRTIO_BLK_T_IN, 3, [Buf(DATA, 1024, write=True)]) == (VIRTIO_BLK_S_OK, 1025)
    assert disk.mem.read(DATA, 1024) == payload
    assert disk.request(VIRTIO_BLK_T_FLUSH, 0) == (VIRTIO_BLK_S_OK, 1)
    assert disk.irq.raised() == 3


def test_any_layout_header_and_data_in_one_buffer(image):
    """VIRTIO_F_VERSION_1 implies any layout: header+data in one buffer, data+status in another."""
    disk = Disk(image)
    disk.mem.write(DATA, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 1) + b"x" * 512)
    disk.d.add(0, [Buf(DATA, 16 + 512)] + [Buf(DATA + 0x400, 1, write=True)])
    disk.d.kick(0)
    assert disk.d.take_used(0)[0][1] == 1
    disk.mem.write(DATA, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1))
    disk.d.add(0, [Buf(DATA, 16), Buf(DATA + 0x400, 513, write=True)])
    disk.d.kick(0)
    assert disk.d.take_used(0)[0][1] == 513
    assert disk.mem.read(DATA + 0x400, 513) == b"x" * 512 + bytes([VIRTIO_BLK_S_OK])


def test_readonly_disk_refuses_writes(image):
    before = image.read_bytes()
    disk = Disk(image, readonly=True)
    disk.mem.write(DATA, b"\xff" * 512)
    assert disk.request(VIRTIO_BLK_T_OUT, 0, [Buf(DATA, 512)]) == (VIRTIO_BLK_S_IOERR, 1)
    assert image.read_bytes() == before
    assert disk.request(VIRTIO_BLK_T_IN, 0, [Buf(DATA, 512, write=True)])[0] == VIRTIO_BLK_S_OK
    assert disk.mem.read(DATA, 512) == before[:512]


@pytest.mark.parametrize("kind", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
@pytest.mark.parametrize("sector", [SECTORS - 1, SECTORS, 1 << 63, (1 << 64) - 1])
def test_past_the_end_is_ioerr(image, kind, sector):
    before = image.read_bytes()
    disk = Disk(image)
    data = Buf(DATA, 1024, write=kind == VIRTIO_BLK_T_IN)
    assert disk.request(kind, sector, [data]) == (VIRTIO_BLK_S_IOERR, 1)
    assert image.read_bytes() == before
    assert not disk.d.status & DeviceStatus.DEVICE_NEEDS_RESET


def test_partial_sector_is_ioerr(image):
    disk = Disk(image)
    assert disk.request(VIRTIO_BLK_T_IN, 0, [Buf(DATA, 100, write=True)])[0] == VIRTIO_BLK_S_IOERR


def test_get_id_and_unsupported(image):
    disk = Disk(image, serial="pyvmm-disk-0")
    assert disk.request(VIRTIO_BLK_T_GET_ID, 0, [Buf(DATA, 20, write=True)]) == (VIRTIO_BLK_S_OK, 21)
    assert disk.mem.read(DATA, 20) == b"pyvmm-disk-0".ljust(20, b"\0")
    assert disk.request(11, 0) == (VIRTIO_BLK_S_UNSUPP, 1)  # DISCARD: not offered


def test_data_outside_ram_is_ioerr_with_one_line(image, caplog):
    disk = Disk(image)
    caplog.set_level(logging.WARNING, "pyvmm.virtio")
    assert disk.request(VIRTIO_BLK_T_IN, 0, [Buf(HOLE + 0x200, 512, write=True)]) == (VIRTIO_BLK_S_IOERR, 1)
    # a buffer running off the end of the slot before the hole
    end_b = SLOT_B[0] + SLOT_B[1]
    assert disk.request(VIRTIO_BLK_T_IN, 0, [Buf(end_b - 256, 512, write=True)])[0] == VIRTIO_BLK_S_IOERR
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "virtio-blk queue 0" in lines[0] and "descriptor 1 GPA 0x20200" in lines[0]
    assert f"GPA {end_b - 256:#x}" in lines[1]
    # a buffer straddling two adjacent slots is fine
    assert disk.request(VIRTIO_BLK_T_IN, 2, [Buf(SLOT_B[0] - 256, 512, write=True)])[0] == VIRTIO_BLK_S_OK
    assert disk.mem.read(SLOT_B[0] - 256, 512) == image.read_bytes()[1024:1536]


def test_chain_without_status_byte(image):
    disk = Disk(image)
    disk.mem.write(HDR, struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
    head = disk.d.add(0, [Buf(HDR, 16)])
    disk.d.kick(0)
    assert disk.d.take_used(0) == [(head, 0)]
    assert disk.t.queues[0].faults == 1


def test_short_header_is_ioerr(image):
    disk = Disk(image)
    head = disk.d.add(0, [Buf(HDR, 8), Buf(STATUS, 1, write=True)])
    disk.d.kick(0)
    assert disk.d.take_used(0) == [(head, 1)]
    assert disk.mem.read(STATUS, 1)[0] == VIRTIO_BLK_S_IOERR
