"""Fault reports: what went wrong when KVM_RUN failed or the VM exited with a failure.

A report gathers the errno and its meaning, the VM type, the vCPU's registers,
the memory-fault fields (only when the exit reason is KVM_EXIT_MEMORY_FAULT,
since they are stale otherwise), every memslot with its backing, host address
range and VMA flags, RLIMIT_MEMLOCK with locked/pinned usage, the kernel log
lines printed since the VM was created, and a likely cause drawn from the
kernel's own rules.  ``text()`` is for people, ``to_json()`` for tools.
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from . import hostinfo, hostmem
from .kvm import uapi

if TYPE_CHECKING:
    from .kvm.vcpu import VcpuFd
    from .vm import Vm


@dataclass
class SlotInfo:
    slot: int
    gpa: int
    size: int
    flags: list[str]
    backing: str
    hva: int
    vmas: list[dict]
    backing_details: dict

    @property
    def vmflags(self) -> set[str]:
        return {f for v in self.vmas for f in v["vmflags"]}


@dataclass
class FaultReport:
    what: str  # one line: what happened
    vm_kind: str  # "normal", "protected"
    vm_type: int
    arch: str
    vcpu: int | None
    exit_reason: str | None = None
    call: str | None = None
    errno: int | None = None
    errno_name: str | None = None
    errno_meaning: str | None = None
    registers: dict[str, int] = field(default_factory=dict)
    memory_fault: dict | None = None
    exit_details: dict = field(default_factory=dict)
    fault_gpa: int | None = None
    faulting_slot: int | None = None
    forced_pages: list[int] = field(default_factory=list)  # guest-owned pages the VMM touched with force=True
    slots: list[SlotInfo] = field(default_factory=list)
    memlock: dict = field(default_factory=dict)
    kernel_log: list[str] = field(default_factory=list)
    kernel_log_unavailable: str | None = None
    likely_cause: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    def text(self) -> str:
        out = ["=" * 72, f"pyvmm fault report: {self.what}", "=" * 72]
        out.append(f"VM: {self.vm_kind} ({self.arch}, KVM_CREATE_VM type {self.vm_type:#x})"
                   + (f", vCPU {self.vcpu}" if self.vcpu is not None else ""))
        if self.call:
            out.append(f"call: {self.call} -> {self.errno_name} ({self.errno_meaning})")
        if self.exit_reason:
            out.append(f"exit reason: {self.exit_reason}")
        for key, value in self.exit_details.items():
            out.append(f"  {key}: {value:#x}" if isinstance(value, int) else f"  {key}: {value}")
        if self.fault_gpa is not None:
            out.append(f"faulting guest address: {self.fault_gpa:#x}"
                       + (f" (slot {self.faulting_slot})" if self.faulting_slot is not None else " (no memslot)"))
        if self.memory_fault:
            mf = self.memory_fault
            out.append(f"memory fault: gpa {mf['gpa']:#x} size {mf['size']:#x} flags {mf['flags']:#x}"
                       + (" (private)" if mf["private"] else ""))
        if self.registers:
            regs = [f"{k}={v:#x}" for k, v in self.registers.items()]
            out.append("registers:")
            out.extend("  " + "  ".join(regs[i:i + 4]) for i in range(0, len(regs), 4))
        out.append("memslots:")
        for s in self.slots:
            mark = "  <-- faulting slot" if s.slot == self.faulting_slot else ""
            out.append(f"  slot {s.slot}: gpa [{s.gpa:#x}, {s.gpa + s.size:#x}) {s.backing}"
                       f" flags={','.join(s.flags) or '-'} hva {s.hva:#x}{mark}")
            for v in s.vmas:
                notable = ", ".join(f"{k} ({d})" for k, d in v["notable"].items())
                out.append(f"    VMA {v['start']:#x}-{v['end']:#x} {v['perms']} {v['path'] or '[anon]'}")
                out.append(f"      VmFlags: {' '.join(v['vmflags'])}" + (f"  [{notable}]" if notable else ""))
            if not s.vmas:
                out.append("    no VMA covers this slot's host range (unmapped?)")
        ml = self.memlock
        if ml:
            lim = "unlimited" if ml["rlimit_soft"] is None else f"{ml['rlimit_soft']} bytes"
            out.append(f"RLIMIT_MEMLOCK: {lim}; VmLck {ml['vm_lck_kb']} kB, VmPin {ml['vm_pin_kb']} kB;"
                       f" CAP_IPC_LOCK {'yes' if ml['cap_ipc_lock'] else 'no'}")
        out.append("kernel log since the VM was created:")
        if self.kernel_log_unavailable:
            out.append(f"  ({self.kernel_log_unavailable})")
        elif not self.kernel_log:
            out.append("  (nothing)")
        out.extend("  " + line for line in self.kernel_log[-40:])
        out.append("likely cause:")
        out.extend("  - " + c for c in self.likely_cause or ["unknown"])
        return "\n".join(out)


def _slot_infos(vm: "Vm") -> list[SlotInfo]:
    try:
        vmas = hostinfo.read_smaps()
    except OSError:
        vmas = []
    infos = []
    for r in vm.memory.regions:
        d = r.describe()
        covering = [v.to_dict() for v in hostinfo.vmas_covering(vmas, r.hva, r.size)] if r.hva else []
        infos.append(SlotInfo(d["slot"], d["gpa"], d["size"], d["flags"], d["backing"], d["hva"], covering,
                              d["backing_details"]))
    return infos


def _swap_backed(slot: SlotInfo) -> bool:
    """Anonymous memory and shmem (memfd, tmpfs files) are swap-backed; guest_memfd and disk files are not."""
    if slot.backing == "guest-memfd":
        return False
    if slot.backing.startswith("file:"):
        try:
            with open("/proc/self/mounts") as f:
                mounts = [line.split()[1:3] for line in f]
        except OSError:
            return False
        path = slot.backing[len("file:"):]
        best = max((m for m in mounts if path.startswith(m[0].rstrip("/") + "/")), key=lambda m: len(m[0]),
                   default=None)
        return best is not None and best[1] in ("tmpfs", "shmem")
    return True


def likely_causes(report: FaultReport) -> list[str]:
    """The kernel's rules, applied to what the report saw.  Pure: tests feed it reports."""
    causes: list[str] = []
    err = report.errno
    protected = report.vm_kind == "protected"
    slot = next((s for s in report.slots if s.slot == report.faulting_slot), None)
    candidates = [slot] if slot else report.slots
    pfn_slots = [s for s in candidates if s.vmflags & {"pf", "io"}]
    in_slot_mmio = report.exit_reason == "KVM_EXIT_MMIO" and slot is not None
    if err == errno_mod.EFAULT and protected and report.forced_pages:
        pages = ", ".join(f"{p:#x}" for p in report.forced_pages[:8])
        causes.append(f"the VMM read or wrote guest-owned page(s) {pages} with force=True: pKVM reclaimed them from "
                      "the protected guest (zeroed), and the guest's next access to them fails with EFAULT")
    if err == errno_mod.EFAULT or in_slot_mmio:
        if protected and pfn_slots:
            for s in pfn_slots:
                causes.append(
                    f"slot {s.slot} ({s.backing}) is mapped VM_PFNMAP/VM_IO (VmFlags "
                    f"{' '.join(sorted(s.vmflags & {'pf', 'io'}))}): a protected VM's pages are pinned with "
                    "pin_user_pages() when the guest first touches them (pkvm_mem_abort), and PFN-mapped memory "
                    "such as a DMA-buf mmap has no pinnable struct pages, so KVM returns EFAULT"
                )
        for s in candidates:
            if not s.vmas:
                causes.append(f"slot {s.slot}: its host range {s.hva:#x} is no longer mapped in the VMM")
            elif any("w" not in v["perms"] for v in s.vmas):
                causes.append(f"slot {s.slot}: its host mapping is not writable ({s.vmas[0]['perms']}), so a guest "
                              "write there cannot be faulted in")
            path = s.backing_details.get("path")
            if path and report.fault_gpa is not None:
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = None
                offset = report.fault_gpa - s.gpa
                if size is not None and offset >= size:
                    causes.append(f"slot {s.slot}: backing file {path} is {size:#x} bytes long, the guest touched "
                                  f"offset {offset:#x} beyond its end: the host page fault there is SIGBUS, so KVM cannot map the page")
        if not causes and in_slot_mmio:
            causes.append(f"KVM could not access the host page behind guest address {report.fault_gpa:#x} in slot "
                          f"{slot.slot} ({slot.backing}) and treated the access as MMIO")
        elif not causes:
            causes.append("KVM could not fault in the host page behind the guest address (hva_to_pfn failed): "
                          "the host mapping is missing, lacks permission, or cannot be pinned")
    elif err == errno_mod.EIO and protected:
        named = [s for s in candidates if not _swap_backed(s)]
        which = ", ".join(f"slot {s.slot} ({s.backing})" for s in named) or "a slot"
        causes.append(f"{which}: a protected VM's pages are pinned and must be swap-backed (anonymous memory or "
                      "shmem: memfd, tmpfs); pkvm_mem_abort refuses page-cache pages of regular files and "
                      "guest_memfd folios with EIO")
    elif err == errno_mod.ENOMEM:
        ml = report.memlock
        causes.append(
            "pinning the guest's pages would exceed RLIMIT_MEMLOCK "
            f"({'unlimited' if ml.get('rlimit_soft') is None else str(ml.get('rlimit_soft')) + ' bytes'})"
            + ("" if ml.get("cap_ipc_lock") else " and the VMM lacks CAP_IPC_LOCK")
            + ": raise it (ulimit -l) to at least the guest's memory size" if protected else
            "the host ran out of memory while faulting in guest pages"
        )
    elif err == errno_mod.EPERM:
        causes.append("a protected VM forbids deleting or moving a memslot after its first KVM_RUN, and READONLY "
                      "or LOG_DIRTY_PAGES memslots" if protected else "the kernel refused the operation (EPERM)")
    elif err in (errno_mod.ENOEXEC, errno_mod.ENOENT) and report.arch == "arm64":
        causes.append("the vCPU was not initialised with KVM_ARM_VCPU_INIT before KVM_RUN")
    if report.exit_reason == "KVM_EXIT_INTERNAL_ERROR":
        sub = report.exit_details.get("suberror")
        if sub == uapi.KVM_INTERNAL_ERROR_EMULATION:
            causes.append("KVM's instruction emulator could not emulate the instruction at the guest PC "
                          f"(bytes {report.exit_details.get('insn_bytes', '?')}); on hosts that emulate every "
                          "guest instruction, avoid instructions the emulator lacks (AVX, BMI...)")
        else:
            causes.append(f"KVM internal error, suberror {sub}")
    elif report.exit_reason == "KVM_EXIT_FAIL_ENTRY":
        causes.append("the hardware refused to enter the guest: the vCPU state (segments, control registers) "
                      "is invalid for the mode it is in")
    elif report.exit_reason == "KVM_EXIT_SHUTDOWN":
        causes.append("the guest triple-faulted (an exception with no usable IDT or a fault while delivering one)")
    return causes


