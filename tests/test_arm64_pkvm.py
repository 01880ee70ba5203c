"""pKVM: the backing matrix on both VM types, the share hypercalls, the host's view of guest-owned
pages, and the kernel's rules for protected VMs (run in the lab: scripts/lab test)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from pyvmm import hostinfo, hostmem
from pyvmm.kvm import uapi
from pyvmm.kvm.errors import ConfigError, GuestMemoryError, KvmError, MissingFeature
from pyvmm.outcome import ExitKind
from pyvmm.vm import Vm
from tests.arm64 import ROOT, guest, memtouch, require_arm64_kvm, require_pkvm

RAM_BASE = 0x8000_0000


@pytest.fixture
def pkvm():
    require_arm64_kvm()
    require_pkvm()


@pytest.mark.parametrize("backing", ["anon", "memfd", "guest-memfd", "udmabuf"])
@pytest.mark.timeout(300)
def test_backings_on_normal_vm(backing):
    """Measured on this lab: a normal VM runs with all four backings."""
    require_arm64_kvm()
    if backing == "udmabuf" and not os.path.exists("/dev/udmabuf"):
        pytest.skip("no /dev/udmabuf (CONFIG_UDMABUF)")
    vm, outcome = memtouch(False, backing)
    with vm:
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, vm.console.text()
        assert "errors=0x0000000000000000" in vm.console.text()
        assert vm.memory.read_u64(RAM_BASE + (2 << 20)) == (RAM_BASE + (2 << 20)) ^ 0x5A17C0DE9E3779B9


@pytest.mark.parametrize("backing", ["anon", "memfd"])
@pytest.mark.timeout(300)
def test_swap_backed_memory_runs_protected(pkvm, backing):
    vm, outcome = memtouch(True, backing)
    with vm:
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, vm.console.text()


@pytest.mark.timeout(300)
def test_udmabuf_on_protected_vm_is_refused_and_explained(pkvm):
    """The class of the crosvm dma-heap bug: the DMA-buf mmap is VM_PFNMAP, pkvm_mem_abort cannot pin it."""
    if not os.path.exists("/dev/udmabuf"):
        pytest.skip("no /dev/udmabuf (CONFIG_UDMABUF)")
    vm, outcome = memtouch(True, "udmabuf")
    with vm:
        assert outcome.kind is ExitKind.FAULT
        r = outcome.report
        assert (r.call, r.errno) == ("KVM_RUN", errno.EFAULT)
        assert r.faulting_slot == 0 and r.exit_details["faulting_slot_inferred"]
        # arm64 names no slot for this fault: the report inferred it, and says so in the text and the JSON
        assert r.faulting_slot_inferred.startswith("inferred: the only slot of raw PFNs (VM_PFNMAP/VM_IO")
        assert "<-- faulting slot (inferred)" in r.text() and "(slot 0, inferred:" in r.text()
        assert json.loads(r.to_json())["faulting_slot_inferred"] == r.faulting_slot_inferred
        slot = r.slots[0]
        assert slot.backing == "udmabuf" and "pf" in slot.vmflags  # udmabuf inserts PFNs: VM_PFNMAP
        assert slot.nature["pfn_mapped"] is True
        assert any("VM_PFNMAP/VM_IO" in c and "pkvm_mem_abort" in c and "check_vma_flags" in c
                   for c in r.likely_cause)
        assert r.exit_reason is None and r.memory_fault is None  # stale after a failed KVM_RUN: not shown
        assert r.host["kvm_arm_mode"] == "protected" and r.host["cpu"].get("implementer") is not None
        assert r.host["caps"]["KVM_CAP_ARM_NISV_TO_USER"] == 0  # hidden from protected VMs


def require_udmabuf() -> None:
    if not os.path.exists("/dev/udmabuf"):
        pytest.skip("no /dev/udmabuf (CONFIG_UDMABUF)")


PATTERN_GPA = RAM_BASE + (2 << 20)  # memtouch writes gpa ^ this constant at every 2 MiB step
PATTERN = PATTERN_GPA ^ 0x5A17C0DE9E3779B9


@pytest.mark.timeout(300)
def test_udmabuf_memfd_mapping_shares_pages_with_the_dmabuf():
    """The thread's fix on a normal VM: the slot maps the memfd, and what the guest wrote is in the DMA-buf."""
    require_arm64_kvm()
    require_udmabuf()
    vm, outcome = memtouch(False, "udmabuf:memfd")
    with vm:
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, vm.console.text()
        backing = vm.memory.regions[0].backing
        assert backing.describe() == "udmabuf:memfd" and backing.dmabuf >= 0
        with backing.dmabuf_mmap() as view:
            (vma,) = hostinfo.vmas_covering(hostinfo.read_smaps(), view.addr, view.size)
            assert "pf" in vma.vmflags, vma  # the view is the DMA-buf's own (PFN) mapping, not the memfd's
            assert int.from_bytes(view.read(PATTERN_GPA - RAM_BASE, 8), "little") == PATTERN
            view.write(PATTERN_GPA - RAM_BASE, b"DMA-buf!")  # and back: the host's write through the DMA-buf
            with pytest.raises(ValueError, match="outside the 0x800000-byte DMA-buf"):
                view.read(8 << 20, 1)
        with pytest.raises(ConfigError, match="mapping is closed"):
            view.read(0, 8)
        assert vm.memory.read(PATTERN_GPA, 8) == b"DMA-buf!"


