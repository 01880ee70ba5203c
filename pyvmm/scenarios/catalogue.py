"""The scenarios: one self-contained reproducer of a guest-fault class each.

The expectations of the protected-VM scenarios are those the arm64 pKVM lab measures (tests/test_arm64_pkvm.py)
where a lab test covers the case; the others follow the same kernel rules (``pyvmm/arch/arm64/pkvm.py``).
"""

from __future__ import annotations

from ..outcome import ExitKind
from .model import (
    HELLO,
    MEMTOUCH,
    PKVM_SHARE,
    ROM,
    Alternative,
    Answer,
    Confinement,
    Expected,
    KiB,
    MiB,
    Scenario,
    Slot,
    SlotFlag,
    Step,
    Target,
)
from .steps import DeleteSlot, ExhaustHugetlbPool, MapReadOnly, ReadGuestPage, TruncateFile

ABOVE_RAM = 0x8000_0000  # RAM base + 2 GiB: on arm64, GPA 0x1_0000_0000 (where the lab tests put an extra slot)
PROTECTED_RAM = 8 * MiB  # the lab tests' protected guests have 8 MiB (memtouch takes a while in the lab)

EFAULT_FROM_KVM_RUN = Answer(ExitKind.FAULT, call="KVM_RUN", errno="EFAULT")
SLOT_1_AS_MMIO = Alternative(
    Answer(ExitKind.FAULT, exit_reason="KVM_EXIT_MMIO", slot=1),
    hosts="hosts that emulate every guest access (kvm_pvm)",
    why="where they cannot reach the slot's host page they fall back to MMIO: a KVM_EXIT_MMIO inside slot 1, "
        "which pyvmm reports as the same fault")


def fault_in_slot_0(errno: str) -> Answer:
    """KVM_RUN fails with ``errno``, in slot 0 (as pyvmm's report infers it: arm64 names no address)."""
    return Answer(ExitKind.FAULT, call="KVM_RUN", errno=errno, slot=0)


def protected_memtouch(name: str, title: str, backing: str, answer: Answer, explanation: str) -> Scenario:
    """A protected VM whose RAM is one slot of ``backing``, running memtouch, which touches all of it."""
    return Scenario(name=name, title=title, arch=Target.ARM64, protected=True,
                    slots=(Slot(0, PROTECTED_RAM, backing),), guest=MEMTOUCH, expected=Expected(answer),
                    explanation=explanation)


PKVM_UDMABUF = protected_memtouch(
    name="pkvm-udmabuf",
    title="protected VM on a udmabuf slot mapping the DMA-buf (VM_PFNMAP): EFAULT",
    backing="udmabuf",
    answer=fault_in_slot_0("EFAULT"),
    explanation=(
        "A protected VM's memory is handed to the guest page by page: on the guest's first access to a page, "
        "kvm_handle_guest_abort calls pkvm_mem_abort, which charges the page to RLIMIT_MEMLOCK and pins it with "
        "pin_user_pages(FOLL_LONGTERM) before donating it to the guest. udmabuf's own mmap (the DMA-buf's CPU "
        "mapping) inserts raw PFNs (vmf_insert_pfn): the VMA is VM_PFNMAP and its PTEs are special, so GUP's "
        "check_vma_flags refuses it, pin_user_pages returns no page and pkvm_mem_abort returns -EFAULT: the first "
        "KVM_RUN fails with EFAULT. arm64 names no address for this fault (no KVM_EXIT_MEMORY_FAULT), so pyvmm "
        "infers the slot: the only PFN-mapped one. The same slot runs on a normal VM (normal-udmabuf). This is the "
        "class of the crosvm dma-heap report; the DMA-buf maintainers keep these PTEs special on purpose, and "
        "pkvm-udmabuf-memfd is the fix they proposed."),
)

PKVM_UDMABUF_MEMFD = protected_memtouch(
    name="pkvm-udmabuf-memfd",
    title="protected VM on a udmabuf whose slot maps the memfd behind the DMA-buf: runs (the thread's fix)",
    backing="udmabuf:memfd",
    answer=Answer(ExitKind.GUEST_EXIT, status=0),
    explanation=(
        "The fix proposed in the crosvm report's thread: do not map the DMA-buf, back the guest with a memfd and "
        "make the DMA-buf from it (UDMABUF_CREATE on the sealed memfd). The memslot maps the memfd itself, so its "
        "pages are ordinary shmem folios: pin_user_pages can pin them and they are swap-backed, so pkvm_mem_abort "
        "accepts them and the protected guest runs (memtouch writes and reads back its RAM: errors=0, exit "
        "status 0). The DMA-buf fd stays open beside the slot for devices and users, over the same pages."),
)

