"""pKVM protected VMs: every rule the kernel applies to them, in one place.

Each rule is stated as Linux 7.2 has it (function names from arch/arm64/kvm/), so that a
report's explanation points at the code that decided:

- VM type (``kvm_arch_init_vm`` -> ``pkvm_init_host_vm``): ``KVM_VM_TYPE_ARM_PROTECTED`` is
  accepted only when pKVM is enabled (``is_protected_kvm_enabled()``, i.e. the host booted with
  ``kvm-arm.mode=protected``); otherwise ``KVM_CREATE_VM`` fails with EINVAL.
- Memslots (``kvm_arch_prepare_memory_region``): a protected VM gets EPERM for a slot with
  ``KVM_MEM_READONLY`` or ``KVM_MEM_LOG_DIRTY_PAGES``, and for deleting or moving a slot once
  ``pkvm_hyp_vm_is_created()`` (the hypervisor's VM is made by ``pkvm_create_hyp_vm`` on the first
  ``KVM_RUN``, from ``kvm_arch_vcpu_run_pid_change``).
- Stage-2 faults (``kvm_handle_guest_abort`` -> ``pkvm_mem_abort``), in order:
  ``topup_mmu_memcache`` fails -> ENOMEM; ``account_locked_vm(mm, 1, true)`` charges one page to
  RLIMIT_MEMLOCK (``__account_locked_vm``: ENOMEM past the limit, CAP_IPC_LOCK bypasses);
  ``pin_user_pages(hva, 1, FOLL_HWPOISON | FOLL_LONGTERM | FOLL_WRITE)`` that does not return one
  page -> EFAULT (GUP's ``check_vma_flags`` refuses VM_IO/VM_PFNMAP VMAs, so a DMA-buf mmap such as
  udmabuf's or a dma-heap's can never be pinned); a pinned folio that is not
  ``folio_test_swapbacked`` -> EIO (page cache of regular files, guest_memfd and hugetlb folios;
  anonymous memory and shmem/memfd pass).
- Capabilities (``kvm_pkvm_ext_allowed``): a protected VM sees only a short list (IRQCHIP, PSCI,
  vCPU counts, IPA size, ptrauth); ``KVM_CHECK_EXTENSION`` on its fd answers 0 for the rest and
  ``KVM_ENABLE_CAP`` fails with EINVAL, ``KVM_CAP_ARM_NISV_TO_USER`` included.
- Aborts without a valid syndrome (``io_mem_abort``): for a protected vCPU KVM injects a
  synchronous external abort into the guest (``kvm_inject_sea_dabt``) instead of exiting.
- Host access to guest pages: after the first run a page belongs to the guest until it shares it;
  a host access through a system call makes pKVM reclaim (and zero) it, and the guest's next access
  to it fails in ``pkvm_mem_abort``.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Callable

from ... import hostmem
from ...cmdline import kvm_arm_mode
from ...kvm import uapi
from ...kvm.errors import ConfigError, KvmError, MissingFeature, PrivatePageError
from ...memory.regions import pages
from ...record import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time
if TYPE_CHECKING:  # hostinfo and preflight are imported where used: pyvmm check, reports, a protected run
    from ...hostinfo import MemlockInfo
    from ...kvm.system import Kvm
    from ...preflight import RuleAnswer
    from ...memory.regions import GuestMemory, MemoryRules
    from ...report import FaultReport, SlotInfo
    from ...virtio import DmaPool
    from ...vm import Vm


# --- VM type ----------------------------------------------------------------------------
def vm_type_bits(mode: str | None = None) -> int:
    """The bits a protected VM adds to KVM_CREATE_VM's type; refuses a host without pKVM."""
    mode = kvm_arm_mode() if mode is None else mode
    if mode != "protected":
        raise MissingFeature(
            f"protected VMs need pKVM: boot the host with kvm-arm.mode=protected (it has "
            f"{'kvm-arm.mode=' + mode if mode else 'no kvm-arm.mode'}; kvm_arch_init_vm refuses "
            "KVM_VM_TYPE_ARM_PROTECTED with EINVAL when is_protected_kvm_enabled() is false)")
    return uapi.KVM_VM_TYPE_ARM_PROTECTED


