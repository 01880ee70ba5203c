"""The memory map against the platform's device windows: regions over a window are refused naming it, x86 RAM
beyond the MMIO hole continues at 4 GiB (two memslots, both in Linux's E820 map), and the validator either
accepts a layout that is valid or raises one one-line ConfigError (property tests, no KVM needed)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm import hostmem
from pyvmm.arch.arm64 import Arm64
from pyvmm.arch.arm64 import layout as arm64_layout
from pyvmm.arch.x86_64 import X86_64, linux
from pyvmm.arch.x86_64 import layout as x86_layout
from pyvmm.kvm.errors import ConfigError
from pyvmm.memory.regions import MemoryRules, check_region, place_ram, validate_layout
from pyvmm.outcome import ExitKind
from tests.conftest import run_cli
from tests.expected import MMIO_GUEST_LOG

PAGE = hostmem.PAGE_SIZE  # the host's: memslots come in its units (16 KiB on a 16K-page arm64 host)
X86_PAGE = 0x1000  # an x86 guest's page
GIB = 1 << 30
HOLE = (x86_layout.MMIO_HOLE_START, x86_layout.MMIO_HOLE_END)
X86_WINDOWS = X86_64().device_windows(None)  # neither arch's windows depend on the VM
ARM64_WINDOWS = Arm64().device_windows(None)
X86_RULES = MemoryRules(max_gpa=1 << 46, device_windows=X86_WINDOWS)
ARM64_RULES = MemoryRules(max_gpa=1 << 40, device_windows=ARM64_WINDOWS)


@pytest.fixture
def x86_kvm(kvm_device):
    from pyvmm.arch import machine_name

    if machine_name() != "x86_64":
        pytest.skip("x86_64 VMs need an x86_64 host")


def overlapping(start: int, end: int) -> dict[str, tuple[int, int]]:
    """Regions (gpa, size) that overlap [start, end) in each way there is."""
    return {"start inside": (end - PAGE, 2 * PAGE), "end inside": (start - PAGE, 2 * PAGE),
            "covering": (start - PAGE, end - start + 2 * PAGE), "equal": (start, end - start),
            "inside": (start + PAGE, PAGE)}


# --- the windows themselves ----------------------------------------------------------------------------
def test_x86_devices_lie_in_the_mmio_hole():
    assert X86_WINDOWS == [(*HOLE, x86_layout.MMIO_HOLE_NAME)]
    devices = [(x86_layout.TEST_DEVICE_MMIO, 0x1000), (x86_layout.IDENTITY_MAP_ADDR, X86_PAGE),
               (x86_layout.TSS_ADDR, 3 * X86_PAGE),  # KVM_SET_TSS_ADDR takes three pages
               (x86_layout.VIRTIO_BASE, x86_layout.VIRTIO_MAX * x86_layout.VIRTIO_STRIDE)]
    for gpa, size in devices:
        assert HOLE[0] <= gpa and gpa + size <= HOLE[1], hex(gpa)


def test_arm64_devices_lie_in_the_device_region_and_pvmfw_and_ram_do_not():
    ((start, end, _),) = ARM64_WINDOWS
    for gpa in (arm64_layout.GIC_DIST, arm64_layout.GIC_ITS, arm64_layout.GIC_REDIST, arm64_layout.UART,
                arm64_layout.DEBUG_EXIT, arm64_layout.TEST_DEVICE,
                arm64_layout.VIRTIO_BASE + (arm64_layout.VIRTIO_MAX - 1) * arm64_layout.VIRTIO_STRIDE):
        assert start <= gpa < end, hex(gpa)
    assert end <= arm64_layout.PVMFW and end <= arm64_layout.RAM_BASE


# --- (a) regions over a window are refused, naming it ----------------------------------------------------
@pytest.mark.parametrize("way", list(overlapping(*HOLE)))
@pytest.mark.parametrize("window", X86_WINDOWS, ids=lambda w: f"{w[0]:#x}")
def test_x86_region_over_a_window_is_refused(x86_kvm, window, way):
    from pyvmm.vm import Vm

    start, end, name = window
    gpa, size = overlapping(start, end)[way]
    with Vm(arch=X86_64()) as vm:
        with pytest.raises(ConfigError) as info:
            vm.add_memory(size, gpa=gpa)
        assert vm.memory.regions == []
    message = str(info.value)
    assert name in message and f"[{start:#x}, {end:#x})" in message and "\n" not in message


def test_x86_regions_next_to_the_hole_are_accepted(x86_kvm):
    from pyvmm.vm import Vm

    with Vm(arch=X86_64()) as vm:
        vm.add_memory(PAGE, gpa=HOLE[0] - PAGE)
        vm.add_memory(PAGE, gpa=HOLE[1])
        assert [(r.gpa, r.size) for r in vm.memory.regions] == [(HOLE[0] - PAGE, PAGE), (HOLE[1], PAGE)]


@pytest.mark.timeout(60)
def test_cli_region_over_the_test_device_is_refused(x86_firmware):
    """The issue's case: --region 0xd0000000,4K used to hide the test device from the guest."""
    res = run_cli("run", os.path.join(x86_firmware, "mmio"), "--region", "0xd0000000,4K")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "region at 0xd0000000 of size 0x1000: overlaps [0xc0000000, 0x100000000), the x86 MMIO hole" in res.stderr


