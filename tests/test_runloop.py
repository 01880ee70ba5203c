"""The run loop on real KVM: string port I/O, ending a run from other threads and by SIGINT,
READONLY memslots, and resuming a run that stopped while an MMIO read was pending.

The guests are in firmware/x86_64 (stringio, spin, rom, mmio-pending)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from pyvmm.devices.testdev import Access, MmioTestDevice, PortTestDevice
from pyvmm.kvm import uapi
from pyvmm.outcome import ExitKind, Outcome
from pyvmm.vm import Vm
from tests.conftest import ROOT, default_signals

pytestmark = pytest.mark.timeout(60)

SPIN_TEXT = "spin: spinning\n"


# --- helpers -----------------------------------------------------------------------------------
def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads alive now that were not alive before (the run's vCPU threads, whatever they are named)."""
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


@contextlib.contextmanager
def booted(x86_firmware, name: str, vcpus: int = 1, memory: int = 2 << 20, setup=None):
    """A VM with ``name`` booted; closed afterwards unless a vCPU thread is still running
    (unmapping ``kvm_run`` under a thread in KVM_RUN would crash the test process: leak it instead)."""
    vm = Vm()
    before = set(threading.enumerate())
    try:
        vm.add_memory(memory)
        if setup is not None:
            setup(vm)
        vm.create_vcpus(vcpus)
        vm.boot(os.path.join(x86_firmware, name))
        yield vm
    finally:
        left = _new_threads(before)
        if left:
            vm.request_stop(Outcome(ExitKind.STOPPED, detail="test cleanup"))
            for t in left:
                t.join(2)
        if not _new_threads(before):
            vm.close()


