"""Region validation before any ioctl, and the accessor that never crashes the VMM."""

from __future__ import annotations


import pytest

from pyvmm import hostmem
from pyvmm.kvm import uapi
from pyvmm.kvm.errors import ConfigError, GuestMemoryError, KvmError
from pyvmm.memory.regions import MemoryRules
from pyvmm.vm import Vm


P = hostmem.PAGE_SIZE  # memslots come in the host's pages: 4 KiB, or 16 KiB on a 16K arm64 host (lab --pages 16k)


@pytest.fixture
def vm(kvm_device):
    with Vm() as v:
        yield v


@pytest.mark.parametrize("gpa, size, message", [
    (P, P // 2, f"multiples of {P:#x}"),
    (P // 2, P, f"multiples of {P:#x}"),
    (0, 0, "size must be positive"),
    (0x100000, P, "overlaps slot 0"),
    (1 << 52, P, "beyond the guest physical address limit"),
])
def test_region_validation(vm, gpa, size, message):
    vm.add_memory(2 << 20, gpa=0)
    with pytest.raises(ConfigError, match=message):
        vm.memory.validate(gpa, size)


def test_slot_limit(kvm_device):
    with Vm() as vm:
        vm.memory.rules = MemoryRules(max_slots=2)
        vm.add_memory(P, gpa=0)
        vm.add_memory(P, gpa=P)
        with pytest.raises(ConfigError, match="limit of 2 memslots"):
            vm.add_memory(P, gpa=2 * P)


def test_protected_rules_refuse_readonly_and_log_dirty(kvm_device):
    with Vm() as vm:
        vm.memory.rules = MemoryRules(readonly_allowed=False, log_dirty_allowed=False, vm_kind="protected")
        with pytest.raises(ConfigError, match="READONLY memslots are not allowed on a protected VM"):
            vm.add_memory(P, gpa=0, flags=uapi.KVM_MEM_READONLY)
        with pytest.raises(ConfigError, match="LOG_DIRTY_PAGES memslots are not allowed"):
            vm.add_memory(P, gpa=0, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)


def test_accessor_round_trip_across_slots(vm):
    vm.add_memory(P, gpa=0)
    vm.add_memory(P, "memfd", gpa=P)
    vm.memory.write(P - 4, b"ABCDEFGH")  # straddles both slots
    assert vm.memory.read(P - 4, 8) == b"ABCDEFGH"


def test_accessor_outside_ram(vm):
    vm.add_memory(P, gpa=0)
    with pytest.raises(GuestMemoryError, match="not in any memslot"):
        vm.memory.read(2 * P, 4)


def test_accessor_survives_an_inaccessible_page(vm):
    """A page the host may not touch (PROT_NONE here; a guest-owned page on pKVM) is an error, not SIGSEGV."""
    region = vm.add_memory(2 * P, gpa=0)
    hostmem.mprotect(region.hva + P, P, 0)  # PROT_NONE
    with pytest.raises(GuestMemoryError, match=rf"at {P:#x} \(slot 0, anon\).*EFAULT"):
        vm.memory.read(P - 0x10, 0x20)
    with pytest.raises(GuestMemoryError, match="EFAULT"):
        vm.memory.write(P, b"x")
    assert vm.memory.read(0, 4) == b"\0\0\0\0"  # still alive, the rest still readable


def test_remove_region_closes_backing(vm):
    region = vm.add_memory(P, "memfd", gpa=0)
    fd = region.backing.memfd
    vm.memory.remove(region)
    assert vm.memory.find(0) is None
    with pytest.raises(OSError) as info:
        __import__("os").fstat(fd)
    assert info.value.errno == __import__("errno").EBADF


def test_slot_alignment_follows_the_host_page_size(vm):
    """KVM takes memslots in the host's pages (kvm_set_memory_region: guest_phys_addr, memory_size and
    userspace_addr must be PAGE_SIZE-aligned, else EINVAL), and pyvmm checks the same before asking.  On a 16 KiB-page
    host (scripts/lab --pages 16k) a 4 KiB-aligned slot is refused by pyvmm with the reason, and the kernel agrees."""
    smaller = 0x1000 if P > 0x1000 else P // 2  # aligned to 4 KiB but not to the host's page on a 16K host
    first = vm.add_memory(P, gpa=0)
    for gpa, size in ((P, smaller), (P + smaller, P)):
        with pytest.raises(ConfigError, match=rf"of size {size:#x}: guest address and size must be multiples of "
                                              rf"{P:#x} \(the host's page size: KVM_SET_USER_MEMORY_REGION refuses"):
            vm.add_memory(size, gpa=gpa)
        with pytest.raises(KvmError) as err:  # the kernel's own answer, asked directly
            vm.fd.set_user_memory_region(5, 0, gpa, size, first.hva)
        assert err.value.errno == __import__("errno").EINVAL
    assert [(r.gpa, r.size) for r in vm.memory.regions] == [(0, P)]
