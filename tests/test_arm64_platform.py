"""The arm64 platform a guest sees, normal and protected (lab: scripts/lab test): boot arguments and an initrd for
firmware, the PMU, SVE, the GICv3 ITS, guest exit statuses, and what `pyvmm caps` says each VM type is offered.

The bundled ``platform`` guest (firmware/arm64/platform.c) reads the device tree and its ID registers, uses each
feature it finds and prints what happened; these tests assert on those lines."""

from __future__ import annotations

import json
import re

import pytest

from pyvmm.arch.arm64 import layout
from pyvmm.hostinfo import kvm_arm_mode
from pyvmm.arch.arm64.features import CpuFeature, FeatureRequest
from pyvmm.kvm.errors import ConfigError, MissingFeature
from pyvmm.outcome import ExitKind
from pyvmm.vm import Vm
from tests.arm64 import guest, kind, require_arm64_kvm, require_pkvm  # noqa: F401 - kind is a fixture
from tests.conftest import run_cli

KVM_ITS_IIDR = 0x4B00_043B  # vgic-its.c: PRODUCT_ID_KVM (0x4b) << 24 | IMPLEMENTER_ARM (0x43b), revision 0..


def platform(kind, cmdline=None, initrd=None, features=None, memory=16 << 20, vcpus=1):
    """Boot the platform guest; returns (vm, outcome, {key: value} of its 'key: value' lines), the VM closed."""
    with Vm(protected=kind == "protected", feature_request=features) as vm:
        vm.add_memory(memory)
        vm.create_vcpus(vcpus)
        vm.boot(guest("platform"), cmdline=cmdline, initrd=initrd)
        outcome = vm.run(timeout=120)
        text = vm.console.text()
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            lines.setdefault(key, []).append(value)
    return vm, outcome, {key: "\n".join(values) for key, values in lines.items()}, text


@pytest.mark.timeout(300)
def test_bootargs_and_initrd_reach_firmware(kind, tmp_path):
    """--cmdline and --initrd for a firmware image: /chosen/bootargs and linux,initrd-start/end, read by the guest."""
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"pyvmm initrd marker 42\n" + bytes(range(256)) * 64)
    vm, outcome, lines, text = platform(kind, cmdline="hello world exit=debug:7", initrd=str(initrd))
    assert lines["bootargs"] == "hello world exit=debug:7", text
    start, end = (int(x, 16) for x in re.fullmatch(r"(0x[0-9a-f]+) (0x[0-9a-f]+)", lines["initrd"]).groups())
    assert end - start == initrd.stat().st_size and start % 4096 == 0
    below = vm.dma_pool.gpa if vm.dma_pool else layout.RAM_BASE + (16 << 20) - (2 << 20)  # the pool or the DTB
    assert end <= below and below - end < 4096  # firmware: as high as it fits
    assert lines["initrd-data"] == "pyvmm initrd marker 42", text
    assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 7, outcome


@pytest.mark.timeout(300)
def test_no_bootargs_for_firmware_by_default(kind):
    vm, outcome, lines, text = platform(kind)
    assert lines["bootargs"] == "(none)" and lines["initrd"] == "(none)", text
    assert outcome.kind is ExitKind.POWER_OFF and "platform: done" in text


@pytest.mark.timeout(300)
def test_pmu_counts_on_a_normal_vm_and_is_absent_on_a_protected_one(kind):
    vm, outcome, lines, text = platform(kind)
    if kind == "normal":
        assert CpuFeature.PMU in vm.cpu_features, vm.cpu_features.why
        m = re.search(r"^pmu: cycles=(\d+)$", text, re.M)
        assert m, text
        if kvm_arm_mode() == "protected":
            # pKVM's hypervisor does not copy the vCPU's PMU event masks into its own vCPU (flush_hyp_vcpu,
            # arch/arm64/kvm/hyp/nvhe/hyp-main.c), so __pmu_switch_to_guest never enables the guest's counters:
            # they read 0 even on a normal VM.  pyvmm says so; with kvm-arm.mode=nvhe they count (below).
            assert int(m.group(1)) == 0, text
            assert "counters read 0 under pKVM" in vm.cpu_features.why[CpuFeature.PMU]
        else:
            assert int(m.group(1)) > 0, text  # the cycle counter counted across the guest's loop
        assert re.search(r"^pmu: pmuver=\d+ pmcr=0x[0-9a-f]+ counters=\d+$", text, re.M), text
        assert lines["pmu-node"] == "interrupts=1 7 4", text  # PPI 7 (INTID 23), level-high
    else:
        assert CpuFeature.PMU not in vm.cpu_features
        assert "KVM_CAP_ARM_PMU_V3 = 0" in vm.cpu_features.why[CpuFeature.PMU]
        assert re.search(r"^pmu: absent \(pmuver=0\)$", text, re.M), text  # the ID register says so too
        assert lines["pmu-node"] == "(none)", text
    assert outcome.kind is ExitKind.POWER_OFF, outcome