def _run_in_thread(vm: Vm, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["outcome"] = vm.run(**kwargs)
        except BaseException as exc:  # reported by the test, not lost in the thread
            result["error"] = exc

    t = threading.Thread(target=target, name="test-run-caller", daemon=True)
    t.start()
    return t, result


def _wait_for_console(vm: Vm, text: str, limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if vm.console.text() == text:
            return True
        time.sleep(0.01)
    return False


# --- string port I/O ---------------------------------------------------------------------------
# What firmware/x86_64/stringio.S sends, and where (port offsets from 0x510).
OUT8 = [0xA1, 0xA2, 0xA3, 0xA4, 0xA5]
OUT16 = [0xB001, 0xB102, 0xB203, 0xB304, 0xB405]
OUT32 = [0xC0000001, 0xC1000102, 0xC2000203, 0xC3000304, 0xC4000405]
IN_BUF = 0x200000
IN_ITEMS = [(8, 1), (10, 2), (12, 4)]  # (port offset, width) of rep insb, insw, insl; 5 items each


def _expected_port_log() -> list[Access]:
    log = [Access(0, 1, True, v) for v in OUT8]
    log += [Access(2, 2, True, v) for v in OUT16]
    log += [Access(4, 4, True, v) for v in OUT32]
    seq = PortTestDevice.sequence(1, 35)
    pos = 0
    for offset, width in IN_ITEMS:
        for _ in range(5):
            log.append(Access(offset, width, False, int.from_bytes(seq[pos:pos + width], "little")))
            pos += width
    return log


def test_string_io_both_directions_all_widths(boot_x86):
    """rep outs{b,w,l} and rep ins{b,w,l}, 5 items each: every item reaches the device as one access
    of its width, in order; the bytes the device returned land in guest memory in order."""
    seen = {}
    run = boot_x86("stringio", inspect=lambda vm: seen.update(mem=vm.memory.read(IN_BUF, 40)))
    assert run.outcome.kind is ExitKind.HALT, run.outcome.detail
    dev = run.vm.devices["porttest"]
    assert dev.log == _expected_port_log()
    assert dev.written == (bytes(OUT8) + b"".join(v.to_bytes(2, "little") for v in OUT16)
                           + b"".join(v.to_bytes(4, "little") for v in OUT32))
    assert seen["mem"] == PortTestDevice.sequence(1, 35) + bytes(5)  # 35 bytes read, nothing past them
    assert run.console == f"stringio: sum=0x{sum(range(1, 36)):016x}\n"


# --- ending a run from another thread ------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_timeout_when_run_is_called_from_a_non_main_thread(x86_firmware, vcpus):
    with booted(x86_firmware, "spin", vcpus) as vm:
        before = set(threading.enumerate())
        start = time.monotonic()
        t, result = _run_in_thread(vm, timeout=0.5)
        t.join(5)
        elapsed = time.monotonic() - start
        assert not t.is_alive(), "run(timeout=0.5) in a non-main thread had not returned after 5 s"
        assert "error" not in result, result.get("error")
        assert result["outcome"].kind is ExitKind.TIMEOUT, result["outcome"].detail
        assert 0.5 <= elapsed < 1.5
        assert _new_threads(before) == []  # no vCPU thread left in KVM_RUN
        assert vm.console.text() == SPIN_TEXT


@pytest.mark.timeout(30)
@pytest.mark.parametrize("vcpus", [1, 2])
def test_request_stop_from_main_thread_ends_a_run_in_another_thread(x86_firmware, vcpus):
    with booted(x86_firmware, "spin", vcpus) as vm:
        before = set(threading.enumerate())
        t, result = _run_in_thread(vm, timeout=30)
        assert _wait_for_console(vm, SPIN_TEXT), vm.console.text()  # the run is under way
        start = time.monotonic()
        vm.request_stop(Outcome(ExitKind.STOPPED, detail="stopped by the test"))
        t.join(5)
        elapsed = time.monotonic() - start
        assert not t.is_alive(), "run() had not returned 5 s after request_stop()"
        assert elapsed < 1.0
        assert "error" not in result, result.get("error")
        outcome = result["outcome"]
        assert (outcome.kind, outcome.detail) == (ExitKind.STOPPED, "stopped by the test")
        assert _new_threads(before) == []


FIRST_RUN_IN_A_THREAD = r"""
import os, sys, threading, time
from pyvmm.outcome import ExitKind, Outcome
from pyvmm.vm import Vm

image, vcpus, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with Vm() as vm:
    vm.add_memory(2 << 20)
    vm.create_vcpus(vcpus)
    vm.boot(image)
    result = {}
    t = threading.Thread(target=lambda: result.update(out=vm.run(timeout=0.5 if how == "timeout" else 30)))
    start = time.monotonic()
    t.start()
    if how == "stop":
        while vm.console.text() != "spin: spinning\n" and time.monotonic() - start < 10:
            time.sleep(0.01)
        start = time.monotonic()
        vm.request_stop(Outcome(ExitKind.STOPPED, detail="main thread"))
    t.join(5)
    if t.is_alive():
        print("STILL RUNNING", flush=True)
        os._exit(3)
    print(result["out"].kind.value, round(time.monotonic() - start, 3), flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, kind, limit", [("timeout", "timeout", 1.5), ("stop", "stopped", 1.0)])
def test_first_run_of_a_process_from_a_non_main_thread(x86_firmware, how, kind, limit):
    """In a fresh process whose main thread never ran a VM (nothing installed from the main thread)."""
    res = subprocess.run([sys.executable, "-c", FIRST_RUN_IN_A_THREAD, os.path.join(x86_firmware, "spin"), "2", how],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 0, (res.stdout, res.stderr)
    got, elapsed = res.stdout.split()
    assert got == kind
    assert float(elapsed) < limit


# --- SIGINT ------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_sigint_while_vcpus_spin_stops_the_run(x86_firmware):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("needs to run on the main thread (SIGINT is delivered there)")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT does not raise KeyboardInterrupt in this process")
    with booted(x86_firmware, "spin", vcpus=2) as vm:
        before = set(threading.enumerate())
        sent = {}

        def interrupt():
            _wait_for_console(vm, SPIN_TEXT)
            sent["at"] = time.monotonic()
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        timer = threading.Thread(target=interrupt, name="test-sigint", daemon=True)
        timer.start()
        try:
            outcome = vm.run(timeout=20)
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt escaped vm.run() instead of ending the run as STOPPED")
        ended = time.monotonic()
        timer.join(5)
        assert outcome.kind is ExitKind.STOPPED, outcome.detail
        assert "SIGINT" in outcome.detail
        assert ended - sent["at"] < 1.0
        assert _new_threads(before) == []  # no vCPU thread left in KVM_RUN


@pytest.mark.timeout(120)
def test_sigint_while_run_starts_its_vcpu_threads(x86_firmware):
    """SIGINT as soon as the first vCPU thread exists (the others may still be starting), then a little later:
    every time the run ends STOPPED, KeyboardInterrupt does not escape run(), and no vCPU thread is left."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("needs to run on the main thread (SIGINT is delivered there)")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT does not raise KeyboardInterrupt in this process")
    main = threading.main_thread().ident
    for attempt, delay in enumerate([0.0] * 8 + [0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01]):
        with booted(x86_firmware, "spin", vcpus=4) as vm:
            before = set(threading.enumerate())

            def interrupt():
                me = threading.current_thread()
                deadline = time.monotonic() + 10
                while not [t for t in _new_threads(before) if t is not me] and time.monotonic() < deadline:
                    time.sleep(0)
                if delay:
                    time.sleep(delay)
                signal.pthread_kill(main, signal.SIGINT)

            timer = threading.Thread(target=interrupt, name="test-sigint", daemon=True)
            timer.start()
            try:
                outcome = vm.run(timeout=20)
            except KeyboardInterrupt:
                pytest.fail(f"attempt {attempt} (SIGINT {delay * 1000:g} ms after the first vCPU thread started): "
                            "KeyboardInterrupt escaped vm.run()")
            timer.join(5)
            assert outcome.kind is ExitKind.STOPPED, (attempt, delay, outcome.detail)
            assert _new_threads(before) == [], (attempt, delay)


@pytest.mark.timeout(60)
def test_sigint_to_the_cli_stops_the_guest(x86_firmware):
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", os.path.join(x86_firmware, "spin"), "-m", "2M",
                             "--vcpus", "2"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=default_signals)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the CLI printed nothing within 20 s"
        assert proc.stdout.readline() == SPIN_TEXT  # the guest is running
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: stopped: ") and "SIGINT" in lines[0], err
    assert out == ""
    assert elapsed < 2.0


