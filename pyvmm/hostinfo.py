"""Facts about the host and our own process: the host's identity (kernel release, kvm-arm.mode, CPU
model, pyvmm version), VMAs from /proc/self/smaps, the kernel log from /dev/kmsg (records with their
sequence numbers and timestamps, and which of them belong to this process), and locked/pinned memory
against RLIMIT_MEMLOCK."""

from __future__ import annotations

import errno
import mmap
import os
import re
import resource
import time
from dataclasses import asdict, dataclass, field

from .kmsg import KmsgRecord, KmsgWatcher  # noqa: F401 (their home is kmsg.py, which pyvmm run imports alone)

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


from .cmdline import kernel_cmdline, kvm_arm_mode  # noqa: E402, F401 (their home: cmdline.py)


def page_size() -> int:
    """The host kernel's page size (4 KiB on x86_64; 4, 16 or 64 KiB on arm64: Debian's -16k kernel, Android's 16K
    pKVM devices).  KVM takes memslots in these units, and the kernel maps, pins and reclaims guest memory in them."""
    return mmap.PAGESIZE


def pkvm_share_granule(protected_vms: bool) -> int | None:
    """The unit in which a pKVM protected guest shares memory with the host, or None without protected VMs.

    Linux 7.2, arch/arm64/kvm/hyp/nvhe/pkvm.c, kvm_handle_pvm_hvc64: ARM_SMCCC_VENDOR_HYP_KVM_HYP_MEMINFO_FUNC_ID
    answers ``val[0] = PAGE_SIZE``, the hypervisor's page size, which is the host kernel's (the nVHE/hVHE
    hypervisor is built with the kernel); MEM_SHARE/MEM_UNSHARE refuse an IPA that is not PAGE_ALIGNED and share
    one such page (``__pkvm_guest_share_host(hyp_vcpu, hyp_phys_to_pfn(ipa))``).  So on a 16 KiB-page host every
    share is 16 KiB, and a protected Linux guest with smaller pages turns sharing off altogether
    (drivers/virt/coco/pkvm-guest/arm-pkvm-guest.c, pkvm_init_hyp_services: ``if (res.a0 > PAGE_SIZE) return``)."""
    return page_size() if protected_vms else None


def monotonic_us() -> int:
    """CLOCK_MONOTONIC in microseconds (the clock /dev/kmsg timestamps count, give or take suspend)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


ARM_IMPLEMENTERS = {0x41: "Arm", 0x42: "Broadcom", 0x43: "Cavium", 0x46: "Fujitsu", 0x48: "HiSilicon",
                    0x4E: "NVIDIA", 0x51: "Qualcomm", 0x61: "Apple", 0x69: "Intel", 0xC0: "Ampere"}


def cpu_model(cpuinfo: str | None = None, midr_path: str = "/sys/devices/system/cpu/cpu0/regs/identification/midr_el1"
              ) -> dict:
    """x86: {"model_name": ...}; arm64: implementer/part/variant/revision (from /proc/cpuinfo, else MIDR_EL1)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError as err:
            return {"unavailable": f"/proc/cpuinfo: {err.strerror}"}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # first processor only
            continue
        fields.setdefault(key.strip(), value.strip())
    if "model name" in fields:
        out = {"model_name": fields["model name"]}
        for key in ("vendor_id", "cpu family", "model", "stepping", "microcode"):
            if key in fields:
                out[key.replace(" ", "_")] = fields[key]
        return out
    arm = {"implementer": "CPU implementer", "variant": "CPU variant", "part": "CPU part", "revision": "CPU revision"}
    out: dict = {}
    for name, key in arm.items():
        if key in fields:
            try:
                out[name] = int(fields[key], 0)
            except ValueError:
                out[name] = fields[key]
    if not out:
        try:
            with open(midr_path) as f:
                midr = int(f.read().strip(), 16)
            out = {"implementer": midr >> 24 & 0xFF, "variant": midr >> 20 & 0xF, "part": midr >> 4 & 0xFFF,
                   "revision": midr & 0xF, "midr_el1": midr}
        except (OSError, ValueError):
            return {"unavailable": "no model name, CPU implementer or MIDR_EL1 found"}
    if isinstance(out.get("implementer"), int):
        out["implementer_name"] = ARM_IMPLEMENTERS.get(out["implementer"], "unknown")
    return out


