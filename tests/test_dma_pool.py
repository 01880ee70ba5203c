"""The DMA pool and the confinement of devices to shared memory (the pieces that run on any host).

A protected VM's devices may touch only memory the guest shared: the restricted-dma-pool that pyvmm puts
in the device tree (the guest shares it at boot) and ranges declared shared through the API.  Here the
confinement logic runs on a real VM's real memory with the protected VM's own access guard
(``pkvm.access_guard``) installed as after a first run; the protected guests themselves run in the lab
(tests/test_virtio_pkvm.py).
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import struct
import subprocess
import threading

import pytest

from pyvmm.devices.virtio import DeviceStatus, VirtioMmioTransport, VirtioRng
from pyvmm.devices.virtio.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from pyvmm.devices.virtio.device import TRANSPORT_FEATURES, VIRTIO_F_ACCESS_PLATFORM
from pyvmm.arch.arm64 import fdt, layout, pkvm
from pyvmm.cli import main as cli_main
from pyvmm.kvm.errors import ConfigError
from pyvmm.virtio import DmaPool, default_dma_pool
from tests.test_virtio_driver import Buf, Driver, FakeMemory, Interrupts

MIB = 1 << 20
POOL = DmaPool(0x300000, 0x100000)  # [3M, 4M) of a 4 MiB guest at GPA 0


# --- the device tree --------------------------------------------------------------------------
def test_device_tree_names_the_pool_for_every_virtio_device(tmp_path):
    if shutil.which("dtc") is None:
        pytest.skip("dtc (Debian: device-tree-compiler) is not installed")
    base = layout.RAM_BASE + (54 << 20)
    cfg = fdt.DeviceTreeConfig(layout.RAM_BASE, 64 << 20, [0], "console=ttyS0", None,
                               [(layout.VIRTIO_BASE, 0x200, 16), (layout.VIRTIO_BASE + 0x200, 0x200, 17)],
                               (base, 8 << 20, 64 << 10))
    path = tmp_path / "guest.dtb"
    path.write_bytes(fdt.build(cfg))
    res = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", "-o", "-", str(path)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    dts = res.stdout
    pool = dts[dts.index("reserved-memory {"):]
    pool = pool[:pool.index("};\n\t};")]
    assert "#address-cells = <0x02>;" in pool and "#size-cells = <0x02>;" in pool and "ranges;" in pool
    assert f"restricted-dma-pool@{base:x}" in pool and 'compatible = "restricted-dma-pool";' in pool
    assert f"reg = <0x00 {base:#x} 0x00 0x800000>;" in pool and "alignment = <0x00 0x10000>;" in pool
    assert f"phandle = <{fdt.DMA_POOL_PHANDLE:#04x}>;" in pool
    for refused in ("no-map", "reusable", "linux,cma-default", "linux,dma-default"):  # swiotlb refuses these
        assert refused not in pool
    assert dts.count(f"memory-region = <{fdt.DMA_POOL_PHANDLE:#04x}>;") == 2  # each virtio node


def test_device_tree_without_pool_has_no_reserved_memory():
    cfg = fdt.DeviceTreeConfig(layout.RAM_BASE, 64 << 20, [0], virtio=[(layout.VIRTIO_BASE, 0x200, 16)])
    blob = fdt.build(cfg)
    assert b"restricted-dma-pool" not in blob and b"memory-region" not in blob


# --- ACCESS_PLATFORM -------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [0, 1 << VIRTIO_F_ACCESS_PLATFORM])
def test_access_platform_offered_only_when_asked(extra):
    memory = FakeMemory()
    t = VirtioMmioTransport(VirtioRng(), memory, Interrupts(), platform_features=extra)
    d = Driver(t, memory)
    assert d.device_features() == TRANSPORT_FEATURES | extra
    assert d.probe() >> VIRTIO_F_ACCESS_PLATFORM & 1 == bool(extra)  # a driver may accept it: FEATURES_OK


# --- the likely cause -----------------------------------------------------------------------
def test_cause_names_the_most_specific_reason():
    assert "no DMA pool" in pkvm.device_access_cause(None, True)
    assert "did not negotiate VIRTIO_F_ACCESS_PLATFORM" in pkvm.device_access_cause(POOL, False)
    kernel = pkvm.device_access_cause(POOL, True)
    assert "CONFIG_ARM_PKVM_GUEST" in kernel and "CONFIG_DMA_RESTRICTED_POOL" in kernel
    assert "has not negotiated" in pkvm.device_access_cause(POOL, None)


@pytest.mark.parametrize("page", [0x1000, 0x4000])
def test_cause_on_a_host_with_larger_pages(monkeypatch, page):
    """A protected Linux guest with pages smaller than pKVM's granule (HYP_MEMINFO: the host's page size) shares
    nothing (pkvm_init_hyp_services): on a 16 KiB-page host the cause says so; with 4 KiB pages it cannot happen."""
    monkeypatch.setattr(pkvm.hostmem, "PAGE_SIZE", page)
    kernel = pkvm.device_access_cause(POOL, True)
    granule = "pages are smaller than pKVM's sharing granule (16 KiB here: HYP_MEMINFO answers the host's page size"
    assert (granule in kernel) == (page == 0x4000), kernel
    assert "CONFIG_ARM_PKVM_GUEST" in kernel
    hint = pkvm.timeout_hint()  # and a protected guest's timeout names pKVM's endless fault retry there
    assert hint == "" if page == 0x1000 else "pkvm_mem_abort maps the fault IPA unaligned" in hint


# --- sizes and hosts --------------------------------------------------------------------------
def test_pool_is_arm64_only_and_a_multiple_of_64k(kvm_device):
    from pyvmm.vm import Vm

    if platform.machine() != "x86_64":
        pytest.skip("checks the x86_64 refusal")
    with pytest.raises(ConfigError, match="arm64 only"):
        Vm(dma_pool=8 * MIB)
    with Vm(dma_pool=0) as vm:
        assert vm.dma_pool_size == 0 and vm.dma_pool is None


def test_pool_size_rules_on_arm64_layout():
    from pyvmm.vm import Vm

    vm = Vm.__new__(Vm)  # only the size check: no KVM needed
    vm.arch = type("A", (), {"dma_pool_supported": True, "name": "arm64"})()
    assert vm._check_dma_pool(True, None) is None  # sized at boot: default_dma_pool(ram)
    assert vm._check_dma_pool(False, None) == 0
    assert default_dma_pool(256 * MIB) == 8 * MIB and default_dma_pool(8 * MIB) == MIB
    assert default_dma_pool(12 * MIB) == 1536 << 10  # an eighth, in 64 KiB steps
    assert vm._check_dma_pool(False, 64 << 10) == 64 << 10
    for bad in (4096, (1 << 20) + 4096):
        with pytest.raises(ConfigError, match="multiple of 64 KiB"):
            vm._check_dma_pool(True, bad)
    with pytest.raises(ConfigError, match="must not be negative"):
        vm._check_dma_pool(True, -65536)


def test_pool_placement():
    """Just below the device tree (top 2 MiB), 64 KiB-aligned; a default pool a small guest cannot hold is
    left out, an asked-for one is refused naming --dma-pool."""
    from pyvmm.arch.arm64 import place_dma_pool

    base = layout.RAM_BASE
    assert place_dma_pool(8 * MIB, None) == DmaPool(base + 5 * MIB, MIB)  # an eighth of 8 MiB
    assert place_dma_pool(256 * MIB, None) == DmaPool(base + 246 * MIB, 8 * MIB)
    assert place_dma_pool(256 * MIB, 0) is None
    odd = place_dma_pool(16 * MIB + 4096, None)  # RAM need only be page-sized: the base is aligned down
    assert odd.gpa % (64 << 10) == 0 and odd.end <= base + 16 * MIB + 4096 - 2 * MIB and odd.size == 2 * MIB
    assert place_dma_pool(layout.MIN_RAM, None) is None  # 4 MiB: the default pool does not fit, none
    with pytest.raises(ConfigError, match=r"--dma-pool\) leaves too little of the guest's 4096 KiB"):
        place_dma_pool(layout.MIN_RAM, 512 << 10)


@pytest.mark.parametrize("value", ["0", "0M", "0x0", "0k"])
def test_cli_pool_zero_means_none(value):
    from pyvmm.cli import _pool_size

    assert _pool_size(value) == 0


def test_refusals_past_the_cap_are_counted(capsys):
    from pyvmm.cli import print_device_faults
    from pyvmm.outcome import DeviceFault, ExitKind, Outcome
    from pyvmm.virtio import MAX_DEVICE_FAULTS
    from pyvmm.vm import Vm

    vm = Vm.__new__(Vm)  # only the bookkeeping: no KVM needed
    vm.device_faults, vm.device_faults_dropped = [], 0
    vm._device_faults_lock = threading.Lock()
    fault = DeviceFault("virtio-rng@0xb000000", 0, 0x80200000, False, "cause", "the line")
    for _ in range(MAX_DEVICE_FAULTS + 5):
        vm.record_device_fault(fault)
    assert len(vm.device_faults) == MAX_DEVICE_FAULTS and vm.device_faults_dropped == 5
    outcome = Outcome(ExitKind.GUEST_EXIT, device_faults=vm.device_faults, device_faults_dropped=5)
    print_device_faults(outcome)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"pyvmm: {MAX_DEVICE_FAULTS + 5} device request(s) refused")
    assert err[1:9] == ["pyvmm:   the line"] * 8
    assert err[9] == f"pyvmm:   ... and {MAX_DEVICE_FAULTS + 5 - 8} more (--report-json lists the first {MAX_DEVICE_FAULTS})"


@pytest.mark.parametrize("value, message", [("12k", "multiple of 64 KiB"), ("lots", "bad size")])
def test_cli_rejects_a_bad_pool_in_one_line(value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["run", "--dma-pool", value, "--timeout", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# --- confinement on real guest memory -------------------------------------------------------------
class GuestSide:
    """The guest's own accesses to its memory (writing rings, reading results): not the host's, so the
    protected guard does not apply to them.  Single-threaded tests only."""

    def __init__(self, memory):
        self.memory = memory

    @contextlib.contextmanager
    def _unguarded(self):
        guard, self.memory.access_guard = self.memory.access_guard, None
        try:
            yield
        finally:
            self.memory.access_guard = guard

    def read(self, gpa: int, length: int) -> bytes:
        with self._unguarded():
            return self.memory.read(gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        with self._unguarded():
            self.memory.write(gpa, data)


@pytest.fixture
def confined(kvm_device, tmp_path):
    """A VM with 4 MiB of RAM, the pool at [3M, 4M) declared shared, a virtio-blk disk offering
    ACCESS_PLATFORM, and the protected VM's guard and causes (arm64 pKVM's) installed as after the first
    run: devices may touch the pool only."""
    from pyvmm.vm import Vm

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 2 * 64)
    with Vm() as vm:
        vm.add_memory(4 * MIB, "anon", gpa=0)
        attached = vm.add_virtio_blk(str(disk))
        attached.transport.platform_features = 1 << VIRTIO_F_ACCESS_PLATFORM
        vm.arch.device_access_cause = lambda vm, negotiated: pkvm.device_access_cause(vm.dma_pool, negotiated)
        vm.dma_pool = POOL
        vm.memory.declare_shared(POOL.gpa, POOL.size)
        vm.memory.access_guard = pkvm.access_guard(vm.memory)
        vm.memory.has_run = True
        yield vm, attached


def _blk_read(d: Driver, guest: GuestSide, header: int, data: int, status: int) -> tuple[int, bytes]:
    guest.write(header, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    guest.write(data, b"\xee" * 512)
    guest.write(status, b"\x77")
    head = d.add(0, [Buf(header, 16), Buf(data, 512, write=True), Buf(status, 1, write=True)])
    d.kick(0)
    assert d.take_used(0)[0][0] == head
    return guest.read(status, 1)[0], guest.read(data, 512)


def test_requests_inside_the_pool_work_and_are_counted(confined):
    vm, attached = confined
    guest = GuestSide(vm.memory)
    d = Driver(attached.transport, guest, ring_base=POOL.gpa)
    d.probe()
    status, data = _blk_read(d, guest, POOL.gpa + 0x8000, POOL.gpa + 0x9000, POOL.gpa + 0xA000)
    assert status == VIRTIO_BLK_S_OK and data == bytes(range(256)) * 2
    counts = vm.device_memory()[attached.name]
    assert counts["shared"] > 0 and counts["outside"] == 0 and counts["refused"] == 0
    assert vm.device_faults == []


def test_a_buffer_outside_the_pool_fails_its_request_untouched(confined, caplog):
    vm, attached = confined
    guest = GuestSide(vm.memory)
    d = Driver(attached.transport, guest, ring_base=POOL.gpa)
    d.probe()
    private = 0x100000
    status, data = _blk_read(d, guest, POOL.gpa + 0x8000, private, POOL.gpa + 0xA000)
    assert status == VIRTIO_BLK_S_IOERR
    assert data == b"\xee" * 512  # the private page was not written
    assert not vm.memory.forced_pages
    counts = vm.device_memory()[attached.name]
    assert counts["outside"] == 0 and counts["refused"] == 1
    [fault] = vm.device_faults
    assert fault.device == attached.name and fault.queue == 0 and fault.gpa == private and fault.write
    assert "CONFIG_ARM_PKVM_GUEST" in fault.cause  # ACCESS_PLATFORM was negotiated: the kernel did not bounce
    lines = [r.getMessage() for r in caplog.records if "private to the protected guest" in r.getMessage()]
    assert len(lines) == 1 and lines[0] == fault.line
    assert f"GPA {private:#x}" in fault.line and "virtio-blk queue 0" in fault.line and "likely cause:" in fault.line


def test_rings_outside_the_pool_need_reset_and_name_the_driver(confined):
    vm, attached = confined
    guest = GuestSide(vm.memory)
    d = Driver(attached.transport, guest, ring_base=0x200000,
               features=TRANSPORT_FEATURES)  # a driver that does not accept ACCESS_PLATFORM
    d.probe()
    guest.write(0x210000, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    d.add(0, [Buf(0x210000, 16), Buf(0x211000, 512, write=True), Buf(0x212000, 1, write=True)])
    d.kick(0)
    assert d.status & DeviceStatus.DEVICE_NEEDS_RESET
    [fault] = vm.device_faults
    assert fault.queue == 0 and 0x200000 <= fault.gpa < 0x201000 and not fault.write
    assert "did not negotiate VIRTIO_F_ACCESS_PLATFORM" in fault.cause
    assert vm.device_memory()[attached.name] == {"shared": 0, "outside": 0, "refused": 1}
