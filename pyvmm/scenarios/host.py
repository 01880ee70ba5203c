"""This host's side of a scenario: whether it can run it (``HostFacts``) and the host-dependent parts of its
backings (``Workspace``: temporary directories, the CMA heap's name)."""

from __future__ import annotations

import contextlib
import os
import tempfile

from .. import hostmem
from ..arch import machine_name
from ..caps import protected_vm_support
from ..firmware import firmware_path
from ..hostinfo import MemlockInfo
from ..kvm import Kvm, uapi
from ..kvm.errors import ConfigError, MissingFeature
from ..memory.backing import DMA_HEAP_DIR, BackingSpec, backing_availability, mount_fstype
from .model import Feature, Placeholder, Scenario

SCENARIO_DIR_ENV = "PYVMM_SCENARIO_DIR"  # where {disk} files go (a directory on a disk filesystem)
# Filesystems whose file pages are page cache, never shmem.  tmpfs is shmem; rootfs (an initramfs) may be
# tmpfs or ramfs and overlay is whatever lies below it: neither is known, so neither is offered as a disk.
DISK_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "vfat", "exfat")
CMA_HEAP_PREFERRED = "default_cma_region"  # Linux 7.x's name for the heap of the default CMA area (cma=)
SYSTEM_HEAPS = ("system", "system-uncached")
HUGE_PAGE = 2 << 20


def dma_heaps() -> list[str]:
    try:
        return sorted(os.listdir(DMA_HEAP_DIR))
    except OSError:
        return []


def cma_heap() -> str:
    """The CMA heap's name: ``default_cma_region`` where it exists, else the first heap that is not a
    system heap.  Raises MissingFeature."""
    heaps = dma_heaps()
    if CMA_HEAP_PREFERRED in heaps:
        return CMA_HEAP_PREFERRED
    others = [h for h in heaps if h not in SYSTEM_HEAPS]
    if not others:
        have = ", ".join(heaps) or "none"
        raise MissingFeature(f"no CMA dma-heap in {DMA_HEAP_DIR} (heaps here: {have}; CONFIG_DMABUF_HEAPS_CMA and a "
                             "CMA area, e.g. cma=64M on the kernel command line)")
    return others[0]


def disk_directory() -> str:
    """A writable directory on a disk filesystem: $PYVMM_SCENARIO_DIR, /var/tmp or the current directory.
    Raises MissingFeature naming each candidate's filesystem."""
    seen = []
    for path in filter(None, (os.environ.get(SCENARIO_DIR_ENV), "/var/tmp", os.getcwd())):
        fstype = mount_fstype(path) if os.path.isdir(path) else None
        if fstype in DISK_FILESYSTEMS and os.access(path, os.W_OK | os.X_OK):
            return path
        seen.append(f"{path}: {fstype or 'not a directory'}")
    raise MissingFeature(f"no writable directory on a disk filesystem ({', '.join(DISK_FILESYSTEMS)}): "
                         f"{'; '.join(seen)}; set {SCENARIO_DIR_ENV} to one")


def huge_pages_available() -> int:
    """Free 2 MiB huge pages not yet reserved by a mapping (free_hugepages - resv_hugepages of the 2 MiB pool: with
    4 KiB pages /proc/meminfo's HugePages_Free - HugePages_Rsvd, but those count the default size's pool)."""
    return hostmem.huge_pages("free_hugepages") - hostmem.huge_pages("resv_hugepages")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def hugetlbfs_missing() -> str | None:
    try:
        with open("/proc/filesystems") as f:
            if any(line.split()[-1:] == ["hugetlbfs"] for line in f):
                return None
    except OSError as err:
        return f"cannot read /proc/filesystems: {err.strerror}"
    return "this kernel has no hugetlbfs (CONFIG_HUGETLBFS)"


