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


@pytest.mark.parametrize("pmu, its", [(True, True), (True, False), (False, True)])
def test_pmu_and_its_nodes(tmp_path, pmu, its):
    """The PMU (a PPI) and the ITS (the GIC's child, an msi-controller): dtc checks them with no warnings."""
    cfg = fdt.DeviceTreeConfig(layout.RAM_BASE, 64 << 20, [0, 1], "", None,
                               pmu_ppi=layout.PMU_PPI if pmu else None,
                               its=(layout.GIC_ITS, layout.GIC_ITS_SIZE) if its else None)
    res = _dtc(fdt.build(cfg), tmp_path)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    dts = res.stdout
    assert ('compatible = "arm,armv8-pmuv3"' in dts) == pmu
    if pmu:
        assert "interrupts = <0x01 0x07 0x04>;" in dts  # PPI 7 = INTID 23, level-high
    assert ("msi-controller@8080000 {" in dts) == its
    if its:
        node = dts[dts.index("msi-controller@8080000 {"):]
        node = node[:node.index("};")]
        assert 'compatible = "arm,gic-v3-its"' in node and "#msi-cells = <0x01>;" in node
        assert "reg = <0x00 0x8080000 0x00 0x20000>;" in node and "msi-controller;" in node
        gic = dts[dts.index("intc@8000000 {"):]
        assert gic.index("msi-controller@8080000") < gic.index("\n\t};")  # inside the GIC's node
    assert "bootargs" not in dts  # empty bootargs: no property


def test_its_window_fits_between_the_distributor_and_the_redistributors():
    assert layout.GIC_DIST + layout.GIC_DIST_SIZE <= layout.GIC_ITS
    assert layout.GIC_ITS + layout.GIC_ITS_SIZE <= layout.GIC_REDIST
