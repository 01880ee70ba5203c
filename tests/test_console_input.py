"""pyvmm's stdin reaches the guest console: a pipe until EOF, a terminal in raw mode with an escape key."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from tests.conftest import ROOT, default_signals

pytestmark = pytest.mark.timeout(60)


def _pyvmm(*args):
    return [sys.executable, "-m", "pyvmm", "run", *args]


def test_piped_stdin_reaches_the_uart(x86_firmware):
    res = subprocess.run(_pyvmm(os.path.join(x86_firmware, "echo"), "-m", "2M"), input="hello there\n",
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert res.stdout == "echo: ready\ngot: hello there\n"
    assert res.returncode == 0x42


def test_end_of_piped_input_does_not_end_the_vm(x86_firmware):
    res = subprocess.run(_pyvmm(os.path.join(x86_firmware, "spin"), "-m", "2M", "--timeout", "1"),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 124 and res.stdout == "spin: spinning\n"


def _read_until(fd: int, text: bytes, limit: float = 20) -> bytes:
    seen = b""
    deadline = time.monotonic() + limit
    while text not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def _run_on_a_terminal(image: str, keys: bytes, wait_for: bytes, signum: int | None = None
                       ) -> tuple[int, bytes, list, list]:
    """Run pyvmm on a pseudo-terminal; type ``keys`` (or send ``signum``) once ``wait_for`` appeared.
    Returns (exit status, what the terminal showed, termios before, termios after)."""
    pid, master = pty.fork()
    if pid == 0:  # the child: pyvmm with the terminal as stdin/stdout/stderr
        os.chdir(ROOT)
        default_signals()  # as from a terminal, whatever the test run's own parent ignored
        os.execv(sys.executable, _pyvmm(image, "-m", "2M", "--timeout", "30"))
    try:
        before = termios.tcgetattr(master)
        shown = _read_until(master, wait_for)
        if signum is not None:
            os.kill(pid, signum)
        else:
            os.write(master, keys)
        shown += _read_until(master, b"pyvmm: ")
        shown += _read_until(master, b"\n", 5)
        _, status = os.waitpid(pid, 0)
        after = termios.tcgetattr(master)
    finally:
        os.close(master)
    return os.waitstatus_to_exitcode(status), shown, before, after


def test_terminal_input_is_raw_and_the_terminal_is_restored(x86_firmware):
    code, shown, before, after = _run_on_a_terminal(os.path.join(x86_firmware, "echo"), b"a\x03b\n",
                                                    b"echo: ready")
    assert code == 0x42
    assert b"got: a\x03b" in shown  # Ctrl-C is a key for the guest, not a signal for pyvmm
    assert after == before  # echo, canonical mode, signals: all as they were


def test_escape_key_ends_the_vm_and_restores_the_terminal(x86_firmware):
    code, shown, before, after = _run_on_a_terminal(os.path.join(x86_firmware, "spin"), b"\x1dq",
                                                    b"spin: spinning")
    assert code == 130
    assert b"pyvmm: stopped: ended from the terminal (Ctrl-] q)" in shown
    assert after == before
    assert before[3] & termios.ECHO and before[3] & termios.ICANON


def test_console_file_and_a_closed_stdout(x86_firmware, tmp_path):
    """--console-file takes the guest's output; a closed stdout (pyvmm run | head) ends nothing."""
    out = tmp_path / "console.txt"
    res = subprocess.run(_pyvmm(os.path.join(x86_firmware, "hello"), "-m", "2M", "--console-file", str(out)),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 0 and res.stdout == ""
    assert out.read_text() == "Hello from a pyvmm guest (x86_64, long mode)\n"
    bad = subprocess.run(_pyvmm("--console-file", str(tmp_path / "missing" / "x")), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    r, w = os.pipe()
    os.close(r)  # nobody reads the guest's output
    proc = subprocess.run(_pyvmm(os.path.join(x86_firmware, "hello"), "-m", "2M"), stdin=subprocess.DEVNULL,
                          stdout=w, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=30)
    os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "fault report" not in proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_cleanly_and_restore_the_terminal(x86_firmware, signum):
    code, shown, before, after = _run_on_a_terminal(os.path.join(x86_firmware, "spin"), b"", b"spin: spinning",
                                                    signum)
    assert code == 128 + signum
    assert f"pyvmm: stopped: stopped by {signal.Signals(signum).name}".encode() in shown
    assert after == before
