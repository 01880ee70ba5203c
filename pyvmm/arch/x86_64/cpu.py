"""x86_64 vCPU set-up: real mode, or 64-bit long mode with a GDT and identity-mapped page tables."""

from __future__ import annotations

from ...kvm import uapi_x86 as x86
from ...kvm.vcpu import VcpuFd
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
    memory.write(layout.PD_ADDR, b"".join(((i << 21) | 0x83).to_bytes(8, "little") for i in range(4 * 512)))


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


def registers(vcpu: VcpuFd) -> dict[str, int]:
    """The registers a fault report shows."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    out = {name: getattr(regs, name) for name, _ in x86.kvm_regs._fields_}
    out.update(cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer,
               cs_selector=sregs.cs.selector, cs_base=sregs.cs.base, cs_long=sregs.cs.l)
    return out
