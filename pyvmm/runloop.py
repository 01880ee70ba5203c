"""The run loop: dispatches each vCPU's exits until the VM ends.

Each ``Vcpu`` (``pyvmm/vcpu.py``) owns its thread, its signal mask and its kick; this module only
decides what an exit means.  ``VcpuFd.run()`` hands over typed exits (``pyvmm/kvm/exits.py``):

* ``Io`` and ``Mmio`` go to the VM's buses.  A guest read is completed by filling the exit's
  ``data`` view, which lies inside ``kvm_run``: the next KVM_RUN finishes the instruction from
  it, so it is filled even when the VM is being stopped (a later ``run()`` resumes correctly).
* An ``Mmio`` exit inside a memslot is either a write to a READONLY slot (ROM, flash: delivered
  to the bus, where a device may claim it; unclaimed writes are dropped and counted, unclaimed reads
  return the slot's bytes), or, on any other slot, a fault: the host could not reach the page behind
  the slot (hosts that emulate guest accesses, such as kvm_pvm, fall back to MMIO when copying from or
  to the slot's mapping fails, where hardware KVM fails KVM_RUN with EFAULT); report.py explains it.
* ``Hlt`` parks the vCPU (the VM halts when all have); ``Shutdown``, ``SystemEvent``, ``Debug``
  and failures end the VM with an ``Outcome``; ``Hypercall`` is answered; ``Intr`` loops.

The first outcome wins (``finish``); every vCPU is then kicked and every join is bounded.  The
console is told too (``Console.stopping``): a vCPU or device thread waiting for a reader that does not
read gives the write up instead of holding the VM's end back.

Signals.  ``finish`` takes locks, so a signal handler (which runs on the main thread, between two of
its bytecodes, perhaps while that thread holds one of those very locks) must not call it: a handler
asks the run's ``SignalStop`` instead, which only stores the outcome; ``run()`` waits in slices of
``SIGNAL_POLL`` seconds and ends the run with it.  ``signal_stop_of(vm)`` finds the ``SignalStop`` of a
VM's current or last run, also while ``Vm.run()`` is still setting it up or already returning: a stop
asked for then is neither lost (the run ends at once) nor harmful (after the run it changes nothing).
Without such a handler (pyvmm as a library, Python's default SIGINT handler), Ctrl-C raises
``KeyboardInterrupt`` in ``run()``, which ends the run STOPPED; further Ctrl-Cs until ``run()``
returns are ignored (we are stopping already).
"""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
import time
import weakref
from collections.abc import Callable

from .kvm import exits, uapi
from .kvm.errors import KvmError
from .outcome import ExitKind, Outcome
from .vcpu import PROCESS_SIGNALS, Vcpu, VcpuState
from .logs import getLogger

TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time
if TYPE_CHECKING:
    from .vm import Vm

log = getLogger("pyvmm.run")


def build_report(vm: "Vm", vcpu, what: str, **report_args):
    """report.build_report: the fault report module is imported by a run that has a fault to report."""
    from .report import build_report

    return build_report(vm, vcpu, what, **report_args)


def add_missing_vcpus(report, vm: "Vm") -> None:
    from .report import add_missing_vcpus

    add_missing_vcpus(report, vm)


KVM_ENOSYS = 1000  # include/uapi/linux/kvm_para.h
JOIN_LIMIT = 5.0  # seconds a vCPU thread gets to leave KVM_RUN after the VM ended
KICK_INTERVAL = 0.05
SIGNAL_POLL = 0.05  # seconds between two looks at a stop asked for by a signal handler (SignalStop)


class SignalStop:
    """What a signal handler may do to one run: ask it to end (``request``) and see whether it has (``ended``).
    Takes no lock and kicks nobody (the run loop does that within ``SIGNAL_POLL`` seconds)."""

    def __init__(self):
        self.outcome: Outcome | None = None
        self.ended = False  # run() has returned: a stop changes nothing any more

    def request(self, outcome: Outcome) -> bool:
        """End the run with ``outcome`` (unless another outcome comes first); False when the run is over."""
        if self.ended:
            return False
        if self.outcome is None:
            self.outcome = outcome
        return True


_SIGNAL_STOPS: "weakref.WeakKeyDictionary[Vm, SignalStop]" = weakref.WeakKeyDictionary()


def signal_stop_of(vm: "Vm") -> SignalStop | None:
    """The ``SignalStop`` of ``vm``'s current or last ``run()`` (None before the first); takes no lock."""
    return _SIGNAL_STOPS.get(vm)


