"""A vCPU: its fd, the thread that runs it, its signal mask and its kick.

How a vCPU is stopped, from any thread, without a race (as QEMU, kvmtool and crosvm do it):

* Every vCPU thread blocks ``KICK_SIGNAL`` (a real-time signal of pyvmm's own) and the signals
  meant for the process (SIGINT, SIGTERM, SIGHUP, SIGQUIT), so they go to the main thread.
* ``KVM_SET_SIGNAL_MASK`` gives KVM the same mask without ``KICK_SIGNAL``: the kick can only
  be taken *inside* ``KVM_RUN``.  A kick sent while the thread runs Python code stays pending,
  and the next ``KVM_RUN`` returns EINTR at once; the thread then consumes it (``sigtimedwait``).
* ``kick()`` also sets ``immediate_exit``, so a thread about to enter ``KVM_RUN`` leaves at once.

No signal handler runs for a kick sent to a vCPU thread (it is blocked there outside ``KVM_RUN``, and
consumed by ``sigtimedwait`` after), so this works whichever thread calls ``Vm.run()`` (a test runner, a
script's worker thread): nothing depends on installing a handler from the main thread.

But ``KICK_SIGNAL``'s default action is to terminate the process, and a kick sent to the *process*
(``kill(pid, SIGRTMIN+2)`` from outside) goes to any thread that does not block it: the main thread,
a device thread.  So the first ``Vcpu`` made on the main thread gives the kick a handler that does
nothing, process-wide (``ensure_kick_is_harmless``; pyvmm's command always makes its vCPUs there).
"""

from __future__ import annotations

import collections
import enum
import signal
import threading
from collections.abc import Callable

from .kvm import exits
from .kvm.ioctl import libc
from .kvm.vcpu import VcpuFd

KICK_SIGNAL = signal.SIGRTMIN + 2
# Signals for the process: never taken by a vCPU thread, so Ctrl-C and friends reach the main thread.
PROCESS_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
BLOCKED_IN_VCPU_THREADS = PROCESS_SIGNALS | {KICK_SIGNAL}

PR_SET_NAME = 15
_EXIT_INTR = exits.Intr.reason  # what ``Intr.code`` is: KVM_RUN's EINTR and KVM_EXIT_INTR


def _kick_elsewhere(signum, frame) -> None:
    """A kick that reached a thread other than a vCPU's (sent to the process from outside): nothing to do."""


def ensure_kick_is_harmless() -> bool:
    """Give ``KICK_SIGNAL`` a no-op handler if it still has its default action (terminate the process).
    Only the main thread may install handlers: elsewhere this does nothing.  True when the kick is handled."""
    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None)
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        signal.signal(KICK_SIGNAL, _kick_elsewhere)
    return True


class VcpuState(enum.Enum):
    IDLE = "idle"  # created; its thread is not running
    RUNNING = "running"  # its thread is in the run loop
    HALTED = "halted"  # HLT without an in-kernel irqchip: the thread ended, the vCPU waits
    EXITED = "exited"  # its thread ended (the VM stopped, or this vCPU ended it)


def _set_thread_name(name: str) -> None:
    """The OS-level name (``comm``) of the calling thread: what the kernel log and ``ps -T`` show."""
    libc().prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class Vcpu:
    """Runs one ``VcpuFd`` on a thread of its own; ``kick()`` gets it out of KVM_RUN from any thread."""

    def __init__(self, fd: VcpuFd):
        ensure_kick_is_harmless()
        self.fd = fd
        self.index = fd.vcpu_id
        self.state = VcpuState.IDLE
        # exit reason -> count, this run; written by this vCPU's thread only
        self.exit_counts: dict[int, int] = collections.defaultdict(int)
        self.tid: int | None = None  # the thread's kernel task id, while it runs
        self.tids: set[int] = set()  # every task id this vCPU's threads have had (kernel-log attribution)
        self.thread_name = f"pyvmm-vcpu{self.index}"
        self._thread: threading.Thread | None = None
        self._in_thread = False  # True while the thread may be signalled (guarded by _lock)
        self._finished = threading.Event()  # clear from start() until the thread has ended
        self._finished.set()
        self._lock = threading.Lock()

    # --- the thread ------------------------------------------------------------------------
    def start(self, body: Callable[["Vcpu"], None], on_error: Callable[["Vcpu", Exception], None]) -> None:
        """Run ``body(self)`` on a new thread; ``body`` calls ``run_once()`` until it is done.
        Any exception on that thread (its set-up included) goes to ``on_error`` on that thread."""
        if self.alive:
            raise RuntimeError(f"vCPU {self.index} is still running (a previous run could not stop it)")
        self.exit_counts = collections.defaultdict(int)
        self.fd.set_immediate_exit(False)
        self._finished.clear()  # before the thread exists: a join can never miss a thread that is starting
        self._thread = threading.Thread(target=self._main, args=(body, on_error), name=f"vcpu{self.index}",
                                        daemon=True)
        try:
            self._thread.start()
        except RuntimeError:  # "can't start new thread": it never existed
            self._finished.set()
            raise

    def _main(self, body: Callable[["Vcpu"], None], on_error: Callable[["Vcpu", Exception], None]) -> None:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_IN_VCPU_THREADS)
            self.tid = threading.get_native_id()
            self.tids.add(self.tid)
            with self._lock:
                self._in_thread = True
                self.state = VcpuState.RUNNING
            _set_thread_name(self.thread_name)
            inside_run = set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) - {KICK_SIGNAL}
            self.fd.set_signal_mask(inside_run)
            body(self)
        except Exception as exc:
            on_error(self, exc)
        finally:
            with self._lock:
                self._in_thread = False
                if self.state is VcpuState.RUNNING:
                    self.state = VcpuState.EXITED
            self.tid = None
            self._finished.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the thread; True when it has ended."""
        return self._finished.wait(timeout)

    @property
    def alive(self) -> bool:
        """From ``start()`` until the thread has ended (also while it is still being created)."""
        return not self._finished.is_set()

    # --- running and stopping --------------------------------------------------------------------
    def run_once(self) -> exits.VcpuExit:
        """One KVM_RUN (on this vCPU's thread).  Counts the exit; consumes a kick that ended it."""
        exit = self.fd.run()
        reason = exit.reason  # the exit class's KVM_EXIT_*: a class attribute, no call (-1 for Other: its own code)
        self.exit_counts[reason if reason >= 0 else exit.code] += 1
        if reason == _EXIT_INTR:
            while signal.sigtimedwait([KICK_SIGNAL], 0) is not None:
                pass
        return exit

    def kick(self) -> None:
        """Make the thread leave KVM_RUN (now, or at its next entry).  Safe from any thread, any number of times."""
        if not self.fd.closed:
            self.fd.set_immediate_exit(True)
        with self._lock:  # the thread cannot finish (and its pthread id go stale) while we hold this
            t = self._thread
            if self._in_thread and t is not None and t.ident != threading.get_ident():
                signal.pthread_kill(t.ident, KICK_SIGNAL)

    def __repr__(self) -> str:
        return f"<Vcpu {self.index} {self.state.value}>"
