"""Fault reports from real failures on this host, and the kernel rules behind "likely cause"."""

from __future__ import annotations

import errno
import json
import mmap
import os

import pytest

from pyvmm import hostmem
from pyvmm.report import FaultReport, SlotInfo, likely_causes
from pyvmm.outcome import ExitKind
from pyvmm.vm import Vm


def _two_slot_vm(x86_firmware, backing):
    vm = Vm()
    vm.add_memory(2 << 20, "anon")
    region = vm.add_memory(2 << 20, backing)
    vm.create_vcpus(1)
    return vm, region


@pytest.mark.timeout(60)
def test_truncated_file_slot_is_reported(x86_firmware, tmp_path):
    """The file behind slot 1 is truncated under the guest: the report names slot 1, the file and the cause."""
    path = tmp_path / "ram.img"
    vm, region = _two_slot_vm(x86_firmware, f"file:{path}")
    with vm:
        os.truncate(path, 0)
        vm.boot(os.path.join(x86_firmware, "memtouch"))
        outcome = vm.run(timeout=30)
    assert outcome.kind is ExitKind.FAULT
    report = outcome.report
    assert report.faulting_slot == 1 and report.fault_gpa == 2 << 20
    assert report.faulting_slot_inferred is None  # named by the exit, not inferred
    assert report.slots[1].nature["file_path"] == str(path)
    slot = next(s for s in report.slots if s.slot == 1)
    assert slot.backing == f"file:{path}"
    assert slot.vmas and slot.vmas[0]["path"] == str(path) and "sh" in slot.vmas[0]["vmflags"]
    assert any(f"{path} is 0x0 bytes long" in c for c in report.likely_cause)
    assert not any("slot 0" in c for c in report.likely_cause)  # the other slot is not blamed
    assert "<-- faulting slot" in report.text() and "(inferred)" not in report.text()


@pytest.mark.timeout(60)
def test_read_only_host_mapping_is_reported(x86_firmware):
    vm, region = _two_slot_vm(x86_firmware, "memfd")
    with vm:
        hostmem.mprotect(region.hva, region.size, mmap.PROT_READ)
        vm.boot(os.path.join(x86_firmware, "memtouch"))
        outcome = vm.run(timeout=30)
    assert outcome.kind is ExitKind.FAULT
    assert outcome.report.faulting_slot == 1
    assert any("not writable" in c for c in outcome.report.likely_cause)
    assert all(c.startswith("slot 1:") or "slot 1 " in c for c in outcome.report.likely_cause)


