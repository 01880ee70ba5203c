"""Linux x86 boot protocol with Debian's own kernel.

This machine runs every guest instruction in KVM's emulator (about a million per second), so a
Linux guest cannot boot here.  What this test proves is as far as the machine allows: the bzImage
is loaded by the 64-bit boot protocol, enters startup_64, relocates itself and runs the
decompressor's C code, which parses *our* command line (earlyprintk=serial,ttyS0,115200) from
*our* zero page and programs the 16550 for 115200 baud.  On real hardware the same path boots on.
"""

from __future__ import annotations

import os

import pytest

from pyvmm.outcome import ExitKind, Outcome
from pyvmm.vm import Vm

KERNEL = os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "linux-x86_64", "vmlinuz")

# arch/x86/boot/compressed/early_serial_console.c: early_serial_init(port, 115200)
EARLY_SERIAL_INIT = [
    ("w", 3, 0x03), ("w", 1, 0x00), ("w", 2, 0x00), ("w", 4, 0x03),  # 8n1, no irqs, no fifo, DTR|RTS
    ("r", 3, None), ("w", 3, 0x83), ("w", 0, 0x01), ("w", 1, 0x00),  # DLAB on, divisor 1 = 115200
    ("w", 3, 0x03),  # DLAB off
]


@pytest.mark.timeout(180)
def test_bzimage_reaches_decompressor(x86_firmware):
    if not os.path.exists(KERNEL):
        pytest.skip(f"no Debian x86_64 kernel at {KERNEL} (scripts/dev test fetches linux-image-amd64)")
    with Vm() as vm:
        vm.add_memory(256 << 20)
        uart = vm.io_bus.remove("COM1 (16550)")
        seen = []

        class Watch:  # the real UART, with its accesses recorded
            def read(self, offset, size):
                seen.append(("r", offset, None))
                return uart.read(offset, size)

            def write(self, offset, data):
                seen.append(("w", offset, data[0]))
                uart.write(offset, data)
                if len(seen) >= len(EARLY_SERIAL_INIT):
                    vm.request_stop(Outcome(ExitKind.STOPPED, detail="decompressor set the UART up"))

        vm.io_bus.insert(Watch(), 0x3F8, 8, "COM1 (watched)")
        vm.create_vcpus(1)
        vm.boot(KERNEL, cmdline="earlyprintk=serial,ttyS0,115200 console=ttyS0")
        outcome = vm.run(timeout=120)
        rip = vm.vcpus[0].get_regs().rip
    assert outcome.kind is ExitKind.STOPPED, outcome.detail
    assert seen[:len(EARLY_SERIAL_INIT)] == EARLY_SERIAL_INIT
    assert 0x1000000 <= rip < 256 << 20  # running inside the relocated kernel image
