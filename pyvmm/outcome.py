"""How a run ended: ``ExitKind`` and ``Outcome``.

Kept apart from the run loop so that architecture code and devices can end a run
(``vm.request_stop(Outcome(...))``) without importing the loop itself.
"""

from __future__ import annotations

import enum

from .record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time
if TYPE_CHECKING:
    from .report import FaultReport


class ExitKind(enum.Enum):
    HALT = "halt"  # every vCPU halted (x86 HLT without an in-kernel irqchip)
    SHUTDOWN = "shutdown"  # KVM_EXIT_SHUTDOWN: x86 triple fault
    POWER_OFF = "power-off"  # SYSTEM_EVENT shutdown (e.g. PSCI SYSTEM_OFF)
    RESET = "reset"  # SYSTEM_EVENT reset, or a reset device
    CRASH = "crash"  # SYSTEM_EVENT crash
    GUEST_EXIT = "guest-exit"  # the guest wrote a status to the debug-exit device
    DEBUG = "debug"  # KVM_EXIT_DEBUG
    TIMEOUT = "timeout"
    STOPPED = "stopped"  # the host asked the VM to stop
    FAULT = "fault"  # KVM_RUN failed, or a failure exit; ``report`` explains


class DeviceFault(Record):
    """A device request that failed on guest memory the device may not touch (a protected guest's private
    page): what ``Outcome.device_faults`` and the JSON report list.  ``line`` is the log line, whole."""

    __slots__ = ("device", "queue", "gpa", "write", "cause", "line")
    __hash__ = Record.value_hash  # never modified

    def __init__(self, device: str, queue: int | None, gpa: int, write: bool, cause: str, line: str):
        self.device = device  # "virtio-blk@0xb000000"
        self.queue = queue
        self.gpa = gpa
        self.write = write
        self.cause = cause
        self.line = line


class Outcome(Record):
    __slots__ = ("kind", "vcpu", "status", "detail", "report", "exits", "device_faults", "device_faults_dropped",
                 "device_memory")

    def __init__(self, kind: ExitKind, vcpu: int | None = None, status: int | None = None, detail: str = "",
                 report: "FaultReport | None" = None, exits: dict[str, int] | None = None,
                 device_faults: list[DeviceFault] | None = None, device_faults_dropped: int = 0,
                 device_memory: dict[str, dict[str, int]] | None = None):
        self.kind = kind
        self.vcpu = vcpu
        self.status = status  # GUEST_EXIT status, SYSTEM_EVENT type...
        self.detail = detail
        self.report = report
        self.exits = {} if exits is None else exits
        self.device_faults = [] if device_faults is None else device_faults  # the first ones of the VM's life
        self.device_faults_dropped = device_faults_dropped  # refusals after the first MAX_DEVICE_FAULTS (counted)
        # per device: accesses in/out of shared memory
        self.device_memory = {} if device_memory is None else device_memory

    def copy(self) -> "Outcome":
        """A shallow copy (``dataclasses.replace(outcome)``)."""
        return Outcome(*self._values())

    @property
    def failed(self) -> bool:
        return self.kind in (ExitKind.FAULT, ExitKind.TIMEOUT, ExitKind.CRASH, ExitKind.SHUTDOWN)
