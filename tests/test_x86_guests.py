"""The bundled x86_64 guests, run on real KVM: what they print and how they end."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from pyvmm.outcome import ExitKind
from tests.conftest import run_cli
from tests.expected import MEMTOUCH_LINE, MMIO_GUEST_LOG, memtouch_checksum


@pytest.mark.timeout(90)
def test_hello_long_mode(boot_x86):
    run = boot_x86("hello")
    assert run.console == "Hello from a pyvmm guest (x86_64, long mode)\n"
    assert run.outcome.kind is ExitKind.HALT
    assert run.outcome.exits["KVM_EXIT_HLT"] == 1


@pytest.mark.timeout(90)
def test_hello_real_mode(boot_x86):
    run = boot_x86("hello16.bin")
    assert run.console == "Hello from a pyvmm guest (x86, real mode)\n"
    assert run.outcome.kind is ExitKind.HALT


@pytest.mark.timeout(90)
def test_hello_two_vcpus_both_halt(boot_x86):
    run = boot_x86("hello", vcpus=2)
    assert run.console.count("Hello") == 1  # only vCPU 0 prints
    assert run.outcome.kind is ExitKind.HALT
    assert run.outcome.exits["KVM_EXIT_HLT"] == 2


@pytest.mark.timeout(90)
def test_memtouch_checksum(boot_x86):
    run = boot_x86("memtouch", memory=4 << 20)
    m = re.fullmatch(MEMTOUCH_LINE, run.console)
    assert m, run.console
    start, end, checksum, errors = (int(g, 16) for g in m.groups())
    assert (start, end) == (2 << 20, 4 << 20)
    assert checksum == memtouch_checksum(start, end)
    assert errors == 0
    assert run.outcome.kind is ExitKind.GUEST_EXIT and run.outcome.status == 0


@pytest.mark.timeout(90)
def test_mmio_access_sizes(boot_x86):
    run = boot_x86("mmio")
    assert run.console == "mmio: ok\n"
    assert run.outcome.kind is ExitKind.GUEST_EXIT and run.outcome.status == 0
    assert run.vm.devices["testdev"].log == MMIO_GUEST_LOG


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name, kind, status, text", [
    ("shutdown-hlt", ExitKind.HALT, None, "shutdown: hlt\n"),
    ("shutdown-triple", ExitKind.SHUTDOWN, None, "shutdown: triple fault\n"),
    ("shutdown-exit", ExitKind.GUEST_EXIT, 0x42, "shutdown: exit port\n"),
    ("shutdown-reset", ExitKind.RESET, None, "shutdown: reset\n"),
])
def test_shutdown_paths(boot_x86, name, kind, status, text):
    run = boot_x86(name)
    assert run.console == text
    assert run.outcome.kind is kind
    assert run.outcome.status == status
    if kind is ExitKind.SHUTDOWN:
        report = run.outcome.report
        assert report.exit_reason == "KVM_EXIT_SHUTDOWN"
        assert any("triple" in c for c in report.likely_cause)


@pytest.mark.timeout(60)
def test_unknown_mmio_reads_zero_and_guest_continues(x86_firmware):
    """The mmio guest against a VM without the test device: reads return 0, the guest reports errors."""
    from pyvmm.vm import Vm

    with Vm() as vm:
        vm.add_memory(4 << 20)
        vm.create_vcpus(1)
        vm.mmio_bus.remove("test-device")  # its accesses become unclaimed
        vm.boot(os.path.join(x86_firmware, "mmio"))
        outcome = vm.run(timeout=30)
        console = vm.console.text()
    assert console.startswith("mmio: FAIL errors=")
    assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 8
    assert vm.mmio_bus.unclaimed_count == 12


@pytest.mark.timeout(60)
def test_timeout_stops_a_spinning_guest(x86_firmware, tmp_path):
    """A guest that never ends is stopped by the timeout; the vCPU thread is kicked out of KVM_RUN."""
    from pyvmm.vm import Vm

    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")  # jmp $
    with Vm() as vm:
        vm.add_memory(2 << 20)
        vm.create_vcpus(1)
        vm.boot(str(spin), mode="real")
        before = set(threading.enumerate())
        start = time.monotonic()
        outcome = vm.run(timeout=0.5)
        elapsed = time.monotonic() - start
        left = [t for t in threading.enumerate() if t not in before]
    assert outcome.kind is ExitKind.TIMEOUT
    assert outcome.detail == "the guest did not finish within 0.5 s"
    assert 0.5 <= elapsed < 1.5
    assert left == []  # the vCPU thread left KVM_RUN and ended


@pytest.mark.timeout(60)
def test_spin_guest_on_two_vcpus_times_out(boot_x86):
    """The long-mode spin guest (vCPU 0 prints, then every vCPU loops on jmp .) ends only by the timeout."""
    start = time.monotonic()
    run = boot_x86("spin", vcpus=2, timeout=0.5)
    assert time.monotonic() - start < 2.0
    assert run.console == "spin: spinning\n"
    assert run.outcome.kind is ExitKind.TIMEOUT
    assert "KVM_EXIT_HLT" not in run.outcome.exits


@pytest.mark.timeout(60)
def test_port_test_device_is_on_the_io_bus(boot_x86):
    seen = {}
    boot_x86("hello", inspect=lambda vm: seen.update(entry=vm.io_bus.find(0x510), last=vm.io_bus.find(0x51F),
                                                     after=vm.io_bus.find(0x520)))
    assert seen["entry"].device is seen["last"].device
    assert (seen["entry"].base, seen["entry"].size) == (0x510, 16)
    assert type(seen["entry"].device).__name__ == "PortTestDevice"
    assert seen["after"] is None


@pytest.mark.timeout(60)
def test_unclaimed_accesses_are_summed_up_in_one_line(x86_firmware):
    """Without -v: one line at the end (how many, the first few); with -v each address is logged too."""
    from pyvmm.vm import Vm

    with Vm() as vm:
        vm.add_memory(4 << 20)
        vm.mmio_bus.remove("test-device")  # its accesses become unclaimed
        vm.create_vcpus(1)
        vm.boot(os.path.join(x86_firmware, "mmio"))
        vm.run(timeout=30)
        line = vm.mmio_bus.summary()
        count = vm.mmio_bus.unclaimed_count
    assert count > 3 and line.startswith(f"{count} unclaimed mmio accesses (reads returned 0, writes were dropped): ")
    assert line.count(" at 0xd00000") == 3 and f"({count} in all)" in line, line
    assert len(set(line.split(": ", 1)[1].split(", ")[:3])) == 3  # three different accesses


@pytest.mark.timeout(60)
def test_cli_prints_the_unclaimed_summary_by_default(x86_firmware):
    guest = os.path.join(x86_firmware, "mmio-pending")  # it reads 0xd0010000, past the test device
    quiet = run_cli("run", "-q", guest, "-m", "4M")
    lines = [l for l in quiet.stderr.splitlines() if "unclaimed" in l]
    assert lines == ["pyvmm: 2 unclaimed mmio accesses (reads returned 0, writes were dropped): read of 8 at "
                     "0xd0010000, ... (2 in all) (-v logs each address)"], quiet.stderr
    verbose = run_cli("-v", "run", "-q", guest, "-m", "4M")
    assert "mmio bus: unclaimed read of 8 bytes at 0xd0010000" in verbose.stderr, verbose.stderr
    assert "(-v logs each address)" not in verbose.stderr