# --- (b) -m 4G on x86: RAM below the hole and from 4 GiB ---------------------------------------------------
def test_x86_ram_steps_over_the_mmio_hole(x86_kvm):
    """4 GiB of anonymous memory is only mapped, never touched: two memslots, [0, 3G) and [4G, 5G)."""
    from pyvmm.vm import Vm

    with Vm(arch=X86_64()) as vm:
        low = vm.add_memory(4 * GIB)
        assert [(r.gpa, r.end, r.slot) for r in vm.memory.regions] == [(0, 3 * GIB, 0), (4 * GIB, 5 * GIB, 1)]
        assert low is vm.memory.regions[0]
        assert all(r.backing.describe() == "anon" for r in vm.memory.regions)
        vm.add_memory(GIB)  # more RAM goes after the last region
        assert (vm.memory.regions[-1].gpa, vm.memory.regions[-1].end) == (5 * GIB, 6 * GIB)


def test_x86_ram_filling_the_room_below_the_hole_is_one_slot(x86_kvm):
    from pyvmm.vm import Vm

    with Vm(arch=X86_64()) as vm:
        vm.add_memory(3 * GIB)
        vm.add_memory(2 << 20)  # starts at the hole: goes to 4 GiB
        assert [(r.gpa, r.size) for r in vm.memory.regions] == [(0, 3 * GIB), (4 * GIB, 2 << 20)]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_x86_split_is_all_or_nothing(x86_kvm):
    """The second memslot refused (a slot limit of 1 here): the first is deleted and its memfd closed."""
    from pyvmm.vm import Vm

    with Vm(arch=X86_64()) as vm:
        vm.memory.rules.max_slots = 1
        before = _open_fds()
        with pytest.raises(ConfigError, match="region at 0x100000000 .*limit of 1 memslots"):
            vm.add_memory(4 * GIB, "memfd")
        assert vm.memory.regions == [] and _open_fds() == before


@pytest.mark.parametrize("backing", ["file", "created"])
def test_x86_split_refuses_a_backing_that_can_back_one_slot(x86_kvm, tmp_path, backing):
    """A file mapped from offset 0 twice would alias low and high RAM; a created Backing is one slot's."""
    from pyvmm.memory.backing import AnonBacking
    from pyvmm.vm import Vm

    with Vm(arch=X86_64()) as vm:
        spec = f"file:{tmp_path / 'ram'}" if backing == "file" else AnonBacking(4 * GIB)
        try:
            with pytest.raises(ConfigError, match=r"run into the x86 MMIO hole .* can back only one; ask for at "
                                                  r"most 0xc0000000 bytes"):
                vm.add_memory(4 * GIB, spec)
        finally:
            if not isinstance(spec, str):
                spec.close()
        assert vm.memory.regions == [] and not (tmp_path / "ram").exists()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("guest, text, kind", [
    ("hello", "Hello from a pyvmm guest (x86_64, long mode)\n", ExitKind.HALT),
    ("mmio", "mmio: ok\n", ExitKind.GUEST_EXIT),  # its accesses reach the test device at 0xd0000000
])
def test_x86_guests_run_with_4g(boot_x86, guest, text, kind):
    run = boot_x86(guest, memory=4 * GIB)
    assert run.console == text
    assert run.outcome.kind is kind and not run.outcome.status
    assert run.vm.mmio_bus.unclaimed_count == 0
    if guest == "mmio":
        assert run.vm.devices["testdev"].log == MMIO_GUEST_LOG