class HostFacts:
    """What this host offers a scenario.  Probes on first use and remembers the answers (one instance per
    command: the host does not change under it)."""

    def __init__(self, kvm_path: str = "/dev/kvm"):
        self.kvm_path = kvm_path
        self.machine = machine_name()
        self._answers: dict[tuple[Feature, str], str | None] = {}
        self._kvm_facts: tuple[str | None, str | None, dict[str, str], bool] | None = None

    def why_not(self, scenario: Scenario) -> str | None:
        """Why ``scenario`` cannot run here (the first missing thing), or None."""
        if not scenario.arch.fits(self.machine):
            return f"{scenario.arch.value} only; this host is {self.machine}"
        kvm_missing = self._kvm()[0]
        if kvm_missing:
            return kvm_missing
        for feature in scenario.features():
            key = (feature, scenario.name)
            if key not in self._answers:
                self._answers[key] = self._lacks(feature, scenario)
            if self._answers[key]:
                return self._answers[key]
        return None

    def _kvm(self) -> tuple[str | None, str | None, dict[str, str], bool]:
        """(why KVM is unusable, why there are no protected VMs, backing availability, READONLY memslots)."""
        if self._kvm_facts is None:
            try:
                with Kvm(self.kvm_path) as kvm, kvm.create_vm(0) as vm:
                    support = protected_vm_support(kvm, self.machine)
                    self._kvm_facts = (None, None if support.available else f"no protected VMs here: {support.reason}",
                                       backing_availability(vm), bool(vm.check_extension(uapi.KVM_CAP_READONLY_MEM)))
            except MissingFeature as err:
                self._kvm_facts = (str(err), str(err), {}, False)
        return self._kvm_facts

    def _lacks(self, feature: Feature, scenario: Scenario) -> str | None:
        _, no_pkvm, backings, readonly = self._kvm()
        if feature is Feature.PKVM:
            return no_pkvm
        if feature is Feature.GUEST_BUILT:
            try:
                firmware_path(self.machine, scenario.guest.name)
            except ConfigError as err:
                return str(err)
            return None
        if feature is Feature.UDMABUF:
            return None if backings["udmabuf"] == "usable" else f"udmabuf: {backings['udmabuf']}"
        if feature is Feature.UDMABUF_MEMFD:
            try:
                BackingSpec.parse("udmabuf:memfd")
            except ConfigError as err:
                return f"this pyvmm has no udmabuf:memfd backing yet ({err})"
            return None
        if feature is Feature.DMA_HEAP:
            wanted = {s.backing.partition(":")[2] for s in scenario.slots if s.backing.startswith("dma-heap:")}
            missing = sorted(wanted - set(dma_heaps()))
            return (f"no dma-heap {', '.join(missing)} in {DMA_HEAP_DIR} (heaps here: {', '.join(dma_heaps()) or 'none'}"
                    "; CONFIG_DMABUF_HEAPS with CONFIG_DMABUF_HEAPS_SYSTEM)") if missing else None
        if feature is Feature.GUEST_MEMFD:
            state = backings["guest-memfd"]
            return None if state.startswith("usable") else f"guest-memfd: {state}"
        if feature is Feature.HUGETLBFS:
            return hugetlbfs_missing()
        if feature is Feature.FREE_HUGE_PAGES:
            have, want = huge_pages_available(), scenario.huge_pages()
            return None if have >= want else (f"{want} free 2 MiB huge pages needed, {have} available (reserve them: "
                                              f"{hostmem.HUGE_PAGE_HINT})")
        if feature is Feature.FIXED_HUGE_PAGE_POOL:
            surplus = _read_int(f"{hostmem.HUGE_PAGE_POOL}/nr_overcommit_hugepages")  # the 2 MiB pool's
            return None if surplus == 0 else (f"the 2 MiB huge page pool can grow (nr_overcommit_hugepages = {surplus}): "
                                              "a mapping takes surplus pages instead of failing")
        if feature is Feature.READONLY_MEM:
            return None if readonly else "this KVM has no READONLY memslots (KVM_CAP_READONLY_MEM)"
        if feature is Feature.MEMLOCK:
            ml, total = MemlockInfo.read(), sum(s.size for s in scenario.slots)
            if ml.cap_ipc_lock or ml.rlimit_soft is None or ml.rlimit_soft >= total:
                return None
            return (f"RLIMIT_MEMLOCK is {ml.rlimit_soft} bytes, the protected guest has {total} (pKVM pins and charges "
                    "every page it touches): raise it (ulimit -l) or give pyvmm CAP_IPC_LOCK")
        if feature is Feature.WITHOUT_CAP_IPC_LOCK:
            if os.geteuid() == 0 or not MemlockInfo.read().cap_ipc_lock:
                return None
            return "pyvmm runs with CAP_IPC_LOCK but not as root: it can neither drop the capability nor switch user"
        return _lacks_resource(feature)


def _lacks_resource(feature: Feature) -> str | None:
    """Features that are a host resource found by name (the same lookups the Workspace makes)."""
    try:
        if feature is Feature.CMA_HEAP:
            cma_heap()
        elif feature is Feature.DISK_DIRECTORY:
            disk_directory()
    except MissingFeature as err:
        return str(err)
    return None


class Workspace(contextlib.ExitStack):
    """Fills a backing spelling's placeholders in; the temporary directories it makes are removed on exit."""

    def __init__(self):
        super().__init__()
        self._values: dict[Placeholder, str] = {}

    def _value(self, placeholder: Placeholder) -> str:
        if placeholder not in self._values:
            if placeholder is Placeholder.CMA_HEAP:
                value = cma_heap()
            else:
                parent = disk_directory() if placeholder is Placeholder.DISK else None
                value = self.enter_context(tempfile.TemporaryDirectory(prefix="pyvmm-scenario-", dir=parent))
            self._values[placeholder] = value
        return self._values[placeholder]

    def resolve(self, text: str) -> str:
        for placeholder in Placeholder:
            if placeholder.value in text:
                text = text.replace(placeholder.value, self._value(placeholder))
        return text
