"""The arm64 test guests on normal and pKVM protected VMs (run in the lab: scripts/lab test)."""

from __future__ import annotations

import re

import pytest

from pyvmm.outcome import ExitKind
from pyvmm.vm import Vm
from tests.arm64 import guest, kind  # noqa: F401 - kind is a fixture
from tests.expected import MEMTOUCH_LINE, MMIO_GUEST_LOG, memtouch_checksum

RAM_BASE = 0x8000_0000


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


@pytest.mark.timeout(300)
def test_hello(kind):
    vm, outcome = boot(kind, "hello")
    with vm:
        assert vm.console.text() == "Hello from a pyvmm guest (arm64)\n"
        assert outcome.kind is ExitKind.POWER_OFF


@pytest.mark.timeout(300)
def test_memtouch(kind):
    vm, outcome = boot(kind, "memtouch", memory=8 << 20)
    with vm:
        m = re.fullmatch(MEMTOUCH_LINE, vm.console.text())
        assert m, vm.console.text()
        start, end, checksum, errors = (int(g, 16) for g in m.groups())
        assert (start, end) == (RAM_BASE + (2 << 20), RAM_BASE + (8 << 20))
        assert checksum == memtouch_checksum(start, end) and errors == 0
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0


@pytest.mark.timeout(300)
def test_mmio_access_sizes(kind):
    vm, outcome = boot(kind, "mmio")
    with vm:
        assert vm.console.text() == "mmio: ok\n"
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0
        assert vm.devices["testdev"].log == MMIO_GUEST_LOG


@pytest.mark.parametrize("name, expected, text", [
    ("psci-off", ExitKind.POWER_OFF, "psci: system off\n"),
    ("psci-reset", ExitKind.RESET, "psci: system reset\n"),
])
@pytest.mark.timeout(300)
def test_psci_system_events(kind, name, expected, text):
    vm, outcome = boot(kind, name)
    with vm:
        assert vm.console.text() == text
        assert outcome.kind is expected


@pytest.mark.timeout(300)
def test_psci_cpu_on_second_vcpu(kind):
    vm, outcome = boot(kind, "psci-cpu-on", vcpus=2)
    with vm:
        assert vm.console.text() == ("psci: cpu on\ncpu1: up, context 0x0000000000c0ffee\n"
                                     "cpu0: CPU_ON returned 0x0000000000000000\ncpu0: cpu1 is up\n")
        assert outcome.kind is ExitKind.POWER_OFF


@pytest.mark.timeout(120)
def test_stop_and_timeout_from_another_thread(kind):
    """A guest that never ends, run from a worker thread: the timeout and a stop from another thread each end
    it within a second, with the powered-off secondary (blocked in KVM_RUN) kicked out too."""
    import threading
    import time

    from pyvmm.outcome import Outcome

    results = {}

    def worker(vm):
        t0 = time.monotonic()
        results["timeout"] = (vm.run(timeout=0.5), time.monotonic() - t0)
        t0 = time.monotonic()
        results["stop"] = (vm.run(), time.monotonic() - t0)

    with Vm(protected=kind == "protected") as vm:
        vm.add_memory(8 << 20)
        vm.create_vcpus(2)
        vm.boot(guest("spin"))
        thread = threading.Thread(target=worker, args=(vm,))
        thread.start()
        while "timeout" not in results and thread.is_alive():
            time.sleep(0.05)
        while "running" not in vm.vcpu_states().values() and thread.is_alive():  # the second run has begun
            time.sleep(0.05)
        time.sleep(0.3)
        vm.request_stop(Outcome(ExitKind.STOPPED, detail="stopped by the test"))
        thread.join(10)
        assert not thread.is_alive()
        assert vm.console.text().startswith("spin: spinning\n")
        outcome, took = results["timeout"]
        assert outcome.kind is ExitKind.TIMEOUT and took < 1.5
        outcome, took = results["stop"]
        assert outcome.kind is ExitKind.STOPPED and outcome.detail == "stopped by the test" and took < 1.5
        assert vm.vcpu_states() == {0: "exited", 1: "exited"}
