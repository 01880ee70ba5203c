"""pyvmm check (predicted, without KVM_RUN) against pyvmm matrix (observed, live), on this host and in the lab.

On the x86_64 host only normal VMs run; in the lab (scripts/lab test) the protected column runs too, and on the
dma-heaps lab kernel the DMA-buf heaps (scripts/lab test --kernel dma-heaps tests/test_dma_heaps.py
tests/test_matrix.py).  In every cell the prediction must agree with what the kernel did."""

from __future__ import annotations

import os
import json
import subprocess
import sys
import tempfile

import pytest

from pyvmm.memory.backing import SHMEM_FILESYSTEMS, mount_fstype

from pyvmm.matrix import backings_here, format_table, run_cell
from pyvmm.preflight import RegionSpec, Verdict, check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What Linux 7.2 answers for a protected arm64 VM's first touch of each backing (tests/test_arm64_pkvm.py
# measured them one by one): None = runs.
PROTECTED = {"anon": None, "memfd": None, "memfd-hugetlb": "EIO", "guest-memfd": "EIO",
             "file": None if mount_fstype(tempfile.gettempdir()) in SHMEM_FILESYSTEMS else "EIO",  # tmpfs: shmem
             "udmabuf": "EFAULT", "udmabuf:memfd": None}


@pytest.fixture(scope="module")
def built_guests(huge_pages):  # huge_pages: memtouch's 8 MiB of memfd-hugetlb, else that cell is "unavailable"
    from pyvmm.arch import machine_name
    from pyvmm.firmware import firmware_path
    from pyvmm.kvm.errors import ConfigError

    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    try:
        firmware_path(machine_name(), "memtouch")
    except ConfigError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("kind", ["normal", "protected"])
@pytest.mark.parametrize("backing", backings_here())
@pytest.mark.timeout(300)
def test_prediction_agrees_with_the_kernel(built_guests, backing, kind, tmp_path):
    cell = run_cell(backing, kind)
    assert cell.agree, format_table([cell])  # unavailable included: check must make the same VM the run makes
    if cell.observed.verdict is Verdict.UNAVAILABLE:
        pytest.skip(f"{backing} ({kind}): {cell.observed.cause()}")
    if kind == "normal":
        assert cell.observed.verdict is Verdict.RUNS, cell.observed
        assert "errors=0x0" in cell.console  # memtouch read back every value it wrote
        return
    want = "EFAULT" if backing.startswith("dma-heap:") else PROTECTED[backing]
    if want is None:
        assert cell.observed.verdict is Verdict.RUNS, cell.observed
    else:
        assert (cell.observed.verdict, cell.observed.errno, cell.observed.call) == (Verdict.FAILS, want, "KVM_RUN")
        rule = {"EFAULT": "check_vma_flags", "EIO": "folio_test_swapbacked"}[want]
        assert rule in cell.predicted.cause(), cell.predicted.cause()  # the right rule, not just the errno


def test_check_reports_what_it_was_made_from(built_guests):
    p = check(False, [RegionSpec(None, 8 << 20, "memfd")])
    assert p.verdict is Verdict.RUNS and p.errno is None
    (slot,) = p.facts["slots"]
    assert slot["backing"] == "memfd" and "sh" in slot["vmflags"] and slot["nature"]["swap_backed"] is True
    assert "rlimit_soft" in p.facts["memlock"]


def test_check_observes_what_fails_before_running(built_guests):
    """What KVM or pyvmm refuses while the VM is made is not predicted but observed."""
    assert check(False, [RegionSpec(None, 8 << 20, "no-such-backing")]).verdict is Verdict.REFUSED
    overlap = check(False, [RegionSpec(None, 8 << 20, "anon"), RegionSpec(None, 8 << 20, "anon")])
    assert overlap.verdict is Verdict.RUNS  # the second follows the first
    bad = check(False, [RegionSpec(0x8000_0000, 8 << 20, "anon"), RegionSpec(0x8000_0000, 2 << 20, "anon")])
    assert bad.verdict is Verdict.REFUSED and "overlaps slot 0" in bad.cause()


def _pyvmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)


def test_check_command(built_guests):
    res = _pyvmm("check", "-m", "8M", "-b", "memfd", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["verdict"] == "runs" and data["facts"]["slots"][0]["backing"] == "memfd"
    text = _pyvmm("check", "-m", "8M", "--region", "0x40000000,2M,memfd")
    assert text.returncode == 0 and text.stdout.startswith("predicted: runs\n") and "slot 1: memfd" in text.stdout
    bad = _pyvmm("check", "-b", "bogus")
    assert bad.returncode == 2 and "unknown backing 'bogus'" in bad.stderr and bad.stdout == ""


def test_check_command_protected_exit_status(built_guests):
    """3 where the host cannot make a protected VM; otherwise the prediction's own status."""
    res = _pyvmm("check", "--protected", "-m", "8M", "-b", "udmabuf")
    p = json.loads(_pyvmm("check", "--protected", "-m", "8M", "-b", "udmabuf", "--json").stdout)
    assert res.returncode == {"unavailable": 3, "runs": 0}.get(p["verdict"], 1), (res.stdout, res.stderr)
    if p["verdict"] == "fails":  # the lab: pin_user_pages cannot pin the DMA-buf's PFN mapping
        assert p["errno"] == "EFAULT" and "check_vma_flags" in p["reasons"][0], p


def test_matrix_command(built_guests):
    res = _pyvmm("matrix", "--backing", "anon", "--backing", "file", "--kind", "normal", "--json")
    assert res.returncode == 0, res.stderr
    cells = json.loads(res.stdout)
    assert [(c["backing"], c["kind"], c["agree"]) for c in cells] == [("anon", "normal", True), ("file", "normal", True)]
    table = _pyvmm("matrix", "--backing", "memfd", "--kind", "normal")
    assert table.returncode == 0 and "memfd    runs -> runs" in table.stdout, table.stdout
    assert "pyvmm: memfd on a normal VM: runs" in table.stderr
