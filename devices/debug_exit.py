"""A write-only "exit" port: the guest writes a status and the VM stops with it.

Like QEMU's isa-debug-exit (x86 port 0x501 by default in pyvmm), for test
guests that want to end with a status the host can assert on.
"""

from __future__ import annotations

from collections.abc import Callable


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None]):
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.on_exit(int.from_bytes(data, "little"))