PKVM_GUEST_MEMFD = protected_memtouch(
    name="pkvm-guest-memfd",
    title="protected VM on a guest_memfd slot: EIO",
    backing="guest-memfd",
    answer=fault_in_slot_0("EIO"),
    explanation=(
        "The slot is a guest_memfd (KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD), its userspace address "
        "the guest_memfd's own mapping (GUEST_MEMFD_FLAG_MMAP). pkvm_mem_abort pins the page behind the slot's "
        "userspace address and refuses any folio that is not folio_test_swapbacked() with -EIO: only anonymous "
        "memory and shmem are swap-backed, guest_memfd folios are not. So the first KVM_RUN fails with EIO; pyvmm "
        "infers the slot (the only one whose pages are not swap-backed)."),
)

PKVM_FILE = protected_memtouch(
    name="pkvm-file",
    title="protected VM on a file on a disk filesystem (page cache): EIO",
    backing="file:{disk}/guest-ram.img",
    answer=fault_in_slot_0("EIO"),
    explanation=(
        "The slot maps a regular file (MAP_SHARED) on a disk filesystem. pin_user_pages pins page-cache pages, but "
        "a page-cache folio is not folio_test_swapbacked(), so pkvm_mem_abort refuses it with -EIO and KVM_RUN "
        "fails with EIO. The same file on tmpfs runs, because tmpfs files are shmem (swap-backed): that is why the "
        "file is made in a directory on a disk filesystem (ext4, xfs, ...; $PYVMM_SCENARIO_DIR names one)."),
)

PKVM_HUGETLB = protected_memtouch(
    name="pkvm-hugetlb",
    title="protected VM on a hugetlb memfd: EIO",
    backing="memfd-hugetlb",
    answer=fault_in_slot_0("EIO"),
    explanation=(
        "A memfd of 2 MiB huge pages (MFD_HUGETLB). pin_user_pages pins hugetlb pages, but hugetlbfs folios are "
        "never swap-backed, so pkvm_mem_abort refuses them with -EIO and KVM_RUN fails with EIO. The same slot runs "
        "on a normal VM. Needs 4 free 2 MiB huge pages (echo 8 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)."),
)

PKVM_HOST_READ = Scenario(
    name="pkvm-host-read",
    title="host reads a page the protected guest owns: pKVM reclaims it, the guest then gets EFAULT",
    arch=Target.ARM64, protected=True,
    slots=(Slot(0, PROTECTED_RAM, "anon"),),
    guest=PKVM_SHARE,
    steps=(ReadGuestPage(),),
    expected=Expected(EFAULT_FROM_KVM_RUN, pyvmm_refuses=True),
    explanation=(
        "After a protected VM's first run its pages belong to the guest unless it shares them (the MEM_SHARE "
        "hypercall). pkvm-share shares page A, keeps page B private and hands both addresses to the host. pyvmm's "
        "accessor refuses to read B (its access guard: no host access to a page the guest has not shared). Forced, "
        "the read goes through process_vm_readv: the host's access to a page donated to the guest makes pKVM "
        "reclaim it (the host gets it back zeroed), and when the guest resumes and reads B, pkvm_mem_abort cannot "
        "map it again: KVM_RUN fails with EFAULT. The fault report names the forced page as the cause."),
)

PKVM_MEMLOCK = Scenario(
    name="pkvm-memlock",
    title="protected VM with RLIMIT_MEMLOCK 0 and without CAP_IPC_LOCK: ENOMEM",
    arch=Target.ARM64, protected=True,
    slots=(Slot(0, PROTECTED_RAM, "anon"),),
    guest=HELLO,
    confinement=Confinement(memlock=0),
    expected=Expected(Answer(ExitKind.FAULT, call="KVM_RUN", errno="ENOMEM"), pyvmm_refuses=True),
    explanation=(
        "pkvm_mem_abort charges every page the guest touches to the VMM's RLIMIT_MEMLOCK (account_locked_vm), "
        "unless the VMM has CAP_IPC_LOCK. With the limit at 0 and no CAP_IPC_LOCK, pyvmm's pre-check refuses to "
        "run (the guest's memory does not fit in RLIMIT_MEMLOCK); run without the pre-check, the guest's first "
        "page fault fails in __account_locked_vm with -ENOMEM and KVM_RUN fails with ENOMEM. Normal VMs do not "
        "charge their memory to RLIMIT_MEMLOCK. Root has CAP_IPC_LOCK, so the scenario runs in a child process "
        "that opens /dev/kvm and then becomes nobody, which drops every capability."),
)

