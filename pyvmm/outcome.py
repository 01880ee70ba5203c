"""How a run ended: ``ExitKind`` and ``Outcome``.

Kept apart from the run loop so that architecture code and devices can end a run
(``vm.request_stop(Outcome(...))``) without importing the loop itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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


@dataclass(frozen=True)
class DeviceFault:
    """A device request that failed on guest memory the device may not touch (a protected guest's private
    page): what ``Outcome.device_faults`` and the JSON report list.  ``line`` is the log line, whole."""

    device: str  # "virtio-blk@0xb000000"
    queue: int | None
    gpa: int
    write: bool
    cause: str
    line: str


@dataclass
class Outcome:
    kind: ExitKind
    vcpu: int | None = None
    status: int | None = None  # GUEST_EXIT status, SYSTEM_EVENT type...
    detail: str = ""
    report: "FaultReport | None" = None
    exits: dict[str, int] = field(default_factory=dict)
    device_faults: list[DeviceFault] = field(default_factory=list)  # the first ones of the VM's life
    device_faults_dropped: int = 0  # refusals after the first MAX_DEVICE_FAULTS (counted, not kept)
    device_memory: dict[str, dict[str, int]] = field(default_factory=dict)  # per device: accesses in/out of shared memory

    @property
    def failed(self) -> bool:
        return self.kind in (ExitKind.FAULT, ExitKind.TIMEOUT, ExitKind.CRASH, ExitKind.SHUTDOWN)
