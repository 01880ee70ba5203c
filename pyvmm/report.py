"""Fault reports: what went wrong when KVM_RUN failed or the VM exited with a failure.

A report gathers the host's identity (kernel release, kvm-arm.mode, CPU model, pyvmm version, the KVM
capabilities that matter), the errno and its meaning, the VM type, the registers of every vCPU
(refused ones shown as refused, with the reason) and the code bytes at each PC, the memory-fault
fields (only when the exit reason is KVM_EXIT_MEMORY_FAULT, since they are stale otherwise), every
memslot with its backing, what its pages are (swap-backed, PFN-mapped, hugetlb, file), host address
range and VMA flags, RLIMIT_MEMLOCK with locked/pinned usage, the exit counts, the console's last
lines, this VM's kernel log records (sequence numbers and timestamps, beside the fault's own
CLOCK_MONOTONIC time), and the likely causes drawn from the kernel's own rules (for protected VMs,
``pyvmm.arch.arm64.pkvm``).  ``text()`` is for people (one screen), ``to_json()`` for tools (everything).
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import TYPE_CHECKING

from . import hostinfo, hostmem
from .kvm import exits, uapi
from .kvm.errors import GuestMemoryError
from .logs import getLogger

log = getLogger("pyvmm.report")

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
    nature: dict = field(default_factory=dict)  # Backing.nature(): swap_backed, pfn_mapped, hugetlb, file_path...
    vmas_error: str | None = None  # /proc/self/smaps could not be read: the VMAs are unknown, not absent

    @property
    def vmflags(self) -> set[str]:
        return {f for v in self.vmas for f in v["vmflags"]}


@dataclass
class VcpuInfo:
    """One vCPU at the time of the report: registers (refused ones with the reason), the code at its PC."""

    vcpu: int
    faulting: bool = False
    tid: int | None = None
    state: str | None = None
    registers: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # register -> why KVM would not give it
    events: dict = field(default_factory=dict)
    unavailable: str | None = None  # no registers at all, and why
    code_gpa: int | None = None
    code_bytes: str | None = None  # hex, CODE_BYTES from code_gpa
    code_unavailable: str | None = None


CODE_BYTES = 16
KMSG_TEXT_LINES = 12
CONSOLE_LINES = 20


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
    registers: dict[str, int] = field(default_factory=dict)  # the faulting vCPU's (also in ``vcpus``)
    vcpus: list[VcpuInfo] = field(default_factory=list)
    memory_fault: dict | None = None
    exit_details: dict = field(default_factory=dict)
    fault_gpa: int | None = None
    faulting_slot: int | None = None
    faulting_slot_inferred: str | None = None  # set when the slot was inferred (no exit named it): why
    forced_pages: list[int] = field(default_factory=list)  # guest-owned pages the VMM touched with force=True
    slots: list[SlotInfo] = field(default_factory=list)
    smaps_error: str | None = None
    memlock: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)  # hostinfo.HostIdentity
    fault_time_us: int | None = None  # CLOCK_MONOTONIC, µs: compare with the kernel log's timestamps
    exit_counts: dict[str, int] = field(default_factory=dict)
    console_tail: list[str] = field(default_factory=list)
    kernel_log: list[str] = field(default_factory=list)  # this VM's lines (and those naming nobody)
    kernel_log_records: list[dict] = field(default_factory=list)  # the same, with seq, ts_us, level, caller
    kernel_log_dropped: int = 0  # records naming another process
    kernel_log_lost: int = 0  # records overwritten before pyvmm read them
    kernel_log_unavailable: str | None = None
    likely_cause: list[str] = field(default_factory=list)
    dma_pool: dict | None = None  # {"gpa", "size"}: the memory a protected guest shares with its devices
    device_faults: list[dict] = field(default_factory=list)  # devices' refused accesses (Outcome.device_faults)
    cpu_features: list[str] = field(default_factory=list)  # arm64: each vCPU/GIC feature, on or off and why

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
        if self.cpu_features:
            out.append("features: " + "; ".join(self.cpu_features))
        h = self.host
        if h:
            cpu = h.get("cpu_text") or "?"
            out.append(f"host: Linux {h.get('kernel_release')} {h.get('machine')}"
                       + (f", kvm-arm.mode={h['kvm_arm_mode']}" if h.get("kvm_arm_mode") else "")
                       + (f", {h['page_size'] >> 10} KiB pages" if h.get("page_size") else "")
                       + f", CPU {cpu}, pyvmm {h.get('pyvmm_version')}")
        if self.call:
            out.append(f"call: {self.call} -> {self.errno_name} ({self.errno_meaning})")
        if self.exit_reason:
            out.append(f"exit reason: {self.exit_reason}")
        for key, value in self.exit_details.items():
            if key == "faulting_slot_inferred":  # shown with the faulting address
                continue
            out.append(f"  {key}: {value:#x}" if isinstance(value, int) else f"  {key}: {value}")
        if self.fault_gpa is not None or self.faulting_slot is not None:
            where = ("(no memslot)" if self.faulting_slot is None else f"(slot {self.faulting_slot}"
                     + (f", {self.faulting_slot_inferred})" if self.faulting_slot_inferred else ")"))
            gpa = f"{self.fault_gpa:#x}" if self.fault_gpa is not None else "unknown"
            out.append(f"faulting guest address: {gpa} {where}")
        if self.memory_fault:
            mf = self.memory_fault
            out.append(f"memory fault: gpa {mf['gpa']:#x} size {mf['size']:#x} flags {mf['flags']:#x}"
                       + (" (private)" if mf["private"] else " (shared)"))
        for v in self.vcpus:
            out.extend(_vcpu_text(v))
        out.append("memslots:")
        for s in self.slots:
            mark = ""
            if s.slot == self.faulting_slot:
                mark = "  <-- faulting slot" + (" (inferred)" if self.faulting_slot_inferred else "")
            nature = [k for k in ("pfn_mapped", "hugetlb") if s.nature.get(k)]
            if s.nature.get("swap_backed") is False:
                nature.append("not swap-backed")
            out.append(f"  slot {s.slot}: gpa [{s.gpa:#x}, {s.gpa + s.size:#x}) {s.backing}"
                       f" flags={','.join(s.flags) or '-'} hva {s.hva:#x}"
                       + (f" [{', '.join(nature)}]" if nature else "") + mark)
            for v in s.vmas:
                notable = ", ".join(f"{k} ({d})" for k, d in v["notable"].items())
                out.append(f"    VMA {v['start']:#x}-{v['end']:#x} {v['perms']} {v['path'] or '[anon]'}")
                out.append(f"      VmFlags: {' '.join(v['vmflags'])}" + (f"  [{notable}]" if notable else ""))
            if s.vmas_error:
                out.append(f"    VMAs unknown: {s.vmas_error}")
            elif not s.vmas:
                out.append("    no VMA covers this slot's host range (unmapped?)")
        ml = self.memlock
        if ml:
            lim = "unlimited" if ml.get("rlimit_soft") is None else f"{ml['rlimit_soft']} bytes"
            out.append(f"RLIMIT_MEMLOCK: {lim}; VmLck {ml.get('vm_lck_kb', '?')} kB, VmPin {ml.get('vm_pin_kb', '?')} kB;"
                       f" CAP_IPC_LOCK {'yes' if ml.get('cap_ipc_lock') else 'no'}")
        if self.exit_counts:
            out.append("exits: " + ", ".join(f"{k.removeprefix('KVM_EXIT_')} {n}" for k, n in
                                             sorted(self.exit_counts.items(), key=lambda kv: -kv[1])))
        if self.console_tail:
            out.append(f"console (last {len(self.console_tail)} lines):")
            out.extend("  | " + line for line in self.console_tail)
        out.extend(self._kernel_log_text())
        if self.device_faults:
            out.append(f"device requests refused ({len(self.device_faults)}):")
            out.extend("  - " + f["line"] for f in self.device_faults[:8])
        out.append("likely cause:")
        out.extend("  - " + c for c in self.likely_cause or ["unknown"])
        return "\n".join(out)

    def _kernel_log_text(self) -> list[str]:
        head = "kernel log since the VM was created"
        if self.fault_time_us is not None:
            head += f" (fault at [{self.fault_time_us / 1e6:12.6f}] CLOCK_MONOTONIC)"
        out = [head + ":"]
        if self.kernel_log_unavailable:
            out.append(f"  ({self.kernel_log_unavailable})")
        elif not self.kernel_log:
            out.append("  (nothing)")
        notes = []
        if len(self.kernel_log) > KMSG_TEXT_LINES:
            notes.append(f"{len(self.kernel_log) - KMSG_TEXT_LINES} earlier lines cut here (all in the JSON report)")
        if self.kernel_log_lost:
            notes.append(f"{self.kernel_log_lost} record(s) lost: overwritten in the kernel's ring buffer before "
                         "pyvmm read them (EPIPE)")
        if self.kernel_log_dropped:
            notes.append(f"{self.kernel_log_dropped} line(s) naming other processes left out")
        out.extend(f"  ({n})" for n in notes)
        out.extend("  " + line for line in self.kernel_log[-KMSG_TEXT_LINES:])
        return out


def _vcpu_text(v: VcpuInfo) -> list[str]:
    head = f"vCPU {v.vcpu}" + (" (faulting)" if v.faulting else "") + (f" [{v.state}]" if v.state else "")
    if v.unavailable:
        return [f"{head}: registers unavailable: {v.unavailable}"]
    regs = [f"{k}={val:#x}" for k, val in v.registers.items()]
    out = [f"{head}:"]
    if v.faulting or len(regs) <= 8:
        out.extend("  " + "  ".join(regs[i:i + 4]) for i in range(0, len(regs), 4))
    else:  # the others: a line, the rest in the JSON report
        pcs = [r for r in regs if r.split("=")[0] in ("rip", "pc", "rsp", "sp", "rflags", "pstate", "cr0", "cr3")]
        out.append("  " + "  ".join(pcs or regs[:4]) + "  (all in the JSON report)")
    for name, why in v.refused.items():
        out.append(f"  {name}: refused ({why})")
    if v.events:
        out.append("  events: " + ", ".join(f"{k}={val}" for k, val in v.events.items()))
    if v.code_bytes is not None:
        out.append(f"  code at gpa {v.code_gpa:#x}: {v.code_bytes}")
    elif v.code_unavailable:
        out.append(f"  code at pc: not shown ({v.code_unavailable})")
    return out


def slot_infos(vm: "Vm") -> tuple[list[SlotInfo], str | None]:
    vmas: list[hostinfo.Vma] | None
    try:
        vmas, smaps_error = hostinfo.read_smaps(), None
    except OSError as err:
        vmas, smaps_error = None, f"cannot read /proc/self/smaps: {err.strerror or err}"
    infos = []
    for r in vm.memory.regions:
        d = r.describe()
        covering = [v.to_dict() for v in hostinfo.vmas_covering(vmas, r.hva, r.size)] if r.hva and vmas else []
        nature_fn = getattr(r.backing, "nature", None)
        try:
            nature = nature_fn() if nature_fn else {}
        except Exception as exc:  # a report must not fail over one fact
            nature = {"unavailable": repr(exc)}
        infos.append(SlotInfo(d["slot"], d["gpa"], d["size"], d["flags"], d["backing"], d["hva"], covering,
                              d["backing_details"], nature, smaps_error))
    return infos, smaps_error


def _nisv_cause(report: FaultReport) -> str | None:
    nisv = report.exit_reason == "KVM_EXIT_ARM_NISV"
    enosys = report.arch == "arm64" and report.call == "KVM_RUN" and report.errno == errno_mod.ENOSYS
    if not (nisv or enosys):
        return None
    where = ""
    if nisv:
        d = report.exit_details
        where = f" (fault_ipa {d.get('fault_ipa', 0):#x}, esr_iss {d.get('esr_iss', 0):#x})"
    how = ("KVM passed it to the VMM as KVM_EXIT_ARM_NISV (KVM_CAP_ARM_NISV_TO_USER)" if nisv else
           "without KVM_CAP_ARM_NISV_TO_USER, io_mem_abort returns -ENOSYS and KVM_RUN fails with ENOSYS "
           "(the address is not in kvm_run: look at the vCPU's PC and the instruction there)")
    return (f"the guest made a data access{where} outside every memslot (or a write to a READONLY slot) with an "
            "instruction that leaves no valid syndrome (ESR_EL2.ISV = 0): a load/store pair (LDP/STP), a "
            "load/store with writeback (pre/post-index), or a SIMD/FP or atomic access to MMIO; KVM cannot "
            f"emulate it as MMIO, so {how}. Use single loads/stores without writeback for device registers, "
            "or map RAM there")


def _memory_fault_cause(report: FaultReport) -> str | None:
    mf = report.memory_fault
    if not mf:
        return None
    kind = "private" if mf["private"] else "shared"
    other = "shared" if mf["private"] else "private"
    slot = next((s for s in report.slots if s.slot == report.faulting_slot), None)
    if mf["private"] and slot is not None and "GUEST_MEMFD" not in slot.flags:
        return (f"the guest accessed gpa {mf['gpa']:#x} as private, but slot {slot.slot} has no guest_memfd "
                "(kvm_mmu_faultin_pfn_gmem): KVM exits with KVM_EXIT_MEMORY_FAULT (flags PRIVATE). Give the slot "
                "a guest_memfd (KVM_SET_USER_MEMORY_REGION2) or keep the range shared")
    return (f"the guest accessed gpa {mf['gpa']:#x} (size {mf['size']:#x}) as {kind} while KVM's memory attributes "
            f"say {other} (kvm_mmu_faultin_pfn: fault->is_private != kvm_mem_is_private): KVM exits with "
            "KVM_EXIT_MEMORY_FAULT for the VMM to convert the range with KVM_SET_MEMORY_ATTRIBUTES ("
            + ("set KVM_MEMORY_ATTRIBUTE_PRIVATE" if mf["private"] else "clear KVM_MEMORY_ATTRIBUTE_PRIVATE")
            + ") and run the vCPU again")


def bad_page_map_cause(kernel_log: list[str]) -> str | None:
    """The kernel's "BUG: Bad page map" (print_bad_page_map, from vm_normal_page) in this VM's log lines: a
    mapping's fault handler put raw PFNs (special PTEs) into a VMA that is neither VM_PFNMAP nor VM_MIXEDMAP, so
    GUP's check_vma_flags let it in and vm_normal_page met a PTE it cannot turn into a page.  Pure."""
    if not any("BUG: Bad page map" in line for line in kernel_log):
        return None
    text = "\n".join(kernel_log)
    fault = re.search(r"\bfault:(\S+)", text)
    flags = re.search(r"\bvm_flags:([0-9a-f]+)", text)
    handler = fault[1] if fault else "the mapping's fault handler"
    vm_flags = f" (vm_flags {flags[1]}: no VM_PFNMAP {VM_PFNMAP:#x}, no VM_IO {VM_IO:#x})" if flags and not (
        int(flags[1], 16) & (VM_PFNMAP | VM_IO)) else ""
    return (f"the kernel logged 'BUG: Bad page map': {handler} inserted raw PFNs (special PTEs) into a VMA that is "
            f"not VM_PFNMAP/VM_MIXEDMAP{vm_flags}, so GUP's check_vma_flags let it walk the mapping (pin_user_pages "
            "in pkvm_mem_abort for a protected VM, hva_to_pfn for a normal one) and vm_normal_page() found a PTE "
            "that has no page: the backing's mmap must mark such a VMA VM_IO|VM_PFNMAP (as Linux 7.2's CMA and "
            "system heaps do), which makes GUP refuse it cleanly (EFAULT for a protected VM; a normal VM then "
            "follows the PFN); a protected VM needs pinnable memory (udmabuf:memfd). pyvmm's own reads of "
            "/proc/self/smaps walk the mapping too and log the same complaint (smaps_pte_range)")


