"""Guest physical memory: a set of regions, each one memslot with one backing.

``GuestMemory`` validates a region before any ioctl (alignment, size, overlap,
slot limits, flags the VM type forbids), registers it with the VM, and is the
one way the VMM reads or writes guest memory: through process_vm_readv/writev,
so that a page the host may not touch (a protected VM's) is an error, not a
SIGSEGV that kills the VMM.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterable

from .. import hostmem
from ..kvm import uapi
from ..kvm.errors import ConfigError, GuestMemoryError
from ..kvm.fd import close_all
from ..kvm.vm import VmFd
from ..record import Record
from .backing import Backing, BackingSpec
from ..logs import getLogger

log = getLogger("pyvmm.memory")

Window = tuple[int, int, str]  # [start, end) and what is there

FLAG_NAMES = {
    uapi.KVM_MEM_LOG_DIRTY_PAGES: "LOG_DIRTY_PAGES",
    uapi.KVM_MEM_READONLY: "READONLY",
    uapi.KVM_MEM_GUEST_MEMFD: "GUEST_MEMFD",
}


def pages(gpa: int, size: int) -> range:
    """Page numbers covering [gpa, gpa+size)."""
    return range(gpa // hostmem.PAGE_SIZE, (gpa + size - 1) // hostmem.PAGE_SIZE + 1)


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES.items() if flags & bit]


class MemoryRegion(Record):
    """One memslot: guest physical range [gpa, gpa+size) backed by ``backing``."""

    __slots__ = ("gpa", "size", "slot", "flags", "backing", "registered")

    def __init__(self, gpa: int, size: int, slot: int, flags: int, backing: Backing, registered: bool = False):
        self.gpa = gpa
        self.size = size
        self.slot = slot
        self.flags = flags
        self.backing = backing
        self.registered = registered

    def _values(self) -> tuple:  # == leaves ``registered`` out
        return self.gpa, self.size, self.slot, self.flags, self.backing

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def hva(self) -> int:
        return self.backing.hva

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end

    def describe(self) -> dict:
        return {
            "slot": self.slot,
            "gpa": self.gpa,
            "size": self.size,
            "flags": flag_names(self.flags | self.backing.slot_flags),
            "backing": self.backing.describe(),
            "hva": self.hva,
            "backing_details": self.backing.details(),
        }


class MemoryRules(Record):
    """What the VM type allows (filled in by the VM from KVM's answers and its type)."""

    __slots__ = ("max_slots", "max_gpa", "readonly_allowed", "log_dirty_allowed", "frozen_after_run", "vm_kind",
                 "device_windows")

    def __init__(self, max_slots: int = 32764, max_gpa: int = 1 << 52, readonly_allowed: bool = True,
                 log_dirty_allowed: bool = True, frozen_after_run: bool = False, vm_kind: str = "normal",
                 device_windows: list[Window] | None = None):
        self.max_slots = max_slots
        self.max_gpa = max_gpa
        self.readonly_allowed = readonly_allowed
        self.log_dirty_allowed = log_dirty_allowed
        self.frozen_after_run = frozen_after_run  # pKVM: no delete/move once a vCPU has run
        self.vm_kind = vm_kind
        # Where the platform has devices (Arch.device_windows): RAM there would hide them from the guest.
        self.device_windows = [] if device_windows is None else device_windows


def check_region(gpa: int, size: int, rules: MemoryRules, taken: Iterable[Window] = (),
                 alignment: int = hostmem.PAGE_SIZE) -> None:
    """Check a prospective region [gpa, gpa+size) against ``rules`` (address limit, device windows) and the
    ranges already ``taken`` ((start, end, what)).  Raises a one-line ConfigError."""
    where = f"region at {gpa:#x} of size {size:#x}"
    if size <= 0:
        raise ConfigError(f"{where}: size must be positive")
    if gpa < 0:
        raise ConfigError(f"{where}: negative guest address")
    if gpa % alignment or size % alignment:
        why = ("the host's page size: KVM_SET_USER_MEMORY_REGION refuses anything else with EINVAL"
               if alignment == hostmem.PAGE_SIZE else "the backing's page size")
        raise ConfigError(f"{where}: guest address and size must be multiples of {alignment:#x} ({why})")
    if gpa + size > rules.max_gpa:
        raise ConfigError(f"{where}: ends beyond the guest physical address limit {rules.max_gpa:#x}")
    for start, end, name in rules.device_windows:
        if gpa < end and start < gpa + size:
            raise ConfigError(f"{where}: overlaps [{start:#x}, {end:#x}), {name}: memory there would hide "
                              "the devices from the guest; put it elsewhere")
    for start, end, what in taken:
        if gpa < end and start < gpa + size:
            raise ConfigError(f"{where}: overlaps {what}")


def validate_layout(ranges: Iterable[tuple[int, int]], rules: MemoryRules,
                    alignment: int = hostmem.PAGE_SIZE) -> list[tuple[int, int]]:
    """A whole memory map of (gpa, size) pairs, checked in order as ``GuestMemory.add`` would check them:
    returns them sorted by gpa, or raises a one-line ConfigError (the first bad region)."""
    taken: list[Window] = []
    for i, (gpa, size) in enumerate(ranges):
        check_region(gpa, size, rules, taken, alignment)
        taken.append((gpa, gpa + size, f"region {i} [{gpa:#x}, {gpa + size:#x})"))
    return sorted((start, end - start) for start, end, _ in taken)


def place_ram(start: int, size: int, windows: Iterable[Window]) -> list[tuple[int, int]]:
    """``size`` bytes of RAM from ``start`` as (gpa, size) pieces that step over the device windows, as other
    VMMs do on x86: RAM that would run into the MMIO hole below 4 GiB continues above it.  A size that is not
    positive is returned as it is, for the caller's validation to refuse."""
    pieces = []
    for lo, hi, _ in sorted(windows):
        if size > 0 and hi > start:
            if lo > start:
                take = min(size, lo - start)
                pieces.append((start, take))
                size -= take
            start = hi
    if size or not pieces:
        pieces.append((start, size))
    return pieces


class GuestMemory:
    """The VM's memory map.  Owns every backing; ``close()`` unmaps and closes them all."""

    def __init__(self, vm: VmFd, rules: MemoryRules | None = None):
        self.vm = vm
        self.rules = rules or MemoryRules()
        self.regions: list[MemoryRegion] = []  # sorted by gpa
        # (region starts, regions) for find(), replaced as one tuple whenever self.regions changes: a vCPU thread's
        # lookup sees the old pair or the new one, never a list of starts that belongs to other regions
        self._index: tuple[list[int], list[MemoryRegion]] = ([], [])
        self.has_run = False
        # Called before the VMM touches guest memory; may refuse (protected VMs: arch.arm64.pkvm.access_guard).
        self.access_guard: Callable[[int, int, bool], None] | None = None
        self.shared_pages: set[int] = set()  # page numbers a protected guest has shared with the host
        self.forced_pages: set[int] = set()  # guest-owned pages the host touched anyway (force=True)
        self.rom_writes_dropped = 0  # guest writes to READONLY slots that no device claimed
        self._rom_lock = threading.Lock()

    # --- building the map ------------------------------------------------
    def validate(self, gpa: int, size: int, flags: int = 0, alignment: int = hostmem.PAGE_SIZE,
                 slot: int | None = None) -> int:
        """Check a prospective region; returns the slot it would get.  Raises ConfigError."""
        taken = [(r.gpa, r.end, f"slot {r.slot} [{r.gpa:#x}, {r.end:#x}) ({r.backing.describe()})")
                 for r in self.regions]
        check_region(gpa, size, self.rules, taken, alignment)
        where = f"region at {gpa:#x} of size {size:#x}"
        if flags & ~(uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY):
            raise ConfigError(f"{where}: unknown memslot flags {flags:#x}")
        if flags & uapi.KVM_MEM_READONLY and not self.rules.readonly_allowed:
            raise ConfigError(f"{where}: READONLY memslots are not allowed on a {self.rules.vm_kind} VM")
        if flags & uapi.KVM_MEM_LOG_DIRTY_PAGES and not self.rules.log_dirty_allowed:
            raise ConfigError(f"{where}: LOG_DIRTY_PAGES memslots are not allowed on a {self.rules.vm_kind} VM")
        used = {r.slot for r in self.regions}
        if slot is None:
            slot = next(i for i in range(len(used) + 1) if i not in used)
        elif slot in used:
            raise ConfigError(f"{where}: slot {slot} is already in use")
        if slot >= self.rules.max_slots:
            raise ConfigError(f"{where}: slot {slot} exceeds this KVM's limit of {self.rules.max_slots} memslots")
        return slot

    def add(self, gpa: int, size: int, backing: BackingSpec | Backing, flags: int = 0,
            slot: int | None = None) -> MemoryRegion:
        """Create the backing (if given as a spec), validate, and register a memslot."""
        alignment = backing.alignment
        slot = self.validate(gpa, size, flags, alignment, slot)
        made = isinstance(backing, BackingSpec)
        store = backing.create(size, self.vm) if made else backing
        if store.size != size:
            raise ConfigError(f"backing {store.describe()} has size {store.size:#x}, region wants {size:#x}")
        region = MemoryRegion(gpa, size, slot, flags, store)
        try:
            self._set_region(region, size)
        except BaseException:
            if made:
                store.close()
            raise
        region.registered = True
        bisect.insort(self.regions, region, key=lambda r: r.gpa)
        self._index = ([r.gpa for r in self.regions], list(self.regions))
        return region

    def _set_region(self, region: MemoryRegion, size: int) -> None:
        b = region.backing
        flags = region.flags | b.slot_flags
        if b.guest_memfd is not None:
            self.vm.set_user_memory_region2(region.slot, flags, region.gpa, size, b.hva,
                                            guest_memfd=b.guest_memfd, guest_memfd_offset=b.guest_memfd_offset)
        else:
            self.vm.set_user_memory_region(region.slot, flags, region.gpa, size, b.hva)

    def remove(self, region: MemoryRegion) -> None:
        """Delete the memslot (size 0) and close its backing."""
        if self.rules.frozen_after_run and self.has_run:
            raise ConfigError(
                f"slot {region.slot}: a {self.rules.vm_kind} VM's memslots cannot be deleted or moved after "
                "its first KVM_RUN (the kernel answers EPERM)"
            )
        if region.registered and not self.vm.closed:
            self._set_region(region, 0)
            region.registered = False
        self.regions.remove(region)
        self._index = ([r.gpa for r in self.regions], list(self.regions))
        region.backing.close()

    def close(self) -> None:
        """Close every backing (all of them, even if one fails; then the first error is raised).
        Call after the VM fd is closed (KVM drops its slots with the VM)."""
        regions, self.regions, self._index = self.regions, [], ([], [])
        close_all(r.backing.close for r in regions)

    def count_rom_write(self, region: MemoryRegion, gpa: int, size: int) -> None:
        """A guest write to READONLY slot ``region`` that no device claimed: dropped, counted, logged once."""
        with self._rom_lock:
            self.rom_writes_dropped += 1
            first = self.rom_writes_dropped == 1
        if first:
            log.warning("guest write of %d bytes at %#x to READONLY slot %d dropped (no device claims it); "
                        "further ones are only counted", size, gpa, region.slot)

    # --- lookup ----------------------------------------------------------
    def find(self, gpa: int) -> MemoryRegion | None:
        starts, regions = self._index
        i = bisect.bisect_right(starts, gpa) - 1
        if i >= 0:
            region = regions[i]  # the last region starting at or below gpa: contains it, or nothing does
            if gpa < region.gpa + region.size:  # (region.contains() inlined: once per MMIO exit)
                return region
        return None

    @property
    def total(self) -> int:
        return sum(r.size for r in self.regions)

    # --- the safe accessor -------------------------------------------------
    def _chunks(self, gpa: int, length: int):
        """Split [gpa, gpa+length) into (region, offset, length) pieces; raises for holes."""
        while length > 0:
            region = self.find(gpa)
            if region is None:
                raise GuestMemoryError(f"guest address {gpa:#x} is not in any memslot")
            take = min(length, region.end - gpa)
            yield region, gpa - region.gpa, take
            gpa += take
            length -= take

    def declare_shared(self, gpa: int, size: int = hostmem.PAGE_SIZE, shared: bool = True) -> None:
        """Record that a protected guest shared (or unshared) [gpa, gpa+size) with the host."""
        if shared:
            self.shared_pages.update(pages(gpa, size))
        else:
            self.shared_pages.difference_update(pages(gpa, size))

    def _io(self, write: bool, gpa: int, buf: ctypes.Array, force: bool = False) -> None:
        if self.access_guard is not None:
            try:
                self.access_guard(gpa, ctypes.sizeof(buf), write)
            except GuestMemoryError:
                if not force:
                    raise
                self.forced_pages.update(set(pages(gpa, ctypes.sizeof(buf))) - self.shared_pages)
        done = 0
        for region, offset, take in self._chunks(gpa, ctypes.sizeof(buf)):
            piece = (ctypes.c_char * take).from_buffer(buf, done)
            try:
                if region.backing.host_io(write, offset, piece):
                    done += take
                    continue
                got = hostmem.process_vm_io(write, region.hva + offset, piece)
            except OSError as err:
                got, why = 0, err
            else:
                why = None
            if got != take:
                bad = region.gpa + offset + got
                reason = why.strerror if why else "short copy"
                if why is None or why.errno == errno.EFAULT:
                    reason = "page not accessible to the host (EFAULT)"
                raise GuestMemoryError(
                    f"cannot {'write' if write else 'read'} guest memory at {bad:#x} "
                    f"(slot {region.slot}, {region.backing.describe()}): {reason}"
                )
            done += take

    def read(self, gpa: int, length: int, force: bool = False) -> bytes:
        buf = (ctypes.c_char * length)()
        if length:
            self._io(False, gpa, buf, force)
        return bytes(buf)

    def write(self, gpa: int, data: bytes, force: bool = False) -> None:
        if not data:
            return
        buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
        self._io(True, gpa, buf, force)

    FILE_CHUNK = 1 << 20  # write_file's bounce buffer

    def write_file(self, gpa: int, fd: int, offset: int, length: int, what: str = "file") -> None:
        """Copy ``length`` bytes of ``fd`` from ``offset`` to guest memory at ``gpa``, FILE_CHUNK bytes at a time
        through write()'s path (the same checks and errors): a kernel or initrd is never held whole in pyvmm's
        memory.  A file shorter than that is a ConfigError naming ``what``."""
        buf = (ctypes.c_char * min(length, self.FILE_CHUNK))()
        view = memoryview(buf).cast("B")
        done = 0
        while done < length:
            take = min(length - done, len(view))
            got = os.preadv(fd, [view[:take]], offset + done)
            if got <= 0:
                raise ConfigError(f"{what}: ends at {offset + done} bytes, short of {offset + length} (it changed "
                                  "while being loaded)")
            piece = buf if got == len(view) else (ctypes.c_char * got).from_buffer(buf)
            self._io(True, gpa + done, piece)
            done += got

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))
