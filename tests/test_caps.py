"""`pyvmm caps`: the host's page size and, with pKVM, the memory-sharing granule a protected guest is told
(HYP_MEMINFO).  The real command on this host (4 KiB here; in the lab 4 KiB, or 16 KiB with scripts/lab --pages 16k,
where the pKVM line appears), and the text for a 16 KiB-page pKVM host from its facts."""

from __future__ import annotations

import json
import mmap
import re

import pytest

from pyvmm.arch.arm64.pkvm import ProtectedVmSupport
from pyvmm.caps import HostCaps, format_caps
from tests.conftest import run_cli


@pytest.mark.timeout(120)
def test_caps_reports_the_host_page_size_and_the_pkvm_granule(kvm_device):
    res = run_cli("caps", "--json")
    assert res.returncode == 0, res.stderr
    caps = json.loads(res.stdout)
    assert caps["page_size"] == mmap.PAGESIZE
    protected = caps["arch"] == "arm64" and caps["protected_vm"]["available"]
    # pKVM's hypervisor answers HYP_MEMINFO with its PAGE_SIZE, the host kernel's (kvm_handle_pvm_hvc64)
    assert caps["pkvm_granule"] == (mmap.PAGESIZE if protected else None)
    text = run_cli("caps").stdout
    kib = mmap.PAGESIZE >> 10
    line = f"host page size: {kib} KiB ({mmap.PAGESIZE:#x}) (memslot addresses and sizes are multiples of it)"
    assert f"\n{line}\n" in text, text
    granule = re.findall(r"^pKVM memory-sharing granule: (\d+) KiB \((0x[0-9a-f]+)\) \(HYP_MEMINFO answers", text, re.M)
    assert granule == ([(str(kib), f"{mmap.PAGESIZE:#x}")] if protected else []), text


def test_caps_text_for_a_16k_pkvm_host():
    pv = ProtectedVmSupport(True, "upstream", "KVM_CREATE_VM accepts KVM_VM_TYPE_ARM_PROTECTED (upstream ABI)")
    caps = HostCaps("arm64", "/dev/kvm", 12, 32768, vm_types=["default", "KVM_VM_TYPE_ARM_PROTECTED"], ipa_bits=48,
                    kvm_arm_mode="protected", protected_vm=pv, page_size=16384, pkvm_granule=16384)
    lines = format_caps(caps).splitlines()
    assert lines[1] == "host page size: 16 KiB (0x4000) (memslot addresses and sizes are multiples of it)"
    assert ("pKVM memory-sharing granule: 16 KiB (0x4000) (HYP_MEMINFO answers the hypervisor's PAGE_SIZE, the "
            "host's: a protected guest shares and unshares memory in these units)") in lines
    without = HostCaps("x86_64", "/dev/kvm", 12, 12288, protected_vm=ProtectedVmSupport(False, None, "x86"),
                       page_size=4096)
    text = format_caps(without)
    assert "host page size: 4 KiB (0x1000)" in text and "pKVM memory-sharing granule" not in text