def test_x86_firmware_gets_the_ram_below_the_hole(x86_firmware):
    """rdi = the RAM below the hole, all of it in the 4 GiB identity map; memtouch touches [2M, rdi)."""
    from pyvmm.vm import Vm

    with Vm(arch=X86_64()) as vm:
        vm.add_memory(4 * GIB)
        vm.create_vcpus(1)
        vm.boot(os.path.join(x86_firmware, "hello"))
        assert vm.vcpus[0].get_regs().rdi == 3 * GIB


@pytest.mark.timeout(60)
def test_cli_mmio_guest_with_4g(x86_firmware):
    res = run_cli("run", os.path.join(x86_firmware, "mmio"), "-m", "4G")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "mmio: ok\n"


# --- (c) Linux's E820 map ---------------------------------------------------------------------------------
def test_e820_low_ram_only():
    assert linux.e820_map([(0, 256 << 20)]) == [(0, 0x9FC00, 1), (0x100000, (256 << 20) - 0x100000, 1)]


def test_e820_with_ram_above_the_hole():
    assert linux.e820_map([(0, 3 * GIB), (4 * GIB, 5 * GIB)]) == [
        (0, 0x9FC00, 1), (0x100000, 3 * GIB - 0x100000, 1), (4 * GIB, GIB, 1)]


def fake_bzimage() -> bytes:
    """The least a bzImage needs for load_bzimage: a 2.15 setup header with a 64-bit entry point."""
    data = bytearray(1024 + 4096)  # one setup sector after the boot sector, then the "kernel"
    data[linux.SETUP_SECTS] = 1
    data[0x201] = 0x6A  # the setup header runs to 0x202 + 0x6a
    data[linux.HEADER:linux.HEADER + 4] = linux.HDRS_MAGIC
    struct.pack_into("<H", data, linux.VERSION, 0x20F)
    data[linux.XLOADFLAGS] = linux.XLF_KERNEL_64
    struct.pack_into("<I", data, linux.CMDLINE_SIZE, 255)
    struct.pack_into("<I", data, linux.INIT_SIZE, 0x10000)
    return bytes(data)


def read_e820(vm) -> list[tuple[int, int, int]]:
    params = vm.memory.read(x86_layout.BOOT_PARAMS_ADDR, 4096)
    return [struct.unpack_from("<QQI", params, linux.BP_E820_TABLE + 20 * i)
            for i in range(params[linux.BP_E820_ENTRIES])]


@pytest.mark.parametrize("extra, e820_high", [
    (None, [(4 * GIB, GIB, 1)]),  # -m 4G: the part above the hole is RAM
    (2 << 20, [(4 * GIB, GIB + (2 << 20), 1)]),  # more RAM after it extends it
])
def test_linux_boot_with_4g_lists_ram_above_the_hole(x86_kvm, tmp_path, extra, e820_high):
    from pyvmm.vm import Vm

    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage())
    with Vm(arch=X86_64()) as vm:
        vm.add_memory(4 * GIB)
        if extra:
            vm.add_memory(extra)
        vm.create_vcpus(1)
        vm.boot(str(kernel), mode="linux")
        assert read_e820(vm) == [(0, 0x9FC00, 1), (0x100000, 3 * GIB - 0x100000, 1), *e820_high]


def test_linux_e820_leaves_out_a_region_beyond_a_gap(x86_kvm, tmp_path):
    """A --region at 4 GiB while RAM stops short of the hole is the user's region, not RAM add_memory placed."""
    from pyvmm.vm import Vm

    kernel = tmp_path / "bzImage"
    kernel.write_bytes(fake_bzimage())
    with Vm(arch=X86_64()) as vm:
        vm.add_memory(64 << 20)
        vm.add_memory(2 << 20, gpa=4 * GIB)
        vm.create_vcpus(1)
        vm.boot(str(kernel), mode="linux")
        assert read_e820(vm) == [(0, 0x9FC00, 1), (0x100000, (64 << 20) - 0x100000, 1)]


# --- (d) the validator: a valid layout or one one-line ConfigError ------------------------------------------
EDGES = [0, PAGE, 2 << 20, *HOLE, x86_layout.TEST_DEVICE_MMIO, arm64_layout.GIC_DIST, arm64_layout.PVMFW,
         arm64_layout.RAM_BASE, *(w[1] for w in ARM64_WINDOWS), 1 << 40, 1 << 46, 1 << 52, 1 << 64]
pages = st.integers(0, 2 << 20).map(lambda n: n * PAGE)  # [0, 8 GiB)
addresses = st.one_of(pages, st.builds(lambda edge, n: edge + n * PAGE, st.sampled_from(EDGES), st.integers(-3, 3)),
                      st.integers())