VM_IO = 0x4000  # include/linux/mm.h, for reading vm_flags in the kernel's own messages
VM_PFNMAP = 0x400


def likely_causes(report: FaultReport) -> list[str]:
    """The kernel's rules, applied to what the report saw.  Pure: tests feed it reports."""
    from .arch.arm64 import pkvm

    causes: list[str] = []
    err = report.errno
    protected = report.vm_kind == "protected"
    slot = next((s for s in report.slots if s.slot == report.faulting_slot), None)
    # Never blame an unrelated slot: with a known fault address outside every slot, no slot is a candidate.
    if slot is not None:
        candidates = [slot]
    elif report.fault_gpa is not None:
        candidates = []
    else:
        candidates = report.slots
    in_slot_mmio = report.exit_reason == "KVM_EXIT_MMIO" and slot is not None
    bad_map = bad_page_map_cause(report.kernel_log)
    if bad_map:
        causes.append(bad_map)
    nisv = _nisv_cause(report)
    if nisv:
        causes.append(nisv)
    if report.exit_reason == "KVM_EXIT_MEMORY_FAULT":
        mf_cause = _memory_fault_cause(report)
        if mf_cause and (report.memory_fault["private"] or report.memory_fault["flags"] or
                         (slot is not None and "GUEST_MEMFD" in slot.flags)):
            causes.append(mf_cause)
    if protected:
        causes.extend(pkvm.fault_causes(report, candidates))
    if (err == errno_mod.EFAULT or in_slot_mmio) and not (protected and causes):
        for s in candidates:
            if s.vmas_error:
                continue  # unknown VMAs are not "unmapped"
            if not s.vmas:
                causes.append(f"slot {s.slot}: its host range {s.hva:#x} is no longer mapped in the VMM")
            elif any("w" not in v["perms"] for v in s.vmas):
                causes.append(f"slot {s.slot}: its host mapping is not writable ({s.vmas[0]['perms']}), so a guest "
                              "write there cannot be faulted in")
            path = s.backing_details.get("path")
            try:
                size = os.stat(path).st_size if path else None
            except OSError:
                size = None
            if size is not None and report.fault_gpa is not None:
                offset = report.fault_gpa - s.gpa
                if offset >= size:
                    causes.append(f"slot {s.slot}: backing file {path} is {size:#x} bytes long, the guest touched "
                                  f"offset {offset:#x} beyond its end: the host page fault there is SIGBUS, so KVM "
                                  "cannot map the page")
            elif size is not None and size < s.size:  # no fault address (arm64 names none): the file is short
                causes.append(f"slot {s.slot}: backing file {path} is {size:#x} bytes long, shorter than the "
                              f"{s.size:#x}-byte slot: a guest access beyond its end is a SIGBUS host page fault, so "
                              "KVM cannot map the page")
        if not causes and in_slot_mmio:
            causes.append(f"KVM could not access the host page behind guest address {report.fault_gpa:#x} in slot "
                          f"{slot.slot} ({slot.backing}) and treated the access as MMIO")
        elif not causes:
            causes.append("KVM could not fault in the host page behind the guest address (hva_to_pfn failed): "
                          "the host mapping is missing, lacks permission, or cannot be pinned")
    elif not protected and err == errno_mod.ENOMEM:
        causes.append("the host ran out of memory while faulting in guest pages")
    elif not protected and err == errno_mod.EPERM:
        causes.append("the kernel refused the operation (EPERM)")
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


