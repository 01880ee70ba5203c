"""Facts about the host and our own process: the kernel command line (kvm-arm.mode), VMAs from
/proc/self/smaps, the kernel log from /dev/kmsg, and locked/pinned memory against RLIMIT_MEMLOCK."""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import asdict, dataclass, field

# VmFlags worth calling out in a fault report (see Documentation/filesystems/proc.rst).
NOTABLE_VMFLAGS = {
    "pf": "VM_PFNMAP: raw PFNs, no struct page refcounting",
    "io": "VM_IO: memory-mapped I/O",
    "ht": "huge TLB (hugetlbfs)",
    "sd": "soft-dirty",
    "lo": "locked (mlock)",
    "dc": "do not copy on fork",
    "dd": "do not dump",
    "sh": "shared",
    "mg": "mergeable (KSM)",
}


def kernel_cmdline() -> str:
    try:
        with open("/proc/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def kvm_arm_mode() -> str | None:
    """kvm-arm.mode from the kernel command line (pKVM needs "protected")."""
    for word in kernel_cmdline().split():
        if word.startswith("kvm-arm.mode="):
            return word.split("=", 1)[1]
    return None


@dataclass
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    path: str
    vmflags: list[str] = field(default_factory=list)
    rss_kb: int = 0
    locked_kb: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notable"] = {f: NOTABLE_VMFLAGS[f] for f in self.vmflags if f in NOTABLE_VMFLAGS}
        return d


def read_smaps(pid: str = "self") -> list[Vma]:
    vmas: list[Vma] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                start, end = (int(x, 16) for x in head[0].split("-"))
                path = head[5].strip() if len(head) > 5 else ""
                vmas.append(Vma(start, end, head[1], int(head[2], 16), path))
            elif line.startswith("VmFlags:"):
                vmas[-1].vmflags = line.split()[1:]
            elif line.startswith("Rss:"):
                vmas[-1].rss_kb = int(line.split()[1])
            elif line.startswith("Locked:"):
                vmas[-1].locked_kb = int(line.split()[1])
    return vmas


def vmas_covering(vmas: list[Vma], start: int, size: int) -> list[Vma]:
    return [v for v in vmas if v.start < start + size and start < v.end]


@dataclass
class MemlockInfo:
    rlimit_soft: int | None  # None = unlimited
    rlimit_hard: int | None
    vm_lck_kb: int
    vm_pin_kb: int
    cap_ipc_lock: bool

    @classmethod
    def read(cls) -> "MemlockInfo":
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        fields = {}
        cap_eff = 0
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmLck", "VmPin"):
                    fields[key] = int(value.split()[0])
                elif key == "CapEff":
                    cap_eff = int(value.strip(), 16)
        inf = resource.RLIM_INFINITY
        return cls(None if soft == inf else soft, None if hard == inf else hard,
                   fields.get("VmLck", 0), fields.get("VmPin", 0), bool(cap_eff & (1 << 14)))


class KmsgWatcher:
    """Kernel log lines printed after ``start()`` (reads /dev/kmsg from its end).

    Where /dev/kmsg cannot be read, ``unavailable`` says why.
    """

    def __init__(self, path: str = "/dev/kmsg"):
        self.path = path
        self.fd = -1
        self.unavailable: str | None = None
        self.lines: list[str] = []
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as err:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            hint = " (needs CAP_SYSLOG or kernel.dmesg_restrict=0)" if err.errno in (errno.EPERM, errno.EACCES) else ""
            self.unavailable = f"cannot read {path}: {err.strerror}{hint}"

    def poll(self) -> list[str]:
        """Collect records printed since the last poll; returns all collected so far."""
        while self.fd >= 0:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.EPIPE:  # overwritten before we read it
                    self.lines.append("[pyvmm: some kernel log records were lost]")
                    continue
                break
            if not record:
                break
            prefix, _, message = record.decode(errors="replace").partition(";")
            parts = prefix.split(",")
            stamp = f"[{int(parts[2]) / 1e6:12.6f}] " if len(parts) > 2 and parts[2].isdigit() else ""
            # continuation lines (" KEY=value") are metadata, not text
            self.lines.append(stamp + message.split("\n", 1)[0])
        return list(self.lines)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
