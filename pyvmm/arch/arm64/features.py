"""What an arm64 VM's vCPUs and GIC may have, per VM type, and what a user asked for.

KVM says what it offers a VM on that VM's own fd: ``KVM_CHECK_EXTENSION`` there answers for the VM's type,
and pKVM answers less for a protected VM (``kvm_pkvm_ext_allowed``: no PMU, no SVE, no MTE, no guest debug;
its hypervisor also drops those vCPU features in ``pkvm_init_features_from_host``).  The ITS is a device, not a
capability: ``KVM_CREATE_DEVICE`` with ``KVM_CREATE_DEVICE_TEST`` asks for it.

By default a VM gets every feature it is offered; ``FeatureRequest`` turns one on (asking for a feature the VM
is not offered is one ``MissingFeature`` naming the capability) or off.  Pure parts (``parse_features``,
``parse_vector_lengths``, ``resolve``) are tested on any host; ``offers`` needs an arm64 VM fd.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum

from ...kvm import uapi
from ...kvm import uapi_arm64 as a64
from ...kvm.errors import ConfigError, KvmError, MissingFeature
from ...record import Record
from . import layout


class CpuFeature(enum.Enum):
    PMU = "pmu"  # PMUv3: KVM_ARM_VCPU_PMU_V3, its PPI through the vCPU's PMU_V3_CTRL attributes
    SVE = "sve"  # KVM_ARM_VCPU_SVE, vector lengths in KVM_REG_ARM64_SVE_VLS, then KVM_ARM_VCPU_FINALIZE
    # KVM_ARM_VCPU_PTRAUTH_ADDRESS and _GENERIC (both or neither).  Keep it on where offered: a guest that sees
    # it in its ID registers (a protected VM's do) but runs on a vCPU without it takes UNDEF at its first key write.
    PTRAUTH = "ptrauth"
    ITS = "its"  # the GICv3 ITS (KVM_DEV_TYPE_ARM_VGIC_ITS), the guest's MSI controller


# What decides each offer: (capability names asked on the VM fd, the vCPU feature bits it sets).
FEATURE_CAPS: dict[CpuFeature, tuple[tuple[str, ...], tuple[int, ...]]] = {
    CpuFeature.PMU: (("KVM_CAP_ARM_PMU_V3",), (a64.KVM_ARM_VCPU_PMU_V3,)),
    CpuFeature.SVE: (("KVM_CAP_ARM_SVE",), (a64.KVM_ARM_VCPU_SVE,)),
    CpuFeature.PTRAUTH: (("KVM_CAP_ARM_PTRAUTH_ADDRESS", "KVM_CAP_ARM_PTRAUTH_GENERIC"),
                         (a64.KVM_ARM_VCPU_PTRAUTH_ADDRESS, a64.KVM_ARM_VCPU_PTRAUTH_GENERIC)),
    CpuFeature.ITS: (("KVM_CREATE_DEVICE_TEST(KVM_DEV_TYPE_ARM_VGIC_ITS)",), ()),
}

# Guest debug is not a feature pyvmm turns on or off, but a protected VM is not offered it either: shown by caps.
DEBUG_CAPS = ("KVM_CAP_SET_GUEST_DEBUG", "KVM_CAP_GUEST_DEBUG_HW_BPS", "KVM_CAP_GUEST_DEBUG_HW_WPS")

# Measured in the lab (Linux 7.2.13): with kvm-arm.mode=protected a normal VM's PMU registers work but its counters
# never count: pKVM's flush_hyp_vcpu (arch/arm64/kvm/hyp/nvhe/hyp-main.c) does not copy vcpu->arch.pmu.events into
# the hypervisor's vCPU, so __pmu_switch_to_guest enables no guest counter at entry.  With kvm-arm.mode=nvhe they do.
PKVM_PMU_CAVEAT = ("counters read 0 under pKVM (kvm-arm.mode=protected): its hypervisor does not switch the guest's "
                   "counters on at entry (flush_hyp_vcpu copies no PMU events)")
SVE_MAX_BITS = 2048  # the architecture's largest vector length (KVM's VLS register has room for more)
PMU_INTID = 16 + layout.PMU_PPI  # the PMU's interrupt: PPI 7, INTID 23, as QEMU, kvmtool and crosvm use


class Offer(Record):
    __slots__ = ("offered", "answer")
    __hash__ = Record.value_hash

    def __init__(self, offered: bool, answer: str):
        self.offered = offered
        self.answer = answer  # what KVM answered on the VM's fd, e.g. "KVM_CAP_ARM_PMU_V3 = 0"


class FeatureRequest(Record):
    """What the user asked for: True on, False off, absent: on when offered.  ``sve_vector_lengths``: bits
    (128, 256, ...), None for every length KVM offers."""

    __slots__ = ("switches", "sve_vector_lengths")

    def __init__(self, switches: dict[CpuFeature, bool] | None = None, sve_vector_lengths: list[int] | None = None):
        self.switches = {} if switches is None else switches
        self.sve_vector_lengths = sve_vector_lengths


class FeatureSet(Record):
    """What a VM got (``vm.cpu_features``), and why each feature is on or off."""

    __slots__ = ("enabled", "why", "sve_vector_lengths")

    def __init__(self, enabled: set[CpuFeature], why: dict[CpuFeature, str], sve_vector_lengths: list[int] | None = None):
        self.enabled = enabled
        self.why = why  # per feature: "on (offered)", "off (--cpu-features sve=off)", "not offered: ..."
        self.sve_vector_lengths = [] if sve_vector_lengths is None else sve_vector_lengths  # bits, set at vCPU init

    def __contains__(self, feature: CpuFeature) -> bool:
        return feature in self.enabled

    def vcpu_feature_bits(self) -> tuple[int, ...]:
        return tuple(bit for f in CpuFeature if f in self.enabled for bit in FEATURE_CAPS[f][1])

    def describe(self) -> list[str]:
        """One phrase per feature, for reports and ``pyvmm run -v``."""
        out = []
        for f in CpuFeature:
            text = f"{f.value}: {self.why[f]}"
            if f is CpuFeature.SVE and f in self.enabled and self.sve_vector_lengths:
                text += f" (vector lengths {','.join(map(str, self.sve_vector_lengths))} bits)"
            out.append(text)
        return out


def parse_features(text: str) -> dict[CpuFeature, bool]:
    """``pmu=off,sve=on`` (also ``-pmu``, ``+sve``, ``sve``) -> switches.  Bad input: one ConfigError line."""
    names = ", ".join(f.value for f in CpuFeature)
    out: dict[CpuFeature, bool] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        value: bool | None = True
        if item[0] in "+-":
            name, value = item[1:], item[0] == "+"
        elif "=" in item:
            name, _, word = item.partition("=")
            value = {"on": True, "off": False, "yes": True, "no": False, "1": True, "0": False}.get(word.strip().lower())
            if value is None:
                raise ConfigError(f"--cpu-features {item!r}: the value is on or off")
        else:
            name = item
        try:
            feature = CpuFeature(name.strip().lower())
        except ValueError:
            raise ConfigError(f"--cpu-features: unknown feature {name!r} (arm64 has {names})") from None
        if feature in out and out[feature] != value:
            raise ConfigError(f"--cpu-features: {feature.value} is both on and off")
        out[feature] = value
    if not out:
        raise ConfigError(f"--cpu-features {text!r}: name at least one of {names} (e.g. pmu=off,sve=on)")
    return out


def parse_vector_lengths(text: str) -> list[int]:
    """``128,256,512`` (bits) -> sorted list; each a multiple of 128 up to SVE's architectural 2048."""
    out = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            bits = int(item, 0)
        except ValueError:
            raise ConfigError(f"--sve-vector-lengths: {item!r} is not a number of bits") from None
        if bits <= 0 or bits % 128 or bits > SVE_MAX_BITS:
            raise ConfigError(f"--sve-vector-lengths: {bits} is not an SVE vector length "
                              f"(a multiple of 128 bits, at most {SVE_MAX_BITS})")
        out.add(bits)
    if not out:
        raise ConfigError("--sve-vector-lengths: give at least one length in bits, e.g. 128,256")
    return sorted(out)