@pytest.mark.timeout(300)
def test_udmabuf_memfd_mapping_runs_protected(pkvm):
    """The same udmabuf, its memfd in the slot: shmem pages pkvm_mem_abort can pin, so the protected VM runs."""
    require_udmabuf()
    vm, outcome = memtouch(True, "udmabuf:memfd")
    with vm:
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, vm.console.text()
        assert "errors=0x0000000000000000" in vm.console.text()
        region = vm.memory.regions[0]
        assert region.backing.describe() == "udmabuf:memfd" and not region.backing.nature()["pfn_mapped"]
        (vma,) = hostinfo.vmas_covering(hostinfo.read_smaps(), region.hva, region.size)
        assert "pf" not in vma.vmflags and "io" not in vma.vmflags and vma.path.startswith("/memfd:pyvmm-udmabuf")


@pytest.mark.timeout(300)
def test_guest_memfd_on_protected_vm_is_refused_and_explained(pkvm):
    vm, outcome = memtouch(True, "guest-memfd")
    with vm:
        assert outcome.kind is ExitKind.FAULT
        r = outcome.report
        assert (r.call, r.errno) == ("KVM_RUN", errno.EIO)
        assert r.faulting_slot == 0
        assert any("slot 0 (guest-memfd)" in c and "swap-backed" in c for c in r.likely_cause)
        assert any("guest_memfd folios are not swap-backed" in c and "folio_test_swapbacked" in c
                   for c in r.likely_cause)
        assert r.faulting_slot_inferred and r.slots[0].nature["swap_backed"] is False


def _reserve_huge_pages(n: int) -> bool:
    return hostmem.reserve_huge_pages(n) >= n  # the 2 MiB pool (32 MiB is the default size on a 16K-page host)


def test_hugetlb_on_protected_vm_is_refused_and_explained(pkvm):
    """Measured in the lab: hugetlb folios are not swap-backed, so pkvm_mem_abort answers EIO."""
    if not _reserve_huge_pages(8):
        pytest.skip("cannot reserve 2 MiB huge pages here")
    vm, outcome = memtouch(True, "memfd-hugetlb")
    with vm:
        assert outcome.kind is ExitKind.FAULT, vm.console.text()
        r = outcome.report
        assert (r.call, r.errno) == ("KVM_RUN", errno.EIO)
        assert r.faulting_slot == 0 and r.faulting_slot_inferred
        assert r.slots[0].nature["hugetlb"] is True and r.slots[0].nature["swap_backed"] is False
        assert "ht" in r.slots[0].vmflags
        assert any("slot 0 (memfd-hugetlb)" in c and "hugetlbfs folios are never swap-backed" in c
                   for c in r.likely_cause)


def test_hugetlb_on_normal_vm_runs(pkvm):
    if not _reserve_huge_pages(8):
        pytest.skip("cannot reserve 2 MiB huge pages here")
    vm, outcome = memtouch(False, "memfd-hugetlb")
    with vm:
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, vm.console.text()


def test_nisv_to_user_enabled_on_normal_vms_only(pkvm):
    """KVM_CAP_ARM_NISV_TO_USER: offered and enabled on a normal VM; a protected VM is not offered it
    (kvm_pkvm_ext_allowed) and KVM_ENABLE_CAP fails with EINVAL."""
    with Vm() as vm:
        assert vm.fd.check_extension(uapi.KVM_CAP_ARM_NISV_TO_USER) == 1
        assert vm.nisv_to_user == "enabled"
    with Vm(protected=True) as vm:
        assert vm.fd.check_extension(uapi.KVM_CAP_ARM_NISV_TO_USER) == 0
        assert vm.nisv_to_user.startswith("not enabled: kvm_pkvm_ext_allowed()")
        with pytest.raises(KvmError) as err:
            vm.fd.enable_cap(uapi.KVM_CAP_ARM_NISV_TO_USER)
        assert err.value.errno == errno.EINVAL


def share_run(protected: bool):
    vm = Vm(protected=protected)
    vm.add_memory(8 << 20)
    vm.create_vcpus(1)
    vm.boot(guest("pkvm-share"))
    first = vm.run(timeout=120)
    scratch = vm.devices["testdev"].scratch
    return vm, first, int.from_bytes(scratch[0:8], "little"), int.from_bytes(scratch[8:16], "little")


