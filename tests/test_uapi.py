"""The ctypes mirrors match the kernel's own uapi headers (Linux 7.2, from Debian sid's linux-libc-dev),
for x86_64 and arm64 alike, whatever the host.

Nothing is listed by hand: every structure a mirror module defines is walked through ``_fields_``
(nested structures, unions and ``kvm_run``'s anonymous exit union included), and each struct's size,
each member's offset and size, every ioctl number and every integer constant is compared with what
the C compiler says for the same name.  The x86_64 side is compiled with ``gcc`` (or
``x86_64-linux-gnu-gcc``), the arm64 side with ``aarch64-linux-gnu-gcc``; the numbers come out of
``gcc -S`` through asm markers (as the kernel's asm-offsets does), so nothing has to run.
Mirror-only padding (fields named ``_pad*``) is skipped.  ``scripts/dev setup`` installs the cross
compiler and fetches the headers (scripts/fetch-uapi-headers).
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import re
import shutil
import subprocess

import pytest

from pyvmm.kvm import uapi, uapi_arm64, uapi_dmabuf, uapi_x86

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARCHES = {
    # name: (mirror module, Debian multiarch triplet, compilers to try, extra headers)
    "x86_64": (uapi_x86, "x86_64-linux-gnu", ["x86_64-linux-gnu-gcc"], ["asm/processor-flags.h"]),
    "arm64": (uapi_arm64, "aarch64-linux-gnu", ["aarch64-linux-gnu-gcc"], []),
}
HEADERS = ["linux/kvm.h", "linux/udmabuf.h", "linux/dma-heap.h", "linux/dma-buf.h"]

# Constants the mirrors define that are not uapi macros, and why.
NOT_IN_UAPI = {
    "KVM_CAP_ARM_PROTECTED_VM": "Android's pKVM ABI, not upstream",
    "KVM_CAP_ARM_PROTECTED_VM_FLAGS_SET_FW_IPA": "Android's pKVM ABI, not upstream",
    "KVM_CAP_ARM_PROTECTED_VM_FLAGS_INFO": "Android's pKVM ABI, not upstream",
    "EFER_LME": "x86 MSR bit (msr-index.h is not uapi)",
    "EFER_LMA": "x86 MSR bit (msr-index.h is not uapi)",
    **{name: "system register id: architecture name, encoded with uapi's ARM64_SYS_REG"
       for name in ("MPIDR_EL1", "SCTLR_EL1", "TTBR0_EL1", "TTBR1_EL1", "TCR_EL1", "SPSR_EL1", "ELR_EL1",
                    "ESR_EL1", "FAR_EL1", "VBAR_EL1", "ZCR_EL1")},
    "KVM_REG_ARM_PSCI_VERSION": "uapi spells it KVM_REG_ARM_PSCI_VERSION too, checked below by expression",
}
# (op0, op1, CRn, CRm, op2) from the Arm ARM, for the sysreg ids above.
SYSREGS = {
    "MPIDR_EL1": (3, 0, 0, 0, 5), "SCTLR_EL1": (3, 0, 1, 0, 0), "TTBR0_EL1": (3, 0, 2, 0, 0),
    "TTBR1_EL1": (3, 0, 2, 0, 1), "TCR_EL1": (3, 0, 2, 0, 2), "SPSR_EL1": (3, 0, 4, 0, 0),
    "ELR_EL1": (3, 0, 4, 0, 1), "ESR_EL1": (3, 0, 5, 2, 0), "FAR_EL1": (3, 0, 6, 0, 0),
    "VBAR_EL1": (3, 0, 12, 0, 0), "ZCR_EL1": (3, 0, 1, 2, 0),
}


# --- what the mirrors say -------------------------------------------------------------------------
def mirrored_structs(arch_mod) -> dict[str, type]:
    """Every public structure the mirror modules define for ``arch_mod``, by C tag."""
    out: dict[str, type] = {}
    for mod in (uapi, arch_mod, uapi_dmabuf):
        for name, obj in vars(mod).items():
            if (isinstance(obj, type) and issubclass(obj, (ctypes.Structure, ctypes.Union))
                    and not name.startswith("_") and obj.__module__ == mod.__name__):
                out[name] = obj
    out["kvm_run"] = uapi.kvm_run_for(arch_mod)
    out["kvm_guest_debug"] = uapi.kvm_guest_debug_for(arch_mod)
    return out


def members(cls: type, prefix: str = "", base: int = 0):
    """``(C member designator, offset, size)`` for every member, recursively; anonymous members
    (``_anonymous_``) add no name of their own, as in C."""
    anonymous = getattr(cls, "_anonymous_", ())
    for name, ftype, *_ in cls._fields_:
        if name.startswith("_pad"):
            continue
        offset = base + getattr(cls, name).offset
        path = prefix if name in anonymous else prefix + name
        if name not in anonymous:
            yield path, offset, ctypes.sizeof(ftype)
        if issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            yield from members(ftype, path if name in anonymous else path + ".", offset)
        elif issubclass(ftype, ctypes.Array) and issubclass(ftype._type_, (ctypes.Structure, ctypes.Union)):
            yield from members(ftype._type_, f"{path}[0].", offset)


def int_constants(*mods) -> dict[str, int]:
    """Integer constants; uapi's re-exports of an arch module's names are left to that arch."""
    out = {}
    for mod in mods:
        for name, value in vars(mod).items():
            if mod is uapi and any(hasattr(arch_mod, name) for arch_mod, *_ in ARCHES.values()):
                continue
            if name[:1].isupper() and isinstance(value, int) and not isinstance(value, bool):
                out[name] = value
    return out


def checks_for(arch: str) -> list[tuple[str, str, int, str]]:
    """``(what, C expression, mirror value, kind)``; kind "const" expressions may be undefined macros."""
    arch_mod = ARCHES[arch][0]
    out = []
    for tag, cls in mirrored_structs(arch_mod).items():
        out.append((f"sizeof(struct {tag})", f"sizeof(struct {tag})", ctypes.sizeof(cls), "layout"))
        for path, offset, size in members(cls):
            out.append((f"offsetof(struct {tag}, {path})", f"__builtin_offsetof(struct {tag}, {path})", offset,
                        "layout"))
            if size:  # size 0: a flexible array member, which has no sizeof in C
                out.append((f"sizeof(struct {tag}.{path})", f"sizeof(((struct {tag} *)0)->{path})", size, "layout"))
    ioctls = {**uapi.ioctls_for(arch_mod), "UDMABUF_CREATE": uapi_dmabuf.UDMABUF_CREATE,
              "DMA_HEAP_IOCTL_ALLOC": uapi_dmabuf.DMA_HEAP_IOCTL_ALLOC,
              "DMA_BUF_IOCTL_SYNC": uapi_dmabuf.DMA_BUF_IOCTL_SYNC}
    for name, value in ioctls.items():
        out.append((name, name, value, "ioctl"))
    every_arch_ioctl = {name for mod, *_ in ARCHES.values() for name in uapi.ioctls_for(mod)}
    for name, value in int_constants(uapi, arch_mod, uapi_dmabuf).items():
        # uapi's plain ioctl names are the host's: compared above, per arch, through ioctls_for()
        if name not in every_arch_ioctl and name not in NOT_IN_UAPI:
            out.append((name, name, value, "const"))
    if arch == "arm64":
        for path, offset, size in uapi_arm64.core_reg_fields():
            expr = (f"KVM_REG_ARM64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG({path}) | "
                    f"((__u64)__builtin_ctz(sizeof(((struct kvm_regs *)0)->{path})) << KVM_REG_SIZE_SHIFT)")
            out.append((f"core register id {path}", expr, uapi_arm64.KVM_REG_ARM_CORE_REG(path), "regid"))
        for name, enc in SYSREGS.items():
            out.append((f"{name} = ARM64_SYS_REG{enc}", "ARM64_SYS_REG(%d, %d, %d, %d, %d)" % enc,
                        getattr(uapi_arm64, name), "regid"))
        out.append(("KVM_REG_ARM_PSCI_VERSION", "KVM_REG_ARM_PSCI_VERSION", uapi_arm64.KVM_REG_ARM_PSCI_VERSION,
                    "regid"))
    return out


# --- what the headers say -------------------------------------------------------------------------
def uapi_include_dir() -> str | None:
    env = os.environ.get("PYVMM_UAPI_INCLUDE")
    if env:
        return env
    found = [d for d in glob.glob(os.path.join(ROOT, ".cache", "uapi", "*", "usr", "include"))
             if os.path.isfile(os.path.join(d, "linux", "kvm.h"))]
    return max(found, key=os.path.getmtime) if found else None


def compiler_for(arch: str) -> str | None:
    names = list(ARCHES[arch][2])
    if {"x86_64": "x86_64", "arm64": "aarch64"}[arch] == platform.machine().lower().replace("arm64", "aarch64"):
        names.append("gcc")
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


MARK_RE = re.compile(r'"->(\d+) [$#]?(-?\d+|undef)')


def header_values(arch: str, checks, tmp_path) -> dict[int, int | None]:
    include, cc = uapi_include_dir(), compiler_for(arch)
    missing = []
    if cc is None:
        missing.append(f"a C compiler for {arch} ({' or '.join(ARCHES[arch][2])}; Debian package "
                       f"{'gcc' if arch == 'x86_64' else 'gcc-aarch64-linux-gnu'})")
    if include is None:
        missing.append("Linux 7.2's uapi headers (Debian sid's linux-libc-dev: scripts/fetch-uapi-headers, "
                       "or scripts/dev setup)")
    if missing:
        if os.environ.get("PYVMM_REQUIRE_UAPI") == "1":  # CI: the check must run, not skip
            pytest.fail("PYVMM_REQUIRE_UAPI=1 but missing " + " and ".join(missing))
        pytest.skip("missing " + " and ".join(missing))
    lines = [f"#include <{h}>" for h in HEADERS + ARCHES[arch][3]]
    lines += ["#define offsetof(type, member) __builtin_offsetof(type, member)  /* no libc: -nostdinc */",
              "#define SZ_64K 0x00010000  /* arm64's KVM_VGIC_V3_*_SIZE use it; only linux/sizes.h (not uapi) has it */",
              '#define MARK(tag, val) asm volatile(".ascii \\"->" tag " %0\\\\n\\"" :: "i"((unsigned long long)(val)))',
              '#define UNDEF(tag) asm volatile(".ascii \\"->" tag " undef\\\\n\\"")',
              "void pyvmm_uapi_check(void) {"]
    for i, (_, expr, _, kind) in enumerate(checks):
        if kind == "const":
            lines += [f"#ifdef {expr}", f'MARK("{i}", {expr});', "#else", f'UNDEF("{i}");', "#endif"]
        else:
            lines.append(f'MARK("{i}", {expr});')
    lines.append("}")
    src = tmp_path / f"uapi-{arch}.c"
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([cc, "-S", "-o", "-", "-nostdinc", "-I", include, "-I",
                           os.path.join(include, ARCHES[arch][1]), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{cc} failed on {src}:\n{proc.stderr[-4000:]}"
    out: dict[int, int | None] = {}
    for m in MARK_RE.finditer(proc.stdout):
        out[int(m.group(1))] = None if m.group(2) == "undef" else int(m.group(2)) & 0xFFFFFFFFFFFFFFFF
    assert len(out) == len(checks), "some markers are missing from the compiler's output"
    return out


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_mirrors_match_kernel_headers(arch, tmp_path):
    checks = checks_for(arch)
    values = header_values(arch, checks, tmp_path)
    wrong = [f"{what}: pyvmm {mine:#x}, header {values[i]:#x}"
             for i, (what, _, mine, _) in enumerate(checks) if values[i] is not None and values[i] != mine]
    undefined = [what for i, (what, _, _, kind) in enumerate(checks) if values[i] is None]
    assert not wrong, f"{arch}: {len(wrong)} differences from the kernel's headers:\n" + "\n".join(wrong)
    assert not undefined, f"{arch}: not macros in the kernel's uapi headers (misnamed?): {undefined}"
    kinds = {kind for *_, kind in checks}
    assert kinds >= {"layout", "ioctl", "const"}
    # the walk reached the nested kvm_run members the run loop and the reports read
    whats = {what for what, *_ in checks}
    for member in ("io.data_offset", "mmio.is_write", "system_event.ndata", "memory_fault.gpa",
                   "arm_nisv.fault_ipa", "s.regs", "emulation_failure.insn_bytes", "debug.arch"):
        assert f"offsetof(struct kvm_run, {member})" in whats


def test_walk_covers_every_struct_and_skips_mirror_padding():
    for arch, (mod, *_) in ARCHES.items():
        structs = mirrored_structs(mod)
        for tag in ("kvm_userspace_memory_region2", "kvm_create_guest_memfd", "kvm_memory_attributes",
                    "kvm_guest_debug", "kvm_one_reg", "kvm_enable_cap", "kvm_device_attr",
                    "kvm_irqfd", "kvm_ioeventfd", "kvm_signal_mask", "kvm_translation", "kvm_regs",
                    "kvm_vcpu_events", "kvm_sync_regs", "udmabuf_create", "dma_heap_allocation_data", "dma_buf_sync"):
            assert tag in structs, (arch, tag)
    assert {"kvm_sregs", "kvm_segment", "kvm_dtable", "kvm_cpuid_entry2"} <= set(mirrored_structs(uapi_x86))
    assert {"user_pt_regs", "user_fpsimd_state", "kvm_vcpu_init"} <= set(mirrored_structs(uapi_arm64))
    paths = [p for p, *_ in members(uapi_arm64.kvm_regs)]
    assert "fp_regs" in paths and not any("_pad" in p for p in paths)


# --- values that do not need a compiler -------------------------------------------------------------
def test_arm64_kvm_regs_layout():
    """user_fpsimd_state.vregs is __uint128_t[32]: fp_regs is 16-byte aligned."""
    assert uapi_arm64.kvm_regs.fp_regs.offset == 336
    assert ctypes.sizeof(uapi_arm64.user_fpsimd_state) == 528
    assert ctypes.sizeof(uapi_arm64.kvm_regs) == 864


def test_ioctl_numbers():
    # Values from the kernel headers (7.2), computed independently of ioctl-opt.
    assert uapi.KVM_CREATE_VM == 0xAE01
    assert uapi.KVM_RUN == 0xAE80
    assert uapi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert uapi.KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
    assert uapi.KVM_CREATE_GUEST_MEMFD == 0xC040AED4
    assert uapi.KVM_GET_ONE_REG == 0x4010AEAB
    assert uapi.KVM_SET_SIGNAL_MASK == 0x4004AE8B
    assert uapi.KVM_TRANSLATE == 0xC018AE85
    x86, arm64 = uapi.ioctls_for(uapi_x86), uapi.ioctls_for(uapi_arm64)
    assert x86["KVM_GET_REGS"] == 0x8090AE81 and arm64["KVM_GET_REGS"] == 0x8360AE81  # 144 vs 864 bytes
    assert x86["KVM_GET_SREGS"] == 0x8138AE83
    assert x86["KVM_GET_VCPU_EVENTS"] == 0x8040AE9F
    assert x86["KVM_SET_GUEST_DEBUG"] == 0x4048AE9B and arm64["KVM_SET_GUEST_DEBUG"] == 0x4208AE9B
    assert arm64["KVM_ARM_VCPU_INIT"] == 0x4020AEAE and arm64["KVM_ARM_PREFERRED_TARGET"] == 0x8020AEAF
    assert "KVM_SET_CPUID2" in x86 and "KVM_SET_CPUID2" not in arm64
    assert "KVM_ARM_VCPU_INIT" in arm64 and "KVM_ARM_VCPU_INIT" not in x86
    host = uapi.ioctls_for(uapi.HOST_ARCH)
    assert (uapi.KVM_GET_REGS, uapi.KVM_SET_GUEST_DEBUG) == (host["KVM_GET_REGS"], host["KVM_SET_GUEST_DEBUG"])


def test_both_arches_kvm_run():
    x86, arm64 = uapi.kvm_run_for(uapi_x86), uapi.kvm_run_for(uapi_arm64)
    assert x86 is not arm64 and uapi.kvm_run is uapi.kvm_run_for(uapi.HOST_ARCH)
    assert ctypes.sizeof(x86) == ctypes.sizeof(arm64) == 2352
    assert x86.s.size == arm64.s.size == uapi.SYNC_REGS_SIZE_BYTES
    assert x86.kvm_valid_regs.offset == arm64.kvm_valid_regs.offset == 288


def test_arm64_register_ids():
    """Documentation/virt/kvm/api.rst, "ARM64 core/FP-SIMD registers": the size bits follow the member."""
    core = uapi_arm64.KVM_REG_ARM_CORE_REG
    assert core("regs.regs[0]") == 0x6030000000100000
    assert core("regs.pc") == 0x6030000000100040
    assert core("sp_el1") == 0x6030000000100044
    assert core("elr_el1") == 0x6030000000100046
    assert core(f"spsr[{uapi_arm64.KVM_SPSR_EL1}]") == 0x6030000000100048
    assert core("fp_regs.vregs[0]") == 0x6040000000100054
    assert core("fp_regs.vregs[31]") == 0x60400000001000D0
    assert core("fp_regs.fpsr") == 0x60200000001000D4
    assert core("fp_regs.fpcr") == 0x60200000001000D5
    assert core(uapi_arm64.core_reg_offset("regs.pc")) == core("regs.pc")  # by byte offset too
    assert uapi_arm64.MPIDR_EL1 == 0x603000000013C005
    assert uapi_arm64.SCTLR_EL1 == 0x603000000013C080
    assert uapi_arm64.ESR_EL1 == 0x603000000013C290
    with pytest.raises(ValueError):
        core("fp_regs.__reserved[0]")


def test_signal_mask_carries_the_sigset():
    mask = uapi.kvm_signal_mask_with(bytes([0x01, 0, 0, 0, 0, 0, 0, 0x80]))
    assert mask.len == 8 and bytes(mask)[4:] == bytes([0x01, 0, 0, 0, 0, 0, 0, 0x80])
    assert ctypes.sizeof(uapi.kvm_signal_mask) == 4


def test_protected_vm_type_is_passed_unsigned(monkeypatch):
    """KVM_VM_TYPE_ARM_PROTECTED is bit 31: create_vm must hand it to ioctl(2) as unsigned long, not a C int."""
    from pyvmm.kvm import ioctl as ioctl_mod
    from pyvmm.kvm.errors import KvmError
    from pyvmm.kvm.system import Kvm

    seen = []

    def fake_ioctl(fd, request, arg):
        seen.append((request, arg))
        return -1 if request == uapi.KVM_CREATE_VM else 12

    monkeypatch.setattr(ioctl_mod, "_ioctl", fake_ioctl)
    monkeypatch.setattr(ctypes, "get_errno", lambda: 22)
    kvm = Kvm.__new__(Kvm)
    kvm._fd = 0  # never a real ioctl: _ioctl is replaced
    with pytest.raises(KvmError) as info:
        kvm.create_vm(uapi.KVM_VM_TYPE_ARM_PROTECTED | 40)
    kvm._fd = -1
    assert (uapi.KVM_CREATE_VM, 0x80000028) in seen
    assert info.value.call == "KVM_CREATE_VM" and info.value.errno == 22
