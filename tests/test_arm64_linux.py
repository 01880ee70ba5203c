"""Debian's own arm64 kernel (the lab's 7.2 Image) boots as a pyvmm guest to a busybox initramfs that
prints a line on the UART and powers off, on a normal and on a protected VM (run in the lab)."""

from __future__ import annotations

import os

import pytest

from pyvmm.outcome import ExitKind
from pyvmm.vm import Vm
from tests.arm64 import require_arm64_kvm, require_pkvm, require_protected_linux

IMAGE = "/opt/lab/Image"
INITRD = "/opt/lab/guest-initrd.cpio"


@pytest.mark.parametrize("kind", ["normal", "protected"])
@pytest.mark.timeout(420)
def test_debian_kernel_boots_to_userspace(kind):
    require_arm64_kvm()
    if not (os.path.exists(IMAGE) and os.path.exists(INITRD)):
        pytest.skip(f"{IMAGE} and {INITRD} are made by the lab (scripts/lab test)")
    if kind == "protected":
        require_pkvm()
        require_protected_linux()
    with Vm(protected=kind == "protected") as vm:
        vm.add_memory(256 << 20)
        vm.create_vcpus(1)
        # oops=panic panic=-1: a guest crash resets (PSCI SYSTEM_RESET) and ends the run at once
        vm.boot(IMAGE, initrd=INITRD,
                cmdline="console=ttyS0 earlycon=uart8250,mmio,0x9000000 oops=panic panic=-1 quiet")
        outcome = vm.run(timeout=300)
        console = vm.console.text()
    assert "pyvmm-guest: Linux 7.2" in console, console[-3000:]
    assert outcome.kind is ExitKind.POWER_OFF, (outcome.detail, console[-3000:])
