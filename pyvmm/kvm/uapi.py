"""Mirror of Linux 7.2 ``include/uapi/linux/kvm.h`` (the parts pyvmm uses).

Names are the kernel's, one to one, so that a reader can grep the kernel for any
of them.  Architecture-specific structures live in ``uapi_x86`` and
``uapi_arm64``; ``udmabuf.h`` and ``dma-heap.h`` live in ``uapi_dmabuf``.
Ioctl numbers are computed with ``ioctl-opt`` from the same structures.

Both architectures' mirrors are importable on any host.  The few structures of
this header that embed an arch structure (``struct kvm_run``, ``struct
kvm_guest_debug``) exist once per arch: ``kvm_run_for(uapi_arm64)``,
``kvm_guest_debug_for(uapi_x86)``; ``ioctls_for(arch)`` gives every ioctl
number as that arch's headers define it.  The plain names (``kvm_run``,
``KVM_GET_REGS``, ``KVM_SET_GUEST_DEBUG``...) are the host's.

Fields whose names start with ``_pad`` exist only in the mirror (explicit
alignment padding ctypes cannot express otherwise); tests/test_uapi.py skips them.
"""

from __future__ import annotations

import ctypes
import functools
import os
from types import ModuleType

from ioctl_opt import IO, IOR, IOW, IOWR

from . import uapi_arm64, uapi_x86

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
s16, s32 = ctypes.c_int16, ctypes.c_int32

KVMIO = 0xAE
KVM_API_VERSION = 12

# --- memslots -------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
        ("guest_memfd_offset", u64),
        ("guest_memfd", u32),
        ("pad1", u32),
        ("pad2", u64 * 14),
    ]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2


class kvm_memory_attributes(ctypes.Structure):
    _fields_ = [("address", u64), ("size", u64), ("attributes", u64), ("flags", u64)]


KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3


class kvm_create_guest_memfd(ctypes.Structure):
    _fields_ = [("size", u64), ("flags", u64), ("reserved", u64 * 6)]


GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

