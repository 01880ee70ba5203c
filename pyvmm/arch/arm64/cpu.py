"""arm64 vCPU set-up: KVM_ARM_VCPU_INIT (PSCI 0.2), core registers through KVM_{GET,SET}_ONE_REG."""

from __future__ import annotations

from ...kvm import uapi_arm64 as a64
from ...kvm.errors import KvmError
from ...kvm.vcpu import VcpuFd
from ...kvm.vm import VmFd


def core(path: str) -> int:
    return a64.KVM_REG_ARM_CORE_REG(a64.core_reg_offset(path))


PC = core("regs.pc")
PSTATE = core("regs.pstate")
SP_EL1 = core("sp_el1")
SP_EL0 = core("regs.sp")
X = [core(f"regs.regs[{i}]") for i in range(31)]
ESR_EL1 = a64.ARM64_SYS_REG(3, 0, 5, 2, 0)
FAR_EL1 = a64.ARM64_SYS_REG(3, 0, 6, 0, 0)
BOOT_PSTATE = a64.PSR_MODE_EL1h | a64.PSR_A_BIT | a64.PSR_I_BIT | a64.PSR_F_BIT | a64.PSR_D_BIT


def default_features(vm_fd: VmFd) -> tuple[int, ...]:
    """Pointer authentication when KVM offers both halves: a guest that sees it in its ID registers
    (a protected VM's do) but runs on a vCPU without it takes UNDEF at its first key write."""
    from ...kvm import uapi

    if vm_fd.check_extension(uapi.KVM_CAP_ARM_PTRAUTH_ADDRESS) and vm_fd.check_extension(uapi.KVM_CAP_ARM_PTRAUTH_GENERIC):
        return (a64.KVM_ARM_VCPU_PTRAUTH_ADDRESS, a64.KVM_ARM_VCPU_PTRAUTH_GENERIC)
    return ()


def init_vcpus(vm_fd: VmFd, vcpus: list[VcpuFd], extra_features: tuple[int, ...] | None = None) -> None:
    """KVM_ARM_VCPU_INIT with the preferred target, PSCI 0.2 and ``extra_features`` (default: ptrauth
    where available); secondaries start powered off."""
    if extra_features is None:
        extra_features = default_features(vm_fd)
    for vcpu in vcpus:
        init = vm_fd.arm_preferred_target()
        features = (1 << a64.KVM_ARM_VCPU_PSCI_0_2)
        for f in extra_features:
            features |= 1 << f
        if vcpu.vcpu_id:
            features |= 1 << a64.KVM_ARM_VCPU_POWER_OFF
        init.features[0] = features
        vcpu.arm_vcpu_init(init)


def enter(vcpu: VcpuFd, pc: int, args: dict[int, int]) -> None:
    """Start at ``pc`` in EL1h with interrupts masked; ``args`` sets x0..x3."""
    vcpu.set_one_reg(PSTATE, BOOT_PSTATE)
    for reg, value in args.items():
        vcpu.set_one_reg(X[reg], value)
    vcpu.set_one_reg(PC, pc)


def mpidr(vcpu_id: int) -> int:
    """The MPIDR affinity KVM gives vCPU ``vcpu_id`` (Aff0 = id % 16, Aff1 = id // 16)."""
    return ((vcpu_id // 16) << 8) | (vcpu_id % 16)


def registers(vcpu: VcpuFd) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, reg in [("pc", PC), ("pstate", PSTATE), ("sp_el1", SP_EL1), ("sp_el0", SP_EL0),
                      *((f"x{i}", X[i]) for i in range(31)), ("esr_el1", ESR_EL1), ("far_el1", FAR_EL1)]:
        try:
            out[name] = vcpu.get_one_reg(reg)
        except KvmError:  # a protected VM's registers are the guest's: KVM may refuse
            continue
    return out
