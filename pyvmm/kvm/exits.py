"""Typed vCPU exits: what ``VcpuFd.run()`` returns (as kvm-ioctls' ``VcpuExit``).

``struct kvm_run``'s exit union is decoded here and nowhere else.  Each exit names
the union member that ``exit_reason`` selects; the others are stale and are never
read.

The completion contract lives here too.  For a guest *read* (``Io`` in, ``Mmio``
read) ``data`` is a writable view of the bytes inside ``kvm_run``: whoever
handles the exit fills it, and the next ``KVM_RUN`` completes the guest's
instruction from it.  Nothing may clear ``exit_reason`` or the data before
that.  For a ``Hypercall``, ``complete(ret)`` writes the return value.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import ClassVar

from . import uapi


@dataclass(slots=True)
class VcpuExit:
    reason: ClassVar[int] = -1

    @property
    def code(self) -> int:
        """The KVM_EXIT_* number of this exit."""
        return self.reason

    @property
    def name(self) -> str:
        return uapi.exit_reason_name(self.code)


@dataclass(slots=True)
class Io(VcpuExit):
    """KVM_EXIT_IO: ``count`` items of ``size`` bytes (string I/O has count > 1)."""

    reason: ClassVar[int] = uapi.KVM_EXIT_IO
    port: int
    size: int
    count: int
    is_write: bool
    data: memoryview  # size * count bytes inside kvm_run; writable (fill it for an IN)


@dataclass(slots=True)
class Mmio(VcpuExit):
    """KVM_EXIT_MMIO: a guest access KVM could not satisfy from a memslot."""

    reason: ClassVar[int] = uapi.KVM_EXIT_MMIO
    addr: int
    is_write: bool
    data: memoryview  # ``len`` bytes inside kvm_run.mmio.data; writable (fill it for a read)


@dataclass(slots=True)
class Hlt(VcpuExit):
    reason: ClassVar[int] = uapi.KVM_EXIT_HLT


@dataclass(slots=True)
class Shutdown(VcpuExit):
    """x86: the guest triple-faulted."""

    reason: ClassVar[int] = uapi.KVM_EXIT_SHUTDOWN


@dataclass(slots=True)
class Intr(VcpuExit):
    """KVM_RUN returned EINTR (a signal or ``immediate_exit``), or KVM_EXIT_INTR."""

    reason: ClassVar[int] = uapi.KVM_EXIT_INTR


@dataclass(slots=True)
class SystemEvent(VcpuExit):
    reason: ClassVar[int] = uapi.KVM_EXIT_SYSTEM_EVENT
    type: int
    data: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Hypercall(VcpuExit):
    reason: ClassVar[int] = uapi.KVM_EXIT_HYPERCALL
    nr: int
    args: list[int]
    _run: uapi.kvm_run = field(repr=False, default=None)

    def complete(self, ret: int) -> None:
        """The hypercall's return value, handed to the guest on the next KVM_RUN."""
        self._run.hypercall.ret = ret & (2**64 - 1)


@dataclass(slots=True)
class Debug(VcpuExit):
    reason: ClassVar[int] = uapi.KVM_EXIT_DEBUG
    arch: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class InternalError(VcpuExit):
    reason: ClassVar[int] = uapi.KVM_EXIT_INTERNAL_ERROR
    suberror: int
    data: list[int]
    insn_bytes: bytes | None = None  # KVM_INTERNAL_ERROR_EMULATION with KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES


@dataclass(slots=True)
class FailEntry(VcpuExit):
    reason: ClassVar[int] = uapi.KVM_EXIT_FAIL_ENTRY
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(slots=True)
class MemoryFault(VcpuExit):
    """KVM_EXIT_MEMORY_FAULT (valid only together with an EFAULT/EHWPOISON from KVM_RUN)."""

    reason: ClassVar[int] = uapi.KVM_EXIT_MEMORY_FAULT
    flags: int
    gpa: int
    size: int

    @property
    def private(self) -> bool:
        return bool(self.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)


@dataclass(slots=True)
class ArmNisv(VcpuExit):
    """arm64: a data abort outside memslots without a valid syndrome (KVM_CAP_ARM_NISV_TO_USER)."""

    reason: ClassVar[int] = uapi.KVM_EXIT_ARM_NISV
    esr_iss: int
    fault_ipa: int