@pytest.mark.timeout(300)
def test_asking_a_protected_vm_for_pmu_or_sve_is_one_error_naming_the_cap():
    require_arm64_kvm()
    require_pkvm()
    for feature, cap in ((CpuFeature.PMU, "KVM_CAP_ARM_PMU_V3"), (CpuFeature.SVE, "KVM_CAP_ARM_SVE")):
        with pytest.raises(MissingFeature) as err:
            Vm(protected=True, feature_request=FeatureRequest({feature: True}))
        assert f"{cap} = 0" in str(err.value) and "protected VM" in str(err.value)
    res = run_cli("run", "--protected", "--cpu-features", "pmu=on", guest("platform"))
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "KVM_CAP_ARM_PMU_V3 = 0" in res.stderr


@pytest.mark.timeout(300)
def test_sve_vector_length_on_a_normal_vm_and_the_trap_on_a_protected_one(kind):
    vm, outcome, lines, text = platform(kind)
    if kind == "normal":
        assert CpuFeature.SVE in vm.cpu_features
        lengths = vm.cpu_features.sve_vector_lengths
        assert lengths and lines["sve"] == f"vl={max(lengths) // 8} bytes", (lengths, text)
    else:
        assert CpuFeature.SVE not in vm.cpu_features
        assert lines["sve"] == "absent; rdvl trapped (ec=0x0)", text  # UNDEFINED: EC 0 (unknown reason)
    assert outcome.kind is ExitKind.POWER_OFF


@pytest.mark.timeout(300)
def test_sve_vector_lengths_can_be_capped():
    require_arm64_kvm()
    vm, *_ = platform("normal")
    if CpuFeature.SVE not in vm.cpu_features:
        pytest.skip(f"this host's KVM offers no SVE: {vm.cpu_features.why[CpuFeature.SVE]}")
    vm, outcome, lines, text = platform("normal", features=FeatureRequest({}, [128]))
    assert vm.cpu_features.sve_vector_lengths == [128] and lines["sve"] == "vl=16 bytes", text
    with pytest.raises(ConfigError, match="KVM can only cap the vector length|this host's KVM offers"):
        platform("normal", features=FeatureRequest({}, [256]))  # 128 is offered, so 256 alone cannot be


@pytest.mark.timeout(300)
def test_its_is_in_the_device_tree_and_answers(kind):
    vm, outcome, lines, text = platform(kind)
    # KVM_CREATE_DEVICE is not among the VM ioctls pKVM gates (kvm_pkvm_ioctl_allowed): both kinds get an ITS
    assert CpuFeature.ITS in vm.cpu_features, vm.cpu_features.why
    its = lines["its"].splitlines()
    assert its[0] == f"node at {layout.GIC_ITS:#x} size {layout.GIC_ITS_SIZE:#x}", text
    m = re.fullmatch(r"iidr=(0x[0-9a-f]+) typer=(0x[0-9a-f]+)", its[1])
    assert m, text
    assert int(m.group(1), 16) & ~0xF000 == KVM_ITS_IIDR, text  # KVM's own ITS answered the guest
    assert int(m.group(2), 16) & 1 == 1, text  # GITS_TYPER.Physical: physical LPIs supported
    assert its[2] == f"parent=intc@{layout.GIC_DIST:x}", text


