"""Mirror of Linux 7.2 ``arch/arm64/include/uapi/asm/kvm.h`` (the parts pyvmm uses)."""

from __future__ import annotations

import ctypes

u32, u64 = ctypes.c_uint32, ctypes.c_uint64


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [("hsr", u32), ("hsr_high", u32), ("far", u64)]


class kvm_guest_debug_arch(ctypes.Structure):
    _fields_ = [("dbg_bcr", u64 * 16), ("dbg_bvr", u64 * 16), ("dbg_wcr", u64 * 16), ("dbg_wvr", u64 * 16)]


class user_pt_regs(ctypes.Structure):
    _fields_ = [("regs", u64 * 31), ("sp", u64), ("pc", u64), ("pstate", u64)]


class user_fpsimd_state(ctypes.Structure):
    _fields_ = [("vregs", (u64 * 2) * 32), ("fpsr", u32), ("fpcr", u32), ("__reserved", u32 * 2)]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        ("regs", user_pt_regs),
        ("sp_el1", u64),
        ("elr_el1", u64),
        ("spsr", u64 * 5),
        ("fp_regs", user_fpsimd_state),
    ]


KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_ARM_COPROC_SHIFT = 16
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_FW = 0x0014 << KVM_REG_ARM_COPROC_SHIFT


def KVM_REG_ARM_CORE_REG(offset: int) -> int:
    """Core register id from a byte offset into ``struct kvm_regs`` (always 64-bit here)."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset // 4)


def core_reg_offset(path: str) -> int:
    """Byte offset of e.g. ``regs.pc`` or ``regs.regs[3]`` inside ``struct kvm_regs``."""
    offset, struct = 0, kvm_regs
    for part in path.split("."):
        name, _, index = part.partition("[")
        field = getattr(struct, name)
        offset += field.offset
        ftype = dict(struct._fields_)[name]
        if index:
            elem = ftype._type_
            offset += int(index.rstrip("]")) * ctypes.sizeof(elem)
            ftype = elem
        struct = ftype
    return offset


def ARM64_SYS_REG(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    return (
        KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
    )


KVM_REG_ARM_PSCI_VERSION = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | 0
MPIDR_EL1 = ARM64_SYS_REG(3, 0, 0, 0, 5)

# vCPU features for KVM_ARM_VCPU_INIT
KVM_ARM_VCPU_POWER_OFF = 0
KVM_ARM_VCPU_EL1_32BIT = 1
KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_VCPU_PMU_V3 = 3
KVM_ARM_VCPU_SVE = 4
KVM_ARM_VCPU_PTRAUTH_ADDRESS = 5
KVM_ARM_VCPU_PTRAUTH_GENERIC = 6

# GICv3 (KVM_DEV_TYPE_ARM_VGIC_V3) attributes
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_CTRL_INIT = 0
KVM_VGIC_V3_ADDR_TYPE_DIST = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST = 3
KVM_VGIC_V3_DIST_SIZE = 0x10000
KVM_VGIC_V3_REDIST_SIZE = 2 * 0x10000

# Architected timer (vCPU device attributes)
KVM_ARM_VCPU_TIMER_CTRL = 1
KVM_ARM_VCPU_TIMER_IRQ_VTIMER = 0
KVM_ARM_VCPU_TIMER_IRQ_PTIMER = 1

PSR_MODE_EL1h = 0x5
PSR_F_BIT = 0x40
PSR_I_BIT = 0x80
PSR_A_BIT = 0x100
PSR_D_BIT = 0x200