def build_report(vm: "Vm", vcpu: "VcpuFd | None", what: str, *, call: str | None = None,
                 err: int | None = None, exit_reason: int | None = None, fault_gpa: int | None = None) -> FaultReport:
    """Collect everything about the failure now, while the VM still exists."""
    run = vcpu.kvm_run if vcpu is not None and not vcpu.closed else None
    report = FaultReport(
        what=what, vm_kind=vm.kind, vm_type=vm.vm_type, arch=vm.arch.name,
        vcpu=vcpu.vcpu_id if vcpu is not None else None,
        exit_reason=uapi.exit_reason_name(exit_reason) if exit_reason is not None else None,
        call=call, errno=err,
        errno_name=errno_mod.errorcode.get(err) if err else None,
        errno_meaning=os.strerror(err) if err else None,
    )
    report.fault_gpa = fault_gpa
    if run is not None:
        # memory_fault is valid only when KVM_RUN failed with EFAULT/EHWPOISON and said so in exit_reason.
        if run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT and err in (errno_mod.EFAULT, errno_mod.EHWPOISON):
            mf = run.memory_fault
            report.exit_reason = "KVM_EXIT_MEMORY_FAULT"
            report.memory_fault = {"gpa": mf.gpa, "size": mf.size, "flags": mf.flags,
                                   "private": bool(mf.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE)}
            report.fault_gpa = mf.gpa
        if exit_reason is not None:
            report.exit_details = exit_details(run, exit_reason)
        try:
            report.registers = vm.arch.registers(vcpu)
        except Exception as exc:  # registers of a dead vCPU: say so, keep the report
            report.exit_details["registers_unavailable"] = str(exc)
    if report.fault_gpa is not None:
        region = vm.memory.find(report.fault_gpa)
        report.faulting_slot = region.slot if region else None
    report.slots = _slot_infos(vm)
    if report.faulting_slot is None and report.vm_kind == "protected":
        # arm64 has no KVM_EXIT_MEMORY_FAULT: infer the slot when exactly one slot fits the kernel's rule.
        if err == errno_mod.EFAULT:
            fits, why = [s for s in report.slots if s.vmflags & {"pf", "io"}], "the only VM_PFNMAP/VM_IO slot"
        elif err == errno_mod.EIO:
            fits = [s for s in report.slots if not _swap_backed(s)]
            why = "the only slot whose pages are not swap-backed"
        else:
            fits = []
        if len(fits) == 1:
            report.faulting_slot = fits[0].slot
            report.exit_details["faulting_slot_inferred"] = why
    report.forced_pages = sorted(p * hostmem.PAGE_SIZE for p in vm.memory.forced_pages)
    report.memlock = asdict(hostinfo.MemlockInfo.read())
    report.kernel_log = vm.kmsg.poll()
    report.kernel_log_unavailable = vm.kmsg.unavailable
    report.likely_cause = likely_causes(report)
    return report