@pytest.mark.timeout(60)
def test_report_json_from_cli(x86_firmware, tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "report.json"
    res = run_cli("run", os.path.join(x86_firmware, "shutdown-triple"), "--memory", "4M", "--report-json", str(out))
    assert res.returncode == 1
    assert "pyvmm fault report" in res.stderr and "Traceback" not in res.stderr
    data = json.loads(out.read_text())
    assert data["outcome"]["kind"] == "shutdown"
    report = data["report"]
    assert report["exit_reason"] == "KVM_EXIT_SHUTDOWN"
    assert report["memory_fault"] is None  # only filled for KVM_EXIT_MEMORY_FAULT
    assert report["registers"]["rip"] >= 0x100000
    assert report["vcpus"][0]["faulting"] and report["vcpus"][0]["registers"] == report["registers"]
    assert report["host"]["kernel_release"] == os.uname().release
    assert report["exit_counts"]["KVM_EXIT_SHUTDOWN"] == 1
    assert report["slots"][0]["backing"] == "anon"
    assert "memlock" in report and "rlimit_soft" in report["memlock"]


def _report(err, kind="protected", vmflags=(), backing="udmabuf", exit_reason=None):
    slot = SlotInfo(slot=3, gpa=0x80000000, size=0x200000, flags=[], backing=backing, hva=0x7F0000000000,
                    vmas=[{"start": 0x7F0000000000, "end": 0x7F0000200000, "perms": "rw-s", "path": "/dmabuf:",
                           "vmflags": list(vmflags), "notable": {}}], backing_details={})
    r = FaultReport(what="test", vm_kind=kind, vm_type=1 << 31, arch="arm64", vcpu=0, errno=err,
                    exit_reason=exit_reason, slots=[slot], faulting_slot=3,
                    memlock={"rlimit_soft": 0, "cap_ipc_lock": False})
    return r


def test_rule_pfnmap_on_protected_vm():
    causes = likely_causes(_report(errno.EFAULT, vmflags=["rd", "wr", "sh", "io", "pf"]))
    assert any("VM_PFNMAP/VM_IO" in c and "pin_user_pages" in c and "slot 3 (udmabuf)" in c for c in causes)


def test_rule_pfnmap_on_normal_vm_is_not_blamed():
    causes = likely_causes(_report(errno.EFAULT, kind="normal", vmflags=["rd", "wr", "sh", "io", "pf"]))
    assert not any("pin_user_pages" in c for c in causes)
    assert causes == ["KVM could not fault in the host page behind the guest address (hva_to_pfn failed): the host "
                      "mapping is missing, lacks permission, or cannot be pinned"]


def test_rule_eio_enomem_eperm_on_protected_vm():
    assert any("swap-backed" in c for c in likely_causes(_report(errno.EIO, backing="guest-memfd")))
    eio = _report(errno.EIO, backing="guest-memfd")
    eio.slots[0].nature = {"swap_backed": False, "guest_memfd": True}
    assert likely_causes(eio)[0].startswith("slot 3 (guest-memfd): guest_memfd folios are not swap-backed")
    assert any("RLIMIT_MEMLOCK" in c and "CAP_IPC_LOCK" in c for c in likely_causes(_report(errno.ENOMEM)))
    eperm = _report(errno.EPERM)
    assert not any("after its first KVM_RUN" in c for c in likely_causes(eperm))  # KVM_RUN's EPERM is not the memslot rule
    eperm.call = "KVM_SET_USER_MEMORY_REGION"
    assert any("after its first KVM_RUN" in c for c in likely_causes(eperm))


# The kernel's lines in the crosvm report (../shared/reference/: Android 6.6, a pKVM guest on a CMA heap buffer).
REPORTED_BAD_PAGE_MAP = [
    "kvm [5276]: gfn(ipa)=0x80000 hva=0x7d4a400000 write_fault=0",
    "BUG: Bad page map in process crosvm_vcpu0 pte:168000140000f43 pmd:8000000c1ca0003",
    "addr:0000007d4a400000 vm_flags:040400fb anon_vma:0000000000000000 mapping:ffffff8085163df0 index:0",
    "file:dmabuf fault:cma_heap_vm_fault [cma_heap] mmap:dma_buf_mmap_internal read_folio:0x0",
]


def test_rule_bad_page_map_names_the_fault_handler():
    """The report's own symptom: the cause names the heap's fault handler and the VMA flags it lacked."""
    report = _report(errno.EFAULT, backing="dma-heap:default_cma_region")
    report.kernel_log = REPORTED_BAD_PAGE_MAP
    cause = likely_causes(report)[0]
    assert cause.startswith("the kernel logged 'BUG: Bad page map': cma_heap_vm_fault inserted raw PFNs")
    assert "(vm_flags 040400fb: no VM_PFNMAP 0x400, no VM_IO 0x4000)" in cause
    assert "udmabuf:memfd" in cause
    report.kernel_log = REPORTED_BAD_PAGE_MAP[:1]  # without the kernel's complaint, no such cause
    assert not any("Bad page map" in c for c in likely_causes(report))


def test_prediction_for_pfns_in_a_vma_that_is_not_pfnmap():
    """pyvmm check: a backing that inserts PFNs into a VMA without VM_PFNMAP/VM_IO fails with EFAULT after a
    'Bad page map' on any VM; with the flags, a protected VM's pin is refused cleanly (EFAULT)."""
    from pyvmm.arch.arm64 import pkvm
    from pyvmm.preflight import bad_page_map_answer

    bare = _report(errno.EFAULT, backing="dma-heap:default_cma_region", vmflags=["rd", "wr", "sh", "dd"]).slots[0]
    bare.nature = {"pfn_mapped": True, "swap_backed": False}
    answer = bad_page_map_answer(bare)
    assert answer.errno == errno.EFAULT and "'BUG: Bad page map'" in answer.reason
    assert pkvm.predict_stage2(bare) == answer
    flagged = _report(errno.EFAULT, backing="dma-heap:system", vmflags=["rd", "wr", "sh", "io", "pf"]).slots[0]
    flagged.nature = {"pfn_mapped": True, "swap_backed": False}
    assert bad_page_map_answer(flagged) is None
    assert "check_vma_flags" in pkvm.predict_stage2(flagged).reason
