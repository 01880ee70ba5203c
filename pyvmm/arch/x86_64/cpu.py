"""x86_64 vCPU set-up: real mode, or 64-bit long mode with a GDT and identity-mapped page tables."""

from __future__ import annotations

import ctypes
import struct

from ...kvm import uapi_x86 as x86
from ...kvm.errors import KvmError
from ...kvm.vcpu import VcpuFd
from .. import RegisterDump
from ...memory.regions import GuestMemory
from . import layout

# GDT descriptors (flat, base 0, limit 4 GiB).  Index * 8 = selector.
GDT_ENTRIES = [
    0x0000000000000000,  # 0x00 null
    0x0000000000000000,  # 0x08 unused
    0x00AF9B000000FFFF,  # 0x10 64-bit code (L=1), DPL0
    0x00CF93000000FFFF,  # 0x18 data, read/write
]


def _segment_from_descriptor(selector: int) -> x86.kvm_segment:
    desc = GDT_ENTRIES[selector >> 3]
    seg = x86.kvm_segment()
    seg.base = ((desc >> 16) & 0xFFFFFF) | ((desc >> 32) & 0xFF000000)
    limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF0000)
    seg.g = (desc >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.selector = selector
    seg.type = (desc >> 40) & 0xF
    seg.s = (desc >> 44) & 1
    seg.dpl = (desc >> 45) & 3
    seg.present = (desc >> 47) & 1
    seg.avl = (desc >> 52) & 1
    seg.l = (desc >> 53) & 1
    seg.db = (desc >> 54) & 1
    return seg


def write_boot_tables(memory: GuestMemory) -> None:
    """GDT and a 4 GiB identity map of 2 MiB pages (covers RAM and the MMIO hole)."""
    memory.write(layout.GDT_ADDR, b"".join(e.to_bytes(8, "little") for e in GDT_ENTRIES))
    memory.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | 0x3)
    memory.write(layout.PDPT_ADDR, b"".join(((layout.PD_ADDR + i * 0x1000) | 0x3).to_bytes(8, "little")
                                            for i in range(4)))
    pages = 4 * 512  # 2 MiB pages, present | writable | PS: entry i is (i << 21) | 0x83 (one pack call, not 2048)
    memory.write(layout.PD_ADDR, struct.pack(f"<{pages}Q", *range(0x83, pages << 21, 1 << 21)))


def set_cpuid(vcpu: VcpuFd, supported) -> None:
    vcpu.set_cpuid2(supported)


def enter_long_mode(vcpu: VcpuFd, entry: int, stack: int, args: dict[str, int]) -> None:
    """Start ``vcpu`` in 64-bit mode at ``entry``; ``args`` sets general registers (rdi, rsi...)."""
    sregs = vcpu.get_sregs()
    code = _segment_from_descriptor(layout.BOOT_CS)
    data = _segment_from_descriptor(layout.BOOT_DS)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0  # any exception becomes a triple fault: KVM_EXIT_SHUTDOWN
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = x86.X86_CR4_PAE
    sregs.cr0 = x86.X86_CR0_PE | x86.X86_CR0_PG | x86.X86_CR0_ET | x86.X86_CR0_NE
    sregs.efer = x86.EFER_LME | x86.EFER_LMA
    vcpu.set_sregs(sregs)
    regs = x86.kvm_regs()
    regs.rip = entry
    regs.rsp = stack
    regs.rflags = 0x2
    for name, value in args.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)


