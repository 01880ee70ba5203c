"""Region validation before any ioctl, and the accessor that never crashes the VMM."""

from __future__ import annotations


import pytest

from pyvmm import hostmem
from pyvmm.kvm import uapi
from pyvmm.kvm.errors import ConfigError, GuestMemoryError
from pyvmm.memory.regions import MemoryRules
from pyvmm.vm import Vm


@pytest.fixture
def vm(kvm_device):
    with Vm() as v:
        yield v


@pytest.mark.parametrize("gpa, size, message", [
    (0x1000, 0x800, "multiples of 0x1000"),
    (0x800, 0x1000, "multiples of 0x1000"),
    (0, 0, "size must be positive"),
    (0x100000, 0x1000, "overlaps slot 0"),
    (1 << 52, 0x1000, "beyond the guest physical address limit"),
])
def test_region_validation(vm, gpa, size, message):
    vm.add_memory(2 << 20, gpa=0)
    with pytest.raises(ConfigError, match=message):
        vm.memory.validate(gpa, size)


def test_slot_limit(kvm_device):
    with Vm() as vm:
        vm.memory.rules = MemoryRules(max_slots=2)
        vm.add_memory(0x1000, gpa=0)
        vm.add_memory(0x1000, gpa=0x1000)
        with pytest.raises(ConfigError, match="limit of 2 memslots"):
            vm.add_memory(0x1000, gpa=0x2000)


def test_protected_rules_refuse_readonly_and_log_dirty(kvm_device):
    with Vm() as vm:
        vm.memory.rules = MemoryRules(readonly_allowed=False, log_dirty_allowed=False, vm_kind="protected")
        with pytest.raises(ConfigError, match="READONLY memslots are not allowed on a protected VM"):
            vm.add_memory(0x1000, gpa=0, flags=uapi.KVM_MEM_READONLY)
        with pytest.raises(ConfigError, match="LOG_DIRTY_PAGES memslots are not allowed"):
            vm.add_memory(0x1000, gpa=0, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)


def test_accessor_round_trip_across_slots(vm):
    vm.add_memory(0x1000, gpa=0)
    vm.add_memory(0x1000, "memfd", gpa=0x1000)
    vm.memory.write(0xFFC, b"ABCDEFGH")  # straddles both slots
    assert vm.memory.read(0xFFC, 8) == b"ABCDEFGH"


def test_accessor_outside_ram(vm):
    vm.add_memory(0x1000, gpa=0)
    with pytest.raises(GuestMemoryError, match="not in any memslot"):
        vm.memory.read(0x2000, 4)


def test_accessor_survives_an_inaccessible_page(vm):
    """A page the host may not touch (PROT_NONE here; a guest-owned page on pKVM) is an error, not SIGSEGV."""
    region = vm.add_memory(0x2000, gpa=0)
    hostmem.mprotect(region.hva + 0x1000, 0x1000, 0)  # PROT_NONE
    with pytest.raises(GuestMemoryError, match=r"at 0x1000 \(slot 0, anon\).*EFAULT"):
        vm.memory.read(0xFF0, 0x20)
    with pytest.raises(GuestMemoryError, match="EFAULT"):
        vm.memory.write(0x1000, b"x")
    assert vm.memory.read(0, 4) == b"\0\0\0\0"  # still alive, the rest still readable


def test_remove_region_closes_backing(vm):
    region = vm.add_memory(0x1000, "memfd", gpa=0)
    fd = region.backing.memfd
    vm.memory.remove(region)
    assert vm.memory.find(0) is None
    with pytest.raises(OSError) as info:
        __import__("os").fstat(fd)
    assert info.value.errno == __import__("errno").EBADF
