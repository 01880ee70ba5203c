"""Mirror of Linux 7.2 ``arch/arm64/include/uapi/asm/kvm.h`` (the parts pyvmm uses).

Importable on any host: nothing here depends on the machine Python runs on.  The ioctl numbers whose
size field comes from an arm64 structure (``KVM_GET_REGS``...) are computed here from these
structures; ``uapi`` re-exports them when the host is arm64.
"""

from __future__ import annotations

import ctypes

from ioctl_opt import IOR, IOW

u8, u32, u64 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64
# __uint128_t: ctypes has no 128-bit integer; two u64 give the size (16) but only 8-byte alignment,
# so a structure holding one needs explicit padding wherever C would align it to 16 (see kvm_regs).
uint128 = u64 * 2

KVMIO = 0xAE  # linux/kvm.h (repeated here so this module does not import uapi)

KVM_SPSR_EL1 = 0
KVM_SPSR_SVC = KVM_SPSR_EL1
KVM_SPSR_ABT = 1
KVM_SPSR_UND = 2
KVM_SPSR_IRQ = 3
KVM_SPSR_FIQ = 4
KVM_NR_SPSR = 5
KVM_ARM_MAX_DBG_REGS = 16


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [("hsr", u32), ("hsr_high", u32), ("far", u64)]


class kvm_guest_debug_arch(ctypes.Structure):
    _fields_ = [(name, u64 * KVM_ARM_MAX_DBG_REGS) for name in ("dbg_bcr", "dbg_bvr", "dbg_wcr", "dbg_wvr")]


class kvm_vcpu_init(ctypes.Structure):
    _fields_ = [("target", u32), ("features", u32 * 7)]


class user_pt_regs(ctypes.Structure):  # asm/ptrace.h
    _fields_ = [("regs", u64 * 31), ("sp", u64), ("pc", u64), ("pstate", u64)]


class user_fpsimd_state(ctypes.Structure):  # asm/ptrace.h; 16-byte aligned in C (vregs)
    _fields_ = [("vregs", uint128 * 32), ("fpsr", u32), ("fpcr", u32), ("__reserved", u32 * 2)]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        ("regs", user_pt_regs),
        ("sp_el1", u64),
        ("elr_el1", u64),
        ("spsr", u64 * KVM_NR_SPSR),
        # Mirror-only: C aligns fp_regs (vregs is __uint128_t) to 16, so it starts at 336, not 328;
        # Python 3.11's ctypes has no _align_.  Fields named _pad* are not in the kernel's header.
        ("_pad_fp_regs", u8 * 8),
        ("fp_regs", user_fpsimd_state),
    ]


class kvm_sregs(ctypes.Structure):  # empty on arm64 (KVM_GET_SREGS is x86's)
    _fields_ = []


class kvm_sync_regs(ctypes.Structure):
    _fields_ = [("device_irq_level", u64)]