# --- READONLY memslots ---------------------------------------------------------------------------
ROM_GPA = 0x200000
ROM_SIZE = 0x10000
ROM_PATTERN = bytes((i * 37 + 11) & 0xFF for i in range(ROM_SIZE))
ROM_WRITE = 0xF1A5C0DE00C0FFEE  # what firmware/x86_64/rom.S writes to ROM_GPA + 0x100
FLASH_NAME = "flash (test)"


def _q(offset: int) -> int:
    return int.from_bytes(ROM_PATTERN[offset:offset + 8], "little")


def _rom_setup(flash=None):
    def setup(vm):
        vm.add_memory(ROM_SIZE, "memfd", gpa=ROM_GPA, flags=uapi.KVM_MEM_READONLY)
        vm.memory.write(ROM_GPA, ROM_PATTERN)
        if flash is not None:
            vm.mmio_bus.insert(flash, ROM_GPA, ROM_SIZE, FLASH_NAME)
    return setup


def _rom_run(x86_firmware, flash=None):
    with booted(x86_firmware, "rom", setup=_rom_setup(flash)) as vm:
        outcome = vm.run(timeout=30)
        return (outcome, vm.console.text(), bytes(vm.devices["testdev"].scratch[:24]),
                vm.memory.read(ROM_GPA, ROM_SIZE), vm.memory.rom_writes_dropped)


def test_rom_write_nobody_claims_is_dropped_and_counted(x86_firmware):
    outcome, console, scratch, rom, dropped = _rom_run(x86_firmware)
    assert outcome.kind is ExitKind.HALT, (outcome.detail, outcome.report and outcome.report.text())
    # the guest read the pattern, and read it back unchanged after its write
    assert console == f"rom: 0x{_q(0):016x} 0x{_q(0x100):016x} 0x{_q(0x100):016x}\n"
    assert scratch == ROM_PATTERN[0:8] + ROM_PATTERN[0x100:0x108] * 2
    assert rom == ROM_PATTERN
    assert dropped == 1
    assert outcome.exits["KVM_EXIT_MMIO"] == 4  # the ROM write + 3 test-device writes; ROM reads do not exit