PKVM_SLOT_DELETE = Scenario(
    name="pkvm-slot-delete",
    title="memslot delete after a protected VM's first run: EPERM",
    arch=Target.ARM64, protected=True,
    slots=(Slot(0, PROTECTED_RAM, "anon"), Slot(ABOVE_RAM, 64 * KiB, "memfd")),
    guest=HELLO,
    steps=(DeleteSlot(1),),
    expected=Expected(Answer(call="KVM_SET_USER_MEMORY_REGION", errno="EPERM"), pyvmm_refuses=True),
    explanation=(
        "On a protected VM's first KVM_RUN the hypervisor makes its own copy of the VM (pkvm_create_hyp_vm, from "
        "kvm_arch_vcpu_run_pid_change); from then on kvm_arch_prepare_memory_region refuses to delete or move a "
        "memslot with -EPERM (once pkvm_hyp_vm_is_created()). pyvmm's memory map refuses the delete before the "
        "ioctl; asked directly, "
        "KVM_SET_USER_MEMORY_REGION with memory_size 0 fails with EPERM."),
)

PKVM_READONLY_SLOT = Scenario(
    name="pkvm-readonly-slot",
    title="READONLY memslot on a protected VM: EPERM",
    arch=Target.ARM64, protected=True,
    slots=(Slot(0, PROTECTED_RAM, "anon"), Slot(ABOVE_RAM, 64 * KiB, "anon", SlotFlag.READONLY)),
    guest=None,
    expected=Expected(Answer(call="KVM_SET_USER_MEMORY_REGION", errno="EPERM"), pyvmm_refuses=True),
    explanation=(
        "kvm_arch_prepare_memory_region refuses READONLY and LOG_DIRTY_PAGES memslots on a protected VM with "
        "-EPERM, whether or not the VM has run. pyvmm's memory rules for protected VMs refuse the slot before the "
        "ioctl; asked directly, KVM_SET_USER_MEMORY_REGION with KVM_MEM_READONLY fails with EPERM, before any "
        "vCPU exists. (A normal VM takes the same slot: readonly-slot-write.)"),
)

PKVM_DMA_HEAP_SYSTEM = protected_memtouch(
    name="pkvm-dma-heap-system",
    title="protected VM on a dma-heap:system buffer (the crosvm report's setup, system heap): EFAULT",
    backing="dma-heap:system",
    answer=fault_in_slot_0("EFAULT"),
    explanation=(
        "Guest RAM is a buffer from /dev/dma_heap/system (DMA_HEAP_IOCTL_ALLOC), mapped through its DMA-buf. The "
        "system heap maps with remap_pfn_range, so the VMA is VM_PFNMAP|VM_IO: pin_user_pages in pkvm_mem_abort "
        "refuses it (check_vma_flags) and KVM_RUN fails with EFAULT, as for udmabuf's DMA-buf mapping; pyvmm "
        "infers the slot (the only PFN-mapped one)."),
)

PKVM_DMA_HEAP_CMA = protected_memtouch(
    name="pkvm-dma-heap-cma",
    title="protected VM on a CMA dma-heap buffer (the crosvm report's own setup): EFAULT",
    backing="dma-heap:{cma_heap}",
    answer=fault_in_slot_0("EFAULT"),
    explanation=(
        "The report's own setup: guest RAM from the CMA heap (a CMA area, e.g. cma=64M). Linux 7.2's CMA heap marks "
        "its mapping VM_IO|VM_PFNMAP (cma_heap_mmap) and fills it from its fault handler, cma_heap_vm_fault, with "
        "raw PFNs (vmf_insert_pfn): GUP's check_vma_flags refuses the VMA before looking at any PTE, so "
        "pin_user_pages in pkvm_mem_abort gets no page and KVM_RUN fails with EFAULT. In the report (Android's 6.6 "
        "kernel) the heap's VMA was not VM_PFNMAP, so GUP walked into the special PTEs and the kernel logged 'BUG: "
        "Bad page map' (vm_normal_page, from pin_user_pages in pkvm_mem_abort) before failing the same way: the "
        "lab's dma-heaps kernel shows that with cma_heap.android66_vma=1 (tests/test_bad_page_map.py). The DMA-buf "
        "maintainers refused to make these pages pinnable (see pkvm-udmabuf-memfd)."),
)

