"""Mirror of Linux 7.2 ``arch/x86/include/uapi/asm/kvm.h`` (the parts pyvmm uses).

Importable on any host.  The ioctl numbers whose size field comes from an x86 structure
(``KVM_GET_REGS``, ``KVM_SET_CPUID2``...) are computed here from these structures; ``uapi``
re-exports them when the host is x86_64.
"""

from __future__ import annotations

import ctypes

from ioctl_opt import IOR, IOW, IOWR

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

KVMIO = 0xAE  # linux/kvm.h (repeated here so this module does not import uapi)

KVM_NR_INTERRUPTS = 256

KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [(name, kvm_segment) for name in "cs ds es fs gs ss tr ldt".split()] + [
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_guest_debug_arch(ctypes.Structure):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; ``cpuid2_with(n)`` gives the variable-length form."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_with(nent: int) -> ctypes.Structure:
    class kvm_cpuid2_n(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]

    value = kvm_cpuid2_n()
    value.nent = nent
    return value


class _kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _kvm_vcpu_events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _kvm_vcpu_events_exception),
        ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _kvm_vcpu_events_smi),
        ("triple_fault", _kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020

KVM_X86_SHADOW_INT_MOV_SS = 0x01
KVM_X86_SHADOW_INT_STI = 0x02


class kvm_sync_regs(ctypes.Structure):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


# Control-register and EFER bits used by the long-mode set-up.
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# --- ioctl numbers whose size comes from an x86 structure ---------------------------------------
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_GET_REGS = IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, kvm_sregs)
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_VCPU_EVENTS = IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = IOW(KVMIO, 0xA0, kvm_vcpu_events)

# Every arch-specific ioctl number above, by name (uapi.ioctls_for() and the header test use it).
IOCTLS = {name: globals()[name] for name in (
    "KVM_GET_SUPPORTED_CPUID", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
    "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS")}
