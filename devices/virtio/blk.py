"""virtio-blk (virtio 1.2 section 5.2) on a raw image file: IN, OUT, FLUSH, GET_ID.

A request is a 16-byte header (type, reserved, sector) in the device-readable buffers, data, and a
status byte: the last byte of the device-writable buffers.  Sectors are 512 bytes; the capacity is the
file's size in whole sectors.  A read-only disk (``readonly=True``, offered as VIRTIO_BLK_F_RO)
answers OUT with IOERR and writes nothing; a request reaching past the capacity answers IOERR.
"""

from __future__ import annotations

import os
import struct

from .device import DEFAULT_QUEUE_SIZE, DeviceId, VirtioDevice
from .queue import CHUNK, AccessError, Chain, Fault, Virtqueue, gather, log, scatter

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
SECTOR_SIZE = 512
HEADER = struct.Struct("<IIQ")  # struct virtio_blk_req: type, reserved, sector
CONFIG_SIZE = 60  # struct virtio_blk_config up to the write-zeroes fields


class VirtioBlock(VirtioDevice):
    name = "virtio-blk"
    device_id = DeviceId.VIRTIO_ID_BLOCK

    def __init__(self, path: str, readonly: bool = False, serial: str | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE):
        super().__init__()
        self.path = path
        self.readonly = readonly
        self.queue_sizes = (queue_size,)
        self.serial = (serial if serial is not None else os.path.basename(path)).encode()[:VIRTIO_BLK_ID_BYTES]
        self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        self.capacity = os.fstat(self.fd).st_size // SECTOR_SIZE

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def device_features(self) -> int:
        bits = 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
        return bits | (1 << VIRTIO_BLK_F_RO if self.readonly else 0)

    def config(self) -> bytes:
        seg_max = max(self.queue_sizes[0] - 2, 1)  # leave room for the header and status
        head = struct.pack("<QII4sI", self.capacity, 0, seg_max, bytes(4), SECTOR_SIZE)
        return head.ljust(CONFIG_SIZE, b"\0")

    def process(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            queue.push(chain.head, self._request(queue, chain))

    def _request(self, queue: Virtqueue, chain: Chain) -> int:
        """Carry out one request; returns the bytes written into the chain (data and status)."""
        if chain.writable_len == 0:
            queue.report(chain, Fault("no device-writable status byte"))
            return 0
        status, written = VIRTIO_BLK_S_IOERR, 0
        if chain.fault is None:
            try:
                status, written = self._execute(queue, chain)
            except AccessError as err:
                queue.report(chain, err.fault)
            except OSError as err:
                queue.rlog.warning(f"{queue}: {self.path}: {err.strerror}; request failed")
        try:
            scatter(self.memory, chain.writable, chain.writable_len - 1, bytes([status]))
        except AccessError as err:
            queue.report(chain, err.fault)
            return 0
        return written + 1

    def _execute(self, queue: Virtqueue, chain: Chain) -> tuple[int, int]:
        """(status, data bytes written) for a well-formed chain; AccessError for a bad buffer,
        OSError for a failing image file."""
        if chain.readable_len < HEADER.size:
            queue.report(chain, Fault(f"request header of {chain.readable_len} bytes (needs {HEADER.size})"))
            return VIRTIO_BLK_S_IOERR, 0
        kind, _, sector = HEADER.unpack(gather(self.memory, chain.readable, 0, HEADER.size))
        if kind == VIRTIO_BLK_T_IN:
            return self._read(queue, sector, chain)
        if kind == VIRTIO_BLK_T_OUT:
            return self._write(queue, sector, chain), 0
        if kind == VIRTIO_BLK_T_FLUSH:
            os.fsync(self.fd)
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:chain.writable_len - 1]
            return VIRTIO_BLK_S_OK, scatter(self.memory, chain.writable, 0, ident)
        return VIRTIO_BLK_S_UNSUPP, 0

    def _in_range(self, queue: Virtqueue, what: str, sector: int, length: int) -> bool:
        """Whether ``length`` bytes from ``sector`` are whole sectors within the capacity."""
        sectors, partial = divmod(length, SECTOR_SIZE)
        if partial or sector > self.capacity or sectors > self.capacity - sector:
            log.debug("%s: %s of %d bytes at sector %d: outside the %d-sector disk or not whole sectors",
                      queue, what, length, sector, self.capacity)
            return False
        return True

    def _read(self, queue: Virtqueue, sector: int, chain: Chain) -> tuple[int, int]:
        length = chain.writable_len - 1
        if not self._in_range(queue, "read", sector, length):
            return VIRTIO_BLK_S_IOERR, 0
        done = 0
        while done < length:
            data = os.pread(self.fd, min(CHUNK, length - done), sector * SECTOR_SIZE + done)
            if not data:  # the file shrank under us
                return VIRTIO_BLK_S_IOERR, done
            done += scatter(self.memory, chain.writable, done, data)
        return VIRTIO_BLK_S_OK, done

    def _write(self, queue: Virtqueue, sector: int, chain: Chain) -> int:
        length = chain.readable_len - HEADER.size
        if self.readonly:
            log.debug("%s: write to a read-only disk refused", queue)
            return VIRTIO_BLK_S_IOERR
        if not self._in_range(queue, "write", sector, length):
            return VIRTIO_BLK_S_IOERR
        done = 0
        while done < length:
            data = gather(self.memory, chain.readable, HEADER.size + done, min(CHUNK, length - done))
            wrote = os.pwrite(self.fd, data, sector * SECTOR_SIZE + done)
            if wrote <= 0:
                return VIRTIO_BLK_S_IOERR
            done += wrote
        return VIRTIO_BLK_S_OK