NISV_READONLY_WRITEBACK = Scenario(
    name="nisv-readonly-writeback",
    title="guest store with writeback into a READONLY slot: no syndrome (ISV=0), KVM_EXIT_ARM_NISV",
    arch=Target.ARM64, protected=False,
    slots=(Slot(0, 8 * MiB, "anon"), Slot(8 * MiB, 64 * KiB, "anon", SlotFlag.READONLY)),
    guest=MEMTOUCH,
    expected=Expected(
        Answer(ExitKind.FAULT, exit_reason="KVM_EXIT_ARM_NISV", slot=1),
        alternatives=(Alternative(Answer(ExitKind.FAULT, call="KVM_RUN", errno="ENOSYS"),
                                  hosts="KVMs without KVM_CAP_ARM_NISV_TO_USER",
                                  why="io_mem_abort returns -ENOSYS"),)),
    explanation=(
        "memtouch's RAM runs on into a READONLY slot (both slots are contiguous from the RAM base). A guest write "
        "to a READONLY slot cannot be mapped, so kvm_handle_guest_abort hands it to io_mem_abort as MMIO, and KVM "
        "emulates MMIO from the syndrome the CPU reports in ESR_EL2 (register, size, sign). memtouch stores with a "
        "post-indexed STR (str x0, [x8], #64): an instruction with writeback, for which the CPU reports no valid "
        "syndrome (ISV = 0). With KVM_CAP_ARM_NISV_TO_USER, which pyvmm enables on normal VMs, io_mem_abort exits "
        "with KVM_EXIT_ARM_NISV (fault_ipa, esr_iss); without it KVM_RUN fails with ENOSYS. pyvmm reports the fault "
        "in slot 1 and names the instruction classes that do this. A protected VM is not offered the capability "
        "(kvm_pkvm_ext_allowed): there KVM injects an external abort into the guest instead (kvm_inject_sea_dabt)."),
)

NORMAL_UDMABUF = Scenario(
    name="normal-udmabuf",
    title="normal VM on a udmabuf slot mapping the DMA-buf: runs",
    arch=Target.ANY, protected=False,
    slots=(Slot(0, 8 * MiB, "udmabuf"),),
    guest=MEMTOUCH,
    expected=Expected(Answer(ExitKind.GUEST_EXIT, status=0)),
    explanation=(
        "The slot of pkvm-udmabuf on a normal VM. KVM's stage-2 fault handler does not pin a normal VM's memory: "
        "hva_to_pfn finds the VMA VM_PFNMAP and reads the PFN from the host page tables (hva_to_pfn_remapped), kept "
        "coherent by MMU notifiers. The guest runs: memtouch writes and reads back its RAM and exits with 0."),
)

READONLY_SLOT_WRITE = Scenario(
    name="readonly-slot-write",
    title="guest write to a READONLY slot on a normal VM: an MMIO exit inside the slot, dropped",
    arch=Target.X86_64, protected=False,
    slots=(Slot(0, 2 * MiB, "anon"), Slot(2 * MiB, 64 * KiB, "memfd", SlotFlag.READONLY)),
    guest=ROM,
    expected=Expected(Answer(ExitKind.HALT, rom_writes=1)),
    explanation=(
        "A READONLY memslot is ROM: KVM maps it read-only, so guest reads come from the slot's memory without an "
        "exit, and a guest write cannot be mapped: the fault handler gets KVM_PFN_ERR_RO_FAULT and emulates the "
        "instruction, and the emulator, which may not write the slot, completes the write as MMIO: a KVM_EXIT_MMIO "
        "at an address inside the slot. A device on the MMIO bus may claim it (flash); nobody does here, so pyvmm "
        "drops the write and counts it (vm.memory.rom_writes_dropped), the guest reads back the ROM's old value and "
        "halts."),
)

def host_breaks_slot_1(name: str, title: str, backing: str, step: Step, explanation: str) -> Scenario:
    """A normal VM with RAM in two slots (anon, then ``backing`` from RAM + 2 MiB) whose host side ``step`` breaks
    after boot; memtouch then touches slot 1 first."""
    return Scenario(name=name, title=title, arch=Target.ANY, protected=False,
                    slots=(Slot(0, 2 * MiB, "anon"), Slot(2 * MiB, 2 * MiB, backing)), guest=MEMTOUCH, steps=(step,),
                    expected=Expected(EFAULT_FROM_KVM_RUN, alternatives=(SLOT_1_AS_MMIO,)), explanation=explanation)