def offers(vm_fd) -> dict[CpuFeature, Offer]:
    """What KVM offers this VM (its own fd answers for its type)."""
    out = {}
    for feature, (caps, _bits) in FEATURE_CAPS.items():
        if feature is CpuFeature.ITS:
            try:
                vm_fd.create_device(uapi.KVM_DEV_TYPE_ARM_VGIC_ITS, test=True)
            except KvmError as err:
                out[feature] = Offer(False, f"{caps[0]} -> {err.errno_name}")
            else:
                out[feature] = Offer(True, f"{caps[0]} -> 0")
            continue
        answers = {name: vm_fd.check_extension(getattr(uapi, name)) for name in caps}
        out[feature] = Offer(all(answers.values()),
                             ", ".join(f"{n} = {v}" for n, v in answers.items()))
    return out


def resolve(request: FeatureRequest | None, offered: dict[CpuFeature, Offer], kind: str) -> FeatureSet:
    """Every offered feature unless switched off; a feature switched on that is not offered is a MissingFeature."""
    request = request or FeatureRequest()
    enabled, why = set(), {}
    for feature in CpuFeature:
        offer = offered[feature]
        wanted = request.switches.get(feature)
        if wanted and not offer.offered:
            raise MissingFeature(f"--cpu-features {feature.value}=on: KVM does not offer a {kind} VM "
                                 f"{feature.value.upper()} (on its VM fd: {offer.answer})")
        if wanted is False:
            why[feature] = "off (--cpu-features)"
        elif offer.offered:
            enabled.add(feature)
            why[feature] = "on (offered)" if wanted is None else "on (--cpu-features)"
        else:
            why[feature] = f"not offered to a {kind} VM (on its VM fd: {offer.answer})"
    if request.sve_vector_lengths is not None and CpuFeature.SVE not in enabled:
        raise ConfigError("--sve-vector-lengths needs SVE, which this VM does not have: " + why[CpuFeature.SVE])
    return FeatureSet(enabled, why)


