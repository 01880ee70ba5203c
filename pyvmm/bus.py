"""Address-range buses (x86 I/O ports, MMIO) that route guest accesses to devices.

Devices see only ``read(offset, size) -> bytes`` and ``write(offset, data)``;
they never see KVM.  An access nobody claims reads as zeros and is logged once
per address (with -v), as crosvm does; so is an access that starts inside a device but runs
past its end (a device only ever sees offsets within its own range).  ``summary()`` is the one line
``pyvmm run`` prints at the end of a run when there were any.
"""

from __future__ import annotations

from bisect import bisect_right
import threading

from .kvm.errors import ConfigError
from .record import Record
from .logs import getLogger

log = getLogger("pyvmm.bus")

TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # a plain base at run time: typing is not imported (pyvmm run's start-up)


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusRange(Record):
    __slots__ = ("base", "size", "device", "name")
    __hash__ = Record.value_hash

    def __init__(self, base: int, size: int, device: BusDevice, name: str):
        self.base = base
        self.size = size
        self.device = device
        self.name = name

    @property
    def end(self) -> int:
        return self.base + self.size


MAX_LOGGED_ADDRESSES = 16
SUMMARY_ACCESSES = 3


class Bus:
    def __init__(self, name: str):
        self.name = name
        # (starts, ranges), replaced whole on insert/remove: vCPU threads look up without a lock
        self._table: tuple[list[int], list[BusRange]] = ([], [])
        self._lock = threading.Lock()  # one device access at a time (devices need not be thread-safe)
        self._unclaimed_seen: set[tuple[int, bool]] = set()
        self.unclaimed_count = 0
        self.unclaimed_first: list[str] = []  # the first SUMMARY_ACCESSES unclaimed accesses, for summary()

    def insert(self, device: BusDevice, base: int, size: int, name: str | None = None) -> BusRange:
        if size <= 0:
            raise ConfigError(f"{self.name} bus: device size must be positive")
        name = name or type(device).__name__
        ranges = self._table[1]
        for r in ranges:
            if base < r.end and r.base < base + size:
                raise ConfigError(
                    f"{self.name} bus: {name} at [{base:#x}, {base + size:#x}) overlaps {r.name} at [{r.base:#x}, {r.end:#x})"
                )
        entry = BusRange(base, size, device, name)
        self._publish(sorted([*ranges, entry], key=lambda r: r.base))
        return entry

    def _publish(self, ranges: list[BusRange]) -> None:
        self._table = ([r.base for r in ranges], ranges)

    def remove(self, name: str) -> BusDevice:
        ranges = self._table[1]
        for r in ranges:
            if r.name == name:
                self._publish([x for x in ranges if x is not r])
                return r.device
        raise ConfigError(f"{self.name} bus: no device named {name!r}")

    def find(self, addr: int) -> BusRange | None:
        starts, ranges = self._table
        i = bisect_right(starts, addr) - 1
        if i >= 0 and addr < ranges[i].end:
            return ranges[i]
        return None

    @property
    def ranges(self) -> list[BusRange]:
        return list(self._table[1])

    def _unclaimed(self, addr: int, size: int, is_write: bool, straddles: BusRange | None = None) -> None:
        why = f" (runs past the end of {straddles.name} at {straddles.end:#x})" if straddles else ""
        with self._lock:
            self.unclaimed_count += 1
            text = f"{'write' if is_write else 'read'} of {size} at {addr:#x}{why}"
            if len(self.unclaimed_first) < SUMMARY_ACCESSES and text not in self.unclaimed_first:
                self.unclaimed_first.append(text)  # the first few different ones
            key = (addr, is_write)
            if key in self._unclaimed_seen or len(self._unclaimed_seen) > MAX_LOGGED_ADDRESSES:
                return
            self._unclaimed_seen.add(key)
            too_many = len(self._unclaimed_seen) > MAX_LOGGED_ADDRESSES
        if too_many:
            log.warning("%s bus: more than %d unclaimed addresses; not logging further ones",
                        self.name, MAX_LOGGED_ADDRESSES)
            return
        log.warning("%s bus: unclaimed %s of %d bytes at %#x%s%s", self.name, "write" if is_write else "read",
                    size, addr, why, "" if is_write else " (reads as 0)")

    def summary(self) -> str | None:
        """One line on the accesses nobody claimed (None if there were none): how many, the first few."""
        with self._lock:
            count, first = self.unclaimed_count, list(self.unclaimed_first)
        if not count:
            return None
        more = f", ... ({count} in all)" if count > len(first) else ""
        return (f"{count} unclaimed {self.name} access{'es' if count > 1 else ''} (reads returned 0, writes were "
                f"dropped): {', '.join(first)}{more}")

    # read() and write() run once per guest access: each looks its device up itself (as find() does), and calls
    # _claim() only for an access no device owns whole.
    def _claim(self, addr: int, size: int, is_write: bool) -> BusRange | None:
        """The device that owns the whole access [addr, addr+size), or None (counted as unclaimed)."""
        entry = self.find(addr)
        if entry is not None and addr + size <= entry.end:
            return entry
        self._unclaimed(addr, size, is_write, entry)
        return None

    def read(self, addr: int, size: int) -> bytes:
        starts, ranges = self._table
        i = bisect_right(starts, addr) - 1
        entry = ranges[i] if i >= 0 else None
        if entry is None or addr + size > entry.base + entry.size:
            entry = self._claim(addr, size, False)
            if entry is None:
                return bytes(size)
        lock = self._lock  # acquire/release: half the cost of a with statement, here once per guest access
        lock.acquire()
        try:
            data = entry.device.read(addr - entry.base, size)
        finally:
            lock.release()
        if type(data) is not bytes or len(data) != size:
            data = bytes(data[:size]).ljust(size, b"\0")
        return data

    def write(self, addr: int, data: bytes | memoryview) -> None:
        """``data`` may be a view (of kvm_run): the device gets a copy of its own, as bytes."""
        starts, ranges = self._table
        i = bisect_right(starts, addr) - 1
        entry = ranges[i] if i >= 0 else None
        if entry is None or addr + len(data) > entry.base + entry.size:
            entry = self._claim(addr, len(data), True)
            if entry is None:
                return
        lock = self._lock
        lock.acquire()
        try:
            entry.device.write(addr - entry.base, bytes(data))
        finally:
            lock.release()