@dataclass(slots=True)
class Other(VcpuExit):
    """Any exit pyvmm does not decode (UNKNOWN, EXCEPTION, FAIL_ENTRY's siblings...): the raw reason."""

    raw_reason: int
    details: dict = field(default_factory=dict)

    @property
    def code(self) -> int:
        return self.raw_reason


_HLT = Hlt()
_SHUTDOWN = Shutdown()
_INTR = Intr()

# Byte offset of kvm_run.mmio.data inside the mapping.
MMIO_DATA_OFFSET = uapi.kvm_run.u.offset + uapi._mmio.data.offset


def decode(run: uapi.kvm_run, view: memoryview) -> VcpuExit:
    """The exit ``run.exit_reason`` names; ``view`` is a writable view of the whole kvm_run mapping."""
    reason = run.exit_reason
    if reason == uapi.KVM_EXIT_IO:
        io = run.io
        start = io.data_offset
        return Io(io.port, io.size, io.count, io.direction == uapi.KVM_EXIT_IO_OUT,
                  view[start:start + io.size * io.count])
    if reason == uapi.KVM_EXIT_MMIO:
        mmio = run.mmio
        length = min(mmio.len, 8)
        return Mmio(mmio.phys_addr, bool(mmio.is_write), view[MMIO_DATA_OFFSET:MMIO_DATA_OFFSET + length])
    if reason == uapi.KVM_EXIT_HLT:
        return _HLT
    if reason == uapi.KVM_EXIT_INTR:
        return _INTR
    if reason == uapi.KVM_EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
        se = run.system_event
        return SystemEvent(se.type, [se.data[i] for i in range(min(se.ndata, 16))])
    if reason == uapi.KVM_EXIT_HYPERCALL:
        hc = run.hypercall
        return Hypercall(hc.nr, list(hc.args), run)
    if reason == uapi.KVM_EXIT_DEBUG:
        arch = run.debug.arch
        return Debug({name: getattr(arch, name) for name, _ in arch._fields_})
    if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
        internal = run.internal
        insn = None
        if internal.suberror == uapi.KVM_INTERNAL_ERROR_EMULATION and run.emulation_failure.flags & 1:
            ef = run.emulation_failure
            insn = bytes(ef.insn_bytes[:ef.insn_size])
        return InternalError(internal.suberror, [internal.data[i] for i in range(min(internal.ndata, 16))], insn)
    if reason == uapi.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == uapi.KVM_EXIT_MEMORY_FAULT:
        mf = run.memory_fault
        return MemoryFault(mf.flags, mf.gpa, mf.size)
    if reason == uapi.KVM_EXIT_ARM_NISV:
        return ArmNisv(run.arm_nisv.esr_iss, run.arm_nisv.fault_ipa)
    if reason == uapi.KVM_EXIT_UNKNOWN:
        return Other(reason, {"hardware_exit_reason": run.hw.hardware_exit_reason})
    if reason == uapi.KVM_EXIT_EXCEPTION:
        return Other(reason, {"exception": run.ex.exception, "error_code": run.ex.error_code})
    if reason == uapi.KVM_EXIT_ARM_SEA:
        sea = run.arm_sea
        return Other(reason, {"flags": sea.flags, "esr": sea.esr, "gva": sea.gva, "gpa": sea.gpa})
    return Other(reason)


EHWPOISON = getattr(errno, "EHWPOISON", 133)  # Linux's value; not every Python's errno module has the name


def memory_fault_after_error(run: uapi.kvm_run, err: int) -> MemoryFault | None:
    """After KVM_RUN failed with ``err``: the KVM_EXIT_MEMORY_FAULT KVM filled in, if it did.

    Only EFAULT and EHWPOISON come with valid memory_fault fields; after any other error (or
    without KVM_EXIT_MEMORY_FAULT in exit_reason) the union is stale."""
    if err in (errno.EFAULT, EHWPOISON) and run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT:
        mf = run.memory_fault
        return MemoryFault(mf.flags, mf.gpa, mf.size)
    return None


def details(exit: VcpuExit) -> dict:
    """The decoded fields of ``exit`` as a plain dict (for reports)."""
    if isinstance(exit, Other):
        return dict(exit.details)
    out = {}
    for name in exit.__slots__:
        if name.startswith("_"):
            continue
        value = getattr(exit, name)
        if isinstance(value, memoryview):
            value = bytes(value).hex(" ")
        elif isinstance(value, bytes):
            value = value.hex(" ")
        out[name] = value
    return out
