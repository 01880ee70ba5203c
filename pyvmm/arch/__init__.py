"""Architecture back-ends.  Generic code talks to an ``Arch``; each arch lives in its own package."""

from __future__ import annotations

import os

from ..kvm.errors import ConfigError
from ..record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time
if TYPE_CHECKING:
    from typing import Protocol

    from ..kvm.system import Kvm
    from ..kvm.vcpu import VcpuFd
    from ..outcome import ExitKind
    from ..memory.regions import MemoryRules
    from ..preflight import RuleAnswer
    from ..report import SlotInfo
    from ..virtio import VirtioSlot
    from ..vm import Vm
else:
    Protocol = object  # a plain base at run time: typing is not imported (pyvmm run's start-up)


class RegisterDump(Record):
    """A vCPU's registers for a fault report (``Arch.registers``)."""

    __slots__ = ("values", "refused", "events")

    def __init__(self, values: dict[str, int], refused: dict[str, str], events: dict[str, int] | None = None):
        self.values = values  # name -> value, display order
        self.refused = refused  # name -> why KVM refused it (errno name and meaning; "hidden by pKVM" on a protected VM)
        self.events = events  # x86 KVM_GET_VCPU_EVENTS: pending/injected exception, nmi, interrupt...


class Arch(Protocol):
    name: str
    ram_base: int
    max_vcpus_cap: int
    max_vcpus: int  # what pyvmm's guest layout has room for
    max_vcpus_why: str
    dma_pool_supported: bool  # whether boot() can give the guest a restricted DMA pool

    def device_access_cause(self, vm: "Vm", access_platform: bool | None) -> str:
        """Why a device met a protected guest's private page (``access_platform``: whether the driver
        negotiated VIRTIO_F_ACCESS_PLATFORM; None before FEATURES_OK)."""
        ...

    def vm_type(self, kvm: "Kvm", protected: bool, ipa_bits: int | None) -> int: ...

    def memory_rules(self, vm: "Vm") -> "MemoryRules": ...

    def device_windows(self, vm: "Vm") -> list[tuple[int, int, str]]:
        """Every guest-physical range [start, end) where the platform has devices (MMIO), with a name for
        errors: memory there would hide them, so regions may not overlap them and RAM placed without an address
        steps over them (x86: the MMIO hole below 4 GiB)."""
        ...

    def prepare_vm(self, vm: "Vm") -> None: ...

    def init_vcpus(self, vm: "Vm") -> None: ...

    def boot(self, vm: "Vm", image: str | None, **options) -> None: ...

    def check_before_run(self, vm: "Vm") -> None: ...

    def predict_first_run(self, vm: "Vm", slots: list["SlotInfo"]) -> list["RuleAnswer"]:
        """What the first KVM_RUN will meet, by the kernel's rules (``pyvmm check``): one answer per rule
        or slot, in the order the guest meets them; ``errno`` None where it passes."""
        ...

    def system_event(self, vcpu: "VcpuFd", event) -> "tuple[ExitKind, int | None, str] | None":
        """What a KVM_EXIT_SYSTEM_EVENT means beyond its type (kind, status, detail), or None for the type's
        generic meaning (arm64: PSCI SYSTEM_RESET2 carries a guest exit status)."""
        ...

    def virtio_slot(self, index: int) -> "VirtioSlot": ...

    def irq_line(self, vm: "Vm", irq: int, level: bool) -> None: ...

    def registers(self, vcpu: "VcpuFd") -> RegisterDump: ...

    def code_address(self, vcpu: "VcpuFd", vm: "Vm") -> tuple[int | None, str]:
        """The guest-physical address of the PC, or None and why not."""
        ...

    def pc(self, vcpu: "VcpuFd") -> int: ...


def machine_name() -> str:
    m = os.uname().machine  # what platform.machine() answers on Linux, without importing platform
    return {"amd64": "x86_64", "aarch64": "arm64"}.get(m.lower(), m)


def get_arch(name: str) -> Arch:
    if name == "x86_64":
        from .x86_64 import X86_64

        return X86_64()
    if name == "arm64":
        from .arm64 import Arm64

        return Arm64()
    raise ConfigError(f"unsupported architecture {name!r} (pyvmm supports x86_64 and arm64)")


def host_arch() -> Arch:
    return get_arch(machine_name())
