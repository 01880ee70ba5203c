"""Typed vCPU exits: what ``VcpuFd.run()`` returns (as kvm-ioctls' ``VcpuExit``).

``struct kvm_run``'s exit union is decoded here and nowhere else.  Each exit names
the union member that ``exit_reason`` selects; the others are stale and are never
read.

The completion contract lives here too.  For a guest *read* (``Io`` in, ``Mmio``
read) ``data`` is a writable view of the bytes inside ``kvm_run``: whoever
handles the exit fills it, and the next ``KVM_RUN`` completes the guest's
instruction from it.  Nothing may clear ``exit_reason`` or the data before
that.  For a ``Hypercall``, ``complete(ret)`` writes the return value.

Exits are never modified: a vCPU's ``Io`` or ``Mmio`` equal to one it decoded
before is that same object (``decode``'s ``seen``), one dict lookup per exit.
"""

from __future__ import annotations

import errno
import struct

from ..record import Record
from . import uapi


class VcpuExit(Record):
    """An exit: its class's ``reason`` is the KVM_EXIT_* it decodes (plain records, not dataclasses: record.py)."""

    __slots__ = ()
    reason = -1

    @property
    def code(self) -> int:
        """The KVM_EXIT_* number of this exit."""
        return self.reason

    @property
    def name(self) -> str:
        return uapi.exit_reason_name(self.code)


class Io(VcpuExit):
    """KVM_EXIT_IO: ``count`` items of ``size`` bytes (string I/O has count > 1)."""

    __slots__ = ("port", "size", "count", "is_write", "data")
    reason = uapi.KVM_EXIT_IO

    def __init__(self, port: int, size: int, count: int, is_write: bool, data: memoryview):
        self.port = port
        self.size = size
        self.count = count
        self.is_write = is_write
        self.data = data  # size * count bytes inside kvm_run; writable (fill it for an IN)


class Mmio(VcpuExit):
    """KVM_EXIT_MMIO: a guest access KVM could not satisfy from a memslot."""

    __slots__ = ("addr", "is_write", "data")
    reason = uapi.KVM_EXIT_MMIO

    def __init__(self, addr: int, is_write: bool, data: memoryview):
        self.addr = addr
        self.is_write = is_write
        self.data = data  # ``len`` bytes inside kvm_run.mmio.data; writable (fill it for a read)


class Hlt(VcpuExit):
    __slots__ = ()
    reason = uapi.KVM_EXIT_HLT


class Shutdown(VcpuExit):
    """x86: the guest triple-faulted."""

    __slots__ = ()
    reason = uapi.KVM_EXIT_SHUTDOWN


class Intr(VcpuExit):
    """KVM_RUN returned EINTR (a signal or ``immediate_exit``), or KVM_EXIT_INTR."""

    __slots__ = ()
    reason = uapi.KVM_EXIT_INTR


class SystemEvent(VcpuExit):
    __slots__ = ("type", "data")
    reason = uapi.KVM_EXIT_SYSTEM_EVENT

    def __init__(self, type: int, data: list[int] | None = None):
        self.type = type
        self.data = [] if data is None else data


class Hypercall(VcpuExit):
    __slots__ = ("nr", "args", "_run")
    reason = uapi.KVM_EXIT_HYPERCALL

    def __init__(self, nr: int, args: list[int], _run: uapi.kvm_run = None):
        self.nr = nr
        self.args = args
        self._run = _run

    def __repr__(self) -> str:  # not kvm_run
        return f"Hypercall(nr={self.nr!r}, args={self.args!r})"

    def complete(self, ret: int) -> None:
        """The hypercall's return value, handed to the guest on the next KVM_RUN."""
        self._run.hypercall.ret = ret & (2**64 - 1)


class Debug(VcpuExit):
    __slots__ = ("arch",)
    reason = uapi.KVM_EXIT_DEBUG

    def __init__(self, arch: dict[str, int] | None = None):
        self.arch = {} if arch is None else arch


class InternalError(VcpuExit):
    __slots__ = ("suberror", "data", "insn_bytes")
    reason = uapi.KVM_EXIT_INTERNAL_ERROR

    def __init__(self, suberror: int, data: list[int], insn_bytes: bytes | None = None):
        self.suberror = suberror
        self.data = data
        # KVM_INTERNAL_ERROR_EMULATION with KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        self.insn_bytes = insn_bytes


class FailEntry(VcpuExit):
    __slots__ = ("hardware_entry_failure_reason", "cpu")
    reason = uapi.KVM_EXIT_FAIL_ENTRY

    def __init__(self, hardware_entry_failure_reason: int, cpu: int):
        self.hardware_entry_failure_reason = hardware_entry_failure_reason
        self.cpu = cpu