def _register_dump(vm: "Vm", vcpu: "VcpuFd") -> tuple[dict[str, int], dict[str, str], dict]:
    """``arch.registers()``: the old dict, or a RegisterDump(values, refused, events)."""
    dump = vm.arch.registers(vcpu)
    if isinstance(dump, dict):
        return dict(dump), {}, {}
    values = dict(getattr(dump, "values", {}) or {})
    refused_raw = getattr(dump, "refused", {}) or {}
    if isinstance(refused_raw, dict):
        refused = {str(k): str(v) for k, v in refused_raw.items()}
    else:  # a list of names, or of (name, why) pairs
        refused = {}
        for item in refused_raw:
            name, why = (item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, "refused"))
            refused[str(name)] = str(why)
    events = getattr(dump, "events", None) or {}
    if is_dataclass(events):
        events = asdict(events)
    elif not isinstance(events, dict):
        events = {"value": str(events)}
    return values, refused, events


def _code_address(vm: "Vm", vcpu: "VcpuFd", regs: dict[str, int]) -> tuple[int | None, str]:
    ca = getattr(vm.arch, "code_address", None)
    if ca is not None:
        return ca(vcpu, vm)
    # Until the arch translates the PC: only where it is a physical address (x86 with paging off).
    if "rip" in regs and "cr0" in regs and not regs["cr0"] & (1 << 31):
        return regs.get("cs_base", 0) + regs["rip"], "paging off: cs.base + rip"
    return None, "the PC is a virtual address and this arch cannot translate it yet"


