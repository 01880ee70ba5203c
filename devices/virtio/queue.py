"""Split virtqueues (virtio 1.2 section 2.7), walked by the device through the guest-memory accessor.

A queue is three areas the driver places in guest RAM: the descriptor table (16 bytes a descriptor),
the driver area ("avail": flags, idx, ring[size], used_event) and the device area ("used": flags, idx,
ring[size] of (id, len), avail_event).  ``pop()`` takes the next available chain and walks it, with
the limits the spec puts on drivers checked rather than trusted: every index below the table size, no
chain longer than its table (so no loops), one level of indirect table, device-readable buffers before
device-writable ones, no buffer wrapping the address space, a total length that fits the used ring's
32-bit ``len``.  A chain that breaks a rule comes back with ``fault`` set, already logged (one line
naming device, queue, descriptor and GPA, rate-limited); the device completes it as failed.  A fault
in the queue itself (an unreadable ring, a head index out of range, the avail index jumping further
than the queue size) raises ``QueueError``: the transport then sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from pyvmm.kvm.errors import GuestMemoryError
from pyvmm.logs import getLogger

log = getLogger("pyvmm.virtio")

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTQ_MAX_SIZE = 32768
DESC_SIZE = 16
USED_ELEM_SIZE = 8
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
MAX_INDIRECT = 65536  # ``next`` is 16 bits: no descriptor past this can be reached
CHUNK = 64 << 10  # the largest single guest-memory access a device makes


class Memory(Protocol):
    """The guest-memory accessor (pyvmm.memory.regions.GuestMemory): raises GuestMemoryError."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class QueueError(Exception):
    """The queue itself is unusable until the driver resets the device.  ``error``: the accessor's
    GuestMemoryError behind it, if any."""

    def __init__(self, text: str, error: GuestMemoryError | None = None):
        super().__init__(text)
        self.error = error


@dataclass(frozen=True)
class Fault:
    reason: str
    desc: int | None = None  # descriptor index (in the indirect table when ``indirect``)
    gpa: int | None = None
    indirect: bool = False
    error: GuestMemoryError | None = None  # the accessor's refusal behind it, if any


class AccessError(Exception):
    """A buffer of a chain could not be read or written through the accessor."""

    def __init__(self, fault: Fault):
        super().__init__(fault.reason)
        self.fault = fault


@dataclass(frozen=True)
class Segment:
    """One buffer of a chain: ``len`` bytes at guest address ``addr``, from descriptor ``desc``."""

    desc: int
    addr: int
    len: int
    indirect: bool = False


