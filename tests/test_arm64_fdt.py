"""The arm64 device tree, built with the fdt library, checked by dtc (runs on any host)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pyvmm.arch.arm64 import fdt, layout


def _dtc(blob: bytes, tmp_path) -> subprocess.CompletedProcess:
    if shutil.which("dtc") is None:
        pytest.skip("dtc (Debian: device-tree-compiler) is not installed")
    path = tmp_path / "guest.dtb"
    path.write_bytes(blob)
    return subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-o", "-", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("cpus, initrd", [(1, None), (2, (0x84000000, 0x84100000)), (4, None)])
def test_device_tree_is_valid(tmp_path, cpus, initrd):
    cfg = fdt.DeviceTreeConfig(layout.RAM_BASE, 64 << 20, [i for i in range(cpus)], "console=ttyS0 earlycon", initrd)
    res = _dtc(fdt.build(cfg), tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr  # no warnings
    dts = res.stdout
    assert "memory@80000000" in dts and 'compatible = "arm,gic-v3"' in dts
    assert dts.count('enable-method = "psci"') == cpus
    assert 'method = "hvc"' in dts and 'compatible = "arm,armv8-timer"' in dts
    assert 'compatible = "ns16550a"' in dts and 'bootargs = "console=ttyS0 earlycon"' in dts
    assert 'stdout-path = "/serial@9000000"' in dts
    assert ("linux,initrd-start" in dts) == (initrd is not None)
