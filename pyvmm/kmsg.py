"""The kernel log from /dev/kmsg: records with their sequence numbers and timestamps (``KmsgRecord``), read from
the moment a VM is made (``KmsgWatcher``).  Which of them belong to this process is ``hostinfo.KmsgFilter``'s
business; this module is what every ``Vm`` needs, kept apart from hostinfo's other facts so that making a VM does
not import them."""

from __future__ import annotations

import errno
import os

from .record import Record


class KmsgRecord(Record):
    """One /dev/kmsg record (Documentation/ABI/testing/dev-kmsg)."""

    __slots__ = ("seq", "ts_us", "level", "facility", "text", "caller")

    def __init__(self, seq: int, ts_us: int, level: int, facility: int, text: str, caller: str | None = None):
        self.seq = seq
        self.ts_us = ts_us  # the kernel's timestamp in microseconds (local_clock: CLOCK_MONOTONIC, give or take suspend)
        self.level = level
        self.facility = facility
        self.text = text
        self.caller = caller  # "T<tid>" (a task) or "C<cpu>" (interrupt context), with CONFIG_PRINTK_CALLER

    @classmethod
    def parse(cls, raw: bytes) -> "KmsgRecord | None":
        prefix, sep, message = raw.decode(errors="replace").partition(";")
        if not sep:
            return None
        parts = prefix.split(",")
        try:
            prio, seq, ts = int(parts[0]), int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            return None
        caller = next((p[len("caller="):] for p in parts[4:] if p.startswith("caller=")), None)
        # continuation lines (" KEY=value") are metadata, not text
        return cls(seq, ts, prio & 7, prio >> 3, message.split("\n", 1)[0], caller)

    @property
    def caller_tid(self) -> int | None:
        if self.caller and self.caller.startswith("T") and self.caller[1:].isdigit():
            return int(self.caller[1:])
        return None

    def line(self) -> str:
        return f"[{self.ts_us / 1e6:12.6f}] {self.text}"


class KmsgWatcher:
    """Kernel log records printed after the watcher was made (reads /dev/kmsg from its end).

    ``records`` keeps every record with its sequence number and timestamp; ``lost`` counts records
    the ring buffer overwrote before we read them (EPIPE, or a gap in the sequence numbers).  Where
    /dev/kmsg cannot be read, ``unavailable`` says why.
    """

    def __init__(self, path: str = "/dev/kmsg"):
        self.path = path
        self.fd = -1
        self.unavailable: str | None = None
        self.records: list[KmsgRecord] = []
        self.lost = 0
        self._next_seq: int | None = None
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as err:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            hint = " (needs CAP_SYSLOG or kernel.dmesg_restrict=0)" if err.errno in (errno.EPERM, errno.EACCES) else ""
            self.unavailable = f"cannot read {path}: {err.strerror}{hint}"

    def poll_records(self) -> list[KmsgRecord]:
        """Collect records printed since the last poll; returns all collected so far."""
        while self.fd >= 0:
            try:
                raw = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.EPIPE:  # overwritten before we read it; the next read resyncs
                    self.lost += 1 if self._next_seq is None else 0
                    continue
                break
            if not raw:
                break
            self.accept(raw)
        return list(self.records)

    def accept(self, raw: bytes) -> None:
        """Keep one raw record; a gap in the sequence numbers counts as lost records."""
        record = KmsgRecord.parse(raw)
        if record is None:
            return
        if self._next_seq is not None and record.seq > self._next_seq:
            self.lost += record.seq - self._next_seq
        self._next_seq = record.seq + 1
        self.records.append(record)

    def poll(self) -> list[str]:
        """The records as text lines (compatibility)."""
        return [r.line() for r in self.poll_records()]

    @property
    def lines(self) -> list[str]:
        return [r.line() for r in self.records]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
