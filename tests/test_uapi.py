"""The ctypes mirrors match the C layout of the kernel's uapi headers (checked with the host's gcc)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from pyvmm.kvm import uapi, uapi_arm64, uapi_x86

STRUCTS = {
    "struct kvm_run": uapi.kvm_run,
    "struct kvm_userspace_memory_region": uapi.kvm_userspace_memory_region,
    "struct kvm_regs": uapi_x86.kvm_regs,
    "struct kvm_sregs": uapi_x86.kvm_sregs,
    "struct kvm_segment": uapi_x86.kvm_segment,
    "struct kvm_enable_cap": uapi.kvm_enable_cap,
    "struct kvm_one_reg": uapi.kvm_one_reg,
    "struct kvm_device_attr": uapi.kvm_device_attr,
    "struct kvm_create_device": uapi.kvm_create_device,
    "struct kvm_ioeventfd": uapi.kvm_ioeventfd,
    "struct kvm_irqfd": uapi.kvm_irqfd,
    "struct kvm_cpuid_entry2": uapi_x86.kvm_cpuid_entry2,
}
OFFSETS = {
    ("struct kvm_run", "exit_reason"): uapi.kvm_run.exit_reason.offset,
    ("struct kvm_run", "mmio.phys_addr"): uapi.kvm_run.u.offset,
    ("struct kvm_run", "kvm_valid_regs"): uapi.kvm_run.kvm_valid_regs.offset,
    ("struct kvm_run", "s"): uapi.kvm_run.s.offset,
}


def test_layout_matches_c_headers(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src = tmp_path / "sizes.c"
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in STRUCTS:
        lines.append(f'printf("%zu\\n", sizeof({name}));')
    for (name, field) in OFFSETS:
        lines.append(f'printf("%zu\\n", offsetof({name}, {field}));')
    lines += ["return 0;", "}"]
    src.write_text("\n".join(lines))
    exe = tmp_path / "sizes"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    values = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    expected = [ctypes.sizeof(s) for s in STRUCTS.values()] + list(OFFSETS.values())
    assert values == expected


def test_ioctl_numbers():
    # Values from the kernel headers (7.2), computed independently of ioctl-opt.
    assert uapi.KVM_CREATE_VM == 0xAE01
    assert uapi.KVM_RUN == 0xAE80
    assert uapi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert uapi.KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
    assert uapi.KVM_CREATE_GUEST_MEMFD == 0xC040AED4
    assert uapi.KVM_ARM_VCPU_INIT == 0x4020AEAE
    assert uapi.KVM_GET_ONE_REG == 0x4010AEAB


def test_arm64_core_register_ids():
    pc = uapi_arm64.KVM_REG_ARM_CORE_REG(uapi_arm64.core_reg_offset("regs.pc"))
    assert pc == 0x6030000000100040
    x0 = uapi_arm64.KVM_REG_ARM_CORE_REG(uapi_arm64.core_reg_offset("regs.regs[0]"))
    assert x0 == 0x6030000000100000
    assert ctypes.sizeof(uapi_arm64.kvm_regs) == 848 + 8  # user_pt_regs .. fp_regs, as in asm/kvm.h


def test_protected_vm_type_is_passed_unsigned():
    """KVM_VM_TYPE_ARM_PROTECTED is bit 31: it must go to ioctl as unsigned long, not a C int."""
    from pyvmm.kvm import ioctl as ioctl_mod

    arg = ctypes.c_ulong(uapi.KVM_VM_TYPE_ARM_PROTECTED | 40).value
    assert arg == 0x80000028
    assert ioctl_mod._ioctl.argtypes[2] is ctypes.c_void_p  # pointer-sized, carries the full value