def _vcpu_info(vm: "Vm", vcpu: "VcpuFd", faulting: bool, tids: dict[int, int], states: dict[int, str]) -> VcpuInfo:
    info = VcpuInfo(vcpu.vcpu_id, faulting, tids.get(vcpu.vcpu_id), states.get(vcpu.vcpu_id))
    if vcpu.closed:
        info.unavailable = "the vCPU fd is closed"
        return info
    try:
        info.registers, info.refused, info.events = _register_dump(vm, vcpu)
    except Exception as exc:  # registers of a dead vCPU: say so, keep the report
        info.unavailable = str(exc)
        return info
    try:
        gpa, why = _code_address(vm, vcpu, info.registers)
    except Exception as exc:
        gpa, why = None, f"cannot translate the PC: {exc}"
    if gpa is None:
        info.code_unavailable = why
        return info
    info.code_gpa = gpa
    # up to the end of the page: the next guest-virtual page need not follow in guest-physical memory
    length = min(CODE_BYTES, hostmem.PAGE_SIZE - gpa % hostmem.PAGE_SIZE)
    try:
        info.code_bytes = vm.memory.read(gpa, length).hex(" ")
    except GuestMemoryError as exc:  # a protected guest's private page, a hole...: say why
        info.code_unavailable = str(exc)
    return info