sizes = st.one_of(st.integers(1, 512).map(lambda n: n * PAGE), st.integers(1, 6).map(lambda n: n * GIB),
                  st.sampled_from([0, -PAGE, HOLE[1] - HOLE[0], 1 << 64]), st.integers())
layouts = st.one_of(st.lists(st.tuples(pages, st.integers(1, 512).map(lambda n: n * PAGE)), max_size=6),  # mostly valid
                    st.lists(st.tuples(addresses, sizes), max_size=6))
rules = st.sampled_from([X86_RULES, ARM64_RULES])
alignments = st.sampled_from([PAGE, 2 << 20])


def valid(ranges, rules: MemoryRules, alignment: int) -> bool:
    """What a valid layout is, said independently of the validator."""
    def overlap(a, b):
        return a[0] < b[1] and b[0] < a[1]

    spans = [(gpa, gpa + size) for gpa, size in ranges]
    return (all(size > 0 and gpa >= 0 and not gpa % alignment and not size % alignment
                and gpa + size <= rules.max_gpa for gpa, size in ranges)
            and not any(overlap(s, w[:2]) for s in spans for w in rules.device_windows)
            and not any(overlap(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]))


@settings(max_examples=500, deadline=None)
@given(layouts, rules, alignments)
def test_validator_gives_a_valid_layout_or_one_config_error(ranges, rules, alignment):
    try:
        result = validate_layout(ranges, rules, alignment)
    except ConfigError as err:  # anything else escaping fails the test
        assert "\n" not in str(err) and str(err)
        assert not valid(ranges, rules, alignment)
    else:
        assert valid(ranges, rules, alignment)
        assert result == sorted(ranges)


garbage = st.lists(st.sampled_from(["0x", "0", "1", "d", "f", "c", "00000", "-", " ", ",", "K", "M", "G", "T", "iB",
                                     "anon", "memfd", "file:", "\n", "_", "x"]), max_size=14).map("".join)
region_texts = st.one_of(
    garbage,
    st.builds("{:#x},{}{}".format, addresses, st.sampled_from(["4K", "2M", "1G", "0x1000", "4096", "3G", "0", "1"]),
              st.sampled_from(["", ",anon", ",memfd", ",bogus"])))


@settings(max_examples=500, deadline=None)
@given(st.lists(region_texts, max_size=4), rules)
def test_region_text_parses_to_a_valid_layout_or_one_config_error(texts, rules):
    """What --region gets from the command line, all the way to the validator."""
    from pyvmm.cli import parse_region

    try:
        parsed = [parse_region(text) for text in texts]
        validate_layout([(gpa, size) for gpa, size, _ in parsed], rules)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 8 << 18).map(lambda n: n * PAGE), st.integers(1, 8 << 18).map(lambda n: n * PAGE), rules)
def test_placed_ram_is_the_size_asked_for_and_avoids_the_windows(start, size, rules):
    pieces = place_ram(start, size, rules.device_windows)
    assert sum(s for _, s in pieces) == size
    assert [g for g, _ in pieces] == sorted(g for g, _ in pieces)
    assert pieces[0][0] == start or any(lo <= start < hi for lo, hi, _ in rules.device_windows)
    validate_layout(pieces, MemoryRules(max_gpa=1 << 64, device_windows=rules.device_windows))


# --- (e) arm64: the same check guards its device region ------------------------------------------------------
@pytest.mark.parametrize("way", list(overlapping(*ARM64_WINDOWS[0][:2])))
def test_arm64_region_over_the_device_region_is_refused(way):
    start, end, name = ARM64_WINDOWS[0]
    gpa, size = overlapping(start, end)[way]
    with pytest.raises(ConfigError, match=r"overlaps \[0x8000000, 0xb008000\), the arm64 device region \(GIC, "):
        check_region(gpa, size, ARM64_RULES)
    assert name.startswith("the arm64 device region")


def test_arm64_pvmfw_ram_and_neighbours_are_accepted():
    start, end, _ = ARM64_WINDOWS[0]
    assert validate_layout([(arm64_layout.RAM_BASE, 64 << 20), (arm64_layout.PVMFW, 2 << 20),
                            (start - PAGE, PAGE), (end, PAGE)], ARM64_RULES)
    assert place_ram(arm64_layout.RAM_BASE, 8 * GIB, ARM64_WINDOWS) == [(arm64_layout.RAM_BASE, 8 * GIB)]