_stop_from_now: Outcome | None = None


def stop_runs_from_now(outcome: Outcome | None) -> None:
    """The process is being stopped (pyvmm's command got a signal before its guest ran): every run that starts
    from now on ends at once with ``outcome``; None: no more.  Takes no lock."""
    global _stop_from_now
    _stop_from_now = outcome


@contextlib.contextmanager
def _second_sigint_ignored():
    """After a first Ctrl-C (Python's default handler, KeyboardInterrupt) while the run is being stopped: more
    Ctrl-Cs change nothing, so none raises inside the stopping (a lock, a join, threading's internals)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


SYSTEM_EVENT_KINDS = {
    uapi.KVM_SYSTEM_EVENT_SHUTDOWN: ExitKind.POWER_OFF,
    uapi.KVM_SYSTEM_EVENT_RESET: ExitKind.RESET,
    uapi.KVM_SYSTEM_EVENT_CRASH: ExitKind.CRASH,
}


class RunLoop:
    """One ``Vm.run()``: every vCPU until one ends the VM, all halt, or the timeout passes."""

    def __init__(self, vm: "Vm", vcpus: list[Vcpu]):
        self.vm = vm
        self.vcpus = vcpus
        self._outcome: Outcome | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._stopping = False  # the run is ending: vCPU threads leave their loop (a plain flag: read once per exit)
        self.signal_stop = SignalStop()
        if _stop_from_now is not None:
            self.signal_stop.request(_stop_from_now)
        # exit type -> handler(vcpu, exit); True when this vCPU's thread is done
        self._handlers: dict[type, Callable[[Vcpu, exits.VcpuExit], bool]] = {
            exits.Io: self._io,
            exits.Mmio: self._mmio,
            exits.Intr: lambda vcpu, exit: False,
            exits.Hlt: self._halt,
            exits.Shutdown: self._shutdown,
            exits.SystemEvent: self._system_event,
            exits.Hypercall: self._hypercall,
            exits.Debug: self._debug,
        }
        _SIGNAL_STOPS[vm] = self.signal_stop  # (it must not refer to the VM: the VM would never be freed)

    # --- ending the VM --------------------------------------------------------------------
    def finish(self, outcome: Outcome) -> None:
        """First outcome wins; then every vCPU is kicked out of KVM_RUN."""
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
        self._stopping = True
        self._console_stopping(True)
        for vcpu in self.vcpus:
            vcpu.kick()
        self._done.set()

    def _console_stopping(self, stopping: bool) -> None:
        """While the VM stops, a console echo whose reader does not read gives up (``Console.stopping``)."""
        console = getattr(self.vm, "console", None)
        if console is not None:
            console.stopping = stopping

    def run(self, timeout: float | None = None) -> Outcome:
        self._console_stopping(False)
        try:
            with contextlib.ExitStack() as quiet:
                try:  # a Ctrl-C while the threads start stops the ones already started, like any other
                    self._start_all()
                    if all(v.state is VcpuState.HALTED for v in self.vcpus):
                        self.finish(Outcome(ExitKind.HALT, detail="every vCPU is halted"))
                    self._wait(timeout)
                except KeyboardInterrupt:
                    quiet.enter_context(_second_sigint_ignored())
                    self.finish(Outcome(ExitKind.STOPPED, status=int(signal.SIGINT), detail="interrupted (SIGINT)"))
                except BaseException:  # e.g. a thread that could not start: stop the ones that did, then say why
                    self.finish(Outcome(ExitKind.STOPPED, detail="the run could not start"))
                    self._join_all()
                    raise
                return self._result()
        finally:
            self.signal_stop.ended = True

    def _wait(self, timeout: float | None) -> None:
        """Until the run ends, the timeout passes or a signal handler asks for a stop (``signal_stop``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.signal_stop.outcome is not None:
                self.finish(self.signal_stop.outcome)
                return
            slice_ = SIGNAL_POLL if deadline is None else min(SIGNAL_POLL, max(deadline - time.monotonic(), 0))
            if self._done.wait(slice_):
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.finish(Outcome(ExitKind.TIMEOUT, detail=f"the guest did not finish within {timeout} s"))
                return

    def _result(self) -> Outcome:
        stuck = self._join_all()
        outcome = self._outcome.copy()  # ours to annotate: the caller of request_stop keeps its own
        if stuck:
            outcome.detail += (f"; vCPU {', '.join(map(str, stuck))} did not leave KVM_RUN within {JOIN_LIMIT:.0f} s "
                               "(its thread is abandoned)")
        outcome.exits = self.exit_counts()
        outcome.device_faults = list(self.vm.device_faults)
        outcome.device_faults_dropped = self.vm.device_faults_dropped
        outcome.device_memory = self.vm.device_memory()
        if outcome.report is not None:
            add_missing_vcpus(outcome.report, self.vm)  # vCPUs that were still in KVM_RUN when it was made
        return outcome

    def _start_all(self) -> None:
        """Start every vCPU that is not halted, with the process signals held back until all are started
        (the threads inherit that mask and keep it; a Ctrl-C meanwhile arrives right after)."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
        try:
            for vcpu in self.vcpus:
                if vcpu.state is not VcpuState.HALTED:
                    vcpu.start(self._dispatch, self._vcpu_error)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _join_all(self) -> list[int]:
        """Join every vCPU thread, kicking again every KICK_INTERVAL; give up after JOIN_LIMIT seconds."""
        deadline = time.monotonic() + JOIN_LIMIT
        pending = [v for v in self.vcpus if v.alive]
        while pending and time.monotonic() < deadline:
            try:
                for vcpu in pending:
                    vcpu.kick()
                pending[0].join(KICK_INTERVAL)
            except KeyboardInterrupt:  # a second Ctrl-C while stopping: we are stopping already
                pass
            pending = [v for v in pending if v.alive]
        for vcpu in pending:
            log.error("vCPU %d did not leave KVM_RUN within %.0f s", vcpu.index, JOIN_LIMIT)
        return [v.index for v in pending]

    def exit_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for vcpu in self.vcpus:
            for reason, n in dict(vcpu.exit_counts).items():
                name = uapi.exit_reason_name(reason)
                total[name] = total.get(name, 0) + n
        return total

    # --- one vCPU's thread ------------------------------------------------------------------
    def _vcpu_error(self, vcpu: Vcpu, exc: Exception) -> None:
        """A bug in a device or in pyvmm on a vCPU thread: end the VM with a report, not a hang."""
        log.error("vCPU %d: unexpected error", vcpu.index, exc_info=exc)
        try:
            self._fault(vcpu, f"pyvmm error on vCPU {vcpu.index}: {exc!r}")
        except Exception:  # the report itself failed: still end the run
            log.exception("vCPU %d: no report", vcpu.index)
            self.finish(Outcome(ExitKind.FAULT, vcpu.index, detail=f"pyvmm error on vCPU {vcpu.index}: {exc!r}"))

    def _dispatch(self, vcpu: Vcpu) -> None:
        handlers = self._handlers
        run_once = vcpu.run_once
        while not self._stopping:
            try:
                exit = run_once()
            except KvmError as err:
                if err.errno == errno.EAGAIN:
                    continue
                what = f"KVM_RUN on vCPU {vcpu.index} failed with {err.errno_name} ({err.meaning})"
                # exit_reason is stale after a failed KVM_RUN, except KVM_EXIT_MEMORY_FAULT (build_report checks)
                self._fault(vcpu, what, call="KVM_RUN", err=err.errno, exit=err.exit)
                return
            handler = handlers.get(type(exit))
            if handler is None:  # MEMORY_FAULT without an error, INTERNAL_ERROR, FAIL_ENTRY, NISV, UNKNOWN...
                self._fault(vcpu, f"vCPU {vcpu.index} exited with {exit.name}", exit=exit)
                return
            if handler(vcpu, exit):
                return

    def _fault(self, vcpu: Vcpu, what: str, **report_args) -> None:
        self._end_with_report(vcpu, ExitKind.FAULT, what, what, **report_args)

    def _end_with_report(self, vcpu: Vcpu, kind: ExitKind, detail: str, what: str, status: int | None = None,
                         **report_args) -> None:
        """Claim the outcome (a timeout meanwhile cannot replace it), stop the other vCPUs (one inside
        KVM_RUN cannot have its registers read), then build the report while the VM still exists."""
        outcome = Outcome(kind, vcpu.index, status=status, detail=detail)
        with self._lock:
            claimed = self._outcome is None
            if claimed:
                self._outcome = outcome
        self._stopping = True
        self._console_stopping(True)
        for other in self.vcpus:
            if other is not vcpu:
                other.kick()
        if claimed:
            outcome.report = build_report(self.vm, vcpu.fd, what, **report_args)
        self.finish(outcome)

    # --- exits ------------------------------------------------------------------------------
    def _io(self, vcpu: Vcpu, exit: exits.Io) -> bool:
        bus, port, size, data = self.vm.io_bus, exit.port, exit.size, exit.data
        if exit.count == 1:  # nearly every IN and OUT (the bus copies what it hands a device)
            if exit.is_write:
                bus.write(port, data)
            else:
                data[:] = bus.read(port, size)
            return False
        for start in range(0, size * exit.count, size):  # string I/O (rep ins/outs) carries count items
            if exit.is_write:
                bus.write(port, data[start:start + size])
            else:
                data[start:start + size] = bus.read(port, size)
        return False

    def _mmio(self, vcpu: Vcpu, exit: exits.Mmio) -> bool:
        vm, addr = self.vm, exit.addr
        region = vm.memory.find(addr)  # None for a device's address: the usual case costs one bisect
        if region is not None:
            if not region.flags & uapi.KVM_MEM_READONLY:
                self._mmio_in_slot(vcpu, exit, region)
                return True
            if vm.mmio_bus.find(addr) is None:  # ROM that no device claims: reads see the slot, writes vanish
                if exit.is_write:
                    vm.memory.count_rom_write(region, addr, len(exit.data))
                else:
                    exit.data[:] = vm.memory.read(addr, len(exit.data))
                return False
        if exit.is_write:
            vm.mmio_bus.write(addr, exit.data)
        else:
            exit.data[:] = vm.mmio_bus.read(addr, len(exit.data))
        return False

    def _mmio_in_slot(self, vcpu: Vcpu, exit: exits.Mmio, region) -> None:
        what = (f"vCPU {vcpu.index}: guest {'write' if exit.is_write else 'read'} at {exit.addr:#x} inside memslot "
                f"{region.slot} ({region.backing.describe()}) came back as an MMIO exit: KVM could not access "
                "the host memory behind it")
        self._fault(vcpu, what, exit=exit, fault_gpa=exit.addr)

    def _halt(self, vcpu: Vcpu, exit: exits.Hlt) -> bool:
        vcpu.state = VcpuState.HALTED
        with self._lock:
            everyone = all(v.state is VcpuState.HALTED for v in self.vcpus)
        if everyone:
            self.finish(Outcome(ExitKind.HALT, vcpu.index, detail="every vCPU halted"))
        return True

    def _shutdown(self, vcpu: Vcpu, exit: exits.Shutdown) -> bool:
        self._end_with_report(vcpu, ExitKind.SHUTDOWN, "KVM_EXIT_SHUTDOWN (triple fault)",
                              f"vCPU {vcpu.index} shut down (triple fault)", exit=exit)
        return True

    def _system_event(self, vcpu: Vcpu, exit: exits.SystemEvent) -> bool:
        kind = SYSTEM_EVENT_KINDS.get(exit.type)
        if kind is None:  # WAKEUP/SUSPEND and newer: note it and keep running
            log.info("vCPU %d: system event %d ignored", vcpu.index, exit.type)
            return False
        detail = f"KVM_EXIT_SYSTEM_EVENT type {exit.type}"
        meaning = self.vm.arch.system_event(vcpu.fd, exit)  # e.g. arm64's PSCI SYSTEM_RESET2 exit status
        if meaning is not None:
            kind, status, what = meaning
            self.finish(Outcome(kind, vcpu.index, status=status, detail=f"{what} ({detail})"))
            return True
        if kind is ExitKind.CRASH:
            self._end_with_report(vcpu, kind, detail, f"guest reported a crash on vCPU {vcpu.index}",
                                  status=exit.type, exit=exit)
        else:
            self.finish(Outcome(kind, vcpu.index, status=exit.type, detail=detail))
        return True

    def _hypercall(self, vcpu: Vcpu, exit: exits.Hypercall) -> bool:
        handler = self.vm.hypercall_handler
        exit.complete(handler(exit.nr, exit.args) if handler else -KVM_ENOSYS)
        return False

    def _debug(self, vcpu: Vcpu, exit: exits.Debug) -> bool:
        self.finish(Outcome(ExitKind.DEBUG, vcpu.index, detail=f"debug exit at pc {self.vm.arch.pc(vcpu.fd):#x}"))
        return True

