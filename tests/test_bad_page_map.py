"""The crosvm report's own symptom, "BUG: Bad page map", on the lab's dma-heaps kernel booted with
``cma_heap.android66_vma=1`` (its CMA heap then maps raw PFNs into a VMA that is not VM_PFNMAP/VM_IO, as the
report's Android 6.6 kernel did):

    scripts/lab test --kernel dma-heaps --append cma_heap.android66_vma=1 tests/test_bad_page_map.py

Elsewhere these tests skip, naming the kernel and the switch they need."""

from __future__ import annotations

import errno

import pytest

from pyvmm import hostinfo
from pyvmm.outcome import ExitKind
from pyvmm.preflight import RegionSpec, Verdict, check
from tests.arm64 import memtouch, require_arm64_kvm, require_pkvm
from pyvmm.kvm.errors import MissingFeature
from pyvmm.scenarios.host import cma_heap

SWITCH = "/sys/module/cma_heap/parameters/android66_vma"


def require_android66_heap() -> str:
    require_arm64_kvm()
    try:
        with open(SWITCH) as f:
            on = f.read().strip() == "Y"
    except OSError:
        on = False
    if not on:
        pytest.skip(f"needs the lab's dma-heaps kernel booted with cma_heap.android66_vma=1 ({SWITCH}): scripts/lab "
                    "test --kernel dma-heaps --append cma_heap.android66_vma=1 tests/test_bad_page_map.py")
    try:
        return cma_heap()
    except MissingFeature as err:
        pytest.skip(str(err))


@pytest.mark.timeout(300)
def test_protected_vm_on_the_reports_cma_heap_logs_a_bad_page_map():
    """pin_user_pages in pkvm_mem_abort walks into the heap's special PTEs: the kernel logs "BUG: Bad page map"
    naming the heap's fault handler, KVM_RUN fails with EFAULT, and pyvmm's report quotes the kernel and explains."""
    heap = require_android66_heap()
    require_pkvm()
    vm, outcome = memtouch(True, f"dma-heap:{heap}")
    with vm:
        assert outcome.kind is ExitKind.FAULT, (outcome, vm.console.text())
        r = outcome.report
        assert (r.call, r.errno) == ("KVM_RUN", errno.EFAULT)
        slot = r.slots[0]
        assert not {"io", "pf"} & slot.vmflags, slot.vmflags  # the heap's VMA as in the report: not VM_PFNMAP/VM_IO
        assert r.faulting_slot == 0 and r.faulting_slot_inferred, r.faulting_slot_inferred
        log = "\n".join(r.kernel_log)  # collected before pyvmm's own smaps read: these lines are the vCPU's
        assert "BUG: Bad page map in process pyvmm-vcpu0" in log and "fault:cma_heap_vm_fault" in log, log[-3000:]
        # pkvm_mem_abort is inlined into kvm_handle_guest_abort in this build: the trace shows its pin_user_pages
        assert "pin_user_pages" in log and "kvm_handle_guest_abort" in log, log[-3000:]
        assert "smaps_pte_range" not in log, log[-3000:]
        assert r.likely_cause[0].startswith("the kernel logged 'BUG: Bad page map': cma_heap_vm_fault inserted raw "
                                            "PFNs"), r.likely_cause
        text = r.text()
        assert "BUG: Bad page map" in text and "cma_heap_vm_fault" in text
        print(text)
    predicted = check(True, [RegionSpec(None, 8 << 20, f"dma-heap:{heap}")])  # and pyvmm check saw it coming
    assert (predicted.verdict, predicted.errno) == (Verdict.FAILS, "EFAULT"), predicted
    assert "'BUG: Bad page map'" in predicted.cause(), predicted.cause()


@pytest.mark.timeout(300)
def test_the_same_heap_on_a_normal_vm():
    """A normal VM's stage-2 fault goes through GUP as well (hva_to_pfn): the special PTE in a VMA that is not
    VM_PFNMAP is refused there too, and KVM falls back only for VM_IO/VM_PFNMAP VMAs -- so it fails the same way."""
    heap = require_android66_heap()
    vm, outcome = memtouch(False, f"dma-heap:{heap}")
    with vm:
        region = vm.memory.regions[0]
        (vma,) = hostinfo.vmas_covering(hostinfo.read_smaps(), region.hva, region.size)
        assert not {"io", "pf"} & set(vma.vmflags), vma
        assert outcome.kind is ExitKind.FAULT and outcome.report.errno == errno.EFAULT, (outcome, vm.console.text())
        log = "\n".join(outcome.report.kernel_log)
        assert "BUG: Bad page map in process pyvmm-vcpu0" in log and "hva_to_pfn" in log, log[-3000:]
        cause = outcome.report.likely_cause[0]
        assert cause.startswith("the kernel logged 'BUG: Bad page map': cma_heap_vm_fault") and "hva_to_pfn" in cause
    predicted = check(False, [RegionSpec(None, 8 << 20, f"dma-heap:{heap}")])
    assert (predicted.verdict, predicted.errno) == (Verdict.FAILS, "EFAULT"), predicted
