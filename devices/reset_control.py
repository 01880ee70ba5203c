"""The x86 reset control register (port 0xCF9): writing a value with bit 2 set resets the machine."""

from __future__ import annotations

from collections.abc import Callable

RST_CPU = 0x04


class ResetControl:
    def __init__(self, on_reset: Callable[[], None]):
        self.on_reset = on_reset
        self.value = 0

    def read(self, offset: int, size: int) -> bytes:
        return self.value.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self.value = data[0] & ~RST_CPU
        if data[0] & RST_CPU:
            self.on_reset()