FILE_TRUNCATED = host_breaks_slot_1(
    name="file-truncated",
    title="the file behind a slot truncated under the guest: EFAULT",
    backing="file:{tmp}/guest-ram.img",
    step=TruncateFile(1),
    explanation=(
        "The file behind slot 1 is truncated to 0 bytes after boot. The guest's first access there has no page "
        "behind it: the host page fault beyond the end of the file is SIGBUS, so hva_to_pfn fails "
        "(KVM_PFN_ERR_FAULT) and KVM_RUN fails with EFAULT (x86 adds KVM_EXIT_MEMORY_FAULT with the address; "
        "arm64's user_mem_abort names none). The report names the file, its new size and the offset the guest "
        "touched."),
)

HOST_MAPPING_READONLY = host_breaks_slot_1(
    name="host-mapping-readonly",
    title="the VMM's mapping of a slot made read-only (mprotect), then a guest write: EFAULT",
    backing="memfd",
    step=MapReadOnly(1),
    explanation=(
        "The VMM mprotects the host mapping behind slot 1 to PROT_READ after boot; the memslot still says "
        "writable. The guest's first write there needs a writable host page: hva_to_pfn asks GUP for it with "
        "FOLL_WRITE, which a read-only VMA refuses, so KVM_RUN fails with EFAULT. The report shows the VMA's "
        "permissions (r--s) and says the host mapping is not writable."),
)

HUGETLB_EXHAUSTED = Scenario(
    name="hugetlb-exhausted",
    title="a hugetlb slot larger than the free huge page pool: mmap fails with ENOMEM",
    arch=Target.ANY, protected=False,
    slots=(),
    guest=None,
    steps=(ExhaustHugetlbPool(),),
    expected=Expected(Answer(call="mmap", errno="ENOMEM"), pyvmm_refuses=True),
    explanation=(
        "A hugetlb memfd takes its huge pages when it is mapped, not when they are touched: mmap(MAP_SHARED) "
        "reserves them (hugetlb_reserve_pages -> hugetlb_acct_memory), which fails with -ENOMEM when the pool "
        "(the 2 MiB pool's nr_hugepages) has fewer free pages than the mapping and cannot grow (its "
        "nr_overcommit_hugepages = 0). "
        "So the failure comes before KVM sees a memslot: pyvmm's memfd-hugetlb backing reports the failed mmap with "
        "the pool's free count, and the direct mmap fails with ENOMEM. Without the reservation (MAP_NORESERVE) the failure "
        "would come on the guest's first touch of a missing page instead: SIGBUS in the host, EFAULT from KVM_RUN."),
)

MEMSLOT_OVERLAP = Scenario(
    name="memslot-overlap",
    title="a memslot overlapping another: EEXIST",
    arch=Target.ANY, protected=False,
    slots=(Slot(0, 4 * MiB, "anon"), Slot(2 * MiB, 2 * MiB, "anon")),
    guest=None,
    expected=Expected(Answer(call="KVM_SET_USER_MEMORY_REGION", errno="EEXIST"), pyvmm_refuses=True),
    explanation=(
        "Two memslots may not share guest-physical addresses: kvm_set_memory_region refuses a new slot that "
        "overlaps another (kvm_check_memslot_overlap) with -EEXIST. pyvmm's memory map refuses the overlap before "
        "the ioctl and names the slot it would overlap; asked directly, KVM_SET_USER_MEMORY_REGION fails with "
        "EEXIST."),
)

CATALOGUE: tuple[Scenario, ...] = (
    PKVM_UDMABUF,
    PKVM_UDMABUF_MEMFD,
    PKVM_DMA_HEAP_SYSTEM,
    PKVM_DMA_HEAP_CMA,
    PKVM_GUEST_MEMFD,
    PKVM_FILE,
    PKVM_HUGETLB,
    PKVM_HOST_READ,
    PKVM_MEMLOCK,
    PKVM_SLOT_DELETE,
    PKVM_READONLY_SLOT,
    NISV_READONLY_WRITEBACK,
    NORMAL_UDMABUF,
    READONLY_SLOT_WRITE,
    FILE_TRUNCATED,
    HOST_MAPPING_READONLY,
    HUGETLB_EXHAUSTED,
    MEMSLOT_OVERLAP,
)
