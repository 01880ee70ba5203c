"""The host kernel's command line and the one setting pyvmm reads there, kvm-arm.mode (pKVM needs "protected").

Apart from hostinfo.py (which re-exports both) so that making an arm64 VM, which asks for kvm-arm.mode, does not
import hostinfo's other facts and their dataclasses."""

from __future__ import annotations


def kernel_cmdline() -> str:
    try:
        with open("/proc/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def kvm_arm_mode() -> str | None:
    """kvm-arm.mode from the kernel command line (pKVM needs "protected")."""
    for word in kernel_cmdline().split():
        if word.startswith("kvm-arm.mode="):
            return word.split("=", 1)[1]
    return None
