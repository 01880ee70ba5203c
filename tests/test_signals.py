"""Signals and a closed stdout, on real KVM with real processes: SIGINT, SIGTERM and SIGHUP at any moment (while
pyvmm is imported, while the VM is set up, while the guest runs, while everything is closed) end pyvmm cleanly with
128 + the signal and one line; a second Ctrl-C changes nothing; the vCPU kick sent to the process does not kill it;
a reader that closes stdout early does not turn into a fault.  And every exit status of `pyvmm run` documented in
EXIT_STATUSES is one `_exit_status` produces."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from pyvmm.outcome import ExitKind, Outcome
from tests.conftest import ROOT, default_signals

SPIN_TEXT = "spin: spinning\n"
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
# A real-mode flat binary that prints "x" on COM1 forever: mov $0x3f8,%dx; mov $'x',%al; 1: out %al,(%dx); jmp 1b
CHATTER = bytes.fromhex("baf803b078eeebfd")


def pyvmm(*args, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyvmm", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            preexec_fn=default_signals,
                            stdout=stdout, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 20) -> tuple[bytes, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # say what the process made of its signals before it is killed
        with open(f"/proc/{proc.pid}/status") as f:
            sigs = [line.strip() for line in f if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))]
        raise AssertionError(f"pyvmm did not end within {timeout} s; its signal state: {sigs}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out or b"", err.decode(errors="replace")


def wait_for_spin(proc: subprocess.Popen) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready, "the guest printed nothing within 30 s"
    assert proc.stdout.readline() == SPIN_TEXT.encode()


def pyvmm_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("pyvmm: ")]


def stop_lines(err: str) -> list[str]:
    return [line for line in pyvmm_lines(err) if line.startswith(("pyvmm: stopped", "pyvmm: interrupted"))]


def handles(pid: int, sig: int) -> bool:
    """Whether the process catches ``sig`` now (SigCgt): for SIGTERM and SIGHUP, pyvmm's own handlers exist."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (sig - 1)))


@pytest.fixture(scope="module")
def spin(x86_firmware):
    return os.path.join(x86_firmware, "spin")


# --- while the guest runs -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_while_the_guest_runs(spin, sig):
    proc = pyvmm("run", spin, "-m", "2M", "--vcpus", "2", "--timeout", "30")
    wait_for_spin(proc)
    start = time.monotonic()
    proc.send_signal(sig)
    out, err = finish(proc)
    assert proc.returncode == STATUS[sig], err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    said = "interrupted (SIGINT)" if sig == signal.SIGINT else f"stopped by {sig.name}"
    assert stop_lines(err) == [f"pyvmm: stopped: {said}"], err
    assert pyvmm_lines(err) == stop_lines(err), err
    assert out == b""  # nothing left unread: the console was flushed before pyvmm's line
    assert time.monotonic() - start < 5