# --- memslots ---------------------------------------------------------------------------
def restrict_memory_rules(rules: "MemoryRules") -> "MemoryRules":
    """kvm_arch_prepare_memory_region: no READONLY/LOG_DIRTY slots; no delete/move after the first run."""
    rules.readonly_allowed = False
    rules.log_dirty_allowed = False
    rules.frozen_after_run = True
    rules.vm_kind = "protected"
    return rules


def access_guard(memory: "GuestMemory") -> Callable[[int, int, bool], None]:
    """The guard ``GuestMemory`` calls before the VMM touches a protected guest's memory."""

    def guard(gpa: int, size: int, write: bool) -> None:
        # After a protected VM has run, its pages are the guest's unless it shared them.  A host
        # access to a guest-owned page is not harmless: through a system call the kernel reclaims
        # the page from the guest (which then faults with EFAULT); directly it is SIGSEGV.  So
        # refuse, before touching anything, unless the range was declared shared.
        if not memory.has_run:
            return
        for page in pages(gpa, size):
            if page not in memory.shared_pages:
                raise PrivatePageError(
                    f"guest page {page * hostmem.PAGE_SIZE:#x} belongs to the protected guest (it has not shared "
                    "it): a host access would make pKVM reclaim the page from the guest. Declare it shared "
                    "(memory.declare_shared) once the guest has shared it, or pass force=True to access it anyway",
                    max(gpa, page * hostmem.PAGE_SIZE), write)

    return guard


def device_access_cause(pool: "DmaPool | None", access_platform: bool | None) -> str:
    """Why a virtio device met a protected guest's private page, most specific first."""
    if pool is None:
        return ("the VM has no DMA pool (--dma-pool 0), so the guest has no memory shared with devices; give it "
                "one (a restricted-dma-pool the guest kernel shares at boot)")
    if access_platform is False:
        return ("the driver did not negotiate VIRTIO_F_ACCESS_PLATFORM, so the guest's virtio ring bypasses the DMA "
                "API and hands the device private buffers instead of bouncing them through the pool")
    granule = hostmem.PAGE_SIZE
    return ("the guest kernel does not bounce device memory through the restricted-dma-pool: it lacks "
            "CONFIG_ARM_PKVM_GUEST / CONFIG_DMA_RESTRICTED_POOL (Debian's kernels have neither), or a bare-metal "
            "guest placed its rings and buffers outside the pool"
            + ("" if granule <= 0x1000 else
               f", or its pages are smaller than pKVM's sharing granule ({granule >> 10} KiB here: HYP_MEMINFO answers "
               "the host's page size, and a Linux guest with smaller pages shares nothing, pkvm_init_hyp_services)")
            + ("" if access_platform else " (and the driver has not negotiated VIRTIO_F_ACCESS_PLATFORM yet)"))


def timeout_hint() -> str:
    """What to add to a protected VM's timeout on a host whose pages are larger than 4 KiB: Linux 7.2's pKVM can
    leave such a guest retrying one access forever, with no exit for the VMM to see.  pkvm_mem_abort hands
    pkvm_pgtable_stage2_map the fault IPA as HPFAR_EL2 gives it (4 KiB granular; user_mem_abort aligns it down, this
    path does not), whose check for existing mappings in [IPA, IPA + PAGE_SIZE) then meets the next page's mapping
    and answers -EAGAIN: a first touch of a page at a non-page-aligned offset after its successor was mapped never
    completes.  Reproduced by firmware/arm64/pkvm-fault-order.S (tests/test_arm64_pkvm.py); Linux guests meet it
    early in boot."""
    if hostmem.PAGE_SIZE <= 0x1000:
        return ""
    return (f"; on this {hostmem.PAGE_SIZE >> 10} KiB-page host a protected guest may be stuck in a stage-2 fault "
            "that pKVM retries forever (Linux 7.2: pkvm_mem_abort maps the fault IPA unaligned, and "
            "pkvm_pgtable_stage2_map answers -EAGAIN when the next page is already mapped: a first access to a page "
            "away from its start, after the page above it was mapped, never completes; Linux guests stop so early in "
            "boot)")


