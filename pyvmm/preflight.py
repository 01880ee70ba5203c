"""``pyvmm check``: what a configuration will do, predicted without ``KVM_RUN``.

The VM is made for real (``KVM_CREATE_VM``, every backing created and mapped, every memslot registered), so
whatever KVM or pyvmm refuses before running is observed, not guessed; only the first ``KVM_RUN`` is
predicted, from the kernel's rules (the arch's ``predict_first_run``: for a protected arm64 VM, pkvm_mem_abort's
RLIMIT_MEMLOCK charge, pinning and swap-backed checks) applied to the host's facts: each slot's VMA flags from
/proc/self/smaps, its backing's nature, the memlock limit and CAP_IPC_LOCK, the pKVM mode.

The prediction is for a guest that touches its RAM (slot 0, where it starts); another slot's answer is
given for when the guest touches it.  ``pyvmm matrix`` prints prediction and observation side by side.
"""

from __future__ import annotations

import dataclasses
import enum
import errno as errno_mod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import hostinfo
from .kvm.errors import ConfigError, KvmError, MissingFeature

if TYPE_CHECKING:
    from .report import SlotInfo
    from .vm import Vm


@dataclass(frozen=True)
class RuleAnswer:
    """One rule's answer for the first KVM_RUN (the arch's ``predict_first_run``): errno None = it passes."""

    errno: int | None
    reason: str
    slot: int | None = None  # the memslot it is about (None: the VM as a whole, e.g. RLIMIT_MEMLOCK)


def pfns_without_pfnmap(s: "SlotInfo") -> bool:
    """The backing fills its mapping with raw PFNs (a DMA-buf's fault handler) but the VMA is not VM_PFNMAP/VM_IO
    (as the CMA heap of the crosvm report's kernel): GUP does not refuse the VMA and walks into special PTEs."""
    return bool(s.nature.get("pfn_mapped")) and bool(s.vmas) and not (s.vmflags & {"pf", "io"})


def bad_page_map_answer(s: "SlotInfo") -> RuleAnswer | None:
    """Any VM: GUP (pin_user_pages in pkvm_mem_abort, hva_to_pfn for a normal VM) walks into the special PTEs of
    a VMA that is not VM_PFNMAP: vm_normal_page() logs "BUG: Bad page map" and returns no page, so the fault fails
    with EFAULT (hva_to_pfn_remapped, a normal VM's way around GUP, serves only VM_IO/VM_PFNMAP VMAs)."""
    if not pfns_without_pfnmap(s):
        return None
    return RuleAnswer(errno_mod.EFAULT,
                      f"slot {s.slot} ({s.backing}): its backing inserts raw PFNs but the VMA is not VM_PFNMAP/VM_IO "
                      f"(VmFlags {' '.join(sorted(s.vmflags))}): GUP walks into the special PTEs, vm_normal_page() "
                      "logs 'BUG: Bad page map' and the stage-2 fault fails with EFAULT", s.slot)


class Verdict(enum.Enum):
    RUNS = "runs"  # the guest runs (as far as its memory is concerned)
    FAILS = "fails"  # an ioctl fails: ``errno`` and ``call`` say which
    REFUSED = "refused"  # pyvmm refuses the configuration before KVM sees it (ConfigError)
    UNAVAILABLE = "unavailable"  # this host lacks what it needs (a device, a kernel option, pKVM)


@dataclass
class Prediction:
    verdict: Verdict
    errno: str | None = None  # "EFAULT"
    call: str | None = None  # the ioctl that fails: "KVM_RUN", "KVM_SET_USER_MEMORY_REGION2", ...
    reasons: list[str] = field(default_factory=list)  # the rules that decided, most relevant first
    facts: dict = field(default_factory=dict)  # what the prediction was made from

    def summary(self) -> str:
        """One cell of a table: "runs", "EFAULT (KVM_RUN)", "refused", "unavailable"."""
        if self.verdict is Verdict.FAILS and self.errno:
            return f"{self.errno} ({self.call})"
        return self.verdict.value

    def cause(self) -> str:
        return self.reasons[0] if self.reasons else ""

    def to_dict(self) -> dict:
        return {"verdict": self.verdict.value, "errno": self.errno, "call": self.call, "reasons": self.reasons,
                "facts": self.facts}


def _errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, str(err))


