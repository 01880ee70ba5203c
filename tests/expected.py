"""What the bundled guests do, shared by the x86_64 and arm64 tests (both architectures' guests match)."""

from __future__ import annotations

from pyvmm.devices import testdev

MEMTOUCH_PATTERN = 0x5A17C0DE9E3779B9
MEMTOUCH_STRIDE = 64
MEMTOUCH_LINE = r"memtouch: start=0x(\w+) end=0x(\w+) checksum=0x(\w+) errors=0x(\w+)\n"


def memtouch_checksum(start: int, end: int) -> int:
    return sum(addr ^ MEMTOUCH_PATTERN for addr in range(start, end, MEMTOUCH_STRIDE)) & (2**64 - 1)


_A = testdev.Access
MMIO_GUEST_LOG = [
    _A(0x000, 1, False, 0x50), _A(0x000, 2, False, 0x5950), _A(0x000, 4, False, 0x4D565950),
    _A(0x000, 8, False, testdev.ID_VALUE),
    _A(0x100, 1, True, 0x11), _A(0x100, 1, False, 0x11),
    _A(0x110, 2, True, 0x2233), _A(0x110, 2, False, 0x2233),
    _A(0x120, 4, True, 0x44556677), _A(0x120, 4, False, 0x44556677),
    _A(0x130, 8, True, 0x8899AABBCCDDEEFF), _A(0x130, 8, False, 0x8899AABBCCDDEEFF),
]