# --- before KVM_RUN ---------------------------------------------------------------------
def check_memlock(vm: "Vm", memlock: MemlockInfo | None = None) -> None:
    """pkvm_mem_abort charges every page the guest touches with account_locked_vm(): without
    CAP_IPC_LOCK the guest's memory must fit in RLIMIT_MEMLOCK or KVM_RUN fails with ENOMEM."""
    from ...hostinfo import MemlockInfo

    ml = memlock or MemlockInfo.read()
    total = vm.memory.total
    if not ml.cap_ipc_lock and ml.rlimit_soft is not None and ml.rlimit_soft < total:
        raise ConfigError(
            f"RLIMIT_MEMLOCK is {ml.rlimit_soft} bytes but the protected VM has {total} bytes of memory: pKVM pins "
            "every page the guest touches and charges it to RLIMIT_MEMLOCK (pkvm_mem_abort -> account_locked_vm), "
            "so KVM_RUN would fail with ENOMEM; raise it (ulimit -l) or give the VMM CAP_IPC_LOCK"
        )


# --- capabilities -------------------------------------------------------------------------
NISV_REFUSED = ("kvm_pkvm_ext_allowed() hides KVM_CAP_ARM_NISV_TO_USER from protected VMs, and io_mem_abort "
                "injects an external abort into a protected guest instead of exiting (kvm_inject_sea_dabt)")


# --- predictions (pyvmm check) --------------------------------------------------------------
def predict_first_run(vm: "Vm", slots: list["SlotInfo"], memlock: MemlockInfo | None = None) -> list[RuleAnswer]:
    """A protected VM's first KVM_RUN: the RLIMIT_MEMLOCK charge, then each slot's stage-2 fault, RAM (the
    slot the guest starts in) first."""
    from ...hostinfo import MemlockInfo
    from ...preflight import RuleAnswer

    ml = memlock or MemlockInfo.read()
    try:
        check_memlock(vm, ml)
        limit = [RuleAnswer(None, "RLIMIT_MEMLOCK covers the guest's memory (or the VMM has CAP_IPC_LOCK)")]
    except ConfigError as err:
        limit = [RuleAnswer(errno_mod.ENOMEM, str(err))]
    ram_first = sorted(slots, key=lambda s: (s.gpa != vm.arch.ram_base, s.gpa))
    pages = [predict_stage2(s) for s in ram_first]
    # account_locked_vm charges one page at a time, before the pin: below one page, the very first fault is
    # ENOMEM; above it, the first page is charged and the slot's own rule answers first
    if limit[0].errno and (ml.rlimit_soft or 0) < hostmem.PAGE_SIZE:
        return limit + pages
    return pages + limit


def predict_stage2(s: "SlotInfo") -> RuleAnswer:
    """pkvm_mem_abort's answer for a page of slot S, from the host's facts about its mapping (VmFlags from
    /proc/self/smaps, the backing's nature): the order is the kernel's (pin_user_pages, then the swap-backed
    check).  Unknown facts predict success and say so."""
    from ...preflight import RuleAnswer, bad_page_map_answer

    bad_map = bad_page_map_answer(s)
    if bad_map:
        return bad_map
    if _pfn_mapped(s):
        flags = " ".join(sorted(s.vmflags & {"pf", "io"})) or "per the backing"
        return RuleAnswer(errno_mod.EFAULT, f"slot {s.slot} ({s.backing}) is VM_PFNMAP/VM_IO (VmFlags {flags}): "
                                            "pin_user_pages fails in check_vma_flags, pkvm_mem_abort returns EFAULT",
                          s.slot)
    if _not_swap_backed(s):
        return RuleAnswer(errno_mod.EIO, f"slot {s.slot} ({s.backing}): {_why_not_swap_backed(s)}; pkvm_mem_abort "
                                         "refuses a folio that is not folio_test_swapbacked() with EIO", s.slot)
    if s.nature.get("swap_backed") is None:
        return RuleAnswer(None, f"slot {s.slot} ({s.backing}): whether its pages are swap-backed is unknown (the "
                                "filesystem could not be read); predicted to pin", s.slot)
    return RuleAnswer(None, f"slot {s.slot} ({s.backing}): pinnable, swap-backed pages", s.slot)


