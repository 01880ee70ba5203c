"""Creating and destroying VMs leaks nothing: fds and RSS stay flat over 200 cycles."""

from __future__ import annotations

import os

import pytest

from pyvmm.outcome import ExitKind
from pyvmm.vm import Vm


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _cycle(image: str, backing: str) -> None:
    with Vm() as vm:
        vm.add_memory(2 << 20, backing)
        vm.create_vcpus(1)
        vm.boot(image)
        assert vm.run(timeout=30).kind is ExitKind.HALT


@pytest.mark.timeout(60)
def test_200_create_destroy_cycles(x86_firmware):
    image = os.path.join(x86_firmware, "hello")
    for backing in ("anon", "memfd", "guest-memfd"):  # warm up every code path
        _cycle(image, backing)
    fds, rss = _fds(), _rss_kb()
    for i in range(200):
        _cycle(image, ("anon", "memfd", "guest-memfd")[i % 3])
    assert _fds() == fds
    assert _rss_kb() - rss < 8 * 1024, f"RSS grew from {rss} kB to {_rss_kb()} kB"
