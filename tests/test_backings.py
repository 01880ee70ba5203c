"""One test per backing kind: the guest writes a pattern, and the host sees it in that backing.

A kind the kernel lacks is skipped with the missing feature named (from pyvmm's own error)."""

from __future__ import annotations

import os

import pytest

from pyvmm.kvm.errors import ConfigError, MissingFeature
from pyvmm.memory.backing import BackingKind
from pyvmm.outcome import ExitKind

from tests.expected import MEMTOUCH_PATTERN as PATTERN
MEMORY = 4 << 20
PROBES = [2 << 20, (3 << 20) + 64 * 7, MEMORY - 64]


def _read_through_backing(region, gpa: int) -> bytes | None:
    """Read 8 bytes via the backing's own fd (not via the slot's mapping), where it has one that supports read."""
    b = region.backing
    offset = gpa - region.gpa
    fd = {BackingKind.MEMFD: getattr(b, "memfd", None), BackingKind.MEMFD_HUGETLB: getattr(b, "memfd", None),
          BackingKind.FILE: getattr(b, "fd", None), BackingKind.UDMABUF: getattr(b, "memfd", None)}.get(b.kind)
    if fd is None:
        return None
    return os.pread(fd, 8, offset)


def backing_param(kind: str, tmp_path) -> str:
    return f"file:{tmp_path / 'guest.img'}" if kind == "file" else kind


@pytest.mark.parametrize("kind", ["anon", "memfd", "memfd-hugetlb", "guest-memfd", "udmabuf", "dma-heap:system",
                                  "file"])
@pytest.mark.timeout(90)
def test_memtouch_on_backing(boot_x86, tmp_path, kind):
    seen = {}

    def inspect(vm):
        region = vm.memory.regions[0]
        seen["slot"] = region.describe()
        for gpa in PROBES:
            seen[gpa] = (vm.memory.read_u64(gpa), _read_through_backing(region, gpa))

    try:
        run = boot_x86("memtouch", memory=MEMORY, backing=backing_param(kind, tmp_path), inspect=inspect)
    except MissingFeature as err:
        pytest.skip(f"{kind}: {err}")
    assert run.outcome.kind is ExitKind.GUEST_EXIT and run.outcome.status == 0, run.console
    assert "errors=0x0000000000000000" in run.console
    assert seen["slot"]["backing"].startswith(kind.split(":")[0])
    for gpa in PROBES:
        via_slot, via_backing = seen[gpa]
        assert via_slot == gpa ^ PATTERN
        if via_backing is not None:  # the pages really live in that memfd/file
            assert int.from_bytes(via_backing, "little") == gpa ^ PATTERN
    if kind == "file":
        data = (tmp_path / "guest.img").read_bytes()
        assert int.from_bytes(data[2 << 20:(2 << 20) + 8], "little") == (2 << 20) ^ PATTERN


@pytest.mark.timeout(90)
def test_guest_memfd_slot_uses_region2(boot_x86):
    seen = {}

    def inspect(vm):
        seen.update(vm.memory.regions[0].describe())

    try:
        boot_x86("hello", backing="guest-memfd", inspect=inspect)
    except MissingFeature as err:
        pytest.skip(str(err))
    assert "GUEST_MEMFD" in seen["flags"]
    assert seen["backing_details"]["guest_memfd"] >= 0


def test_missing_backings_name_what_is_missing(kvm_device):
    from pyvmm.kvm import Kvm
    from pyvmm.memory.backing import BackingSpec

    with Kvm() as kvm, kvm.create_vm(0) as vm:
        if not os.path.exists("/dev/udmabuf"):
            with pytest.raises(MissingFeature, match=r"/dev/udmabuf.*CONFIG_UDMABUF"):
                BackingSpec.parse("udmabuf").create(2 << 20, vm)
        if not os.path.isdir("/dev/dma_heap"):
            with pytest.raises(MissingFeature, match=r"/dev/dma_heap.*CONFIG_DMABUF_HEAPS"):
                BackingSpec.parse("dma-heap:system").create(2 << 20, vm)


def test_udmabuf_spellings():
    """``udmabuf`` and ``udmabuf:dmabuf`` map the DMA-buf; ``udmabuf:memfd`` maps the memfd behind it."""
    from pyvmm.memory.backing import BackingKind, BackingSpec

    assert BackingSpec.parse("udmabuf") == BackingSpec.parse("udmabuf:dmabuf") == BackingSpec(BackingKind.UDMABUF)
    assert str(BackingSpec.parse("udmabuf:memfd")) == "udmabuf:memfd"
    for bad in ("udmabuf:", "udmabuf:shmem", "udmabuf:memfd:x"):
        with pytest.raises(ConfigError, match="udmabuf:dmabuf, the default, or udmabuf:memfd"):
            BackingSpec.parse(bad)
    with pytest.raises(ConfigError, match=r"udmabuf\[:memfd\]"):
        BackingSpec.parse("udma")


def test_udmabuf_memfd_mapping_without_the_device_says_what_is_missing(kvm_device):
    from pyvmm.kvm import Kvm
    from pyvmm.memory.backing import BackingSpec

    if os.path.exists("/dev/udmabuf"):
        pytest.skip("this kernel has /dev/udmabuf (the lab tests the mapping: tests/test_arm64_pkvm.py)")
    with Kvm() as kvm, kvm.create_vm(0) as vm:
        with pytest.raises(MissingFeature, match=r"/dev/udmabuf.*CONFIG_UDMABUF"):
            BackingSpec.parse("udmabuf:memfd").create(2 << 20, vm)