# --- faults -------------------------------------------------------------------------------
def _pfn_mapped(s: "SlotInfo") -> bool:
    """VM_PFNMAP/VM_IO: the VMA's flags where /proc/self/smaps showed them, else the backing's own word."""
    if s.vmas:
        return bool(s.vmflags & {"pf", "io"})
    return bool(s.nature.get("pfn_mapped"))


def _not_swap_backed(s: "SlotInfo") -> bool:
    sb = s.nature.get("swap_backed")
    return sb is False


def infer_faulting_slot(report: "FaultReport") -> tuple[int | None, str | None]:
    """arm64 has no KVM_EXIT_MEMORY_FAULT from pkvm_mem_abort: when exactly one slot fits the rule that
    gives this errno, name it (and say it was inferred)."""
    from ...preflight import pfns_without_pfnmap

    err = report.errno
    if err == errno_mod.EFAULT and not report.forced_pages:
        fits = [s for s in report.slots if _pfn_mapped(s) or pfns_without_pfnmap(s)]
        why = ("inferred: the only slot of raw PFNs (VM_PFNMAP/VM_IO, or a backing that inserts PFNs), and "
               "pin_user_pages() fails with EFAULT only there")
    elif err == errno_mod.EIO:
        fits = [s for s in report.slots if _not_swap_backed(s)]
        why = "inferred: the only slot whose pages are not swap-backed (pkvm_mem_abort's EIO)"
    else:
        return None, None
    if len(fits) == 1:
        return fits[0].slot, why
    return None, None


def _why_not_swap_backed(s: "SlotInfo") -> str:
    n = s.nature
    if n.get("hugetlb"):
        return "hugetlbfs folios are never swap-backed"
    if n.get("guest_memfd"):
        return "guest_memfd folios are not swap-backed"
    if n.get("file_path"):
        return f"{n['file_path']} is a regular file on {n.get('filesystem') or 'a non-shmem filesystem'}: page-cache folios"
    return "its folios are not swap-backed"


