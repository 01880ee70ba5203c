"""What a scenario is, as data: the VM, its memslots and their backings, the guest, the special steps, and
what the kernel is expected to answer.

Everything a reproducer sets up is a field here, so that the same description can be run by pyvmm
(``runner.py``) or written out as another program.  Only the few steps no field can express (a host read of
a guest page, a truncation, a slot delete...) are code: ``Step`` subclasses in ``steps.py``, each of which
also says in one line what it does.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..kvm import uapi
from ..memory.backing import BackingKind
from ..outcome import ExitKind

if TYPE_CHECKING:
    from .runner import RunContext

KiB = 1 << 10
MiB = 1 << 20


class Target(enum.Enum):
    """The host architecture a scenario runs on."""

    ANY = "any"
    ARM64 = "arm64"
    X86_64 = "x86_64"

    def fits(self, machine: str) -> bool:
        return self is Target.ANY or self.value == machine


class SlotFlag(enum.IntFlag):
    """``kvm_userspace_memory_region.flags`` a scenario may ask for (the values are the uapi's)."""

    NONE = 0
    LOG_DIRTY_PAGES = uapi.KVM_MEM_LOG_DIRTY_PAGES
    READONLY = uapi.KVM_MEM_READONLY


class Placeholder(enum.Enum):
    """Parts of a backing spelling that depend on the host; the runner fills them in (``host.Workspace``)."""

    TMP = "{tmp}"  # a private temporary directory, removed afterwards
    DISK = "{disk}"  # a private temporary directory on a disk filesystem (page cache, not tmpfs/shmem)
    CMA_HEAP = "{cma_heap}"  # the name of this host's CMA dma-heap (/dev/dma_heap/<name>)


@dataclass(frozen=True)
class Slot:
    """One memslot: ``size`` bytes at ``offset`` from the arch's RAM base (x86_64: 0, arm64: 0x80000000),
    backed by ``backing`` (a ``--backing`` spelling: anon, memfd, memfd-hugetlb, guest-memfd, udmabuf,
    udmabuf:memfd, dma-heap:NAME, file:PATH; may hold ``Placeholder`` values), with memslot ``flags``."""

    offset: int
    size: int
    backing: str
    flags: SlotFlag = SlotFlag.NONE

    @property
    def kind(self) -> BackingKind:
        return BackingKind(self.backing.partition(":")[0])

    @property
    def placeholders(self) -> frozenset[Placeholder]:
        return frozenset(p for p in Placeholder if p.value in self.backing)


@dataclass(frozen=True)
class Guest:
    """A bundled test guest (``pyvmm.firmware.firmware_path``: an installed pyvmm's ``pyvmm/guests/<arch>/<name>``,
    a checkout's ``firmware/<arch>/build/<name>``; its source is ``firmware/<arch>/<name>.S``)."""

    name: str
    does: str  # what it does, in one sentence


MEMTOUCH = Guest("memtouch", "writes addr ^ 0x5a17c0de9e3779b9 every 64 bytes from RAM + 2 MiB to the end of the "
                             "RAM that starts at the RAM base (arm64: with post-indexed STR, which leaves no syndrome), "
                             "reads it back, prints 'memtouch: ... errors=N' and exits with status 0 when all matched")
HELLO = Guest("hello", "prints a greeting and powers off (arm64: PSCI SYSTEM_OFF; x86_64: halts)")
ROM = Guest("rom", "reads RAM + 2 MiB (a READONLY slot), writes a quadword to RAM + 2 MiB + 0x100 and reads it back, "
                   "prints the three values and halts")
PKVM_SHARE = Guest("pkvm-share", "writes pages A (RAM + 3 MiB) and B (the next page), shares A with MEM_SHARE, hands "
                                 "both addresses to the host in the test device's scratch area (B at scratch + 8) and "
                                 "exits with 0x51; resumed, it reads B again (a protected guest's own page), unshares A "
                                 "and exits with 0 (B intact) or 2 (B lost)")
PKVM_SHARE_HANDOVER = 0x51  # pkvm-share's exit status when it stops for the host to read its pages
PKVM_SHARE_PAGE_B = slice(8, 16)  # where in the test device's scratch area pkvm-share puts page B's address


@dataclass(frozen=True)
class Answer:
    """What the kernel answered.  As an expectation a field left None means "any".

    ``outcome``: how the run ended (``fault`` when KVM_RUN failed or the vCPU exited with a failure); ``call``
    and ``errno``: the system call that failed and its errno name (``call`` with ``errno`` None: the call
    succeeded); ``exit_reason``: the exit that ended the run; ``status``: the guest's exit status;
    ``slot``: the memslot of the fault (as the report names or infers it); ``rom_writes``: guest writes to a
    READONLY slot that came back as MMIO exits and were dropped."""

    outcome: ExitKind | None = None
    call: str | None = None
    errno: str | None = None
    exit_reason: str | None = None
    status: int | None = None
    slot: int | None = None
    rom_writes: int | None = None

    def matches(self, observed: "Answer") -> bool:
        return all(want is None or want == getattr(observed, name) for name, want in self._fields())

    def _fields(self) -> list[tuple[str, object]]:
        return [(name, getattr(self, name)) for name in self.__dataclass_fields__]

    def text(self) -> str:
        parts = []
        if self.outcome is not None:
            shown = self.outcome is ExitKind.GUEST_EXIT and self.status is not None
            parts.append(self.outcome.value + (f" {self.status:#x}" if shown else ""))
        if self.call is not None:
            parts.append(f"{self.call} -> {self.errno or 'success'}")
        elif self.errno is not None:
            parts.append(self.errno)
        if self.exit_reason is not None:
            parts.append(self.exit_reason)
        if self.slot is not None:
            parts.append(f"slot {self.slot}")
        if self.rom_writes:
            parts.append(f"{self.rom_writes} ROM write(s) dropped")
        return ", ".join(parts) or "anything"

    def to_dict(self) -> dict:
        return {name: (value.value if isinstance(value, ExitKind) else value) for name, value in self._fields()}

    @classmethod
    def from_dict(cls, data: dict) -> "Answer":
        outcome = data.get("outcome")
        return cls(**{**data, "outcome": ExitKind(outcome) if outcome is not None else None})


@dataclass(frozen=True)
class Alternative:
    """Another answer the kernel gives on some ``hosts`` (a noun phrase), and ``why``."""

    answer: Answer
    hosts: str
    why: str


@dataclass(frozen=True)
class Expected:
    """What the kernel is expected to answer; ``pyvmm_refuses``: pyvmm's own checks refuse first (the runner
    then asks the kernel directly, as a user reproducing the kernel's behaviour would)."""

    answer: Answer
    pyvmm_refuses: bool = False
    alternatives: tuple[Alternative, ...] = ()

    def match(self, observed: Answer, refused: bool) -> str | None:
        """None when ``observed`` is not expected; otherwise which answer it is ("expected" or an
        alternative's ``hosts``)."""
        if refused != self.pyvmm_refuses:
            return None
        if self.answer.matches(observed):
            return "expected"
        return next((alt.hosts for alt in self.alternatives if alt.answer.matches(observed)), None)

    def text(self, alternatives: bool = True) -> str:
        head = ("pyvmm refuses; kernel: " if self.pyvmm_refuses else "") + self.answer.text()
        if not alternatives:
            return head
        return " | ".join([head, *(alt.answer.text() for alt in self.alternatives)])


class Feature(enum.Enum):
    """What a scenario may need from the host; ``host.HostFacts`` checks each."""

    PKVM = "protected VMs (arm64 pKVM: kvm-arm.mode=protected)"
    GUEST_BUILT = "the bundled guest, built"
    UDMABUF = "/dev/udmabuf (CONFIG_UDMABUF)"
    UDMABUF_MEMFD = "the udmabuf:memfd backing (a udmabuf whose slot maps its memfd)"
    DMA_HEAP = "the dma-heap a slot names (/dev/dma_heap/NAME)"
    CMA_HEAP = "a CMA dma-heap (CONFIG_DMABUF_HEAPS_CMA and a CMA area, e.g. cma=64M)"
    GUEST_MEMFD = "guest_memfd (KVM_CAP_GUEST_MEMFD)"
    HUGETLBFS = "hugetlbfs (CONFIG_HUGETLBFS)"
    FREE_HUGE_PAGES = "enough free 2 MiB huge pages for the hugetlb slots"
    FIXED_HUGE_PAGE_POOL = "a 2 MiB huge page pool that cannot grow (its nr_overcommit_hugepages = 0)"
    DISK_DIRECTORY = "a directory on a disk filesystem (page cache, not tmpfs)"
    READONLY_MEM = "READONLY memslots (KVM_CAP_READONLY_MEM)"
    WITHOUT_CAP_IPC_LOCK = "a way to run without CAP_IPC_LOCK (root, to become another user; or no CAP_IPC_LOCK)"
    MEMLOCK = "RLIMIT_MEMLOCK of at least the protected guest's memory, or CAP_IPC_LOCK (pKVM pins every page)"


@dataclass(frozen=True)
class Confinement:
    """Run the scenario in a child process with RLIMIT_MEMLOCK at ``memlock`` bytes and without
    CAP_IPC_LOCK: a root parent's child opens /dev/kvm, then becomes ``uid`` (which drops every capability)."""

    memlock: int = 0
    uid: int = 65534  # nobody

    def describe(self) -> str:
        return (f"in a child process with RLIMIT_MEMLOCK {self.memlock} bytes and without CAP_IPC_LOCK (as root: "
                f"/dev/kvm opened first, then uid/gid {self.uid}, which drops every capability)")


class When(enum.Enum):
    """Where in the run a ``Step`` happens."""

    BEFORE_BOOT = "after the memslots are registered"
    BEFORE_RUN = "after boot, before the first KVM_RUN"
    AFTER_RUN = "after the first run"


class Step:
    """A special step no field can express.  Subclasses are frozen dataclasses (their fields are the step's
    parameters), set ``when``, may add ``needs``, and implement ``describe`` and ``apply``."""

    when: ClassVar[When]
    needs: ClassVar[tuple[Feature, ...]] = ()

    def describe(self) -> str:
        raise NotImplementedError

    def apply(self, ctx: "RunContext") -> Answer | None:
        """Do the step; an ``Answer`` ends the scenario with it (what the kernel answered)."""
        raise NotImplementedError


NAME_RE = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


@dataclass(frozen=True)
class Scenario:
    """One self-contained reproducer.  ``guest`` None: the scenario ends before any vCPU exists (the kernel
    answers a memslot or mapping call)."""

    name: str
    title: str
    arch: Target
    protected: bool
    slots: tuple[Slot, ...]
    guest: Guest | None
    expected: Expected
    explanation: str
    vcpus: int = 1
    steps: tuple[Step, ...] = ()
    needs: tuple[Feature, ...] = ()  # beyond what the VM type, the slots, the guest and the steps imply
    confinement: Confinement | None = None
    timeout: float = 120.0  # per KVM_RUN; the arm64 lab emulates the whole machine

    @property
    def vm_kind(self) -> str:
        return "protected" if self.protected else "normal"

    def features(self) -> tuple[Feature, ...]:
        """Everything this scenario needs from the host, in the order to check it."""
        implied: list[Feature] = []
        if self.protected:
            implied.append(Feature.PKVM)
            if self.confinement is None:  # a confined scenario sets its own limit
                implied.append(Feature.MEMLOCK)
        if self.guest is not None:
            implied.append(Feature.GUEST_BUILT)
        kinds = {s.kind for s in self.slots}
        if BackingKind.UDMABUF in kinds:
            implied.append(Feature.UDMABUF)
        if any(s.backing == "udmabuf:memfd" for s in self.slots):
            implied.append(Feature.UDMABUF_MEMFD)
        if any(Placeholder.CMA_HEAP in s.placeholders for s in self.slots):
            implied.append(Feature.CMA_HEAP)
        elif BackingKind.DMA_HEAP in kinds:
            implied.append(Feature.DMA_HEAP)
        if BackingKind.GUEST_MEMFD in kinds:
            implied.append(Feature.GUEST_MEMFD)
        if BackingKind.MEMFD_HUGETLB in kinds:
            implied += [Feature.HUGETLBFS, Feature.FREE_HUGE_PAGES]
        if any(Placeholder.DISK in s.placeholders for s in self.slots):
            implied.append(Feature.DISK_DIRECTORY)
        if not self.protected and any(s.flags & SlotFlag.READONLY for s in self.slots):
            implied.append(Feature.READONLY_MEM)
        if self.confinement is not None:
            implied.append(Feature.WITHOUT_CAP_IPC_LOCK)
        for step in self.steps:
            implied += step.needs
        return tuple(dict.fromkeys([*implied, *self.needs]))  # in order, once each

    def huge_pages(self) -> int:
        """2 MiB huge pages the hugetlb slots take."""
        return sum(s.size for s in self.slots if s.kind is BackingKind.MEMFD_HUGETLB) // (2 * MiB)