@pytest.mark.timeout(300)
def test_features_switched_off_are_gone_for_the_guest():
    require_arm64_kvm()
    off = FeatureRequest({CpuFeature.PMU: False, CpuFeature.SVE: False, CpuFeature.ITS: False})
    vm, outcome, lines, text = platform("normal", features=off)
    assert vm.cpu_features.enabled <= {CpuFeature.PTRAUTH}
    assert re.search(r"^pmu: absent \(pmuver=0\)$", text, re.M) and lines["pmu-node"] == "(none)", text
    assert lines["sve"].startswith("absent; rdvl trapped"), text
    assert lines["its"] == "(none)", text


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how, kind_, status", [("reset2:42", ExitKind.GUEST_EXIT, 42), ("reset2:0", ExitKind.GUEST_EXIT, 0),
                                                ("off2", ExitKind.POWER_OFF, None), ("debug:3", ExitKind.GUEST_EXIT, 3)])
def test_guest_exit_status_conventions(kind, how, kind_, status):
    vm, outcome, lines, text = platform(kind, cmdline=f"exit={how}")
    assert outcome.kind is kind_, (outcome, text)
    if status is not None:
        assert outcome.status == status
    if how.startswith("reset2"):
        assert "PSCI SYSTEM_RESET2" in outcome.detail
    if how == "off2":
        assert "SYSTEM_OFF2" in outcome.detail, outcome.detail


@pytest.mark.timeout(300)
def test_cli_exit_status_follows_the_guest(kind):
    prot = ["--protected"] if kind == "protected" else []
    for how, code, says in (("reset2:42", 42, "guest exited with status 42 (PSCI SYSTEM_RESET2"),
                            ("debug:9", 9, "guest wrote 0x9 to the exit register"),
                            ("off2", 0, "PSCI SYSTEM_OFF2 (hibernate-off)")):
        res = run_cli("run", *prot, "-q", "--cmdline", f"exit={how}", guest("platform"))
        assert res.returncode == code and says in res.stderr, res.stderr


@pytest.mark.timeout(300)
def test_caps_shows_what_each_vm_type_is_offered():
    require_arm64_kvm()
    res = run_cli("caps", "--json")
    assert res.returncode == 0, res.stderr
    feats = json.loads(res.stdout)["features"]
    normal = feats["normal"]
    assert normal["pmu"]["offered"] and normal["sve"]["offered"] and normal["debug"]["offered"], normal
    text = run_cli("caps").stdout
    assert "arm64 features by VM type" in text
    if "protected" not in feats:
        pytest.skip("no protected VMs here: the protected column is missing")
    prot = feats["protected"]
    assert not prot["pmu"]["offered"] and "KVM_CAP_ARM_PMU_V3 = 0" in prot["pmu"]["answer"], prot
    assert not prot["sve"]["offered"] and not prot["debug"]["offered"], prot
    assert prot["ptrauth"]["offered"] and prot["its"]["offered"] and normal["its"]["offered"], prot
    assert re.search(r"^  pmu\s+yes\s+no\s", text, re.M), text


@pytest.mark.timeout(300)
def test_fault_report_lists_the_features():
    """A fault report says which features the vCPUs had (and, with SVE, ZCR_EL1)."""
    require_arm64_kvm()
    with Vm() as vm:
        vm.add_memory(16 << 20)
        vm.create_vcpus(1)
        vm.boot(guest("platform"))
        from pyvmm.report import build_report

        report = build_report(vm, vm.vcpus[0], "test")
    text = report.text()
    assert "features: pmu: on (offered)" in text, text
    if CpuFeature.SVE in vm.cpu_features:
        assert "zcr_el1" in report.registers, report.registers


@pytest.mark.timeout(300)
def test_two_vcpus_get_every_feature(kind):
    """Each vCPU gets its PMU interrupt and PMU init, SVE finalize; the guest runs on vCPU 0 (the other is off)."""
    vm, outcome, lines, text = platform(kind, vcpus=2, cmdline="exit=reset2:5")
    assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 5, (outcome, text)
    assert (CpuFeature.PMU in vm.cpu_features) == (kind == "normal") == lines["sve"].startswith("vl="), text
