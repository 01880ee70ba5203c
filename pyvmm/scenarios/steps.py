"""The special steps of scenarios: what a field cannot say.  Each is a frozen dataclass whose fields are its
parameters; ``describe()`` says in one line what it does, ``apply()`` does it (``model.Step``)."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from .. import hostmem
from ..kvm.errors import ConfigError, GuestMemoryError, KvmError, MissingFeature
from ..outcome import ExitKind
from .host import huge_pages_available
from .model import PKVM_SHARE_HANDOVER, PKVM_SHARE_PAGE_B, Answer, Feature, Step, When
from .runner import RunContext


@dataclass(frozen=True)
class SlotStep(Step):
    """A step on one of the scenario's memslots."""

    slot: int  # index in Scenario.slots


class TruncateFile(SlotStep):
    """The file behind a slot loses its pages under the VM (``ftruncate`` to 0)."""

    when = When.BEFORE_RUN

    def describe(self) -> str:
        return f"truncate the file behind slot {self.slot} to 0 bytes ({self.when.value})"

    def apply(self, ctx: RunContext) -> None:
        path = ctx.region(self.slot).backing.file_path
        os.truncate(path, 0)
        ctx.note(f"truncated {path} to 0 bytes")


class MapReadOnly(SlotStep):
    """The VMM's mapping of a slot becomes read-only (``mprotect(PROT_READ)``); the memslot does not know."""

    when = When.BEFORE_RUN

    def describe(self) -> str:
        return f"mprotect the host mapping of slot {self.slot} to PROT_READ ({self.when.value})"

    def apply(self, ctx: RunContext) -> None:
        region = ctx.region(self.slot)
        hostmem.mprotect(region.hva, region.size, mmap.PROT_READ)
        ctx.note(f"host range {region.hva:#x}+{region.size:#x} of slot {region.slot} is now read-only")


class DeleteSlot(SlotStep):
    """Delete a memslot (``KVM_SET_USER_MEMORY_REGION`` with size 0) after the guest has run."""

    when = When.AFTER_RUN

    def describe(self) -> str:
        return f"delete slot {self.slot} (KVM_SET_USER_MEMORY_REGION, memory_size 0) {self.when.value}"

    def apply(self, ctx: RunContext) -> Answer:
        region = ctx.region(self.slot)
        fd = ctx.vm.fd
        try:
            ctx.vm.memory.remove(region)
        except ConfigError as err:  # pyvmm's rule; then the kernel's
            ctx.refused(str(err))
            return ctx.kernel_call("KVM_SET_USER_MEMORY_REGION",
                                   lambda: fd.set_user_memory_region(region.slot, 0, region.gpa, 0, region.hva))
        except KvmError as err:
            return ctx.failed(err.call, err.errno)
        return Answer(call="KVM_SET_USER_MEMORY_REGION")


@dataclass(frozen=True)
class ReadGuestPage(Step):
    """When pkvm-share hands over, the host reads page B, which the protected guest owns and did not share:
    first through pyvmm's accessor as it is (refused), then with ``force=True``; then the guest resumes."""

    when = When.AFTER_RUN

    def describe(self) -> str:
        return (f"when the guest exits with {PKVM_SHARE_HANDOVER:#x}: read its unshared page B from the host "
                "(pyvmm's accessor, then force=True), then run the guest again")

    def apply(self, ctx: RunContext) -> Answer | None:
        first = ctx.outcome
        if first is None or first.kind is not ExitKind.GUEST_EXIT or first.status != PKVM_SHARE_HANDOVER:
            ctx.note(f"the guest did not stop with {PKVM_SHARE_HANDOVER:#x} to hand its pages over")
            return None  # the first run's answer stands
        memory = ctx.vm.memory
        page = int.from_bytes(ctx.vm.devices["testdev"].scratch[PKVM_SHARE_PAGE_B], "little")
        try:
            memory.read(page, 8)
        except GuestMemoryError as err:
            ctx.refused(str(err))
        data = memory.read(page, 8, force=True)
        ctx.note(f"host read of page {page:#x} with force=True returned {data.hex()} "
                 f"({'zeroed: pKVM reclaimed it' if data == bytes(8) else 'not zeroed'})")
        return ctx.run()


@dataclass(frozen=True)
class ExhaustHugetlbPool(Step):
    """Map one 2 MiB huge page more than the pool has free: through pyvmm (``memfd-hugetlb``), then directly
    (``memfd_create(MFD_HUGETLB)``, ``ftruncate``, ``mmap(MAP_SHARED)``)."""

    when = When.BEFORE_BOOT
    needs = (Feature.HUGETLBFS, Feature.FIXED_HUGE_PAGE_POOL)

    def describe(self) -> str:
        return ("map (free - reserved + 1) x 2 MiB of memfd-hugetlb from the 2 MiB pool at the RAM base: through pyvmm, "
                "then with memfd_create(MFD_HUGETLB) + ftruncate + mmap(MAP_SHARED)")

    def apply(self, ctx: RunContext) -> Answer:
        pages = huge_pages_available() + 1
        size = pages * hostmem.HUGE_PAGE_SIZE
        ctx.note(f"{pages - 1} huge pages available: mapping {pages} ({size >> 20} MiB)")
        try:
            ctx.vm.add_memory(size, "memfd-hugetlb", gpa=ctx.vm.arch.ram_base)
        except MissingFeature as err:  # what pyvmm says of the mmap it made
            ctx.refused(str(err))
        fd = os.memfd_create("pyvmm-scenario-hugetlb", hostmem.MFD_CLOEXEC | hostmem.MFD_HUGETLB | hostmem.MFD_HUGE_2MB)
        try:
            os.ftruncate(fd, size)
            mapped: list[int] = []
            answer = ctx.kernel_call("mmap", lambda: mapped.append(hostmem.mmap_fd(fd, size)))
            for addr in mapped:
                hostmem.munmap(addr, size)
            return answer
        finally:
            os.close(fd)