# --- misc structures ------------------------------------------------------


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_one_reg(ctypes.Structure):
    _fields_ = [("id", u64), ("addr", u64)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_create_device(ctypes.Structure):
    _fields_ = [("type", u32), ("fd", u32), ("flags", u32)]


class kvm_device_attr(ctypes.Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


kvm_vcpu_init = uapi_arm64.kvm_vcpu_init  # arm64's asm/kvm.h; re-exported for VmFd/VcpuFd


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << 3
KVM_IOEVENTFD_VALID_FLAG_MASK = (1 << 5) - 1  # kvm_ioeventfd_flag_nr_max = 5 (fast_mmio is bit 4)


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_signal_mask(ctypes.Structure):
    """Header only (``__u32 len; __u8 sigset[]``); ``kvm_signal_mask_with(sigset)`` gives the whole thing."""

    _fields_ = [("len", u32), ("sigset", u8 * 0)]


def kvm_signal_mask_with(sigset: bytes) -> ctypes.Structure:
    """A ``struct kvm_signal_mask`` carrying ``sigset`` (the kernel's sigset_t: 8 bytes on x86_64 and arm64)."""

    class kvm_signal_mask_n(ctypes.Structure):
        _fields_ = [("len", u32), ("sigset", u8 * len(sigset))]

    value = kvm_signal_mask_n()
    value.len = len(sigset)
    ctypes.memmove(value.sigset, sigset, len(sigset))
    return value


class kvm_translation(ctypes.Structure):
    """KVM_TRANSLATE (x86): guest linear address in, guest-physical address out."""

    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_STOPPED = 5

# --- struct kvm_run -------------------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_ARM_SEA = 41

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5

KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

ARCHES = {"x86_64": uapi_x86, "arm64": uapi_arm64}
# The host's arch module: the plain names below (kvm_run, KVM_GET_REGS...) are its.
HOST_ARCH = uapi_arm64 if os.uname().machine.lower() in ("aarch64", "arm64") else uapi_x86  # platform.machine()
kvm_debug_exit_arch = HOST_ARCH.kvm_debug_exit_arch


class _hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _hypercall(ctypes.Structure):
    _fields_ = [("nr", u64), ("args", u64 * 6), ("ret", u64), ("flags", u64)]


class _internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _emulation_failure(ctypes.Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class _system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _arm_nisv(ctypes.Structure):
    _fields_ = [("esr_iss", u64), ("fault_ipa", u64)]


class _memory_fault(ctypes.Structure):
    _fields_ = [("flags", u64), ("gpa", u64), ("size", u64)]


class _arm_sea(ctypes.Structure):
    _fields_ = [("flags", u64), ("esr", u64), ("gva", u64), ("gpa", u64)]


SYNC_REGS_SIZE_BYTES = 2048


@functools.cache
def _arch_structs(arch: ModuleType) -> dict[str, type]:
    """The structures of this header that embed ``arch``'s (one set per arch module, built once)."""

    class _debug(ctypes.Structure):
        _fields_ = [("arch", arch.kvm_debug_exit_arch)]

    class _kvm_run_exit(ctypes.Union):  # anonymous in C: members are reached as run.io, run.mmio...
        _fields_ = [
            ("hw", _hw),
            ("fail_entry", _fail_entry),
            ("ex", _ex),
            ("io", _io),
            ("debug", _debug),
            ("mmio", _mmio),
            ("hypercall", _hypercall),
            ("internal", _internal),
            ("emulation_failure", _emulation_failure),
            ("system_event", _system_event),
            ("arm_nisv", _arm_nisv),
            ("memory_fault", _memory_fault),
            ("arm_sea", _arm_sea),
            ("padding", ctypes.c_char * 256),
        ]

    class _kvm_run_s(ctypes.Union):
        _fields_ = [("regs", arch.kvm_sync_regs), ("padding", ctypes.c_char * SYNC_REGS_SIZE_BYTES)]

    class kvm_run(ctypes.Structure):
        _anonymous_ = ("u",)
        _fields_ = [
            ("request_interrupt_window", u8),
            ("immediate_exit", u8),
            ("padding1", u8 * 6),
            ("exit_reason", u32),
            ("ready_for_interrupt_injection", u8),
            ("if_flag", u8),
            ("flags", u16),
            ("cr8", u64),
            ("apic_base", u64),
            ("u", _kvm_run_exit),
            ("kvm_valid_regs", u64),
            ("kvm_dirty_regs", u64),
            ("s", _kvm_run_s),
        ]

    class kvm_guest_debug(ctypes.Structure):
        _fields_ = [("control", u32), ("pad", u32), ("arch", arch.kvm_guest_debug_arch)]

    return {"_debug": _debug, "_kvm_run_exit": _kvm_run_exit, "_kvm_run_s": _kvm_run_s, "kvm_run": kvm_run,
            "kvm_guest_debug": kvm_guest_debug}


def kvm_run_for(arch: ModuleType) -> type:
    """``struct kvm_run`` as laid out for ``arch`` (``uapi_x86`` or ``uapi_arm64``)."""
    return _arch_structs(arch)["kvm_run"]


def kvm_guest_debug_for(arch: ModuleType) -> type:
    """``struct kvm_guest_debug`` as laid out for ``arch``."""
    return _arch_structs(arch)["kvm_guest_debug"]


_debug = _arch_structs(HOST_ARCH)["_debug"]
_kvm_run_exit = _arch_structs(HOST_ARCH)["_kvm_run_exit"]
_kvm_run_s = _arch_structs(HOST_ARCH)["_kvm_run_s"]
kvm_run = kvm_run_for(HOST_ARCH)
kvm_guest_debug = kvm_guest_debug_for(HOST_ARCH)


# --- VM types ---------------------------------------------------------------

KVM_VM_TYPE_ARM_IPA_SIZE_MASK = 0xFF
KVM_VM_TYPE_ARM_PROTECTED = 1 << 31
KVM_X86_DEFAULT_VM = uapi_x86.KVM_X86_DEFAULT_VM  # x86's asm/kvm.h; re-exported
KVM_X86_SW_PROTECTED_VM = uapi_x86.KVM_X86_SW_PROTECTED_VM

# --- capabilities -----------------------------------------------------------

KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_ONE_REG = 70
KVM_CAP_READONLY_MEM = 81
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_GUEST_DEBUG_HW_WPS = 120
KVM_CAP_ARM_PMU_V3 = 126
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_ARM_SVE = 170
KVM_CAP_ARM_PTRAUTH_ADDRESS = 171
KVM_CAP_ARM_PTRAUTH_GENERIC = 172
KVM_CAP_ARM_NISV_TO_USER = 177
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_ARM_MTE = 205
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_ARM_EL2 = 240
KVM_CAP_GUEST_MEMFD_FLAGS = 244
# Android's pKVM ABI (not upstream): KVM_ENABLE_CAP flags for pvmfw.
KVM_CAP_ARM_PROTECTED_VM = 0xFFBADAB1
KVM_CAP_ARM_PROTECTED_VM_FLAGS_SET_FW_IPA = 0
KVM_CAP_ARM_PROTECTED_VM_FLAGS_INFO = 1

# --- device types (KVM_CREATE_DEVICE) ---------------------------------------

KVM_DEV_TYPE_ARM_VGIC_V2 = 5
KVM_DEV_TYPE_ARM_VGIC_V3 = 7
KVM_DEV_TYPE_ARM_VGIC_ITS = 8

# --- ioctl numbers ----------------------------------------------------------
# The same on every arch (their structures are fixed-width); arch-specific ones are at the end.
_BEFORE_IOCTLS = set(globals())
# system
KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
# VM
KVM_CREATE_VCPU = IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, u64)
KVM_SET_USER_MEMORY_REGION2 = IOW(KVMIO, 0x49, kvm_userspace_memory_region2)
KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)
KVM_IRQ_LINE = IOW(KVMIO, 0x61, kvm_irq_level)
KVM_IRQFD = IOW(KVMIO, 0x76, kvm_irqfd)
KVM_IOEVENTFD = IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_CREATE_DEVICE = IOWR(KVMIO, 0xE0, kvm_create_device)
KVM_SET_MEMORY_ATTRIBUTES = IOW(KVMIO, 0xD2, kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD = IOWR(KVMIO, 0xD4, kvm_create_guest_memfd)
# device (also VM and vCPU for the attr calls)
KVM_SET_DEVICE_ATTR = IOW(KVMIO, 0xE1, kvm_device_attr)
KVM_GET_DEVICE_ATTR = IOW(KVMIO, 0xE2, kvm_device_attr)
KVM_HAS_DEVICE_ATTR = IOW(KVMIO, 0xE3, kvm_device_attr)
# vCPU
KVM_RUN = IO(KVMIO, 0x80)
KVM_TRANSLATE = IOWR(KVMIO, 0x85, kvm_translation)
KVM_SET_SIGNAL_MASK = IOW(KVMIO, 0x8B, kvm_signal_mask)
KVM_GET_MP_STATE = IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_ONE_REG = IOW(KVMIO, 0xAB, kvm_one_reg)
KVM_SET_ONE_REG = IOW(KVMIO, 0xAC, kvm_one_reg)
KVM_ARM_VCPU_FINALIZE = IOW(KVMIO, 0xC2, ctypes.c_int)

GENERIC_IOCTLS = {name: value for name, value in globals().items()
                  if name.startswith("KVM_") and name not in _BEFORE_IOCTLS}
del _BEFORE_IOCTLS


def ioctls_for(arch: ModuleType) -> dict[str, int]:
    """Every ioctl number pyvmm knows, as ``arch``'s headers define it (name -> number)."""
    return {**GENERIC_IOCTLS, "KVM_SET_GUEST_DEBUG": IOW(KVMIO, 0x9B, kvm_guest_debug_for(arch)), **arch.IOCTLS}


# The host's arch-specific numbers, under their plain names (vcpu.py, vm.py and system.py use them):
# KVM_SET_GUEST_DEBUG, KVM_{GET,SET}_{REGS,SREGS,VCPU_EVENTS}, and the host's own: x86's
# KVM_GET_SUPPORTED_CPUID, KVM_{SET,GET}_CPUID2; arm64's KVM_ARM_VCPU_INIT, KVM_ARM_PREFERRED_TARGET.
# An ioctl the host's arch does not have is not defined here (see uapi_x86.IOCTLS, uapi_arm64.IOCTLS).
KVM_SET_GUEST_DEBUG = IOW(KVMIO, 0x9B, kvm_guest_debug)
globals().update(HOST_ARCH.IOCTLS)


EXIT_REASON_NAMES = {
    value: name
    for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_") and isinstance(value, int)
}


def exit_reason_name(reason: int) -> str:
    return EXIT_REASON_NAMES.get(reason, f"KVM_EXIT_{reason}")