def enter_real_mode(vcpu: VcpuFd, load_addr: int, entry: int, stack: int, args: dict[str, int]) -> None:
    """Start ``vcpu`` in real mode with CS based at ``load_addr`` (16-byte aligned, below 1 MiB)."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        seg.base = load_addr if name == "cs" else 0
        seg.selector = load_addr >> 4 if name == "cs" else 0
        seg.limit = 0xFFFF
    vcpu.set_sregs(sregs)
    regs = x86.kvm_regs()
    regs.rip = entry - load_addr
    regs.rsp = stack
    regs.rflags = 0x2
    for name, value in args.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)


SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def segment_attrs(seg: x86.kvm_segment) -> int:
    """A segment's attributes packed as VMX's access-rights field: type[3:0] s[4] dpl[6:5] p[7] avl[12]
    l[13] db[14] g[15] unusable[16]."""
    return (seg.type | seg.s << 4 | seg.dpl << 5 | seg.present << 7 | seg.avl << 12 | seg.l << 13 | seg.db << 14
            | seg.g << 15 | seg.unusable << 16)


def _refusal(err: KvmError) -> str:
    return f"{err.call}: {err.errno_name} ({err.meaning})"


def _flatten(struct: ctypes.Structure, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for name, ftype in struct._fields_:
        if name in ("pad", "reserved"):
            continue
        value = getattr(struct, name)
        if isinstance(value, ctypes.Structure):
            out.update(_flatten(value, f"{prefix}{name}_"))
        else:
            out[prefix + name] = value
    return out


def registers(vcpu: VcpuFd) -> RegisterDump:
    """The registers a fault report shows: GPRs, rip, rflags, every segment (selector, base, limit,
    attrs), gdt/idt, control registers, efer, apic_base; ``events`` from KVM_GET_VCPU_EVENTS."""
    values: dict[str, int] = {}
    refused: dict[str, str] = {}
    gprs = [name for name, _ in x86.kvm_regs._fields_]
    try:
        regs = vcpu.get_regs()
        values.update((name, getattr(regs, name)) for name in gprs)
    except KvmError as err:  # e.g. a guest whose state KVM keeps encrypted (SEV-ES, TDX)
        refused.update((name, _refusal(err)) for name in gprs)
    sreg_names = [f"{seg}_{part}" for seg in SEGMENTS for part in ("selector", "base", "limit", "attrs")]
    sreg_names += ["gdt_base", "gdt_limit", "idt_base", "idt_limit", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                   "apic_base"]
    try:
        sregs = vcpu.get_sregs()
    except KvmError as err:
        refused.update((name, _refusal(err)) for name in sreg_names)
    else:
        for name in SEGMENTS:
            seg = getattr(sregs, name)
            values.update({f"{name}_selector": seg.selector, f"{name}_base": seg.base, f"{name}_limit": seg.limit,
                           f"{name}_attrs": segment_attrs(seg)})
        values.update(gdt_base=sregs.gdt.base, gdt_limit=sregs.gdt.limit, idt_base=sregs.idt.base,
                      idt_limit=sregs.idt.limit, cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4,
                      cr8=sregs.cr8, efer=sregs.efer, apic_base=sregs.apic_base)
    events = None
    try:
        events = _flatten(vcpu.get_vcpu_events())
    except KvmError as err:
        refused["events"] = _refusal(err)
    return RegisterDump(values, refused, events)


def code_address(vcpu: VcpuFd) -> tuple[int | None, str]:
    """The guest-physical address of CS:RIP: cs.base + ip in real mode or with paging off, else
    KVM_TRANSLATE of the linear address through the guest's page tables."""
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except KvmError as err:
        return None, f"registers unavailable: {_refusal(err)}"
    if not sregs.cr0 & x86.X86_CR0_PE:
        return sregs.cs.base + (regs.rip & 0xFFFF), "real mode: cs.base + ip"
    long_mode = bool(sregs.efer & x86.EFER_LMA) and sregs.cs.l
    linear = regs.rip if long_mode else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
    if not sregs.cr0 & x86.X86_CR0_PG:
        return linear, "paging off: cs.base + rip"
    try:
        tr = vcpu.translate(linear)
    except KvmError as err:
        return None, f"cannot translate rip {linear:#x}: {_refusal(err)}"
    if not tr.valid:
        return None, f"rip {linear:#x} is not mapped by the guest's page tables (KVM_TRANSLATE: not valid)"
    return tr.physical_address, f"KVM_TRANSLATE of rip {linear:#x}"
