"""The pyvmm command: the default run, caps against KVM itself, and one-line errors with status 2."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_cli


@pytest.mark.timeout(60)
def test_default_run_boots_hello(x86_firmware):
    res = run_cli()
    assert res.returncode == 0, res.stderr
    assert res.stdout == "Hello from a pyvmm guest (x86_64, long mode)\n"


@pytest.mark.timeout(60)
def test_run_guest_exit_status(x86_firmware):
    res = run_cli("run", os.path.join(x86_firmware, "shutdown-exit"), "-m", "4M")
    assert res.returncode == 0x42
    assert "guest-exit" in res.stderr


@pytest.mark.timeout(30)
def test_timeout_status(x86_firmware, tmp_path):
    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")
    res = run_cli("run", str(spin), "--timeout", "0.5", "-m", "2M")
    assert res.returncode == 124
    assert "timeout" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "/no/such/guest"], "guest image /no/such/guest: no such file"),
    (["run", "--memory", "12Q"], "bad size '12Q'"),
    (["run", "--memory", "0"], "must be positive"),
    (["run", "--backing", "tmpfs"], "unknown backing 'tmpfs'"),
    (["run", "--backing", "dma-heap"], "needs an argument: dma-heap:NAME"),
    (["run", "--region", "0x100000,1M"], "overlaps slot 0"),
    (["run", "--region", "0x40000001,1M"], "multiples of 0x1000"),
    (["run", "--region", "zz,1M"], "is not a number"),
    (["run", "--vcpus", "0"], "must be at least 1"),
    (["run", "--boot", "floppy"], "unknown boot mode 'floppy'"),
    (["run", "--protected"], "protected VMs"),
    (["run", "--memory", "1M"], "need at least 2 MiB of RAM"),
    (["frobnicate"], "invalid choice"),
])
@pytest.mark.timeout(30)
def test_bad_input_is_one_line_and_status_2(x86_firmware, args, message):
    res = run_cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.timeout(30)
def test_no_permission_on_dev_kvm(kvm_device):
    if os.getuid() != 0:
        pytest.skip("needs root, to run the command as an unprivileged user")
    if os.stat("/dev/kvm").st_mode & 0o006 == 0o006:
        pytest.skip("/dev/kvm is world-accessible here")
    res = run_cli("caps", user=65534)
    assert res.returncode == 2
    assert res.stderr.strip() == "pyvmm: error: /dev/kvm: permission denied: add this user to the 'kvm' group or run as root"


@pytest.mark.timeout(30)
def test_no_dev_kvm(kvm_device):
    res = run_cli("--kvm-device", "/nonexistent/kvm", "caps")
    assert res.returncode == 2
    assert "/nonexistent/kvm does not exist" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(60)
def test_caps_agrees_with_kvm(kvm_device):
    from pyvmm.caps import CAPABILITIES
    from pyvmm.kvm import Kvm

    res = run_cli("caps", "--json")
    assert res.returncode == 0, res.stderr
    caps = json.loads(res.stdout)
    with Kvm() as kvm, kvm.create_vm(0) as vm:
        assert caps["api_version"] == kvm.api_version() == 12
        for name, cap, on_vm in CAPABILITIES:
            if name in caps["capabilities"]:
                assert caps["capabilities"][name] == (vm if on_vm else kvm).check_extension(cap), name
    assert caps["protected_vm"]["available"] is False or caps["arch"] == "arm64"
    assert set(caps["backings"]) >= {"anon", "memfd", "memfd-hugetlb", "guest-memfd", "udmabuf", "dma-heap:NAME"}


@pytest.mark.timeout(60)
def test_help_texts():
    for args in (["--help"], ["run", "--help"], ["caps", "--help"]):
        res = run_cli(*args)
        assert res.returncode == 0 and "usage: pyvmm" in res.stdout
    assert "--report-json" in run_cli("run", "--help").stdout


@pytest.mark.parametrize("argv, says", [
    (["--cpu-features", "mte=on"], "unknown feature 'mte'"),
    (["--cpu-features", "pmu=maybe"], "the value is on or off"),
    (["--sve-vector-lengths", "100"], "not an SVE vector length"),
    (["--cmdline", "x=1"], "--cmdline is only for Linux kernels on x86_64"),
    (["--initrd", "/etc/hostname"], "--initrd is only for Linux kernels on x86_64"),
])
def test_platform_options_bad_input_is_one_line(argv, says):
    """Bad feature switches (any host), and boot arguments x86 firmware cannot take: exit 2, one line."""
    from pyvmm.arch import machine_name

    if machine_name() != "x86_64" and argv[0] in ("--cmdline", "--initrd"):
        pytest.skip("x86_64 firmware's refusal; arm64 passes both in the device tree")
    res = run_cli("run", *argv)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in res.stderr, res.stderr