OTHER_VCPU_WAIT = 1.0  # seconds: KVM serialises a vCPU's ioctls, so one still in KVM_RUN makes us wait
OTHER_VCPU_LATE_WAIT = 5.0  # once every vCPU is stopped, a late read ends promptly


def _other_vcpu_info(vm: "Vm", vcpu: "VcpuFd", tids: dict[int, int], states: dict[int, str],
                     deadline: float, pending: list[threading.Thread]) -> VcpuInfo:
    """Another vCPU's state, without hanging if it is still in KVM_RUN (vcpu->mutex): bounded wait.
    A read that did not finish in time is left in ``pending`` (``add_missing_vcpus`` waits for it)."""
    box: list[VcpuInfo] = []
    t = threading.Thread(target=lambda: box.append(_vcpu_info(vm, vcpu, False, tids, states)),
                         name=f"pyvmm-report-vcpu{vcpu.vcpu_id}", daemon=True)
    t.start()
    t.join(max(0.0, deadline - time.monotonic()))
    if box:
        return box[0]
    pending.append(t)
    return VcpuInfo(vcpu.vcpu_id, False, tids.get(vcpu.vcpu_id), states.get(vcpu.vcpu_id),
                    unavailable="still in KVM_RUN when the report was made (KVM serialises vCPU ioctls); "
                                "call report.add_missing_vcpus(vm) once the vCPUs are stopped")