@pytest.mark.timeout(300)
def test_pkvm_share_hypercalls_and_host_reads(pkvm):
    vm, first, page_a, page_b = share_run(True)
    with vm:
        assert first.kind is ExitKind.GUEST_EXIT and first.status == 0x51
        # FEATURES: FEATURES | HYP_MEMINFO | MEM_SHARE | MEM_UNSHARE; MEMINFO: the hypervisor's PAGE_SIZE, which is
        # the host's (16 KiB on scripts/lab --pages 16k), and what pyvmm caps reports; MEM_SHARE: success
        granule = hostmem.PAGE_SIZE
        assert hostinfo.pkvm_share_granule(True) == granule
        assert vm.console.text() == (f"pkvm-share: features=0x000000000000001d meminfo={granule:#018x} "
                                     "share=0x0000000000000000\n")
        assert page_b - page_a == granule  # B is the granule after A: sharing A (one granule) left B private
        vm.memory.declare_shared(page_a)
        assert vm.memory.read(page_a, 8) == b"A-DERAHS"  # the page the guest shared
        with pytest.raises(GuestMemoryError, match="belongs to the protected guest"):
            vm.memory.read(page_b, 8)  # refused before anything touches it
        again = vm.run(timeout=120)  # the VMM is alive and the guest still runs
        assert again.kind is ExitKind.GUEST_EXIT and again.status == 0
        assert vm.console.text().endswith("pkvm-share: page B intact, unshare=0x0000000000000000\n")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["normal", "protected"])
def test_pkvm_fault_inside_a_page_whose_successor_is_mapped(pkvm, kind):
    """firmware/arm64/pkvm-fault-order.S maps page A + 16 KiB, then touches A + 4 KiB.  With 4 KiB host pages, and on
    a normal VM whatever the page size, it runs to the end.  A protected VM on a 16 KiB-page host (scripts/lab --pages
    16k) never gets past that store: Linux 7.2's pkvm_mem_abort maps the 4 KiB-granular fault IPA without aligning it,
    pkvm_pgtable_stage2_map meets the next page's mapping in [IPA, IPA + PAGE_SIZE) and answers -EAGAIN, and the
    guest retries forever, with no exit for pyvmm; the timeout says why.  It is why protected Linux guests do not
    boot there (tests/arm64.py: require_protected_linux)."""
    stuck = kind == "protected" and hostmem.PAGE_SIZE > 0x1000
    with Vm(protected=kind == "protected") as vm:
        vm.add_memory(8 << 20)
        vm.create_vcpus(1)
        vm.boot(guest("pkvm-fault-order"))
        outcome = vm.run(timeout=30 if stuck else 120)
        text = vm.console.text()
    if stuck:
        assert outcome.kind is ExitKind.TIMEOUT, (outcome.detail, text)
        assert text == "pkvm-fault-order: next page mapped\n"
        assert "KVM_EXIT_MMIO" in outcome.exits and set(outcome.exits) <= {"KVM_EXIT_MMIO", "KVM_EXIT_INTR"}
        assert f"on this {hostmem.PAGE_SIZE >> 10} KiB-page host a protected guest may be stuck" in outcome.detail
        assert "pkvm_mem_abort maps the fault IPA unaligned" in outcome.detail
    else:
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, (outcome.detail, text)
        assert text == "pkvm-fault-order: next page mapped\npkvm-fault-order: both pages mapped\n"


@pytest.mark.timeout(300)
def test_forced_read_of_a_guest_page_reclaims_it(pkvm):
    """What the guard prevents: a host read of a guest-owned page makes pKVM reclaim and zero it,
    and the guest's next access fails with EFAULT, which the report attributes to the forced read."""
    vm, first, page_a, page_b = share_run(True)
    with vm:
        assert first.status == 0x51
        assert vm.memory.read(page_b, 8, force=True) == bytes(8)  # zeroed, not the guest's value
        again = vm.run(timeout=120)
        assert again.kind is ExitKind.FAULT and again.report.errno == errno.EFAULT
        assert again.report.forced_pages == [page_b]
        assert any("force=True" in c and f"{page_b:#x}" in c for c in again.report.likely_cause)


@pytest.mark.timeout(300)
def test_pkvm_share_on_normal_vm(pkvm):
    vm, first, page_a, page_b = share_run(False)
    with vm:
        assert "share=0xffffffffffffffff" in vm.console.text()  # SMCCC NOT_SUPPORTED
        assert vm.memory.read(page_b, 8) == b"-ETAVIRP"  # a normal VM's memory is the host's


