"""A 16550A UART: enough for a polled or interrupt-driven console (COM1 on x86, MMIO on arm64)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0
MCR_LOOP = 0x10


class Uart16550:
    """Registers at ``offset << reg_shift`` (0 for I/O ports, 2 for 32-bit spaced MMIO)."""

    def __init__(self, output: Callable[[bytes], None], irq: Callable[[bool], None] | None = None,
                 reg_shift: int = 0):
        self.output = output
        self.irq = irq
        self.reg_shift = reg_shift
        self.ier = self.lcr = self.mcr = self.scr = 0
        self.dll, self.dlm = 0x0C, 0  # 9600 baud
        self.fcr = 0
        self.thri_pending = False
        self.rx: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        """Host input (what a user types) for the guest to read."""
        with self._lock:
            self.rx.extend(data)
            self._update_irq()

    def _iir(self) -> int:
        fifo = IIR_FIFO if self.fcr & 1 else 0
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI | fifo
        if self.ier & IER_THRI and self.thri_pending:
            return IIR_THRI | fifo
        return IIR_NO_INT | fifo

    def _update_irq(self) -> None:
        if self.irq is not None:
            self.irq(not self._iir() & IIR_NO_INT)

    def read(self, offset: int, size: int) -> bytes:
        reg = offset >> self.reg_shift
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            value = self.dll if dlab else (self.rx.popleft() if self.rx else 0)
        elif reg == IER_DLM:
            value = self.dlm if dlab else self.ier
        elif reg == IIR_FCR:
            value = self._iir()
            if value & 0x0F == IIR_THRI:
                self.thri_pending = False
        elif reg == LCR:
            value = self.lcr
        elif reg == MCR:
            value = self.mcr
        elif reg == LSR:
            value = LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        elif reg == MSR:
            value = 0xB0  # DCD, DSR, CTS
        elif reg == SCR:
            value = self.scr
        else:
            value = 0
        self._update_irq()
        return value.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        reg = offset >> self.reg_shift
        value = data[0]
        dlab = self.lcr & LCR_DLAB
        if reg == RBR_THR_DLL:
            if dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                self.rx.append(value)
            else:
                self.output(bytes([value]))
                self.thri_pending = True
        elif reg == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
                self.thri_pending = bool(self.ier & IER_THRI)
        elif reg == IIR_FCR:
            self.fcr = value
            if value & 0x02:
                self.rx.clear()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value
        elif reg == SCR:
            self.scr = value
        self._update_irq()
