"""Test devices for checking the MMIO and port-I/O paths.

``MmioTestDevice`` -- layout: 0x000 ID (8 bytes, read-only, "PYVMMTST"
little-endian); 0x100-0x1ff scratch (reads return what was written, at any
width 1-8).

``PortTestDevice`` -- ``PORT_SIZE`` ports (x86: at 0x510); writes are kept in
``written``; a read of N bytes returns the next N bytes of a byte counter
(``first``, ``first + 1``, ... modulo 256), so a guest's string input
(``rep insb/insw/insl``) fills memory with a sequence the host can predict.

Both record every access in ``log`` so a test can assert on exactly what the
guest did.
"""

from __future__ import annotations

from pyvmm.record import Record

ID_OFFSET = 0x000
ID_VALUE = int.from_bytes(b"PYVMMTST", "little")
SCRATCH_OFFSET = 0x100
SCRATCH_SIZE = 0x100
SIZE = 0x1000


class Access(Record):
    __slots__ = ("offset", "size", "is_write", "value")
    __hash__ = Record.value_hash

    def __init__(self, offset: int, size: int, is_write: bool, value: int):
        self.offset = offset
        self.size = size
        self.is_write = is_write
        self.value = value


class MmioTestDevice:
    def __init__(self):
        self.scratch = bytearray(SCRATCH_SIZE)
        self.log: list[Access] = []

    def read(self, offset: int, size: int) -> bytes:
        if ID_OFFSET <= offset < ID_OFFSET + 8:
            data = ID_VALUE.to_bytes(8, "little")[offset - ID_OFFSET:][:size]
        elif SCRATCH_OFFSET <= offset < SCRATCH_OFFSET + SCRATCH_SIZE:
            start = offset - SCRATCH_OFFSET
            data = bytes(self.scratch[start:start + size])
        else:
            data = b""
        data = data.ljust(size, b"\0")
        self.log.append(Access(offset, size, False, int.from_bytes(data, "little")))
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(Access(offset, len(data), True, int.from_bytes(data, "little")))
        if SCRATCH_OFFSET <= offset < SCRATCH_OFFSET + SCRATCH_SIZE:
            start = offset - SCRATCH_OFFSET
            chunk = data[:SCRATCH_SIZE - start]
            self.scratch[start:start + len(chunk)] = chunk


PORT_SIZE = 16


class PortTestDevice:
    def __init__(self, first: int = 1):
        self.first = first & 0xFF
        self.next_byte = self.first  # the counter: value of the next byte a read returns
        self.written = bytearray()
        self.log: list[Access] = []

    def read(self, offset: int, size: int) -> bytes:
        data = bytes((self.next_byte + i) & 0xFF for i in range(size))
        self.next_byte = (self.next_byte + size) & 0xFF
        self.log.append(Access(offset, size, False, int.from_bytes(data, "little")))
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(Access(offset, len(data), True, int.from_bytes(data, "little")))
        self.written += data

    @staticmethod
    def sequence(first: int, length: int) -> bytes:
        """The bytes ``length`` bytes of reads return, starting from a fresh device with ``first``."""
        return bytes((first + i) & 0xFF for i in range(length))