def test_rom_write_claimed_by_a_device_reaches_it(x86_firmware):
    """Flash-like: a device over the READONLY slot gets the guest's writes; reads still come from the slot."""
    flash = MmioTestDevice()
    outcome, console, scratch, rom, dropped = _rom_run(x86_firmware, flash)
    assert outcome.kind is ExitKind.HALT, (outcome.detail, outcome.report and outcome.report.text())
    assert flash.log == [Access(0x100, 8, True, ROM_WRITE)]
    assert bytes(flash.scratch[0:8]) == ROM_WRITE.to_bytes(8, "little")
    assert console == f"rom: 0x{_q(0):016x} 0x{_q(0x100):016x} 0x{_q(0x100):016x}\n"
    assert scratch == ROM_PATTERN[0:8] + ROM_PATTERN[0x100:0x108] * 2
    assert rom == ROM_PATTERN
    assert dropped == 0


# --- resuming after a pending MMIO read -------------------------------------------------------------
PENDING_GPA = 0xD0010000  # where firmware/x86_64/mmio-pending.S reads (twice, 8 bytes)
FIRST_VALUE = 0x1122334455667788
SECOND_VALUE = 0x99AABBCCDDEEFF00


class StopsOnFirstRead:
    """Answers reads with FIRST_VALUE then SECOND_VALUE; the first read also ends the run."""

    def __init__(self, vm: Vm):
        self.vm = vm
        self.log: list[Access] = []

    def read(self, offset: int, size: int) -> bytes:
        values = (FIRST_VALUE, SECOND_VALUE)
        value = values[len(self.log)] if len(self.log) < len(values) else 0
        self.log.append(Access(offset, size, False, value))
        if len(self.log) == 1:
            self.vm.request_stop(Outcome(ExitKind.STOPPED, detail="the device stopped the VM during a read"))
        return value.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(Access(offset, len(data), True, int.from_bytes(data, "little")))


