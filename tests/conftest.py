"""Shared fixtures: every test here runs real KVM and real guests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRMWARE_X86 = os.path.join(ROOT, "firmware", "x86_64", "build")


def _machine() -> str:
    from pyvmm.arch import machine_name

    return machine_name()


@pytest.fixture(scope="session")
def kvm_device():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host (KVM not available)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not accessible to this user")
    return "/dev/kvm"


@pytest.fixture(scope="session")
def x86_firmware(kvm_device):
    if _machine() != "x86_64":
        pytest.skip("x86_64 guests need an x86_64 host")
    subprocess.run(["make", "-s", "-C", os.path.dirname(FIRMWARE_X86)], check=True)
    return FIRMWARE_X86


@dataclass
class GuestRun:
    outcome: object
    console: str
    vm: object


@pytest.fixture
def boot_x86(x86_firmware):
    """boot_x86(name, memory=4 MiB, backing="anon", vcpus=1, inspect=None) -> GuestRun.

    ``inspect(vm)`` runs after the guest ends and before the VM is torn down.
    """
    from pyvmm.vm import Vm

    def boot(name, memory=4 << 20, backing="anon", vcpus=1, inspect=None, timeout=60, **boot_opts):
        with Vm() as vm:
            vm.add_memory(memory, backing)
            vm.create_vcpus(vcpus)
            vm.boot(os.path.join(x86_firmware, name), **boot_opts)
            outcome = vm.run(timeout=timeout)
            if inspect is not None:
                inspect(vm)
            return GuestRun(outcome, vm.console.text(), vm)

    return boot


def run_cli(*args, env=None, user=None, timeout=120):
    """Run ``python -m pyvmm ARGS``; returns CompletedProcess with text output."""
    cmd = [sys.executable, "-m", "pyvmm", *args]
    ids = {}
    if user is not None and _util_linux_setpriv():
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    elif user is not None:  # e.g. busybox hosts (the arm64 lab)
        ids = {"user": user, "group": user, "extra_groups": []}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, **ids)  # never the developer's terminal (raw mode)


def _util_linux_setpriv() -> bool:
    if shutil.which("setpriv") is None:
        return False
    res = subprocess.run(["setpriv", "--version"], capture_output=True, text=True)
    return "util-linux" in res.stdout


@pytest.fixture(scope="session")
def huge_pages():
    """Grow the 2 MiB huge page pool to 8 free pages when we may (root; the lab), never shrinking it: the
    memfd-hugetlb cases (8 MiB guests) then run instead of being unavailable.  Returns the free count.  The 2 MiB
    pool itself (hostmem.HUGE_PAGE_POOL), not vm.nr_hugepages: on a 16 KiB-page host that is the 32 MiB pool."""
    from pyvmm import hostmem

    return hostmem.reserve_huge_pages(8)


def default_signals() -> None:
    """Popen(preexec_fn=...): the child starts with SIGINT, SIGTERM and SIGHUP at their default actions, as from a
    terminal.  A test run started in the background (`cmd &` ignores SIGINT) or under nohup (SIGHUP) would
    otherwise pass those ignored dispositions on, and pyvmm keeps what its parent ignored."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