class MemoryFault(VcpuExit):
    """KVM_EXIT_MEMORY_FAULT (valid only together with an EFAULT/EHWPOISON from KVM_RUN)."""

    __slots__ = ("flags", "gpa", "size")
    reason = uapi.KVM_EXIT_MEMORY_FAULT

    def __init__(self, flags: int, gpa: int, size: int):
        self.flags = flags
        self.gpa = gpa
        self.size = size

    @property
    def private(self) -> bool:
        return bool(self.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)


class ArmNisv(VcpuExit):
    """arm64: a data abort outside memslots without a valid syndrome (KVM_CAP_ARM_NISV_TO_USER)."""

    __slots__ = ("esr_iss", "fault_ipa")
    reason = uapi.KVM_EXIT_ARM_NISV

    def __init__(self, esr_iss: int, fault_ipa: int):
        self.esr_iss = esr_iss
        self.fault_ipa = fault_ipa


class Other(VcpuExit):
    """Any exit pyvmm does not decode (UNKNOWN, EXCEPTION, FAIL_ENTRY's siblings...): the raw reason."""

    __slots__ = ("raw_reason", "details")

    def __init__(self, raw_reason: int, details: dict | None = None):
        self.raw_reason = raw_reason
        self.details = {} if details is None else details

    @property
    def code(self) -> int:
        return self.raw_reason


_HLT = Hlt()
_SHUTDOWN = Shutdown()
INTR = _INTR = Intr()

# Byte offset of kvm_run.mmio.data inside the mapping.
MMIO_DATA_OFFSET = uapi.kvm_run.u.offset + uapi._mmio.data.offset

# The two exits of nearly every guest access, read straight from the mapping with one struct call each (a ctypes
# field read builds an object per field): kvm_run.exit_reason, kvm_run.io, kvm_run.mmio as the uapi mirror lays them
# out (tests/test_costs.py checks decode() against the mirror, tests/test_uapi.py the mirror against the kernel).
EXIT_REASON_OFFSET = uapi.kvm_run.exit_reason.offset
EXIT_OFFSET = uapi.kvm_run.u.offset  # the union: io, mmio...
# exit_reason, then (EXIT_OFFSET - EXIT_REASON_OFFSET - 4 bytes on) io's direction, size, port, count, data_offset
_reason_and_io_at = struct.Struct(f"=I{EXIT_OFFSET - EXIT_REASON_OFFSET - 4}xBBHIQ").unpack_from
_mmio_at = struct.Struct("=Q8xIB").unpack_from  # mmio's phys_addr, (data), len, is_write
_EXIT_IO, _EXIT_MMIO, _IO_OUT = uapi.KVM_EXIT_IO, uapi.KVM_EXIT_MMIO, uapi.KVM_EXIT_IO_OUT


SEEN_LIMIT = 256  # distinct I/O and MMIO exits decode() keeps per vCPU (then it starts afresh)


def decode(run: uapi.kvm_run, view: memoryview, seen: dict | None = None) -> VcpuExit:
    """The exit ``run.exit_reason`` names; ``view`` is a writable view of the whole kvm_run mapping.

    ``seen`` (one dict per vCPU, kept by the caller): an ``Io`` or ``Mmio`` exit equal to one decoded before is
    that same object, whose ``data`` is the same bytes of kvm_run.  A guest mostly repeats a few accesses (a UART
    register, a queue notify): each then costs a dict lookup instead of a new exit.  So exits are never modified."""
    fields = _reason_and_io_at(view, EXIT_REASON_OFFSET)
    reason = fields[0]
    if reason == _EXIT_IO:
        exit = seen.get(fields) if seen is not None else None
        if exit is None:
            _, direction, size, port, count, start = fields
            exit = Io(port, size, count, direction == _IO_OUT, view[start:start + size * count])
            _remember(seen, fields, exit)
        return exit
    if reason == _EXIT_MMIO:
        access = _mmio_at(view, EXIT_OFFSET)  # (addr, len, is_write)
        exit = seen.get(access) if seen is not None else None
        if exit is None:
            addr, length, is_write = access
            exit = Mmio(addr, is_write != 0, view[MMIO_DATA_OFFSET:MMIO_DATA_OFFSET + (length if length < 8 else 8)])
            _remember(seen, access, exit)
        return exit
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


def _remember(seen: dict | None, key: tuple, exit: VcpuExit) -> None:
    if seen is not None:
        if len(seen) >= SEEN_LIMIT:
            seen.clear()
        seen[key] = exit


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