class _kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [("serror_pending", u8), ("serror_has_esr", u8), ("ext_dabt_pending", u8), ("pad", u8 * 5),
                ("serror_esr", u64)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [("exception", _kvm_vcpu_events_exception), ("reserved", u32 * 12)]


KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_U128 = 0x0040000000000000
KVM_REG_SIZE_U512 = 0x0060000000000000
KVM_REG_ARM_COPROC_SHIFT = 16
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_FW = 0x0014 << KVM_REG_ARM_COPROC_SHIFT


def core_reg_fields(struct: type = kvm_regs, prefix: str = "", base: int = 0):
    """Every core register of ``struct kvm_regs``: ``(path, byte offset, size in bytes)``, in order.

    A path is C syntax (``regs.pc``, ``regs.regs[3]``, ``spsr[0]``, ``fp_regs.vregs[31]``); mirror-only
    padding and ``__reserved`` (not registers: KVM refuses them) are left out."""
    for name, ftype in struct._fields_:
        if name.startswith(("_pad", "__reserved")):
            continue
        path, offset = prefix + name, base + getattr(struct, name).offset
        if isinstance(ftype, type) and issubclass(ftype, ctypes.Structure):
            yield from core_reg_fields(ftype, path + ".", offset)
        elif isinstance(ftype, type) and issubclass(ftype, ctypes.Array) and ftype is not uint128:
            elem = ftype._type_
            for i in range(ftype._length_):
                yield f"{path}[{i}]", offset + i * ctypes.sizeof(elem), ctypes.sizeof(elem)
        else:
            yield path, offset, ctypes.sizeof(ftype)


_CORE = {path: (offset, size) for path, offset, size in core_reg_fields()}
_CORE_BY_OFFSET = {offset: (offset, size) for offset, size in _CORE.values()}


def core_reg_offset(path: str) -> int:
    """Byte offset of e.g. ``regs.pc`` or ``regs.regs[3]`` inside ``struct kvm_regs``."""
    try:
        return _CORE[path.replace(" ", "")][0]
    except KeyError:
        raise ValueError(f"no core register {path!r} in struct kvm_regs") from None


def KVM_REG_SIZE(size: int) -> int:
    """The KVM_REG_SIZE_* bits for a register of ``size`` bytes."""
    if size & (size - 1) or not 1 <= size <= 256:
        raise ValueError(f"no KVM_REG_SIZE_* for {size} bytes")
    return (size.bit_length() - 1) << KVM_REG_SIZE_SHIFT


def KVM_REG_ARM_CORE_REG(reg: str | int) -> int:
    """ONE_REG id of a core register, named by its path in ``struct kvm_regs`` (or its byte offset).

    The kernel's macro of this name gives only the index (offset / 4); this returns the whole id, with
    KVM_REG_SIZE_* from the member's type: U64 for x0-x30/sp/pc/pstate/sp_el1/elr_el1/spsr[],
    U128 for the V registers, U32 for fpsr/fpcr (Documentation/virt/kvm/api.rst, "ARM64 registers")."""
    try:
        offset, size = _CORE[reg.replace(" ", "")] if isinstance(reg, str) else _CORE_BY_OFFSET[reg]
    except KeyError:
        raise ValueError(f"no core register {reg!r} in struct kvm_regs") from None
    return KVM_REG_ARM64 | KVM_REG_SIZE(size) | KVM_REG_ARM_CORE | (offset // 4)


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

# System registers by (op0, op1, CRn, CRm, op2), as the Arm ARM encodes them.  The sysreg names are
# the architecture's (uapi has no names for them).  Userspace reads ELR_EL1 and SPSR_EL1 as the core
# registers ``elr_el1`` and ``spsr[KVM_SPSR_EL1]``; the sysreg ids below are what KVM's sys_regs table
# uses for them.
MPIDR_EL1 = ARM64_SYS_REG(3, 0, 0, 0, 5)
SCTLR_EL1 = ARM64_SYS_REG(3, 0, 1, 0, 0)
TTBR0_EL1 = ARM64_SYS_REG(3, 0, 2, 0, 0)
TTBR1_EL1 = ARM64_SYS_REG(3, 0, 2, 0, 1)
TCR_EL1 = ARM64_SYS_REG(3, 0, 2, 0, 2)
SPSR_EL1 = ARM64_SYS_REG(3, 0, 4, 0, 0)
ELR_EL1 = ARM64_SYS_REG(3, 0, 4, 0, 1)
ESR_EL1 = ARM64_SYS_REG(3, 0, 5, 2, 0)
FAR_EL1 = ARM64_SYS_REG(3, 0, 6, 0, 0)
VBAR_EL1 = ARM64_SYS_REG(3, 0, 12, 0, 0)
ZCR_EL1 = ARM64_SYS_REG(3, 0, 1, 2, 0)  # SVE: the EL1 vector length (LEN, in quadwords - 1)

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
KVM_VGIC_ITS_ADDR_TYPE = 4  # the ITS's KVM_DEV_ARM_VGIC_GRP_ADDR attribute (KVM_DEV_TYPE_ARM_VGIC_ITS)
KVM_VGIC_V3_ITS_SIZE = 2 * 0x10000

# PMUv3 (vCPU device attributes, feature KVM_ARM_VCPU_PMU_V3)
KVM_ARM_VCPU_PMU_V3_CTRL = 0
KVM_ARM_VCPU_PMU_V3_IRQ = 0
KVM_ARM_VCPU_PMU_V3_INIT = 1

# SVE (feature KVM_ARM_VCPU_SVE): the vector lengths pseudo-register, a bitmap of VQ (128-bit quadwords)
KVM_REG_ARM64_SVE = 0x15 << KVM_REG_ARM_COPROC_SHIFT
KVM_ARM64_SVE_VQ_MIN = 1
KVM_ARM64_SVE_VQ_MAX = 512
KVM_ARM64_SVE_VLS_WORDS = (KVM_ARM64_SVE_VQ_MAX - KVM_ARM64_SVE_VQ_MIN) // 64 + 1
KVM_REG_ARM64_SVE_VLS = KVM_REG_ARM64 | KVM_REG_ARM64_SVE | KVM_REG_SIZE_U512 | 0xFFFF

# PSCI SYSTEM_RESET2 / SYSTEM_OFF2 exits: KVM_EXIT_SYSTEM_EVENT data[0] flags
KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2 = 1 << 0
KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2 = 1 << 0

# Architected timer (vCPU device attributes)
KVM_ARM_VCPU_TIMER_CTRL = 1
KVM_ARM_VCPU_TIMER_IRQ_VTIMER = 0
KVM_ARM_VCPU_TIMER_IRQ_PTIMER = 1

PSR_MODE_EL1h = 0x5
PSR_F_BIT = 0x40
PSR_I_BIT = 0x80
PSR_A_BIT = 0x100
PSR_D_BIT = 0x200

# --- ioctl numbers whose size comes from an arm64 structure -------------------------------------
KVM_GET_REGS = IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_VCPU_EVENTS = IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_ARM_VCPU_INIT = IOW(KVMIO, 0xAE, kvm_vcpu_init)
KVM_ARM_PREFERRED_TARGET = IOR(KVMIO, 0xAF, kvm_vcpu_init)

# Every arch-specific ioctl number above, by name (uapi.ioctls_for() and the header test use it).
IOCTLS = {name: globals()[name] for name in (
    "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS",
    "KVM_ARM_VCPU_INIT", "KVM_ARM_PREFERRED_TARGET")}
