"""arm64 feature switches: parsing, and what a VM gets from KVM's offers (pure parts: any host).  The lab tests
(tests/test_arm64_platform.py) show the same on real normal and protected VMs."""

from __future__ import annotations

import pytest

from pyvmm.arch.arm64.features import (CpuFeature, FeatureRequest, Offer, parse_features, parse_vector_lengths,
                                       resolve, vqs_from_vls)
from pyvmm.kvm.errors import ConfigError, MissingFeature

PMU, SVE, PTRAUTH, ITS = CpuFeature.PMU, CpuFeature.SVE, CpuFeature.PTRAUTH, CpuFeature.ITS


def offers(*offered: CpuFeature) -> dict[CpuFeature, Offer]:
    """KVM's answers as the lab's 7.2 pKVM gives them (normal: all; protected: no PMU, no SVE)."""
    return {f: Offer(f in offered, f"KVM_CAP_X_{f.name} = {int(f in offered)}") for f in CpuFeature}


@pytest.mark.parametrize("text, expected", [
    ("pmu=off", {PMU: False}), ("pmu=on,sve=off", {PMU: True, SVE: False}), ("-pmu,+its", {PMU: False, ITS: True}),
    ("sve", {SVE: True}), (" PMU = off , ", {PMU: False}), ("ptrauth=no,its=0", {PTRAUTH: False, ITS: False}),
    ("pmu,pmu=on", {PMU: True}),
])
def test_feature_switches_parse(text, expected):
    assert parse_features(text) == expected


@pytest.mark.parametrize("text, says", [
    ("mte=on", "unknown feature 'mte' (arm64 has pmu, sve, ptrauth, its)"), ("pmu=maybe", "the value is on or off"),
    ("", "name at least one"), (",,", "name at least one"), ("pmu=on,-pmu", "pmu is both on and off"),
])
def test_bad_feature_switches_are_one_line(text, says):
    with pytest.raises(ConfigError) as err:
        parse_features(text)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_vector_lengths_parse_and_bad_ones_are_refused():
    assert parse_vector_lengths("256,128,256") == [128, 256]
    for bad in ("100", "0", "-128", "abc", "", "8320"):
        with pytest.raises(ConfigError):
            parse_vector_lengths(bad)
    assert vqs_from_vls(0b1011) == [128, 256, 512]


def test_default_is_everything_offered_and_says_why():
    normal = resolve(None, offers(*CpuFeature), "normal")
    assert normal.enabled == set(CpuFeature)
    protected = resolve(None, offers(PTRAUTH, ITS), "protected")
    assert protected.enabled == {PTRAUTH, ITS}
    assert protected.why[PMU] == "not offered to a protected VM (on its VM fd: KVM_CAP_X_PMU = 0)"
    assert "pmu: not offered to a protected VM" in protected.describe()[0]


def test_switching_off_and_on():
    got = resolve(FeatureRequest({PMU: False, SVE: True}), offers(*CpuFeature), "normal")
    assert got.enabled == {SVE, PTRAUTH, ITS} and got.why[PMU] == "off (--cpu-features)"
    assert got.why[SVE] == "on (--cpu-features)" and got.why[ITS] == "on (offered)"
    assert 3 not in got.vcpu_feature_bits() and 4 in got.vcpu_feature_bits()  # KVM_ARM_VCPU_PMU_V3, _SVE
    assert {5, 6} <= set(got.vcpu_feature_bits())  # both pointer-authentication halves


def test_asking_for_what_the_vm_type_lacks_names_the_capability():
    with pytest.raises(MissingFeature) as err:
        resolve(FeatureRequest({PMU: True}), offers(PTRAUTH, ITS), "protected")
    assert str(err.value) == ("--cpu-features pmu=on: KVM does not offer a protected VM PMU "
                              "(on its VM fd: KVM_CAP_X_PMU = 0)")


def test_vector_lengths_without_sve_are_refused():
    with pytest.raises(ConfigError, match="--sve-vector-lengths needs SVE"):
        resolve(FeatureRequest({}, [128]), offers(PTRAUTH), "protected")
    with pytest.raises(ConfigError, match="--sve-vector-lengths needs SVE.*off"):
        resolve(FeatureRequest({SVE: False}, [128]), offers(*CpuFeature), "normal")


def test_an_x86_vm_refuses_arm64_feature_switches():
    from pyvmm.arch import machine_name
    from pyvmm.vm import Vm

    if machine_name() != "x86_64":
        pytest.skip("the x86_64 refusal (arm64 VMs take the switches: tests/test_arm64_platform.py)")
    with pytest.raises(ConfigError, match="--cpu-features and --sve-vector-lengths are for arm64 VMs"):
        Vm(feature_request=FeatureRequest({PMU: False}))