def exit_details(run: uapi.kvm_run, exit_reason: int | None) -> dict:
    """The union member that belongs to ``exit_reason`` (never the others: they are stale)."""
    if exit_reason == uapi.KVM_EXIT_INTERNAL_ERROR:
        internal = run.internal
        d = {"suberror": internal.suberror, "ndata": internal.ndata,
             "data": [internal.data[i] for i in range(min(internal.ndata, 16))]}
        if internal.suberror == uapi.KVM_INTERNAL_ERROR_EMULATION:
            ef = run.emulation_failure
            if ef.flags & 1:
                d["insn_bytes"] = bytes(ef.insn_bytes[: ef.insn_size]).hex(" ")
        return d
    if exit_reason == uapi.KVM_EXIT_FAIL_ENTRY:
        return {"hardware_entry_failure_reason": run.fail_entry.hardware_entry_failure_reason,
                "cpu": run.fail_entry.cpu}
    if exit_reason == uapi.KVM_EXIT_UNKNOWN:
        return {"hardware_exit_reason": run.hw.hardware_exit_reason}
    if exit_reason == uapi.KVM_EXIT_EXCEPTION:
        return {"exception": run.ex.exception, "error_code": run.ex.error_code}
    if exit_reason == uapi.KVM_EXIT_SYSTEM_EVENT:
        se = run.system_event
        return {"type": se.type, "data": [se.data[i] for i in range(min(se.ndata, 16))]}
    if exit_reason == uapi.KVM_EXIT_ARM_NISV:
        return {"esr_iss": run.arm_nisv.esr_iss, "fault_ipa": run.arm_nisv.fault_ipa}
    if exit_reason == uapi.KVM_EXIT_ARM_SEA:
        sea = run.arm_sea
        return {"flags": sea.flags, "esr": sea.esr, "gva": sea.gva, "gpa": sea.gpa}
    if exit_reason == uapi.KVM_EXIT_DEBUG:
        return {name: getattr(run.debug.arch, name) for name, _ in run.debug.arch._fields_}
    if exit_reason == uapi.KVM_EXIT_MMIO:
        return {"phys_addr": run.mmio.phys_addr, "len": run.mmio.len, "is_write": run.mmio.is_write}
    return {}