def predict(vm: "Vm") -> Prediction:
    """The first ``KVM_RUN`` of VM (memslots registered, not yet run), from the kernel's rules."""
    from .report import slot_infos

    if vm.memory.has_run:
        raise ConfigError("pyvmm check predicts a VM's first KVM_RUN: this VM has already run")
    slots, smaps_error = slot_infos(vm)
    facts = {
        "vm_kind": vm.kind, "arch": vm.arch.name, "kvm_arm_mode": hostinfo.kvm_arm_mode(),
        "memlock": dataclasses.asdict(hostinfo.MemlockInfo.read()),
        "slots": [{"slot": s.slot, "gpa": s.gpa, "size": s.size, "backing": s.backing, "flags": s.flags,
                   "vmflags": sorted(s.vmflags), "nature": s.nature} for s in slots],
    }
    if smaps_error:
        facts["smaps_error"] = smaps_error
    answers = vm.arch.predict_first_run(vm, slots)
    ram = next((s.slot for s in slots if s.gpa <= vm.arch.ram_base < s.gpa + s.size),
               min(slots, key=lambda s: s.gpa).slot if slots else None)
    decisive = [a for a in answers if a.slot is None or a.slot == ram]  # the guest starts in its RAM
    failing = [a for a in decisive if a.errno is not None]
    elsewhere = [f"if the guest touches slot {a.slot}: {_errno_name(a.errno)}: {a.reason}"
                 for a in answers if a not in decisive and a.errno is not None]
    if not failing:
        reasons = [a.reason for a in decisive] or ["every backing runs"]
        return Prediction(Verdict.RUNS, reasons=reasons + elsewhere, facts=facts)
    first = failing[0]  # the arch orders them: what the guest meets first
    return Prediction(Verdict.FAILS, _errno_name(first.errno), "KVM_RUN", [a.reason for a in failing] + elsewhere,
                      facts)


@dataclass(frozen=True)
class RegionSpec:
    gpa: int | None  # None: after the previous one (RAM at the arch's base)
    size: int
    backing: str
    flags: int = 0


def check(protected: bool, regions: list[RegionSpec], vcpus: int = 1, kvm=None) -> Prediction:
    """Make the VM (type, backings, memslots) and predict its first run; the VM is closed again.

    What fails while making it is observed: a host without the backing or without pKVM is UNAVAILABLE, a
    configuration pyvmm refuses is REFUSED, an ioctl KVM refuses is FAILS with its errno and call."""
    from .vm import Vm

    try:
        vm = Vm(protected=protected, kvm=kvm)
    except (MissingFeature, ConfigError) as err:  # no pKVM, or protected VMs on another arch
        return Prediction(Verdict.UNAVAILABLE, reasons=[str(err)])
    except KvmError as err:
        return Prediction(Verdict.FAILS, err.errno_name, err.call, [str(err)])
    with vm:
        try:
            for r in regions:
                vm.add_memory(r.size, r.backing, gpa=r.gpa, flags=r.flags)
            vm.create_vcpus(vcpus)
        except MissingFeature as err:
            return Prediction(Verdict.UNAVAILABLE, reasons=[str(err)])
        except KvmError as err:
            return Prediction(Verdict.FAILS, err.errno_name, err.call, [str(err)])
        except ConfigError as err:
            return Prediction(Verdict.REFUSED, reasons=[str(err)])
        return predict(vm)


def format_prediction(p: Prediction) -> str:
    lines = [f"predicted: {p.summary()}"]
    lines += [f"  because: {r}" for r in p.reasons]
    for s in p.facts.get("slots", []):
        vmflags = " ".join(s["vmflags"]) or "unknown"
        lines.append(f"  slot {s['slot']}: {s['backing']} at {s['gpa']:#x}, {s['size'] >> 10} KiB, VmFlags {vmflags}")
    ml = p.facts.get("memlock")
    if ml:
        limit = "unlimited" if ml["rlimit_soft"] is None else f"{ml['rlimit_soft']} bytes"
        lines.append(f"  RLIMIT_MEMLOCK {limit}, CAP_IPC_LOCK {'yes' if ml['cap_ipc_lock'] else 'no'}; "
                     f"kvm-arm.mode {p.facts.get('kvm_arm_mode') or '-'}")
    return "\n".join(lines)
