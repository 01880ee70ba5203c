"""The run loop: one thread per vCPU calling KVM_RUN and dispatching its exits.

I/O and MMIO exits go to the VM's buses; HLT, SHUTDOWN, SYSTEM_EVENT,
HYPERCALL, MEMORY_FAULT, INTERNAL_ERROR, FAIL_ENTRY and DEBUG are each handled
or end the VM with an ``Outcome``; EINTR/EAGAIN are retried.  ``stop()`` kicks
every vCPU out of KVM_RUN with ``immediate_exit`` and a signal.

After an MMIO or I/O exit the data in ``kvm_run`` is left as KVM wrote it (and
as the device completed it): KVM finishes the guest's access from it on the
next KVM_RUN, so nothing here clears ``exit_reason`` or the MMIO data.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import threading
from typing import TYPE_CHECKING

from .kvm import uapi
from .kvm.errors import KvmError
from .outcome import ExitKind, Outcome
from .report import build_report

if TYPE_CHECKING:
    from .kvm.vcpu import VcpuFd
    from .vm import Vm

log = logging.getLogger("pyvmm.run")

KICK_SIGNAL = signal.SIGUSR2
KVM_ENOSYS = 1000  # include/uapi/linux/kvm_para.h


def _ignore_signal(signum, frame) -> None:
    pass


def install_kick_handler() -> bool:
    """Make KICK_SIGNAL interrupt KVM_RUN (EINTR) instead of killing us.  Main thread only."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None, signal.SIG_IGN):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _ignore_signal)
    return True


