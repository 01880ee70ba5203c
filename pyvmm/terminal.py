"""The host side of the guest console's input: pyvmm's stdin, forwarded to the UART or virtio console.

When stdin is a terminal it is put in raw mode (every key goes to the guest, Ctrl-C included) and
``ESCAPE`` (Ctrl-]) followed by ``q`` ends the VM; Ctrl-] twice sends one Ctrl-] to the guest.  The
terminal is restored when the forwarder stops, whatever ended the run.  When stdin is not a
terminal (a pipe, a file) it is forwarded as it is until end of file.
"""

from __future__ import annotations

import os
import select
import signal
import termios
import threading
import tty
from collections.abc import Callable

from .vcpu import PROCESS_SIGNALS
from .logs import getLogger

log = getLogger("pyvmm.terminal")


def discard_output(stream) -> None:
    """``stream`` (sys.stdout, sys.stderr) can no longer be written (a closed pipe: ``pyvmm run | head``; a hung-up
    terminal): point its fd at /dev/null, so what is still buffered or written later (Python's own flush at exit
    included) vanishes quietly instead of raising again, as the Python docs advise for SIGPIPE."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(devnull, fd, inheritable=fd <= 2)
    finally:
        os.close(devnull)


ESCAPE = 0x1D  # Ctrl-]
ESCAPE_HELP = "Ctrl-] q ends the VM (Ctrl-] Ctrl-] sends one Ctrl-] to the guest)"


class StdinForwarder:
    def __init__(self, feed: Callable[[bytes], None], on_escape: Callable[[], None], fd: int = 0):
        self.feed = feed
        self.on_escape = on_escape
        self.fd = fd
        self._saved: list | None = None
        self._stop_r: int | None = None
        self._stop_w: int | None = None
        self._thread: threading.Thread | None = None
        self._escaped = False

    @property
    def interactive(self) -> bool:
        return self._saved is not None

    def start(self) -> None:
        try:
            os.fstat(self.fd)
        except OSError:  # no stdin at all (closed): nothing to forward
            return
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
        try:
            if self._saved is not None:
                tty.setraw(self.fd, termios.TCSANOW)
                attrs = termios.tcgetattr(self.fd)  # keep output processing: "\n" still starts a new line
                attrs[1] |= termios.OPOST | termios.ONLCR
                termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
            self._thread = threading.Thread(target=self._forward, name="pyvmm-stdin", daemon=True)
            self._thread.start()
        except BaseException:  # __exit__ does not run when __enter__ fails: give the terminal back here
            self.stop()
            raise

    def _forward(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                continue
            except OSError as err:
                log.info("stdin: %s; no more input for the guest", err.strerror)
                return
            if not data:  # end of file
                return
            if self.interactive:
                data = self._escape(data)
            if data:
                try:
                    self.feed(data)
                except Exception:  # a device must not take the forwarder down
                    log.exception("console input dropped")

    def _escape(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escaped:
                self._escaped = False
                if byte == ESCAPE:
                    out.append(ESCAPE)
                elif byte in (ord("q"), ord("Q")):
                    self.on_escape()
                continue
            if byte == ESCAPE:
                self._escaped = True
            else:
                out.append(byte)
        return bytes(out)

    def stop(self) -> None:
        """Give the terminal back as it was, then stop forwarding (idempotent).  The terminal first: whatever
        interrupts the rest (a signal raising in the main thread), the user's terminal is not left raw."""
        try:
            self._stop_forwarding()
        finally:
            self._restore_terminal()

    def _restore_terminal(self) -> None:
        if self._saved is not None:
            saved, self._saved = self._saved, None
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except (termios.error, OSError) as err:  # the terminal is gone (SIGHUP: hung up): nothing to restore
                log.info("terminal not restored: %s", err)

    def _stop_forwarding(self) -> None:
        self._restore_terminal()
        if self._stop_w is not None:
            os.write(self._stop_w, b"x")
        stopped = True
        if self._thread is not None:
            self._thread.join(2)
            stopped = not self._thread.is_alive()
        if stopped:  # a thread still inside feed() keeps its fds: closing them under it is not safe
            for fd in (self._stop_r, self._stop_w):
                if fd is not None:
                    os.close(fd)
            self._stop_r = self._stop_w = None
            self._thread = None

    def __enter__(self) -> "StdinForwarder":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
