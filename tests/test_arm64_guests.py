"""The arm64 test guests on normal and pKVM protected VMs (run in the lab: scripts/lab test)."""

from __future__ import annotations

import re

import pytest

from devices import testdev
from pyvmm.runloop import ExitKind
from pyvmm.vm import Vm
from tests.arm64 import guest, require_arm64_kvm, require_pkvm

KINDS = ["normal", "protected"]
RAM_BASE = 0x8000_0000


@pytest.fixture(params=KINDS)
def kind(request):
    require_arm64_kvm()
    if request.param == "protected":
        require_pkvm()
    return request.param


def boot(kind, name, memory=8 << 20, backing="anon", vcpus=1, timeout=120):
    vm = Vm(protected=kind == "protected")
    try:
        vm.add_memory(memory, backing)
        vm.create_vcpus(vcpus)
        vm.boot(guest(name))
        outcome = vm.run(timeout=timeout)
    except BaseException:
        vm.close()
        raise
    return vm, outcome


def test_hello(kind):
    vm, outcome = boot(kind, "hello")
    with vm:
        assert vm.console.text() == "Hello from a pyvmm guest (arm64)\n"
        assert outcome.kind is ExitKind.POWER_OFF


def expected_checksum(start: int, end: int) -> int:
    return sum(a ^ 0x5A17C0DE9E3779B9 for a in range(start, end, 64)) & (2**64 - 1)


def test_memtouch(kind):
    vm, outcome = boot(kind, "memtouch", memory=8 << 20)
    with vm:
        m = re.fullmatch(r"memtouch: start=0x(\w+) end=0x(\w+) checksum=0x(\w+) errors=0x(\w+)\n", vm.console.text())
        assert m, vm.console.text()
        start, end, checksum, errors = (int(g, 16) for g in m.groups())
        assert (start, end) == (RAM_BASE + (2 << 20), RAM_BASE + (8 << 20))
        assert checksum == expected_checksum(start, end) and errors == 0
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0


def test_mmio_access_sizes(kind):
    vm, outcome = boot(kind, "mmio")
    with vm:
        assert vm.console.text() == "mmio: ok\n"
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0
        A = testdev.Access
        assert vm.devices["testdev"].log == [
            A(0x000, 1, False, 0x50), A(0x000, 2, False, 0x5950), A(0x000, 4, False, 0x4D565950),
            A(0x000, 8, False, testdev.ID_VALUE),
            A(0x100, 1, True, 0x11), A(0x100, 1, False, 0x11),
            A(0x110, 2, True, 0x2233), A(0x110, 2, False, 0x2233),
            A(0x120, 4, True, 0x44556677), A(0x120, 4, False, 0x44556677),
            A(0x130, 8, True, 0x8899AABBCCDDEEFF), A(0x130, 8, False, 0x8899AABBCCDDEEFF),
        ]


@pytest.mark.parametrize("name, expected, text", [
    ("psci-off", ExitKind.POWER_OFF, "psci: system off\n"),
    ("psci-reset", ExitKind.RESET, "psci: system reset\n"),
])
def test_psci_system_events(kind, name, expected, text):
    vm, outcome = boot(kind, name)
    with vm:
        assert vm.console.text() == text
        assert outcome.kind is expected


def test_psci_cpu_on_second_vcpu(kind):
    vm, outcome = boot(kind, "psci-cpu-on", vcpus=2)
    with vm:
        assert vm.console.text() == ("psci: cpu on\ncpu1: up, context 0x0000000000c0ffee\n"
                                     "cpu0: CPU_ON returned 0x0000000000000000\ncpu0: cpu1 is up\n")
        assert outcome.kind is ExitKind.POWER_OFF
