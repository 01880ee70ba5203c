"""What this host's KVM can do, straight from KVM_CHECK_EXTENSION (for ``pyvmm caps``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .arch import machine_name
from .hostinfo import kvm_arm_mode, page_size, pkvm_share_granule
from .kvm import Kvm, uapi
from .kvm.errors import KvmError, PyvmmError
from .arch.arm64.pkvm import ProtectedVmSupport, protected_vm_support
from .memory.backing import backing_availability

# (name, capability, asked on the VM fd rather than the system fd)
CAPABILITIES = [
    ("KVM_CAP_USER_MEMORY", uapi.KVM_CAP_USER_MEMORY, False),
    ("KVM_CAP_USER_MEMORY2", uapi.KVM_CAP_USER_MEMORY2, True),
    ("KVM_CAP_NR_MEMSLOTS", uapi.KVM_CAP_NR_MEMSLOTS, False),
    ("KVM_CAP_NR_VCPUS", uapi.KVM_CAP_NR_VCPUS, False),
    ("KVM_CAP_MAX_VCPUS", uapi.KVM_CAP_MAX_VCPUS, False),
    ("KVM_CAP_IMMEDIATE_EXIT", uapi.KVM_CAP_IMMEDIATE_EXIT, False),
    ("KVM_CAP_READONLY_MEM", uapi.KVM_CAP_READONLY_MEM, True),
    ("KVM_CAP_SYNC_MMU", uapi.KVM_CAP_SYNC_MMU, True),
    ("KVM_CAP_GUEST_MEMFD", uapi.KVM_CAP_GUEST_MEMFD, False),
    ("KVM_CAP_GUEST_MEMFD_FLAGS", uapi.KVM_CAP_GUEST_MEMFD_FLAGS, True),
    ("KVM_CAP_MEMORY_ATTRIBUTES", uapi.KVM_CAP_MEMORY_ATTRIBUTES, True),
    ("KVM_CAP_MEMORY_FAULT_INFO", uapi.KVM_CAP_MEMORY_FAULT_INFO, False),
    ("KVM_CAP_PRE_FAULT_MEMORY", uapi.KVM_CAP_PRE_FAULT_MEMORY, True),
    ("KVM_CAP_VM_TYPES", uapi.KVM_CAP_VM_TYPES, False),
    ("KVM_CAP_EXIT_HYPERCALL", uapi.KVM_CAP_EXIT_HYPERCALL, True),
    ("KVM_CAP_SYSTEM_EVENT_DATA", uapi.KVM_CAP_SYSTEM_EVENT_DATA, False),
    ("KVM_CAP_IRQCHIP", uapi.KVM_CAP_IRQCHIP, False),
    ("KVM_CAP_IOEVENTFD", uapi.KVM_CAP_IOEVENTFD, False),
    ("KVM_CAP_IRQFD", uapi.KVM_CAP_IRQFD, False),
    ("KVM_CAP_ONE_REG", uapi.KVM_CAP_ONE_REG, False),
    ("KVM_CAP_SET_GUEST_DEBUG", uapi.KVM_CAP_SET_GUEST_DEBUG, False),
    ("KVM_CAP_ARM_VM_IPA_SIZE", uapi.KVM_CAP_ARM_VM_IPA_SIZE, False),
    ("KVM_CAP_ARM_PSCI_0_2", uapi.KVM_CAP_ARM_PSCI_0_2, False),
    ("KVM_CAP_ARM_EL2", uapi.KVM_CAP_ARM_EL2, False),
    ("KVM_CAP_ARM_PROTECTED_VM", uapi.KVM_CAP_ARM_PROTECTED_VM, True),
]

# The few capabilities a fault report records (name, capability, asked on the VM fd): what decides
# how KVM reports a memory fault and which memory the VM may have.  On the VM fd where the answer
# depends on the VM (pKVM hides most capabilities from a protected VM: kvm_pkvm_ext_allowed).
REPORT_CAPABILITIES = [
    ("KVM_CAP_MEMORY_FAULT_INFO", uapi.KVM_CAP_MEMORY_FAULT_INFO, False),
    ("KVM_CAP_USER_MEMORY2", uapi.KVM_CAP_USER_MEMORY2, True),
    ("KVM_CAP_GUEST_MEMFD", uapi.KVM_CAP_GUEST_MEMFD, False),
    ("KVM_CAP_MEMORY_ATTRIBUTES", uapi.KVM_CAP_MEMORY_ATTRIBUTES, True),
    ("KVM_CAP_READONLY_MEM", uapi.KVM_CAP_READONLY_MEM, True),
    ("KVM_CAP_NR_MEMSLOTS", uapi.KVM_CAP_NR_MEMSLOTS, True),
    ("KVM_CAP_MAX_VCPUS", uapi.KVM_CAP_MAX_VCPUS, True),
    ("KVM_CAP_ARM_VM_IPA_SIZE", uapi.KVM_CAP_ARM_VM_IPA_SIZE, False),
    ("KVM_CAP_ARM_NISV_TO_USER", uapi.KVM_CAP_ARM_NISV_TO_USER, True),
]


def report_caps(kvm: Kvm, vm=None, arch: str | None = None) -> dict[str, int]:
    """KVM_CHECK_EXTENSION answers for a fault report (VM-fd questions asked on ``vm`` when given)."""
    arch = arch or machine_name()
    out: dict[str, int] = {}
    for name, cap, on_vm in REPORT_CAPABILITIES:
        if name.startswith("KVM_CAP_ARM_") and arch != "arm64":
            continue
        fd = vm if on_vm and vm is not None and not getattr(vm, "closed", False) else kvm
        try:
            out[name] = fd.check_extension(cap)
        except (KvmError, OSError, ValueError):
            out[name] = -1  # could not ask
    return out


X86_VM_TYPES = {0: "KVM_X86_DEFAULT_VM", 1: "KVM_X86_SW_PROTECTED_VM", 2: "KVM_X86_SEV_VM",
                3: "KVM_X86_SEV_ES_VM", 4: "KVM_X86_SNP_VM", 5: "KVM_X86_TDX_VM"}


@dataclass
class HostCaps:
    arch: str
    kvm_path: str
    api_version: int
    vcpu_mmap_size: int
    capabilities: dict[str, int] = field(default_factory=dict)
    vm_types: list[str] = field(default_factory=list)
    ipa_bits: int | None = None
    kvm_arm_mode: str | None = None
    protected_vm: ProtectedVmSupport | None = None
    backings: dict[str, str] = field(default_factory=dict)
    # arm64: per VM kind ("normal", "protected"), per feature (pmu, sve, ptrauth, its, debug): offered, KVM's answer
    features: dict[str, dict[str, dict]] = field(default_factory=dict)
    page_size: int = 0  # the host kernel's page size: memslots are in these units
    pkvm_granule: int | None = None  # what HYP_MEMINFO answers a protected guest (hostinfo.pkvm_share_granule)

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.protected_vm is not None:  # a plain record (pkvm.py), which asdict() leaves as it is
            out["protected_vm"] = self.protected_vm.as_dict()
        return out


def probe(kvm: Kvm) -> HostCaps:
    arch = machine_name()
    caps = HostCaps(arch, kvm.path, kvm.api_version(), kvm.vcpu_mmap_size(), page_size=page_size())
    with kvm.create_vm(0) as vm:
        for name, cap, on_vm in CAPABILITIES:
            if name.startswith("KVM_CAP_ARM_") and arch != "arm64":
                continue
            try:
                caps.capabilities[name] = (vm if on_vm else kvm).check_extension(cap)
            except KvmError:
                caps.capabilities[name] = 0
        caps.backings = backing_availability(vm)
        if arch == "arm64":
            caps.features["normal"] = arm64_feature_offers(vm)
    types = caps.capabilities.get("KVM_CAP_VM_TYPES", 0)
    if arch == "x86_64":
        caps.vm_types = [n for bit, n in X86_VM_TYPES.items() if types & (1 << bit)] or ["KVM_X86_DEFAULT_VM"]
    elif arch == "arm64":
        caps.ipa_bits = caps.capabilities.get("KVM_CAP_ARM_VM_IPA_SIZE") or 40
        caps.kvm_arm_mode = kvm_arm_mode()
    caps.protected_vm = protected_vm_support(kvm, arch)
    caps.pkvm_granule = pkvm_share_granule(arch == "arm64" and caps.protected_vm.available)
    if arch == "arm64":
        caps.vm_types = ["default"] + (["KVM_VM_TYPE_ARM_PROTECTED"] if caps.protected_vm.available else [])
        if caps.protected_vm.available:  # made as protected_vm_support made its own: that one answered
            try:
                with kvm.create_vm(uapi.KVM_VM_TYPE_ARM_PROTECTED) as vm:
                    caps.features["protected"] = arm64_feature_offers(vm)
            except PyvmmError as err:
                caps.features["protected"] = {"unavailable": {"offered": False, "answer": str(err)}}
    return caps


def arm64_feature_offers(vm) -> dict[str, dict]:
    """What KVM offers a VM of this kind, asked on its own fd (pKVM answers less for a protected VM)."""
    from .arch.arm64 import features

    out = {f.value: {"offered": o.offered, "answer": o.answer} for f, o in features.offers(vm).items()}
    debug = {name: vm.check_extension(getattr(uapi, name)) for name in features.DEBUG_CAPS}
    out["debug"] = {"offered": bool(debug["KVM_CAP_SET_GUEST_DEBUG"]),
                    "answer": ", ".join(f"{n} = {v}" for n, v in debug.items())}
    return out


def _kib(size: int) -> str:
    return f"{size >> 10} KiB ({size:#x})" if size >= 1024 and size % 1024 == 0 else f"{size} bytes"


def format_caps(caps: HostCaps) -> str:
    out = [f"KVM at {caps.kvm_path}: API version {caps.api_version}, {caps.arch}, "
           f"kvm_run is {caps.vcpu_mmap_size} bytes"]
    out.append(f"host page size: {_kib(caps.page_size)} (memslot addresses and sizes are multiples of it)")
    out.append("capabilities (KVM_CHECK_EXTENSION):")
    for name, value in caps.capabilities.items():
        shown = "no" if value == 0 else "yes" if value == 1 else f"{value} ({value:#x})"
        out.append(f"  {name:<28} {shown}")
    gm = caps.capabilities.get("KVM_CAP_GUEST_MEMFD_FLAGS", 0)
    if caps.capabilities.get("KVM_CAP_GUEST_MEMFD"):
        flags = [n for bit, n in ((uapi.GUEST_MEMFD_FLAG_MMAP, "MMAP"), (uapi.GUEST_MEMFD_FLAG_INIT_SHARED, "INIT_SHARED"))
                 if gm & bit]
        out.append(f"guest_memfd flags: {', '.join(flags) or 'none'}")
    out.append(f"VM types: {', '.join(caps.vm_types)}")
    if caps.ipa_bits is not None:
        out.append(f"IPA size: up to {caps.ipa_bits} bits; kvm-arm.mode={caps.kvm_arm_mode or '(default)'}")
    pv = caps.protected_vm
    out.append(f"protected VMs: {'yes, ' + pv.abi + ' ABI' if pv.available else 'no'} ({pv.reason})")
    if caps.pkvm_granule:
        out.append(f"pKVM memory-sharing granule: {_kib(caps.pkvm_granule)} (HYP_MEMINFO answers the hypervisor's "
                   "PAGE_SIZE, the host's: a protected guest shares and unshares memory in these units)")
    if caps.features:
        kinds = list(caps.features)
        out.append("arm64 features by VM type (KVM_CHECK_EXTENSION on a fresh VM of each type; pyvmm run turns on "
                   "what is offered, --cpu-features switches):")
        out.append("  " + f"{'feature':<9}" + "".join(f"{k:<11}" for k in kinds) + "what KVM answered")
        for name in caps.features[kinds[0]]:
            cells = "".join(f"{'yes' if caps.features[k].get(name, {}).get('offered') else 'no':<11}" for k in kinds)
            answers = " | ".join(f"{k}: {caps.features[k].get(name, caps.features[k].get('unavailable'))['answer']}"
                                 for k in kinds) if len(kinds) > 1 else caps.features[kinds[0]][name]["answer"]
            out.append(f"  {name:<9}{cells}{answers}")
    out.append("memory backings:")
    for name, state in caps.backings.items():
        out.append(f"  {name:<16} {state}")
    return "\n".join(out)