@dataclass
class Chain:
    head: int
    readable: list[Segment] = field(default_factory=list)
    writable: list[Segment] = field(default_factory=list)
    fault: Fault | None = None
    reported: bool = False

    @property
    def readable_len(self) -> int:
        return sum(s.len for s in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(s.len for s in self.writable)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """EVENT_IDX: notify when ``event`` lies in the window (old, new] of indices just published."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _pieces(segments: Sequence[Segment], offset: int, length: int) -> Iterator[tuple[Segment, int, int]]:
    """(segment, gpa, n) pieces covering [offset, offset+length) of the segments' concatenation."""
    if offset < 0:
        raise ValueError(f"negative offset {offset} into a chain's buffers")
    for seg in segments:
        if length <= 0:
            return
        if offset >= seg.len:
            offset -= seg.len
            continue
        n = min(seg.len - offset, length)
        yield seg, seg.addr + offset, n
        offset, length = 0, length - n


def _access_fault(seg: Segment, gpa: int, err: GuestMemoryError) -> AccessError:
    return AccessError(Fault(f"buffer not accessible ({err})", seg.desc, gpa, seg.indirect, err))


def gather(memory: Memory, segments: Sequence[Segment], offset: int, length: int) -> bytes:
    """Read ``length`` bytes at ``offset`` of the buffers (at most what they hold)."""
    out = bytearray()
    for seg, gpa, n in _pieces(segments, offset, length):
        try:
            out += memory.read(gpa, n)
        except GuestMemoryError as err:
            raise _access_fault(seg, gpa, err) from None
    return bytes(out)


def scatter(memory: Memory, segments: Sequence[Segment], offset: int, data: bytes) -> int:
    """Write ``data`` at ``offset`` of the buffers; returns how much fitted."""
    done = 0
    for seg, gpa, n in _pieces(segments, offset, len(data)):
        try:
            memory.write(gpa, data[done:done + n])
        except GuestMemoryError as err:
            raise _access_fault(seg, gpa, err) from None
        done += n
    return done


class RateLimitedLog:
    """Warnings where an identical line is repeated only at counts 2, 4, 8, ..., and no more than
    ``burst`` lines a second are written at all (the rest are counted, then summarised)."""

    def __init__(self, logger: "logging.Logger" = log, burst: int = 20):
        self.logger = logger
        self.burst = burst
        self.seen: dict[str, int] = {}
        self.window = 0.0
        self.in_window = 0
        self.suppressed = 0

    def warning(self, text: str) -> None:
        if len(self.seen) > 4096:
            self.seen.clear()
        n = self.seen[text] = self.seen.get(text, 0) + 1
        if n & (n - 1):  # a repeat, not at a power of two
            self.suppressed += 1
            return
        now = time.monotonic()
        if now - self.window >= 1.0:
            if self.suppressed:
                self.logger.warning("(%d similar virtio lines suppressed)", self.suppressed)
            self.window, self.in_window, self.suppressed = now, 0, 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return
        self.in_window += 1
        self.logger.warning("%s%s", text, f" (seen {n} times)" if n > 1 else "")


class Virtqueue:
    """One split virtqueue of a device.  The transport fills in size/addresses/ready/features."""

    def __init__(self, memory: Memory, index: int, max_size: int, device: str,
                 rlog: RateLimitedLog | None = None):
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.device = device
        self.rlog = rlog or RateLimitedLog()
        self.faults = 0  # chains reported as malformed, over the queue's life
        # Told of every failed chain and unusable queue: (queue, the logged line, the accessor's error or None).
        self.on_fault: Callable[[Virtqueue, str, GuestMemoryError | None], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.driver_addr = self.device_addr = 0
        self.event_idx = self.indirect_desc = False
        self.last_avail = self.used_idx = self.signalled_used = 0

    def __str__(self) -> str:
        return f"{self.device} queue {self.index}"

    # --- ring access ---------------------------------------------------------------
    def _read(self, gpa: int, length: int, what: str) -> bytes:
        try:
            return self.memory.read(gpa, length)
        except GuestMemoryError as err:
            raise QueueError(f"{self}: cannot read the {what} at GPA {gpa:#x}: {err}", err) from None

    def _write(self, gpa: int, data: bytes, what: str) -> None:
        try:
            self.memory.write(gpa, data)
        except GuestMemoryError as err:
            raise QueueError(f"{self}: cannot write the {what} at GPA {gpa:#x}: {err}", err) from None

    def _u16(self, gpa: int, what: str) -> int:
        return int.from_bytes(self._read(gpa, 2, what), "little")

    def avail_idx(self) -> int:
        return self._u16(self.driver_addr + 2, "avail index")

    # --- taking chains -------------------------------------------------------------
    def pop(self) -> Chain | None:
        """The next available chain (walked; ``fault`` set and logged if malformed), or None."""
        avail = self.avail_idx()
        if avail == self.last_avail and self.event_idx:
            # Tell the driver where to notify next, then look again so a buffer it published
            # before reading avail_event is not missed.
            self._write(self.device_addr + 4 + USED_ELEM_SIZE * self.size,
                        self.last_avail.to_bytes(2, "little"), "avail_event")
            avail = self.avail_idx()
        if avail == self.last_avail:
            return None
        if (avail - self.last_avail) & 0xFFFF > self.size:
            raise QueueError(f"{self}: avail index jumped from {self.last_avail} to {avail} "
                             f"(more than the queue size {self.size})")
        head = self._u16(self.driver_addr + 4 + 2 * (self.last_avail % self.size), "avail ring")
        if head >= self.size:
            raise QueueError(f"{self}: avail ring entry {self.last_avail} names descriptor {head}, "
                             f"outside the table of {self.size}")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = self._walk(head)
        if chain.fault is not None:
            self.report(chain, chain.fault)
        return chain

    def _walk(self, head: int) -> Chain:
        chain = Chain(head)
        table, entries, indirect = self.desc_addr, self.size, False
        index, seen, total = head, 0, 0
        where = table + DESC_SIZE * index

        def bad(reason: str, gpa: int | None = None, error: GuestMemoryError | None = None) -> Chain:
            """Fail the chain at the current descriptor (GPA: the buffer's, else the descriptor's)."""
            chain.fault = Fault(reason, index, where if gpa is None else gpa, indirect, error)
            return chain

        while True:
            where = table + DESC_SIZE * index
            seen += 1
            if seen > entries:
                return bad(f"chain loops or is longer than its table ({entries})")
            if indirect:
                try:
                    raw = self.memory.read(where, DESC_SIZE)
                except GuestMemoryError as err:
                    return bad(f"indirect table not accessible ({err})", error=err)
            else:
                raw = self._read(where, DESC_SIZE, "descriptor table")
            addr, length, flags, nxt = struct.unpack("<QIHH", raw)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    return bad("nested indirect table", addr)
                if not self.indirect_desc:
                    return bad("indirect descriptor without VIRTIO_F_INDIRECT_DESC", addr)
                if flags & VIRTQ_DESC_F_NEXT:
                    return bad("indirect descriptor with VIRTQ_DESC_F_NEXT", addr)
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    return bad(f"indirect table length {length:#x} is not a multiple of 16 in (0, 1 MiB]", addr)
                if addr + length > 1 << 64:
                    return bad("indirect table wraps the address space", addr)
                table, entries, indirect, index, seen = addr, length // DESC_SIZE, True, 0, 0
                continue
            if addr + length > 1 << 64:
                return bad(f"buffer of {length:#x} bytes wraps the address space", addr)
            total += length
            if total > 0xFFFFFFFF:
                return bad("chain length overflows 32 bits", addr)
            seg = Segment(index, addr, length, indirect)
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append(seg)
            elif chain.writable:
                return bad("device-readable buffer after a device-writable one", addr)
            else:
                chain.readable.append(seg)
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= entries:
                return bad(f"next index {nxt} is outside the {'indirect ' if indirect else ''}table of {entries}")
            index = nxt

    def report(self, chain: Chain, fault: Fault) -> None:
        """Log a chain's failure: once per chain, one line, rate-limited."""
        if chain.reported:
            return
        chain.reported = True
        self.faults += 1
        desc = "?" if fault.desc is None else f"{'indirect ' if fault.indirect else ''}descriptor {fault.desc}"
        gpa = "" if fault.gpa is None else f" GPA {fault.gpa:#x}"
        line = f"{self}: chain head {chain.head}, {desc}{gpa}: {fault.reason}; request failed"
        self.rlog.warning(line)
        if self.on_fault is not None:
            self.on_fault(self, line, fault.error)

    # --- returning chains ----------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Put chain ``head`` in the used ring, ``written`` bytes written into its buffers."""
        elem = self.device_addr + 4 + USED_ELEM_SIZE * (self.used_idx % self.size)
        self._write(elem, struct.pack("<II", head, written), "used ring")
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._write(self.device_addr + 2, self.used_idx.to_bytes(2, "little"), "used index")

    def should_signal(self) -> bool:
        """Whether the used buffers pushed since the last call need a notification (2.7.7.2)."""
        new, old = self.used_idx, self.signalled_used
        if new == old:
            return False
        self.signalled_used = new
        if self.event_idx:
            used_event = self._u16(self.driver_addr + 4 + 2 * self.size, "used_event")
            return vring_need_event(used_event, new, old)
        return not self._u16(self.driver_addr, "avail flags") & VIRTQ_AVAIL_F_NO_INTERRUPT