def pyvmm_version() -> str:
    """The installed distribution's version, else pyvmm.__version__ (a source checkout not installed: the lab)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("pyvmm")
    except (ImportError, PackageNotFoundError):
        from . import __version__

        return __version__ + " (source tree)"


@dataclass
class HostIdentity:
    kernel_release: str
    kernel_version: str
    machine: str
    kvm_arm_mode: str | None
    cpu: dict
    pyvmm_version: str
    caps: dict[str, int] = field(default_factory=dict)  # a handful of KVM_CHECK_EXTENSION answers
    page_size: int = 0  # the host kernel's (page_size()); 0: not recorded

    @classmethod
    def read(cls, caps: dict[str, int] | None = None) -> "HostIdentity":
        u = os.uname()
        return cls(u.release, u.version, u.machine, kvm_arm_mode(), cpu_model(), pyvmm_version(), dict(caps or {}),
                   page_size())

    def cpu_text(self) -> str:
        c = self.cpu
        if "model_name" in c:
            return c["model_name"]
        if "part" in c:
            impl = c.get("implementer")
            impl_text = f"{impl:#x}" if isinstance(impl, int) else str(impl)
            part = c["part"]
            return (f"implementer {impl_text} ({c.get('implementer_name', '?')}) part "
                    f"{part:#x}" if isinstance(part, int) else f"implementer {impl_text} part {part}") + \
                f" variant {c.get('variant', '?')} revision {c.get('revision', '?')}"
        return c.get("unavailable", "unknown")


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


# Ways a kernel message names a task: "kvm [1234]: ..." (kvm_pr_unimpl and friends), "CPU: 3 PID: 5276 Comm:
# crosvm_vcpu0" (dump_stack), "pid 42", "pid=42", "Bad page map in process crosvm_vcpu0".
_PID_PATTERNS = [re.compile(r"\bkvm \[(\d+)\]"), re.compile(r"\bPID: (\d+)"),
                 re.compile(r"\bpid[ =:]\s*(\d+)", re.IGNORECASE)]
_COMM_PATTERNS = [re.compile(r"\bComm: (\S+)"), re.compile(r"\bin process (\S+)"), re.compile(r"\bcomm[ =:]\s*(\S+)")]


def named_tasks(text: str) -> tuple[set[int], set[str]]:
    """The pids and comms a kernel message names."""
    pids = {int(m.group(1)) for p in _PID_PATTERNS for m in p.finditer(text)}
    comms = {m.group(1).strip('",') for p in _COMM_PATTERNS for m in p.finditer(text)}
    return pids, comms


@dataclass
class KmsgFilter:
    """Which tasks are this VM's: the VMM's pid, its threads' tids and their names."""

    pid: int
    tids: set[int] = field(default_factory=set)
    names: set[str] = field(default_factory=set)

    @classmethod
    def for_this_process(cls, vcpu_tids: dict[int, int] | None = None,
                         past_tids: set[int] | frozenset[int] = frozenset()) -> "KmsgFilter":
        """``past_tids``: tasks of ours that have ended (vCPU threads of earlier runs, a halted vCPU's)."""
        pid = os.getpid()
        tids = set((vcpu_tids or {}).values()) | set(past_tids)
        names = {f"pyvmm-vcpu{i}" for i in (vcpu_tids or {})}
        for tid_dir in _listdir("/proc/self/task"):
            if tid_dir.isdigit():
                tids.add(int(tid_dir))
                names.add(_read_first_line(f"/proc/self/task/{tid_dir}/comm"))
        names.add(_read_first_line("/proc/self/comm"))
        names.discard("")
        return cls(pid, tids, names)

    def ours(self, record: KmsgRecord) -> bool | None:
        """True: names this VMM; False: names another task; None: names nobody (kept)."""
        pids, comms = named_tasks(record.text)
        if pids:
            return bool(pids & ({self.pid} | self.tids))
        if comms:
            return bool(comms & self.names)
        tid = record.caller_tid
        if tid is not None:
            return tid == self.pid or tid in self.tids
        return None


def filter_kmsg(records: list[KmsgRecord], flt: KmsgFilter) -> tuple[list[KmsgRecord], int]:
    """Keep this VM's records and those naming nobody; returns (kept, number dropped)."""
    kept = [r for r in records if flt.ours(r) is not False]
    return kept, len(records) - len(kept)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""