# --- while pyvmm starts: importing, setting the VM up, starting the vCPUs ------------------------------------------
STARTUP_DELAYS = (0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_while_pyvmm_starts(spin, sig):
    """Sent at several moments after the process exists: some land while Python itself starts (before pyvmm's first
    line: the signal's default action, or Python's own KeyboardInterrupt while it imports `site`), the rest while
    pyvmm is imported, set up or running.  Once pyvmm's handlers exist, every run ends with 128 + signal, one line,
    no traceback."""
    marker = signal.SIGTERM if sig == signal.SIGINT else sig  # Python catches SIGINT itself from its start
    outcomes = []
    for delay in STARTUP_DELAYS:
        proc = pyvmm("run", spin, "-m", "2M", "--timeout", "20")
        if delay:
            time.sleep(delay)
        ours = handles(proc.pid, marker)
        proc.send_signal(sig)
        _, err = finish(proc)
        outcomes.append((delay, ours, proc.returncode))
        if not ours and proc.returncode != STATUS[sig]:  # before pyvmm's first line: Python's business
            assert proc.returncode in (-sig, 1), (delay, proc.returncode, err)
            assert "/pyvmm/" not in err, (delay, err)  # nothing of pyvmm's own ran
            continue
        assert proc.returncode == STATUS[sig], (delay, ours, proc.returncode, err)
        assert "Traceback" not in err and "Exception ignored" not in err, (delay, err)
        assert len(stop_lines(err)) == 1, (delay, err)
    assert any(ours for _, ours, _ in outcomes), outcomes  # some did land after pyvmm took the signals over


# --- two Ctrl-Cs ----------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_double_ctrl_c(spin):
    """The second SIGINT lands while the first is handled: in the run loop, while the vCPUs are joined, while the VM
    is closed, while the outcome is printed.  Always 130 and one line; never a traceback, never killed by a signal."""
    for gap in (0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1) * 2:
        proc = pyvmm("run", spin, "-m", "2M", "--vcpus", "2", "--timeout", "30")
        wait_for_spin(proc)
        proc.send_signal(signal.SIGINT)
        if gap:
            time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = finish(proc)
        assert proc.returncode == 130, (gap, proc.returncode, err)
        assert "Traceback" not in err and "release unlocked lock" not in err, (gap, err)
        assert stop_lines(err) == ["pyvmm: stopped: interrupted (SIGINT)"], (gap, err)


@pytest.mark.timeout(60)
def test_a_storm_of_signals_is_one_stop(spin):
    """SIGTERM, then SIGINT and SIGHUP and more within a few ms: the first one handled decides; nothing else shows."""
    for _ in range(3):
        proc = pyvmm("run", spin, "-m", "2M", "--vcpus", "2", "--timeout", "30")
        wait_for_spin(proc)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            if proc.poll() is None:
                proc.send_signal(sig)
            time.sleep(0.002)
        _, err = finish(proc)
        assert proc.returncode in STATUS.values(), (proc.returncode, err)
        assert "Traceback" not in err, err
        assert len(stop_lines(err)) == 1, err


# --- the vCPU kick, sent to the process ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_kick_signal_sent_to_the_process_is_harmless(spin):
    from pyvmm.vcpu import KICK_SIGNAL

    proc = pyvmm("run", spin, "-m", "2M", "--vcpus", "2", "--timeout", "1.5")
    wait_for_spin(proc)
    for _ in range(20):
        if proc.poll() is None:
            os.kill(proc.pid, KICK_SIGNAL)
        time.sleep(0.01)
    _, err = finish(proc)
    assert proc.returncode == 124, (proc.returncode, err)  # ended by its timeout, as if nothing had happened
    assert pyvmm_lines(err) == ["pyvmm: timeout: the guest did not finish within 1.5 s"], err


# --- a closed stdout ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_stdout_closed_while_the_guest_prints(x86_firmware, tmp_path):
    """`pyvmm run | head -c 10`: the console drops what it can no longer write; the guest runs on to its timeout."""
    chatter = tmp_path / "chatter.bin"
    chatter.write_bytes(CHATTER)
    proc = pyvmm("run", str(chatter), "-m", "2M", "--timeout", "1.5")
    assert proc.stdout.read(10) == b"x" * 10
    proc.stdout.close()
    _, err = finish(proc)
    assert proc.returncode == 124, err
    assert pyvmm_lines(err) == ["pyvmm: timeout: the guest did not finish within 1.5 s"], err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


@pytest.mark.timeout(60)
def test_stdout_closed_before_the_guest_prints(x86_firmware):
    """hello prints into a pipe nobody reads any more, then halts: a clean end, status 0."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = pyvmm("run", os.path.join(x86_firmware, "hello"), "-m", "4M", stdout=write)
    finally:
        os.close(write)
    _, err = finish(proc)
    assert proc.returncode == 0, err
    assert pyvmm_lines(err) == ["pyvmm: halt: every vCPU halted"], err
    assert "Traceback" not in err and "Exception ignored" not in err, err


# --- the terminal, and a reader that does not read -------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_terminal_is_restored_after_a_signal(spin, sig):
    """stdin on a terminal (a pty) is put in raw mode for the run; a signal gives it back as it was."""
    import pty
    import termios

    main, tty = pty.openpty()
    try:
        before = termios.tcgetattr(tty)
        proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", spin, "-m", "2M", "--timeout", "30"],
                                cwd=ROOT, stdin=tty, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=default_signals)
        wait_for_spin(proc)
        assert termios.tcgetattr(tty) != before  # raw while the guest runs
        proc.send_signal(sig)
        _, err = finish(proc)
        assert proc.returncode == STATUS[sig], err
        assert "Traceback" not in err and len(stop_lines(err)) == 1, err
        assert termios.tcgetattr(tty) == before
    finally:
        os.close(main)
        os.close(tty)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "timeout"])
def test_stop_while_nobody_reads_stdout(x86_firmware, tmp_path, how):
    """`pyvmm run | sleep 1000`: the vCPU waits for the reader while the guest prints (the pipe is full); a stop
    still ends the run at once (the console gives the write up), no vCPU is left behind, nothing hangs."""
    chatter = tmp_path / "chatter.bin"
    chatter.write_bytes(CHATTER)
    read, write = os.pipe()
    try:
        proc = pyvmm("run", str(chatter), "-m", "2M", "--timeout", "1" if how == "timeout" else "30", stdout=write)
        os.close(write)
        if how != "timeout":
            time.sleep(1)  # the pipe is full long before
            proc.send_signal(getattr(signal, how))
        start = time.monotonic()
        _, err = finish(proc)
    finally:
        os.close(read)
    assert proc.returncode == {"SIGTERM": 143, "SIGINT": 130, "timeout": 124}[how], err
    assert time.monotonic() - start < 4, err
    assert "Traceback" not in err and "did not leave KVM_RUN" not in err and "error" not in err, err
    assert len(pyvmm_lines(err)) == 1, err


# --- in-process: a signal at an exact moment of the command ---------------------------------------------------------
def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def main_thread_only():
    """The main thread, with SIGINT/SIGTERM/SIGHUP as in a process started from a terminal for the test's duration
    (a test run started in the background has SIGINT ignored, and pyvmm keeps what its parent ignored)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers exist on the main thread only")
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
    previous = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _send_to_self(*sigs):
    for sig in sigs:
        signal.pthread_kill(threading.main_thread().ident, sig)


@pytest.mark.timeout(60)
def test_signal_during_set_up_unwinds_and_closes_everything(x86_firmware, main_thread_only, monkeypatch, capsys):
    """SIGTERM while the guest is loaded, then SIGINT and SIGHUP while the VM is closed on the way out: 143, the one
    line, every fd closed, the previous handlers back."""
    from pyvmm import cli
    from pyvmm.vm import Vm

    real_boot, real_close = Vm.boot, Vm.close
    closes = []

    def boot(self, *args, **kwargs):
        _send_to_self(signal.SIGTERM)
        return real_boot(self, *args, **kwargs)

    def close(self):
        _send_to_self(signal.SIGINT, signal.SIGHUP)
        for _ in range(1000):  # bytecodes enough for the handlers to run (and not raise) in here
            pass
        real_close(self)
        closes.append(self)

    monkeypatch.setattr(Vm, "boot", boot)
    monkeypatch.setattr(Vm, "close", close)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    before = _open_fds()
    status = cli.main(["run", os.path.join(x86_firmware, "spin"), "-m", "2M", "--timeout", "20"])
    err = capsys.readouterr().err
    assert status == 143, err
    assert err.splitlines() == ["pyvmm: stopped by SIGTERM"]
    assert len(closes) == 1
    assert _open_fds() == before
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_after_the_run_changes_nothing(x86_firmware, main_thread_only, monkeypatch, capsys, sig):
    """The guest halted; the signal comes while the VM is closed: close() is not interrupted (no fd left open), and
    the status is the guest's (0): the run had ended before anyone asked to stop it.  A second signal would get
    the default action (a pyvmm blocked after its run can always be stopped): its handler is SIG_DFL then."""
    from pyvmm import cli
    from pyvmm.vm import Vm

    real_close = Vm.close
    handlers = []

    def close(self):
        _send_to_self(sig)
        for _ in range(1000):
            pass
        handlers.append(signal.getsignal(sig))
        real_close(self)

    monkeypatch.setattr(Vm, "close", close)
    before = _open_fds()
    status = cli.main(["run", os.path.join(x86_firmware, "hello"), "-m", "4M"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.err.splitlines() == ["pyvmm: halt: every vCPU halted"]
    assert _open_fds() == before
    assert handlers == [signal.SIG_DFL]


@pytest.mark.timeout(60)
def test_library_run_and_a_double_ctrl_c(x86_firmware, main_thread_only):
    """pyvmm as a library, Python's default SIGINT handler: the first Ctrl-C ends vm.run() STOPPED; a second one
    while it stops raises nothing (one after run() returned is the caller's); the default handler is back after."""
    from pyvmm.vm import Vm

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT does not raise KeyboardInterrupt in this process")
    for gap in (0, 0, 0.0002, 0.0005, 0.001, 0.005):
        with Vm() as vm:
            vm.add_memory(2 << 20)
            vm.create_vcpus(2)
            vm.boot(os.path.join(x86_firmware, "spin"))
            returned = threading.Event()

            def interrupt():
                deadline = time.monotonic() + 10
                while vm.console.text() != SPIN_TEXT and time.monotonic() < deadline:
                    time.sleep(0.002)
                _send_to_self(signal.SIGINT)
                time.sleep(gap)
                if not returned.is_set():
                    _send_to_self(signal.SIGINT)

            sender = threading.Thread(target=interrupt, daemon=True)
            sender.start()
            ran = False
            try:
                outcome = vm.run(timeout=20)
                ran = True
                returned.set()
                sender.join(5)
                for _ in range(1000):
                    pass
            except KeyboardInterrupt:
                if not ran:
                    pytest.fail(f"a KeyboardInterrupt escaped vm.run() (second Ctrl-C {gap * 1000:g} ms after the "
                                "first)")
                # else the second one came after run() had returned: the caller's
            assert outcome.kind is ExitKind.STOPPED and "SIGINT" in outcome.detail, outcome.detail
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- the exit statuses ------------------------------------------------------------------------------------------------
def test_every_documented_exit_status_is_produced():
    from pyvmm.cli import EXIT_STATUSES, _exit_status

    produced = {
        "0": [Outcome(ExitKind.HALT), Outcome(ExitKind.POWER_OFF), Outcome(ExitKind.RESET),
              Outcome(ExitKind.GUEST_EXIT, status=0), Outcome(ExitKind.DEBUG)],
        "N": [Outcome(ExitKind.GUEST_EXIT, status=0x42), Outcome(ExitKind.GUEST_EXIT, status=1000)],
        "1": [Outcome(ExitKind.FAULT), Outcome(ExitKind.SHUTDOWN), Outcome(ExitKind.CRASH)],
        "124": [Outcome(ExitKind.TIMEOUT)],
        "129": [Outcome(ExitKind.STOPPED, status=signal.SIGHUP)],
        "130": [Outcome(ExitKind.STOPPED, status=signal.SIGINT), Outcome(ExitKind.STOPPED)],  # Ctrl-] q: no signal
        "143": [Outcome(ExitKind.STOPPED, status=signal.SIGTERM)],
    }
    assert [_exit_status(o) for o in produced["0"]] == [0] * 5
    assert [_exit_status(o) for o in produced["N"]] == [0x42, 255]
    for status in ("1", "124", "129", "130", "143"):
        assert {_exit_status(o) for o in produced[status]} == {int(status)}, status
    documented = [status for status, _ in EXIT_STATUSES]
    assert documented == ["0", "N", "1", "2", "124", "129", "130", "143"]
    assert all(meaning for _, meaning in EXIT_STATUSES)
    # 2 is the command's, before any outcome: bad input (tests/test_cli.py), a host that cannot run the VM
    from pyvmm.cli import EXIT_BAD_INPUT, signal_line

    assert EXIT_BAD_INPUT == 2
    assert signal_line(signal.SIGTERM) == "pyvmm: stopped by SIGTERM"


@pytest.mark.timeout(60)
def test_a_signal_ignored_by_who_started_pyvmm_stays_ignored(spin):
    """nohup ignores SIGHUP, a script's `pyvmm ... &` SIGINT: pyvmm keeps them ignored (the guest runs on to its
    timeout) and still stops on the others."""
    def ignore_hup_and_int():
        default_signals()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", spin, "-m", "2M", "--timeout", "1.5"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=ignore_hup_and_int)
    wait_for_spin(proc)
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGINT)
    _, err = finish(proc)
    assert proc.returncode == 124, err  # both ignored: the timeout ended it
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", spin, "-m", "2M", "--timeout", "30"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=ignore_hup_and_int)
    wait_for_spin(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = finish(proc)
    assert proc.returncode == 143 and stop_lines(err) == ["pyvmm: stopped: stopped by SIGTERM"], err
