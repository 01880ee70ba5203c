"""arm64 vCPU set-up: KVM_ARM_VCPU_INIT (PSCI 0.2), core registers through KVM_{GET,SET}_ONE_REG."""

from __future__ import annotations

import weakref

from ...kvm import uapi
from ...kvm import uapi_arm64 as a64
from ...kvm.errors import GuestMemoryError, KvmError
from ...kvm.vcpu import VcpuFd
from ...kvm.vm import VmFd
from .. import RegisterDump


def core(path: str) -> int:
    """ONE_REG id of a ``struct kvm_regs`` member; its size (U32/U64/U128) follows the member's type."""
    return a64.KVM_REG_ARM_CORE_REG(path)


PC = core("regs.pc")
PSTATE = core("regs.pstate")
SP_EL1 = core("sp_el1")
SP_EL0 = core("regs.sp")
X = [core(f"regs.regs[{i}]") for i in range(31)]
V = [core(f"fp_regs.vregs[{i}]") for i in range(32)]
FPSR = core("fp_regs.fpsr")
FPCR = core("fp_regs.fpcr")
# ELR_EL1 and SPSR_EL1 are core registers for userspace: their sysreg ids answer ENOENT.
ELR_EL1 = core("elr_el1")
SPSR_EL1 = core(f"spsr[{a64.KVM_SPSR_EL1}]")
ESR_EL1 = a64.ESR_EL1
FAR_EL1 = a64.FAR_EL1

# What a fault report shows, in display order.
REPORT_REGISTERS = [("pc", PC), ("pstate", PSTATE), ("sp_el0", SP_EL0), ("sp_el1", SP_EL1),
                    *((f"x{i}", X[i]) for i in range(31)), ("elr_el1", ELR_EL1), ("spsr_el1", SPSR_EL1),
                    ("esr_el1", a64.ESR_EL1), ("far_el1", a64.FAR_EL1), ("vbar_el1", a64.VBAR_EL1),
                    ("sctlr_el1", a64.SCTLR_EL1), ("ttbr0_el1", a64.TTBR0_EL1), ("ttbr1_el1", a64.TTBR1_EL1),
                    ("tcr_el1", a64.TCR_EL1), ("mpidr_el1", a64.MPIDR_EL1)]

# vCPUs of protected VMs (recorded by init_vcpus): a refusal of their registers is pKVM's doing.
_protected_vcpus: "weakref.WeakSet[VcpuFd]" = weakref.WeakSet()
# vCPUs with SVE: their reports add ZCR_EL1 (the vector length the guest chose); their V registers are the low
# 128 bits of the Z registers and KVM refuses them as core registers (fp_regs) once SVE is on.
_sve_vcpus: "weakref.WeakSet[VcpuFd]" = weakref.WeakSet()
BOOT_PSTATE = a64.PSR_MODE_EL1h | a64.PSR_A_BIT | a64.PSR_I_BIT | a64.PSR_F_BIT | a64.PSR_D_BIT


def init_vcpus(vm_fd: VmFd, vcpus: list[VcpuFd], extra_features: tuple[int, ...] = ()) -> None:
    """KVM_ARM_VCPU_INIT with the preferred target, PSCI 0.2 and ``extra_features`` (vCPU feature bit numbers:
    ``features.FeatureSet.vcpu_feature_bits``); secondaries start powered off."""
    for vcpu in vcpus:
        init = vm_fd.arm_preferred_target()
        features = (1 << a64.KVM_ARM_VCPU_PSCI_0_2)
        for f in extra_features:
            features |= 1 << f
        if vcpu.vcpu_id:
            features |= 1 << a64.KVM_ARM_VCPU_POWER_OFF
        init.features[0] = features
        vcpu.arm_vcpu_init(init)
        if vm_fd.vm_type & uapi.KVM_VM_TYPE_ARM_PROTECTED:
            _protected_vcpus.add(vcpu)
        if a64.KVM_ARM_VCPU_SVE in extra_features:
            _sve_vcpus.add(vcpu)


def enter(vcpu: VcpuFd, pc: int, args: dict[int, int]) -> None:
    """Start at ``pc`` in EL1h with interrupts masked; ``args`` maps register numbers to values (x0 = DTB, ...; firmware gets x0..x4)."""
    vcpu.set_one_reg(PSTATE, BOOT_PSTATE)
    for reg, value in args.items():
        vcpu.set_one_reg(X[reg], value)
    vcpu.set_one_reg(PC, pc)