def test_readonly_and_log_dirty_slots_refused(pkvm):
    with Vm(protected=True) as vm:
        vm.add_memory(8 << 20)
        for flag, name in ((uapi.KVM_MEM_READONLY, "READONLY"), (uapi.KVM_MEM_LOG_DIRTY_PAGES, "LOG_DIRTY_PAGES")):
            with pytest.raises(ConfigError, match=f"{name} memslots are not allowed on a protected VM"):
                vm.add_memory(0x10000, gpa=0x1_0000_0000, flags=flag)
        region = vm.memory.regions[0]
        with pytest.raises(KvmError) as err:  # and the kernel agrees
            vm.fd.set_user_memory_region(5, uapi.KVM_MEM_READONLY, 0x1_0000_0000, 0x10000, region.hva)
        assert err.value.errno == errno.EPERM


@pytest.mark.timeout(300)
def test_no_slot_delete_after_first_run(pkvm):
    with Vm(protected=True) as vm:
        ram = vm.add_memory(8 << 20)
        extra = vm.add_memory(0x10000, "memfd", gpa=0x1_0000_0000)
        vm.create_vcpus(1)
        vm.boot(guest("hello"))
        assert vm.run(timeout=120).kind is ExitKind.POWER_OFF
        with pytest.raises(ConfigError, match="cannot be deleted or moved after its first KVM_RUN"):
            vm.memory.remove(extra)
        with pytest.raises(KvmError) as err:  # and the kernel agrees
            vm.fd.set_user_memory_region(extra.slot, 0, extra.gpa, 0, extra.hva)
        assert err.value.errno == errno.EPERM
        assert ram.registered


MEMLOCK_SCRIPT = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
from pyvmm.kvm.errors import ConfigError
from pyvmm.vm import Vm
with Vm(protected=True) as vm:
    vm.add_memory(8 << 20)
    vm.create_vcpus(1)
    vm.boot(sys.argv[1])
    try:
        vm.run(timeout=60)
    except ConfigError as e:
        print("PRECHECK:", e)
    out = vm.run(timeout=60, precheck=False)
    print("RUN:", out.kind.value, out.report.errno_name if out.report else None)
    print("CAUSE:", out.report.likely_cause if out.report else None)
"""


@pytest.mark.timeout(360)
def test_memlock_limit_without_cap_ipc_lock(pkvm):
    """Without CAP_IPC_LOCK and with RLIMIT_MEMLOCK 0: pyvmm refuses before KVM_RUN, and KVM says ENOMEM."""
    os.chmod("/dev/kvm", 0o666)  # the lab is throwaway; an unprivileged user has no CAP_IPC_LOCK
    try:
        res = subprocess.run([sys.executable, "-c", MEMLOCK_SCRIPT, guest("hello")], capture_output=True, text=True,
                             cwd=ROOT, user=65534, group=65534, extra_groups=[], timeout=300,
                             env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
    finally:
        os.chmod("/dev/kvm", 0o600)
    assert "PRECHECK: RLIMIT_MEMLOCK is 0 bytes" in res.stdout, res.stdout + res.stderr
    assert "RUN: fault ENOMEM" in res.stdout, res.stdout + res.stderr
    assert "RLIMIT_MEMLOCK" in res.stdout.split("CAUSE:")[1]


def test_pvmfw_needs_the_android_abi(pkvm, tmp_path):
    fw = tmp_path / "pvmfw.bin"
    fw.write_bytes(b"\0" * 4096)
    with Vm(protected=True) as vm:
        vm.add_memory(8 << 20)
        vm.create_vcpus(1)
        if vm.fd.check_extension(uapi.KVM_CAP_ARM_PROTECTED_VM):
            pytest.skip("this kernel has Android's pKVM ABI")
        with pytest.raises(MissingFeature, match="Android's pKVM ABI .*upstream protected-VM ABI"):
            vm.boot(guest("hello"), pvmfw=str(fw))


@pytest.mark.timeout(360)
def test_protected_vm_via_cli(pkvm, tmp_path):
    if not os.path.exists("/dev/udmabuf"):
        pytest.skip("no /dev/udmabuf")
    report = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--protected", "--backing", "udmabuf",
                          "-m", "8M", guest("memtouch"), "--report-json", str(report)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 1, res.stderr
    assert "pyvmm fault report" in res.stderr and "Traceback" not in res.stderr
    assert "VM_PFNMAP" in res.stderr and "slot 0 (udmabuf)" in res.stderr
    data = json.loads(report.read_text())
    assert data["report"]["vm_kind"] == "protected" and data["report"]["errno_name"] == "EFAULT"
    assert data["report"]["faulting_slot"] == 0 and data["report"]["faulting_slot_inferred"].startswith("inferred:")
    assert data["report"]["vcpus"][0]["registers"]  # every vCPU's registers, in the JSON