def fault_causes(report: "FaultReport", candidates: list["SlotInfo"]) -> list[str]:
    """The likely causes of a protected VM's failure, by pkvm_mem_abort's rules.  Pure."""
    causes: list[str] = []
    err = report.errno
    if err == errno_mod.EFAULT and report.forced_pages:
        pages = ", ".join(f"{p:#x}" for p in report.forced_pages[:8])
        causes.append(f"the VMM read or wrote guest-owned page(s) {pages} with force=True: pKVM reclaimed them from "
                      "the protected guest (zeroed), and the guest's next access to them fails with EFAULT")
    if err == errno_mod.EFAULT:
        for s in (c for c in candidates if _pfn_mapped(c)):
            flags = " ".join(sorted(s.vmflags & {"pf", "io"})) or "from the backing"
            causes.append(
                f"slot {s.slot} ({s.backing}) is mapped VM_PFNMAP/VM_IO (VmFlags {flags}): a protected VM's pages "
                "are pinned with pin_user_pages(FOLL_LONGTERM) when the guest first touches them (pkvm_mem_abort), "
                "and GUP's check_vma_flags() refuses VM_IO/VM_PFNMAP mappings such as a DMA-buf mmap (udmabuf, "
                "dma-heap), so pkvm_mem_abort returns EFAULT; to share guest RAM as a DMA-buf, back it with a memfd "
                "and make the DMA-buf from it (backing udmabuf:memfd: the slot maps the memfd, GUP can pin it)"
            )
    elif err == errno_mod.EIO:
        named = [s for s in candidates if _not_swap_backed(s)]
        if named:
            for s in named:
                causes.append(
                    f"slot {s.slot} ({s.backing}): {_why_not_swap_backed(s)}; pkvm_mem_abort pins each page and "
                    "refuses a folio that is not folio_test_swapbacked() with EIO (only anonymous memory and "
                    "shmem/memfd are swap-backed)")
        else:
            causes.append("a protected VM's pages must be swap-backed (anonymous memory or shmem: memfd, tmpfs); "
                          "pkvm_mem_abort refuses other folios (page cache, guest_memfd, hugetlb) with EIO")
    elif err == errno_mod.ENOMEM:
        ml = report.memlock
        exempt = ml.get("rlimit_soft") is None or ml.get("cap_ipc_lock")
        if exempt:  # account_locked_vm cannot have failed: unlimited, or CAP_IPC_LOCK
            causes.append("the host ran out of memory while pkvm_mem_abort prepared the stage-2 mapping "
                          "(topup_mmu_memcache) or pinned the page; RLIMIT_MEMLOCK is not the cause here ("
                          + ("unlimited" if ml.get("rlimit_soft") is None else "the VMM has CAP_IPC_LOCK") + ")")
        else:
            causes.append(
                "pkvm_mem_abort charges each page the guest touches with account_locked_vm(), which fails with "
                f"ENOMEM past RLIMIT_MEMLOCK ({ml.get('rlimit_soft')} bytes) since the VMM lacks CAP_IPC_LOCK: raise "
                "it (ulimit -l) to at least the guest's memory size; ENOMEM also comes from topup_mmu_memcache "
                "when the host is out of memory")
    elif err == errno_mod.EPERM and report.call and "MEMORY_REGION" in report.call:
        causes.append("kvm_arch_prepare_memory_region refuses a protected VM's READONLY or LOG_DIRTY_PAGES memslots, "
                      "and deleting or moving a memslot after its first KVM_RUN (once pkvm_hyp_vm_is_created())")
    elif err == errno_mod.EINVAL and report.call and "ENABLE_CAP" in report.call:
        causes.append(NISV_REFUSED)
    return causes


class ProtectedVmSupport(Record):
    __slots__ = ("available", "abi", "reason")

    def __init__(self, available: bool, abi: str | None, reason: str):
        self.available = available
        self.abi = abi  # "upstream" (KVM_VM_TYPE_ARM_PROTECTED) or "android" (KVM_CAP_ARM_PROTECTED_VM)
        self.reason = reason


def protected_vm_support(kvm: "Kvm", arch: str) -> ProtectedVmSupport:
    """Whether this host makes protected VMs, and by which ABI (asks KVM_CREATE_VM itself)."""
    if arch != "arm64":
        return ProtectedVmSupport(False, None, f"protected VMs are an arm64 pKVM feature; this host is {arch}")
    try:
        vm = kvm.create_vm(uapi.KVM_VM_TYPE_ARM_PROTECTED)
    except KvmError as err:
        mode = kvm_arm_mode()
        why = ("pKVM is not enabled: boot the host with kvm-arm.mode=protected" if mode != "protected" else
               f"KVM_CREATE_VM(KVM_VM_TYPE_ARM_PROTECTED) failed: {err.errno_name}")
        return ProtectedVmSupport(False, None, why)
    with vm:
        if vm.check_extension(uapi.KVM_CAP_ARM_PROTECTED_VM):
            return ProtectedVmSupport(True, "android", "KVM_CAP_ARM_PROTECTED_VM present (Android pKVM ABI, pvmfw)")
    return ProtectedVmSupport(True, "upstream", "KVM_CREATE_VM accepts KVM_VM_TYPE_ARM_PROTECTED (upstream ABI)")


__all__ = ["ProtectedVmSupport", "protected_vm_support", "vm_type_bits", "restrict_memory_rules", "access_guard", "device_access_cause", "check_memlock", "infer_faulting_slot",
           "fault_causes", "NISV_REFUSED"]