# --- vCPU set-up for the features ------------------------------------------------------------------------

class FeatureSetupError(KvmError):
    """KVM refused a step of setting a feature up: the KVM error, and which feature and switch to turn it off."""

    def __init__(self, feature: CpuFeature, err: KvmError):
        super().__init__(err.call, err.errno)
        self.feature = feature

    def __str__(self) -> str:
        return (f"setting up {self.feature.value.upper()} failed: {super().__str__()} "
                f"(--cpu-features {self.feature.value}=off runs without it)")


@contextlib.contextmanager
def setting_up(feature: CpuFeature):
    try:
        yield
    except FeatureSetupError:
        raise
    except KvmError as err:
        raise FeatureSetupError(feature, err) from err


def vqs_from_vls(words: int) -> list[int]:
    """The KVM_REG_ARM64_SVE_VLS bitmap (bit vq-1) -> vector lengths in bits."""
    return [(i + 1) * 128 for i in range(a64.KVM_ARM64_SVE_VQ_MAX) if words >> i & 1]


def configure_sve(vcpu, lengths: list[int] | None) -> list[int]:
    """Before KVM_ARM_VCPU_FINALIZE: read the lengths KVM offers, keep ``lengths`` (None: all of them), finalize.
    Returns the lengths the vCPU has.  A length KVM does not offer is a ConfigError listing those it does."""
    offered_bits = vcpu.get_one_reg(a64.KVM_REG_ARM64_SVE_VLS)
    offered = vqs_from_vls(offered_bits)
    if lengths is not None:
        missing = [b for b in lengths if b not in offered]
        if missing:
            raise ConfigError(f"--sve-vector-lengths {','.join(map(str, missing))}: this host's KVM offers "
                              f"{','.join(map(str, offered))} bits")
        # KVM cannot hide single lengths, only cap them (ZCR_EL2.LEN): every offered length up to the largest
        needed = [b for b in offered if b <= max(lengths)]
        if needed != sorted(lengths):
            raise ConfigError(f"--sve-vector-lengths {','.join(map(str, lengths))}: KVM can only cap the vector "
                              f"length, so up to {max(lengths)} bits the vCPU has {','.join(map(str, needed))}")
        wanted = 0
        for bits in lengths:
            wanted |= 1 << (bits // 128 - 1)
        vcpu.set_one_reg(a64.KVM_REG_ARM64_SVE_VLS, wanted)
        offered = lengths
    vcpu.arm_vcpu_finalize(a64.KVM_ARM_VCPU_SVE)
    return offered


def set_pmu_irq(vcpu) -> None:
    """After the GIC device exists (before its CTRL_INIT): the PMU overflow interrupt, a PPI."""
    vcpu.set_device_attr(a64.KVM_ARM_VCPU_PMU_V3_CTRL, a64.KVM_ARM_VCPU_PMU_V3_IRQ, PMU_INTID, width=ctypes.c_int)


def init_pmu(vcpu) -> None:
    """After the GIC's CTRL_INIT (kvm_arm_pmu_v3_init wants an initialised vgic)."""
    vcpu.set_device_attr(a64.KVM_ARM_VCPU_PMU_V3_CTRL, a64.KVM_ARM_VCPU_PMU_V3_INIT)