class RunLoop:
    """Runs every vCPU of ``vm`` until one ends the VM, all halt, or the timeout passes."""

    def __init__(self, vm: "Vm"):
        self.vm = vm
        self._outcome: Outcome | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._halted: set[int] = set()
        self.exit_counts: dict[str, int] = {}
        self.can_kick = install_kick_handler()

    # --- ending the VM ----------------------------------------------------
    def finish(self, outcome: Outcome) -> None:
        """First outcome wins; then every vCPU is stopped."""
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
        self._kick_all()
        self._done.set()

    def _kick_all(self) -> None:
        self._stopping.set()
        for vcpu in self.vm.vcpus:
            if not vcpu.closed:
                vcpu.set_immediate_exit(True)
        if self.can_kick:
            for t in self._threads:
                if t.is_alive() and t.ident is not None and t is not threading.current_thread():
                    try:
                        signal.pthread_kill(t.ident, KICK_SIGNAL)
                    except ProcessLookupError:
                        pass

    def run(self, timeout: float | None = None) -> Outcome:
        self.vm.memory.has_run = True
        for vcpu in self.vm.vcpus:
            vcpu.set_immediate_exit(False)
            t = threading.Thread(target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.vcpu_id}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()
        try:
            if not self._done.wait(timeout):
                self.finish(Outcome(ExitKind.TIMEOUT, detail=f"the guest did not finish within {timeout} s"))
        except KeyboardInterrupt:
            self.finish(Outcome(ExitKind.STOPPED, detail="interrupted (SIGINT)"))
        for t in self._threads:
            while t.is_alive():
                t.join(0.05)
                if t.is_alive():
                    self._kick_all()
        outcome = self._outcome
        outcome.exits = dict(self.exit_counts)
        return outcome

    # --- one vCPU ------------------------------------------------------------
    def _vcpu_thread(self, vcpu: "VcpuFd") -> None:
        try:
            self._vcpu_loop(vcpu)
        except Exception as exc:  # a bug in a device or in pyvmm: end the VM with a report, not a hang
            log.exception("vCPU %d: unexpected error", vcpu.vcpu_id)
            self.finish(Outcome(ExitKind.FAULT, vcpu.vcpu_id, detail=f"pyvmm error on vCPU {vcpu.vcpu_id}: {exc!r}",
                                report=build_report(self.vm, vcpu, f"pyvmm error: {exc!r}")))

    def _count(self, reason: int) -> None:
        name = uapi.exit_reason_name(reason)
        self.exit_counts[name] = self.exit_counts.get(name, 0) + 1

    def _vcpu_loop(self, vcpu: "VcpuFd") -> None:
        run = vcpu.kvm_run
        vid = vcpu.vcpu_id
        while not self._stopping.is_set():
            try:
                vcpu.run()
            except KvmError as err:
                if err.errno in (errno.EINTR, errno.EAGAIN):
                    run.immediate_exit = 0 if not self._stopping.is_set() else 1
                    continue
                what = f"KVM_RUN on vCPU {vid} failed with {err.errno_name} ({err.meaning})"
                # exit_reason is stale after a failed KVM_RUN, except KVM_EXIT_MEMORY_FAULT (build_report checks)
                self.finish(Outcome(ExitKind.FAULT, vid, detail=what,
                                    report=build_report(self.vm, vcpu, what, call="KVM_RUN", err=err.errno)))
                return
            reason = run.exit_reason
            self._count(reason)
            if reason == uapi.KVM_EXIT_IO:
                self._io(vcpu, run)
            elif reason == uapi.KVM_EXIT_MMIO:
                if self._mmio_in_memslot(vcpu, run):
                    return
                self._mmio(run)
            elif reason == uapi.KVM_EXIT_INTR:
                continue
            elif reason == uapi.KVM_EXIT_HLT:
                self._halt(vid)
                return
            elif reason == uapi.KVM_EXIT_SHUTDOWN:
                self.finish(Outcome(ExitKind.SHUTDOWN, vid, detail="KVM_EXIT_SHUTDOWN (triple fault)",
                                    report=build_report(self.vm, vcpu, f"vCPU {vid} shut down (triple fault)",
                                                        exit_reason=reason)))
                return
            elif reason == uapi.KVM_EXIT_SYSTEM_EVENT:
                if self._system_event(vcpu, run):
                    return
            elif reason == uapi.KVM_EXIT_HYPERCALL:
                self._hypercall(vcpu, run)
            elif reason == uapi.KVM_EXIT_DEBUG:
                self.finish(Outcome(ExitKind.DEBUG, vid, detail=f"debug exit at pc {self.vm.arch.pc(vcpu):#x}"))
                return
            else:
                # MEMORY_FAULT (without an error return), INTERNAL_ERROR, FAIL_ENTRY, UNKNOWN, EXCEPTION, NISV...
                what = f"vCPU {vid} exited with {uapi.exit_reason_name(reason)}"
                self.finish(Outcome(ExitKind.FAULT, vid, detail=what,
                                    report=build_report(self.vm, vcpu, what, exit_reason=reason)))
                return

    def _io(self, vcpu: "VcpuFd", run: uapi.kvm_run) -> None:
        io = run.io
        bus = self.vm.io_bus
        with vcpu.run_bytes(io.data_offset, io.size * io.count) as data:
            for i in range(io.count):  # string I/O (rep ins/outs) carries count items
                chunk = slice(i * io.size, (i + 1) * io.size)
                if io.direction == uapi.KVM_EXIT_IO_OUT:
                    bus.write(io.port, bytes(data[chunk]))
                else:
                    data[chunk] = bus.read(io.port, io.size)

    def _mmio_in_memslot(self, vcpu: "VcpuFd", run: uapi.kvm_run) -> bool:
        """An MMIO exit for an address inside a memslot means KVM could not reach the host page
        (hosts that emulate guest accesses fall back to MMIO when copy_{from,to}_user fails).
        That is a fault to explain, not a device access."""
        addr = run.mmio.phys_addr
        region = self.vm.memory.find(addr)
        if region is None:
            return False
        what = (f"vCPU {vcpu.vcpu_id}: guest {'write' if run.mmio.is_write else 'read'} at {addr:#x} inside memslot "
                f"{region.slot} ({region.backing.describe()}) came back as an MMIO exit: KVM could not access "
                "the host memory behind it")
        self.finish(Outcome(ExitKind.FAULT, vcpu.vcpu_id, detail=what,
                            report=build_report(self.vm, vcpu, what, exit_reason=uapi.KVM_EXIT_MMIO, fault_gpa=addr)))
        return True

    def _mmio(self, run: uapi.kvm_run) -> None:
        mmio = run.mmio
        length = min(mmio.len, 8)
        if mmio.is_write:
            self.vm.mmio_bus.write(mmio.phys_addr, bytes(mmio.data[:length]))
        else:
            value = self.vm.mmio_bus.read(mmio.phys_addr, length)
            ctypes.memmove(mmio.data, value, length)

    def _halt(self, vid: int) -> None:
        with self._lock:
            self._halted.add(vid)
            everyone = len(self._halted) == len(self.vm.vcpus)
        if everyone:
            self.finish(Outcome(ExitKind.HALT, vid, detail="every vCPU halted"))

    def _system_event(self, vcpu: "VcpuFd", run: uapi.kvm_run) -> bool:
        event = run.system_event
        vid = vcpu.vcpu_id
        kinds = {
            uapi.KVM_SYSTEM_EVENT_SHUTDOWN: ExitKind.POWER_OFF,
            uapi.KVM_SYSTEM_EVENT_RESET: ExitKind.RESET,
            uapi.KVM_SYSTEM_EVENT_CRASH: ExitKind.CRASH,
        }
        kind = kinds.get(event.type)
        if kind is None:  # WAKEUP/SUSPEND and newer: note it and keep running
            log.info("vCPU %d: system event %d ignored", vid, event.type)
            return False
        report = None
        if kind is ExitKind.CRASH:
            report = build_report(self.vm, vcpu, f"guest reported a crash on vCPU {vid}",
                                  exit_reason=uapi.KVM_EXIT_SYSTEM_EVENT)
        self.finish(Outcome(kind, vid, status=event.type, detail=f"KVM_EXIT_SYSTEM_EVENT type {event.type}",
                            report=report))
        return True

    def _hypercall(self, vcpu: "VcpuFd", run: uapi.kvm_run) -> None:
        hc = run.hypercall
        handler = self.vm.hypercall_handler
        hc.ret = handler(hc.nr, list(hc.args)) if handler else (-KVM_ENOSYS) & (2**64 - 1)
