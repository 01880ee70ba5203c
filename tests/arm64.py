"""Helpers for the arm64 tests (they run inside the lab: scripts/lab test)."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRMWARE = os.path.join(ROOT, "firmware", "arm64", "build")


def require_arm64_kvm() -> None:
    from pyvmm.arch import machine_name

    if machine_name() != "arm64":
        pytest.skip("arm64 guests need an arm64 host with KVM (run them in the lab: scripts/lab test)")
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this arm64 host")
    if not os.path.exists(os.path.join(FIRMWARE, "hello")):
        pytest.skip("arm64 test guests are not built (make -C firmware/arm64)")


def require_pkvm() -> None:
    from pyvmm.caps import protected_vm_support
    from pyvmm.kvm import Kvm

    with Kvm() as kvm:
        support = protected_vm_support(kvm, "arm64")
    if not support.available:
        pytest.skip(f"no protected VMs here: {support.reason}")


def require_protected_linux() -> None:
    """A protected Linux guest boots only where the host's pages are 4 KiB: with larger pages Linux 7.2's pKVM
    retries one of its early stage-2 faults forever (pkvm.timeout_hint; tests/test_arm64_pkvm.py's
    test_pkvm_fault_inside_a_page_whose_successor_is_mapped reproduces it with a bare-metal guest)."""
    from pyvmm import hostmem

    if hostmem.PAGE_SIZE > 0x1000:
        pytest.skip(f"a protected Linux guest never boots on this {hostmem.PAGE_SIZE >> 10} KiB-page host: Linux 7.2's "
                    "pkvm_mem_abort retries an unaligned first touch forever (see "
                    "test_pkvm_fault_inside_a_page_whose_successor_is_mapped)")


def guest(name: str) -> str:
    return os.path.join(FIRMWARE, name)


def memtouch(protected: bool, backing: str, size: int = 8 << 20):
    """Boot the memtouch guest on SIZE bytes of BACKING; returns (vm, outcome), the VM still open (close it)."""
    from pyvmm.vm import Vm

    vm = Vm(protected=protected)
    try:
        vm.add_memory(size, backing)
        vm.create_vcpus(1)
        vm.boot(guest("memtouch"))
        return vm, vm.run(timeout=120)
    except BaseException:
        vm.close()
        raise


KINDS = ["normal", "protected"]


@pytest.fixture(params=KINDS)
def kind(request):
    """Each arm64 VM kind this lab can make: "normal", and "protected" where pKVM is on (else skipped)."""
    require_arm64_kvm()
    if request.param == "protected":
        require_pkvm()
    return request.param
