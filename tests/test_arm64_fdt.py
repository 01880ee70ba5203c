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


def test_initrd_placement():
    """Linux: the first 2 MiB boundary after the kernel.  Firmware: as high as it fits below the pool or DTB,
    page-aligned, away from the scratch memory test guests use above their image."""
    from pyvmm.arch.arm64 import place_initrd
    from pyvmm.kvm.errors import ConfigError

    base, dtb = layout.RAM_BASE, layout.RAM_BASE + (14 << 20)
    assert place_initrd(5000, base + 0x1234, dtb, linux=True) == base + (2 << 20)
    start = place_initrd(5000, base + 0x1234, dtb, linux=False)
    assert start % 4096 == 0 and start + 5000 <= dtb and dtb - start <= 8192
    assert place_initrd(dtb - base - (1 << 20), base + (1 << 20), dtb, linux=False) == base + (1 << 20)
    for linux, size in ((True, 12 << 20 + 1), (False, (13 << 20) + 1)):
        with pytest.raises(ConfigError, match="does not fit in guest RAM between the image"):
            place_initrd(size, base + (1 << 20), dtb, linux=linux)


class _Regs:
    """A vCPU whose x1/x2 are given (or refused): what system_event reads after the exit."""

    def __init__(self, x1=None, x2=None, refuse=False):
        self.values, self.refuse = {1: x1, 2: x2}, refuse

    def get_one_reg(self, reg):
        from pyvmm.arch.arm64 import cpu
        from pyvmm.kvm.errors import KvmError

        if self.refuse:
            raise KvmError("KVM_GET_ONE_REG", 1)
        return self.values[cpu.X.index(reg)]


@pytest.mark.parametrize("regs, event, expected", [
    (_Regs(0x80007079, 42), (2, [1]), ("guest-exit", 42)),
    (_Regs(0x80007079, 300), (2, [1]), ("guest-exit", 300)),  # pyvmm run caps the exit status at 255
    (_Regs(0x80000001, 5), (2, [1]), ("reset", 2)),  # another vendor's reset type: a reset
    (_Regs(0, 0), (2, [1]), ("reset", 2)),  # a warm reset through SYSTEM_RESET2
    (_Regs(refuse=True), (2, [1]), ("reset", 2)),  # registers hidden: a reset that says so
    (_Regs(), (1, [1]), ("power-off", 1)),  # SYSTEM_OFF2
    (_Regs(), (2, [0]), None), (_Regs(), (1, []), None), (_Regs(), (3, [1]), None),  # generic meanings
])
def test_psci_system_events(regs, event, expected):
    from pyvmm.arch.arm64 import Arm64
    from pyvmm.kvm.exits import SystemEvent

    got = Arm64().system_event(regs, SystemEvent(*event))
    assert (got if got is None else (got[0].value, got[1])) == expected
    if expected and expected[0] == "guest-exit":
        assert "SYSTEM_RESET2" in got[2]
    if regs.refuse:
        assert "unreadable" in got[2]