def test_resume_after_a_run_stopped_during_an_mmio_read(x86_firmware):
    with booted(x86_firmware, "mmio-pending") as vm:
        dev = StopsOnFirstRead(vm)
        vm.mmio_bus.insert(dev, PENDING_GPA, 0x1000, "stops-on-first-read")
        first = vm.run(timeout=30)
        assert (first.kind, first.detail) == (ExitKind.STOPPED, "the device stopped the VM during a read")
        assert dev.log == [Access(0, 8, False, FIRST_VALUE)]
        assert vm.devices["testdev"].log == []  # the guest has not got past the read
        run = vm.vcpus[0].kvm_run
        if run.exit_reason == uapi.KVM_EXIT_MMIO:  # still pending: the next KVM_RUN completes it from here
            assert (run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == (PENDING_GPA, 8, 0)
            assert bytes(run.mmio.data[:8]) == FIRST_VALUE.to_bytes(8, "little")

        second = vm.run(timeout=30)
        assert second.kind is ExitKind.HALT, second.detail
        # the first read was completed with the device's value, not re-issued and not lost
        assert dev.log == [Access(0, 8, False, FIRST_VALUE), Access(0, 8, False, SECOND_VALUE)]
        assert vm.console.text() == f"mmio-pending: 0x{FIRST_VALUE:016x} 0x{SECOND_VALUE:016x}\n"
        scratch = bytes(vm.devices["testdev"].scratch[:16])
        assert scratch == FIRST_VALUE.to_bytes(8, "little") + SECOND_VALUE.to_bytes(8, "little")


# --- stop, close and failure paths found in review ----------------------------------------------------------

def _wait_running(vm: Vm, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 10
    while "running" not in vm.vcpu_states().values() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.mark.timeout(120)
def test_close_while_another_thread_runs_the_vm(x86_firmware):
    """Vm.close() from one thread while run() spins in another: run() returns STOPPED, never raises,
    and nothing is closed under a vCPU still in KVM_RUN."""
    for attempt in range(10):
        vm = Vm()
        vm.add_memory(2 << 20)
        vm.create_vcpus(4)
        vm.boot(os.path.join(x86_firmware, "spin"))
        result: dict = {}

        def runner():
            try:
                result["outcome"] = vm.run(timeout=30)
            except BaseException as exc:  # what the test is about: nothing may escape
                result["error"] = exc

        before = set(threading.enumerate())
        thread = threading.Thread(target=runner)
        thread.start()
        _wait_running(vm, thread)
        time.sleep(0.002 * attempt)
        vm.close()
        thread.join(10)
        assert not thread.is_alive()
        assert "error" not in result, (attempt, result.get("error"))
        assert result["outcome"].kind is ExitKind.STOPPED and result["outcome"].detail == "the VM was closed"
        assert _new_threads(before) == []
        assert vm.fd.closed and vm.vcpus == []


@pytest.mark.timeout(60)
def test_a_vcpu_that_cannot_start_stops_the_others(x86_firmware, monkeypatch):
    from pyvmm import vcpu as vcpu_mod

    real_start = vcpu_mod.Vcpu.start

    def start(self, body, on_error):
        if self.index == 1:
            raise RuntimeError("can't start new thread")
        real_start(self, body, on_error)

    monkeypatch.setattr(vcpu_mod.Vcpu, "start", start)
    with booted(x86_firmware, "spin", vcpus=2) as vm:
        before = set(threading.enumerate())
        with pytest.raises(RuntimeError, match="can't start new thread"):
            vm.run(timeout=30)
        assert _new_threads(before) == []
        assert vm.vcpu_states()[0] == "exited"


@pytest.mark.timeout(60)
def test_a_fault_is_not_replaced_by_a_timeout_while_its_report_is_built(x86_firmware, monkeypatch):
    from pyvmm import runloop

    real = runloop.build_report

    def slow_report(*args, **kwargs):
        time.sleep(1.0)  # the run's timeout (0.3 s) passes meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(runloop, "build_report", slow_report)
    with booted(x86_firmware, "shutdown-triple") as vm:
        outcome = vm.run(timeout=0.3)
    assert outcome.kind is ExitKind.SHUTDOWN
    assert outcome.report is not None and outcome.report.exit_reason == "KVM_EXIT_SHUTDOWN"


@pytest.mark.timeout(60)
def test_a_failure_while_a_vcpu_thread_sets_up_ends_the_run(x86_firmware, monkeypatch):
    """run() without a timeout must not hang when a vCPU thread fails before its first KVM_RUN."""
    from pyvmm.kvm.vcpu import VcpuFd

    def broken(self, blocked):
        raise OSError(22, "injected KVM_SET_SIGNAL_MASK failure")

    monkeypatch.setattr(VcpuFd, "set_signal_mask", broken)
    with booted(x86_firmware, "spin") as vm:
        outcome = vm.run()
    assert outcome.kind is ExitKind.FAULT
    assert outcome.detail.startswith("pyvmm error on vCPU 0: OSError(22, 'injected KVM_SET_SIGNAL_MASK failure')")


@pytest.mark.timeout(60)
def test_vcpu_threads_block_the_kick_and_process_signals(x86_firmware):
    """The kick is deliverable only inside KVM_RUN (KVM_SET_SIGNAL_MASK): outside it, the thread blocks it."""
    from pyvmm.vcpu import KICK_SIGNAL

    masks = {}

    def setup(vm):
        def probe(offset, size):
            tid = threading.get_native_id()
            with open(f"/proc/self/task/{tid}/status") as f:
                masks["SigBlk"] = int(next(l for l in f if l.startswith("SigBlk:")).split()[1], 16)
            vm.request_stop(Outcome(ExitKind.STOPPED, detail="probed"))
            return bytes(size)

        class Probe:
            read = staticmethod(probe)

            def write(self, offset, data):
                pass

        vm.mmio_bus.remove("test-device")
        vm.mmio_bus.insert(Probe(), 0xD0000000, 0x1000, "probe")

    with booted(x86_firmware, "mmio", setup=setup) as vm:
        assert vm.run(timeout=30).detail == "probed"
    for sig in (KICK_SIGNAL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        assert masks["SigBlk"] & (1 << (int(sig) - 1)), sig


def test_kernel_log_lines_of_ended_vcpu_threads_stay_ours():
    from pyvmm.hostinfo import KmsgFilter, KmsgRecord

    flt = KmsgFilter.for_this_process({0: 999_998}, past_tids={999_999})
    record = KmsgRecord(seq=1, ts_us=1, level=3, facility=0, text="some message", caller="T999999")
    assert flt.ours(record) is True
    assert flt.ours(KmsgRecord(seq=2, ts_us=1, level=3, facility=0, text="x", caller="T999997")) is False