def mpidr(vcpu_id: int) -> int:
    """The MPIDR affinity KVM gives vCPU ``vcpu_id`` (Aff0 = id % 16, Aff1 = id // 16)."""
    return ((vcpu_id // 16) << 8) | (vcpu_id % 16)


def registers(vcpu: VcpuFd, protected: bool | None = None) -> RegisterDump:
    """pc, pstate, sp_el0/1, x0-x30, elr/spsr/esr/far/vbar/sctlr/ttbr0/ttbr1/tcr/mpidr_el1, and zcr_el1 on a
    vCPU with SVE (the vector length its guest chose).  A register
    KVM refuses is listed in ``refused`` with the errno and, on a protected VM, that pKVM hides it.
    (pKVM in Linux 7.2 does not hide them: KVM_GET_ONE_REG answers a protected vCPU's real values.)"""
    if protected is None:
        protected = vcpu in _protected_vcpus
    values: dict[str, int] = {}
    refused: dict[str, str] = {}
    shown = REPORT_REGISTERS + ([("zcr_el1", a64.ZCR_EL1)] if vcpu in _sve_vcpus else [])
    for name, reg in shown:
        try:
            values[name] = vcpu.get_one_reg(reg)
        except KvmError as err:
            why = f"{err.call}: {err.errno_name} ({err.meaning})"
            refused[name] = why + ("; hidden by pKVM (protected VM)" if protected else "")
    return RegisterDump(values, refused)


# TCR_EL1 fields (Arm ARM D19.2): T0SZ[5:0] EPD0[7] TG0[15:14] T1SZ[21:16] EPD1[23] TG1[31:30]
_TG0_4K, _TG1_4K = 0b00, 0b10
_OA_MASK = (1 << 48) - 1


def code_address(vcpu: VcpuFd, vm) -> tuple[int | None, str]:
    """The guest-physical address of the PC: the PC itself with the stage-1 MMU off (SCTLR_EL1.M = 0),
    else a best-effort stage-1 walk (4K granule only; no LPA2) of the tables through ``vm.memory.read``
    (which refuses a protected guest's private pages)."""
    try:
        pc = vcpu.get_one_reg(PC)
        sctlr = vcpu.get_one_reg(a64.SCTLR_EL1)
    except KvmError as err:
        return None, f"registers unavailable: {err}"
    if not sctlr & 1:
        return pc, "MMU off (SCTLR_EL1.M = 0): the PC is a physical address"
    try:
        tcr = vcpu.get_one_reg(a64.TCR_EL1)
        upper = bool(pc >> 55 & 1)
        ttbr = vcpu.get_one_reg(a64.TTBR1_EL1 if upper else a64.TTBR0_EL1)
    except KvmError as err:
        return None, f"translation registers unavailable: {err}"
    n = 1 if upper else 0
    tsz = (tcr >> 16 if upper else tcr) & 0x3F
    tg = (tcr >> 30 if upper else tcr >> 14) & 0x3
    if tg != (_TG1_4K if upper else _TG0_4K):
        return None, f"TCR_EL1.TG{n} = {tg}: only the 4K granule is walked"
    if tcr >> (23 if upper else 7) & 1:
        return None, f"TCR_EL1.EPD{n} = 1: walks through TTBR{n}_EL1 are disabled, pc {pc:#x} faults"
    va_bits = 64 - tsz
    top = pc >> va_bits
    if top != (((1 << (64 - va_bits)) - 1) if upper else 0):
        return None, f"pc {pc:#x} is outside the {va_bits}-bit TTBR{n}_EL1 range"
    levels = -(-(va_bits - 12) // 9)
    table = ttbr & _OA_MASK & ~1  # BADDR; bit 0 is CnP
    for level in range(4 - levels, 4):
        shift = 12 + 9 * (3 - level)
        index = (pc >> shift) & ((1 << min(9, va_bits - shift)) - 1)
        try:
            desc = vm.memory.read_u64(table + index * 8)
        except GuestMemoryError as err:
            return None, f"cannot read the level-{level} table at {table:#x}: {err}"
        if not desc & 1:
            return None, f"pc {pc:#x} is not mapped (level-{level} descriptor {desc:#x} invalid)"
        if level == 3 or not desc & 2:  # page, or block
            if level == 3 and not desc & 2 or level == 0:
                return None, f"level-{level} descriptor {desc:#x} is reserved"
            out = desc & _OA_MASK & ~((1 << shift) - 1)
            return out | pc & ((1 << shift) - 1), f"stage-1 walk of pc {pc:#x} (TTBR{n}_EL1, 4K granule)"
        table = desc & _OA_MASK & ~0xFFF
    return None, "unreachable"
