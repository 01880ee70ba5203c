"""Fault reports: the pure rules (fed hand-made reports), the kernel-log filter, and real reports from
KVM on this host (a triple fault with two vCPUs)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from pyvmm import hostinfo
from pyvmm.hostinfo import KmsgFilter, KmsgRecord, filter_kmsg
from pyvmm.memory.backing import AnonBacking, Backing, FileBacking, MemfdBacking, mount_fstype
from pyvmm.outcome import ExitKind
from pyvmm.report import FaultReport, SlotInfo, likely_causes
from pyvmm.vm import Vm


def slot(n=0, backing="anon", vmflags=("rd", "wr"), nature=None, vmas=True, vmas_error=None, flags=()):
    gpa = 0x80000000 + n * 0x200000
    v = [{"start": 0x7F0000000000, "end": 0x7F0000200000, "perms": "rw-s", "path": "", "vmflags": list(vmflags),
          "notable": {}}] if vmas else []
    return SlotInfo(slot=n, gpa=gpa, size=0x200000, flags=list(flags), backing=backing, hva=0x7F0000000000, vmas=v,
                    backing_details={}, nature=dict(nature or {}), vmas_error=vmas_error)


def report(err=None, kind="protected", slots=(), **kw):
    r = FaultReport(what="test", vm_kind=kind, vm_type=1 << 31 if kind == "protected" else 0, arch="arm64", vcpu=0,
                    errno=err, call="KVM_RUN" if err else None, slots=list(slots),
                    memlock={"rlimit_soft": 0, "cap_ipc_lock": False}, **kw)
    return r


# --- the rules ----------------------------------------------------------------------------------
def test_hugetlb_is_not_swap_backed_on_protected_vm():
    s = slot(0, "memfd-hugetlb", vmflags=("rd", "wr", "sh", "ht"), nature={"swap_backed": False, "hugetlb": True})
    causes = likely_causes(report(errno.EIO, slots=[s], faulting_slot=0))
    assert len(causes) == 1
    assert "slot 0 (memfd-hugetlb)" in causes[0] and "hugetlbfs folios are never swap-backed" in causes[0]
    assert "folio_test_swapbacked" in causes[0] and "pkvm_mem_abort" in causes[0]


def test_backings_state_their_nature(tmp_path):
    with AnonBacking(0x10000) as b:
        assert (b.swap_backed, b.pfn_mapped, b.hugetlb, b.file_path) == (True, False, False, None)
    with MemfdBacking(0x10000) as b:
        assert b.swap_backed is True and not b.hugetlb and b.nature()["shared_mapping"] is True
    with FileBacking(0x10000, path=str(tmp_path / "ram")) as b:
        fs = mount_fstype(str(tmp_path))
        assert b.file_path == str(tmp_path / "ram")
        assert b.swap_backed is (None if fs is None else fs in ("tmpfs", "shmem"))
        assert b.nature()["filesystem"] == fs
    from pyvmm.memory.backing import DmaHeapBacking, GuestMemfdBacking, UdmabufBacking

    assert UdmabufBacking.pfn_mapped and DmaHeapBacking.pfn_mapped  # udmabuf:memfd is not: tests/test_arm64_pkvm.py
    assert GuestMemfdBacking.swap_backed is False


def test_mount_fstype_longest_prefix(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\ntmpfs /tmpx tmpfs rw 0 0\n")
    assert mount_fstype("/tmp/a/b", str(mounts)) == "tmpfs"
    assert mount_fstype("/tmpfile", str(mounts)) == "ext4"
    assert mount_fstype("/x", str(tmp_path / "missing")) is None


def test_close_closes_everything_then_raises_the_first_error(monkeypatch):
    b = MemfdBacking(0x10000)
    extra = os.dup(b.memfd)
    b._own(extra)
    fds = list(b._fds)
    from pyvmm import hostmem

    calls = []

    def bad_munmap(hva, size):
        calls.append(hva)
        raise OSError(errno.EINVAL, "munmap failed")

    real_munmap = hostmem.munmap
    hva = b.hva
    monkeypatch.setattr(hostmem, "munmap", bad_munmap)
    with pytest.raises(OSError, match="munmap failed"):
        b.close()
    monkeypatch.setattr(hostmem, "munmap", real_munmap)
    real_munmap(hva, 0x10000)
    assert calls == [hva] and b.hva == 0 and b._fds == []
    for fd in fds:  # every fd was closed despite the munmap failure
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    assert issubclass(MemfdBacking, Backing)


def test_inferred_slot_is_marked_in_text_and_json():
    from pyvmm.arch.arm64 import pkvm

    r = report(errno.EFAULT, slots=[slot(0, "anon"), slot(1, "udmabuf", vmflags=("rd", "wr", "io", "pf"),
                                                           nature={"pfn_mapped": True})])
    s, why = pkvm.infer_faulting_slot(r)
    assert s == 1 and why.startswith("inferred:")
    r.faulting_slot, r.faulting_slot_inferred = s, why
    r.likely_cause = likely_causes(r)
    text = r.text()
    assert "<-- faulting slot (inferred)" in text and "(slot 1, inferred:" in text
    assert json.loads(r.to_json())["faulting_slot_inferred"] == why
    assert all("slot 0" not in c for c in r.likely_cause)  # the anon slot is not blamed


def test_no_inference_when_two_slots_fit():
    from pyvmm.arch.arm64 import pkvm

    pf = dict(vmflags=("io", "pf"), nature={"pfn_mapped": True})
    assert pkvm.infer_faulting_slot(report(errno.EFAULT, slots=[slot(0, "udmabuf", **pf),
                                                                slot(1, "udmabuf", **pf)])) == (None, None)


def test_unrelated_slot_not_blamed_when_fault_is_outside_slots():
    r = report(errno.EFAULT, kind="normal", slots=[slot(0, "anon", vmas=False)], fault_gpa=0x1_0000_0000)
    causes = likely_causes(r)
    assert not any("slot 0" in c for c in causes)
    assert any("hva_to_pfn" in c for c in causes)


def test_smaps_failure_is_not_unmapped():
    s = slot(0, "memfd", vmas=False, vmas_error="cannot read /proc/self/smaps: Permission denied")
    r = report(errno.EFAULT, kind="normal", slots=[s], faulting_slot=0, fault_gpa=0x80000000,
               smaps_error=s.vmas_error)
    causes = likely_causes(r)
    assert not any("no longer mapped" in c for c in causes)
    text = r.text()
    assert "VMAs unknown: cannot read /proc/self/smaps: Permission denied" in text
    assert "unmapped?" not in text
    # and a really missing VMA is still reported
    r2 = report(errno.EFAULT, kind="normal", slots=[slot(0, "memfd", vmas=False)], faulting_slot=0,
                fault_gpa=0x80000000)
    assert any("no longer mapped" in c for c in likely_causes(r2))


def test_nisv_exit_rule():
    r = report(kind="normal", exit_reason="KVM_EXIT_ARM_NISV",
               exit_details={"esr_iss": 0x1234, "fault_ipa": 0x0A001000})
    causes = likely_causes(r)
    assert len(causes) == 1
    c = causes[0]
    assert "fault_ipa 0xa001000" in c and "esr_iss 0x1234" in c
    assert "LDP/STP" in c and "writeback" in c and "ISV = 0" in c and "KVM_EXIT_ARM_NISV" in c


def test_nisv_enosys_rule():
    causes = likely_causes(report(errno.ENOSYS, kind="normal"))
    assert any("io_mem_abort returns -ENOSYS" in c and "KVM_CAP_ARM_NISV_TO_USER" in c for c in causes)
    # ENOSYS from KVM_RUN is an arm64 rule only
    r = report(errno.ENOSYS, kind="normal")
    r.arch = "x86_64"
    assert not any("ISV" in c for c in likely_causes(r))


def test_memory_fault_private_rule():
    mf = {"gpa": 0x80001000, "size": 0x1000, "flags": 8, "private": True}
    s = slot(0, "guest-memfd", flags=["GUEST_MEMFD"], nature={"guest_memfd": True, "swap_backed": False})
    r = report(errno.EFAULT, kind="normal", slots=[s], exit_reason="KVM_EXIT_MEMORY_FAULT", memory_fault=mf,
               fault_gpa=mf["gpa"], faulting_slot=0)
    causes = likely_causes(r)
    assert "as private while KVM's memory attributes say shared" in causes[0]
    assert "KVM_SET_MEMORY_ATTRIBUTES" in causes[0] and "set KVM_MEMORY_ATTRIBUTE_PRIVATE" in causes[0]
    # a private access to a slot without guest_memfd is its own case
    r.slots = [slot(0, "anon")]
    assert "has no guest_memfd" in likely_causes(r)[0]
    # the text shows the fields (only given for KVM_EXIT_MEMORY_FAULT)
    assert "memory fault: gpa 0x80001000 size 0x1000 flags 0x8 (private)" in r.text()


def test_pfnmap_rule_names_the_kernel_functions():
    s = slot(3, "udmabuf", vmflags=("rd", "wr", "sh", "io", "pf"), nature={"pfn_mapped": True})
    causes = likely_causes(report(errno.EFAULT, slots=[s], faulting_slot=3))
    assert len(causes) == 1
    assert "pkvm_mem_abort" in causes[0] and "check_vma_flags" in causes[0] and "VmFlags io pf" in causes[0]


def test_eperm_enomem_rules_name_the_kernel_functions():
    eperm = report(errno.EPERM)
    eperm.call = "KVM_SET_USER_MEMORY_REGION2"
    assert "kvm_arch_prepare_memory_region" in likely_causes(eperm)[0]
    enomem = report(errno.ENOMEM)
    enomem.memlock = {"rlimit_soft": 1 << 20, "cap_ipc_lock": False}
    assert "account_locked_vm" in likely_causes(enomem)[0] and "1048576 bytes" in likely_causes(enomem)[0]
    for memlock in ({"rlimit_soft": None, "cap_ipc_lock": False}, {"rlimit_soft": 0, "cap_ipc_lock": True}):
        enomem.memlock = memlock  # memlock cannot be the cause: only the host's memory
        assert "RLIMIT_MEMLOCK is not the cause" in likely_causes(enomem)[0]
    assert likely_causes(report(errno.ENOMEM, kind="normal")) == [
        "the host ran out of memory while faulting in guest pages"]


# --- the kernel log ---------------------------------------------------------------------------
def rec(seq, text, caller=None):
    return KmsgRecord(seq=seq, ts_us=1_000_000 + seq, level=4, facility=0, text=text, caller=caller)


def test_kmsg_record_parse():
    r = KmsgRecord.parse(b"4,812,3021455,-,caller=T4242;kvm [4242]: unhandled exit\n SUBSYSTEM=kvm\n")
    assert (r.seq, r.ts_us, r.level, r.caller, r.caller_tid, r.text) == (812, 3021455, 4, "T4242", 4242,
                                                                         "kvm [4242]: unhandled exit")
    r = KmsgRecord.parse(b"6,5,100,-;plain")
    assert r.caller is None and r.caller_tid is None and r.line() == "[    0.000100] plain"


def test_kmsg_filter_drops_other_processes():
    f = KmsgFilter(pid=100, tids={101, 102}, names={"python3", "pyvmm-vcpu0"})
    records = [
        rec(1, "kvm [100]: ours by pid"),
        rec(2, "kvm [999]: another VMM"),
        rec(3, "CPU: 1 PID: 102 Comm: pyvmm-vcpu0 Tainted: G"),
        rec(4, "CPU: 1 PID: 555 Comm: crosvm_vcpu0 Tainted: G"),
        rec(5, "BUG: Bad page map in process crosvm_vcpu0 pte:1"),
        rec(6, "BUG: Bad page map in process pyvmm-vcpu0 pte:1"),
        rec(7, "no task named here"),
        rec(8, "printed by our thread", caller="T101"),
        rec(9, "printed by another task", caller="T77"),
        rec(10, "from an interrupt", caller="C2"),
        rec(11, "oom: pid 999 killed"),
    ]
    kept, dropped = filter_kmsg(records, f)
    assert [r.seq for r in kept] == [1, 3, 6, 7, 8, 10]
    assert dropped == 5


def test_kmsg_cut_and_lost_lines_are_announced():
    r = report(errno.EFAULT, kind="normal")
    r.kernel_log = [f"[    1.{i:06d}] line {i}" for i in range(30)]
    r.kernel_log_lost = 3
    r.kernel_log_dropped = 2
    r.fault_time_us = 2_500_000
    text = r.text()
    assert "18 earlier lines cut here (all in the JSON report)" in text
    assert "3 record(s) lost" in text and "EPIPE" in text
    assert "2 line(s) naming other processes left out" in text
    assert "line 29" in text and "line 11" not in text
    assert "fault at [    2.500000] CLOCK_MONOTONIC" in text


def test_kmsg_watcher_counts_sequence_gaps(tmp_path):
    w = hostinfo.KmsgWatcher(str(tmp_path / "nope"))
    assert w.unavailable and "cannot read" in w.unavailable
    for raw in (b"6,10,1,-;a", b"6,14,2,-;b", b"6,15,3,-;c", b"garbage"):
        w.accept(raw)
    assert [r.seq for r in w.records] == [10, 14, 15]
    assert w.lost == 3


def test_host_identity_cpu_models():
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n\nprocessor\t: 1\n"
    assert hostinfo.cpu_model(x86)["model_name"] == "Intel(R) Xeon(R)"
    arm = ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
           "CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n")
    m = hostinfo.cpu_model(arm)
    assert (m["implementer"], m["part"], m["variant"], m["revision"], m["implementer_name"]) == (0x41, 0xD0C, 3, 1, "Arm")
    ident = hostinfo.HostIdentity("7.2", "#1", "aarch64", "protected", m, "0.1.0")
    assert ident.cpu_text() == "implementer 0x41 (Arm) part 0xd0c variant 3 revision 1"


# --- real reports on this host -----------------------------------------------------------------
@pytest.mark.timeout(90)
def test_triple_fault_report_has_every_vcpu(x86_firmware):
    with Vm() as vm:
        vm.add_memory(4 << 20)
        vm.create_vcpus(2)
        vm.boot(os.path.join(x86_firmware, "shutdown-triple"))
        outcome = vm.run(timeout=60)
        has_code_address = hasattr(vm.arch, "code_address")
    assert outcome.kind is ExitKind.SHUTDOWN
    r = outcome.report
    assert [v.vcpu for v in r.vcpus] == [0, 1]
    assert r.vcpus[0].faulting and not r.vcpus[1].faulting
    for v in r.vcpus:
        assert v.unavailable is None, v.unavailable
        assert v.registers["rip"] >= 0x100000 and "cr3" in v.registers
        for name, why in v.refused.items():  # refused registers carry a reason and no value
            assert why and name not in v.registers
    assert r.registers == r.vcpus[0].registers
    v0 = r.vcpus[0]
    if has_code_address:
        assert v0.code_gpa == v0.registers["rip"] and len(bytes.fromhex(v0.code_bytes)) == 16
        assert bytes.fromhex(v0.code_bytes)[:2] == b"\x0f\x0b"  # ud2: what the guest faulted on
    else:
        assert v0.code_bytes is None and "cannot translate" in v0.code_unavailable
    # host identity
    assert r.host["kernel_release"] == os.uname().release
    assert r.host["pyvmm_version"] and r.host["pyvmm_version"] != "unknown"
    assert r.host["cpu_text"] and r.host["cpu_text"] != "unknown"
    assert r.host["caps"]["KVM_CAP_USER_MEMORY2"] in (0, 1)
    assert "KVM_CAP_ARM_NISV_TO_USER" not in r.host["caps"]  # arm64 only
    # exit counts and the console
    assert r.exit_counts.get("KVM_EXIT_SHUTDOWN") == 1 and r.exit_counts.get("KVM_EXIT_IO", 0) > 0
    assert r.console_tail == ["shutdown: triple fault"]
    assert r.fault_time_us and r.fault_time_us <= hostinfo.monotonic_us()
    text = r.text()
    assert "vCPU 0 (faulting)" in text and "vCPU 1" in text and f"host: Linux {os.uname().release}" in text
    assert "console (last 1 lines):" in text and "SHUTDOWN 1" in text
    data = json.loads(r.to_json())
    assert len(data["vcpus"]) == 2 and data["vcpus"][1]["registers"]["rip"] >= 0x100000
    for record in data["kernel_log_records"]:
        assert {"seq", "ts_us", "caller", "text"} <= set(record)


@pytest.mark.timeout(60)
def test_a_vcpu_still_in_kvm_run_is_filled_in_after_the_stop(x86_firmware, monkeypatch):
    """When another vCPU cannot be read while the report is made, the report says so, and the run loop fills
    it in once every vCPU has stopped, after waiting for the late read (no ioctl after run() returns)."""
    import threading

    from pyvmm import report as report_mod

    monkeypatch.setattr(report_mod, "OTHER_VCPU_WAIT", 0.0)  # no time for the other vCPU: it is "still running"
    seen = {}
    real_fill, real_info = report_mod.add_missing_vcpus, report_mod._vcpu_info
    # The other vCPU may be between two KVM_RUNs when the report is made (its read would then finish at
    # once): hold its read until the run loop fills the report in, as a vCPU still in KVM_RUN would.
    release = threading.Event()

    def held_info(vm, vcpu, faulting, *args):
        if not faulting:
            release.wait(30)
        return real_info(vm, vcpu, faulting, *args)

    def fill(report, vm):
        seen["before"] = [v.unavailable for v in report.vcpus]
        release.set()
        real_fill(report, vm)

    monkeypatch.setattr(report_mod, "_vcpu_info", held_info)

    monkeypatch.setattr("pyvmm.runloop.add_missing_vcpus", fill)
    with Vm() as vm:
        vm.add_memory(4 << 20)
        vm.create_vcpus(2)
        vm.boot(os.path.join(x86_firmware, "shutdown-triple"))
        outcome = vm.run(timeout=60)
    assert outcome.kind is ExitKind.SHUTDOWN
    other = 1 - outcome.vcpu
    assert seen["before"][other].startswith("still in KVM_RUN when the report was made")
    filled = outcome.report.vcpus[other]
    assert filled.unavailable is None and "rip" in filled.registers
    assert not [t for t in threading.enumerate() if t.name.startswith("pyvmm-report-vcpu")]
    assert "_pending_reads" not in outcome.report.to_json()