def add_missing_vcpus(report: FaultReport, vm: "Vm") -> None:
    """Fill in vCPUs whose registers could not be read while they ran (call after every vCPU stopped).

    First waits for the late register reads of ``build_report``: none may touch a vCPU fd after this
    returns (the VM may be closed next)."""
    for t in getattr(report, "_pending_reads", []):
        t.join(OTHER_VCPU_LATE_WAIT)
        if t.is_alive():
            log.error("a register read of the fault report did not finish")
    report._pending_reads = []
    tids = _call(vm, "vcpu_tids", {})
    states = _call(vm, "vcpu_states", {})
    for i, info in enumerate(report.vcpus):
        if info.unavailable and info.unavailable.startswith("still in KVM_RUN"):
            fd = next((v for v in vm.vcpus if v.vcpu_id == info.vcpu), None)
            if fd is not None:
                report.vcpus[i] = _vcpu_info(vm, fd, info.faulting, tids, states)


def _call(vm, name: str, default):
    fn = getattr(vm, name, None)
    if fn is None:
        return default
    try:
        return fn()
    except Exception:
        return default


def build_report(vm: "Vm", vcpu: "VcpuFd | None", what: str, *, call: str | None = None,
                 err: int | None = None, exit: "exits.VcpuExit | None" = None,
                 fault_gpa: int | None = None) -> FaultReport:
    """Collect everything about the failure now, while the VM still exists.

    ``exit`` is the typed exit that ended the VM (``pyvmm/kvm/exits.py`` decodes ``kvm_run``; this
    module never reads it), or the ``MemoryFault`` that came with a failed KVM_RUN."""
    from .arch.arm64 import pkvm
    from .caps import report_caps

    fault_time = hostinfo.monotonic_us()
    report = FaultReport(
        what=what, vm_kind=vm.kind, vm_type=vm.vm_type, arch=vm.arch.name,
        vcpu=vcpu.vcpu_id if vcpu is not None else None,
        exit_reason=exit.name if exit is not None else None,
        call=call, errno=err,
        errno_name=errno_mod.errorcode.get(err) if err else None,
        errno_meaning=os.strerror(err) if err else None,
        fault_time_us=fault_time,
    )
    report.fault_gpa = fault_gpa
    if isinstance(exit, exits.MemoryFault):
        report.memory_fault = {"gpa": exit.gpa, "size": exit.size, "flags": exit.flags, "private": exit.private}
        report.fault_gpa = exit.gpa
    if exit is not None:
        report.exit_details = exits.details(exit)
        if isinstance(exit, exits.ArmNisv):
            report.fault_gpa = exit.fault_ipa
    tids = _call(vm, "vcpu_tids", {})
    states = _call(vm, "vcpu_states", {})
    if vcpu is not None:
        mine = _vcpu_info(vm, vcpu, True, tids, states)
        report.vcpus.append(mine)
        report.registers = dict(mine.registers)
        if mine.unavailable:
            report.exit_details["registers_unavailable"] = mine.unavailable
    deadline = time.monotonic() + OTHER_VCPU_WAIT
    report._pending_reads = []  # not a field: never in to_dict()/JSON
    for other in list(vm.vcpus):
        if vcpu is None or other.vcpu_id != vcpu.vcpu_id:
            report.vcpus.append(_other_vcpu_info(vm, other, tids, states, deadline, report._pending_reads))
    report.vcpus.sort(key=lambda v: v.vcpu)
    if report.fault_gpa is not None:
        region = vm.memory.find(report.fault_gpa)
        report.faulting_slot = region.slot if region else None
    # the kernel log first: reading /proc/self/smaps walks every mapping, and a mapping of raw PFNs without
    # VM_PFNMAP makes that walk log 'BUG: Bad page map' itself, which must not pass for the fault's
    _collect_kernel_log(report, vm, tids)
    report.slots, report.smaps_error = slot_infos(vm)
    report.forced_pages = sorted(p * hostmem.PAGE_SIZE for p in vm.memory.forced_pages)
    if report.faulting_slot is None and report.fault_gpa is None and report.vm_kind == "protected":
        # arm64 has no KVM_EXIT_MEMORY_FAULT from pkvm_mem_abort: infer the slot when exactly one fits the rule.
        slot, why = pkvm.infer_faulting_slot(report)
        if slot is not None:
            report.faulting_slot, report.faulting_slot_inferred = slot, why
            report.exit_details["faulting_slot_inferred"] = why
    report.memlock = asdict(hostinfo.MemlockInfo.read())
    try:
        caps = report_caps(vm.kvm, vm.fd, vm.arch.name)
    except Exception as exc:
        caps = {"unavailable": repr(exc)}
    identity = hostinfo.HostIdentity.read(caps)
    report.host = {**asdict(identity), "cpu_text": identity.cpu_text()}
    report.exit_counts = dict(_call(vm, "exit_counts", {}))
    feats = getattr(vm, "cpu_features", None)
    report.cpu_features = feats.describe() if feats is not None else []
    pool = getattr(vm, "dma_pool", None)
    report.dma_pool = {"gpa": pool.gpa, "size": pool.size} if pool is not None else None
    report.device_faults = [f.as_dict() for f in getattr(vm, "device_faults", [])]
    console = getattr(vm, "console", None)
    if console is not None:
        report.console_tail = console.text().splitlines()[-CONSOLE_LINES:]
    report.likely_cause = likely_causes(report)
    return report


def _collect_kernel_log(report: FaultReport, vm: "Vm", tids: dict[int, int]) -> None:
    kmsg = vm.kmsg
    if kmsg is None:
        report.kernel_log_unavailable = "no kernel log watcher"
        return
    report.kernel_log_unavailable = kmsg.unavailable
    records = kmsg.poll_records() if hasattr(kmsg, "poll_records") else []
    kept, dropped = hostinfo.filter_kmsg(records, hostinfo.KmsgFilter.for_this_process(
        tids, _call(vm, "vcpu_all_tids", set())))
    report.kernel_log = [r.line() for r in kept]
    report.kernel_log_records = [r.as_dict() for r in kept]
    report.kernel_log_dropped = dropped
    report.kernel_log_lost = getattr(kmsg, "lost", 0)
