"""A scenario as a standalone C reproducer (``pyvmm scenario export NAME --c FILE``; ``pyvmm/cexport.py``).

``to_c`` maps a ``Scenario`` onto a ``cexport.CReproducer``: its memslots (arm64 RAM base + offset, placeholders
filled with the fixed values below), the bundled guest as pyvmm loads it and the registers pyvmm's firmware boot
sets, what the kernel is expected to answer (when pyvmm refuses first, the kernel's answer: the C program has
no pyvmm to refuse), the alternatives some hosts give, the steps that have a C counterpart, and the scenario's
own paragraph.  What C cannot say raises ``NotExportable`` naming the scenario and the missing piece.

Placeholders, as the C program fills them (it creates the files, not the directories):
  ``{tmp}/NAME``  -> ``/tmp/pyvmm-SCENARIO-NAME``
  ``{disk}/NAME`` -> ``/var/tmp/pyvmm-SCENARIO-NAME``, which must be on a disk filesystem (else the program
                     says ``unavailable``)
  ``{cma_heap}``  -> ``default_cma_region``, Linux 7.2's name for the default CMA area's heap (another name:
                     ``unavailable``, /dev/dma_heap/default_cma_region does not exist)
"""

from __future__ import annotations

from .. import cexport
from ..arch.arm64 import layout
from ..firmware import firmware_path
from ..kvm.errors import ConfigError
from ..outcome import ExitKind
from .model import Answer, Placeholder, Scenario, Step
from .steps import DeleteSlot, ExhaustHugetlbPool, MapReadOnly, ReadGuestPage, TruncateFile

PLACEHOLDER_DIRS = {Placeholder.TMP: "/tmp", Placeholder.DISK: "/var/tmp"}
CMA_HEAP = "default_cma_region"
SYSTEM_EVENTS = {ExitKind.POWER_OFF: "SHUTDOWN", ExitKind.RESET: "RESET", ExitKind.CRASH: "CRASH"}


class NotExportable(ConfigError):
    """The scenario has a piece the C program cannot reproduce."""


def _missing(scenario: Scenario, piece: str) -> NotExportable:
    return NotExportable(f"scenario {scenario.name} cannot be written as C: {piece}")


def backing(scenario: Scenario, text: str) -> str:
    """A backing spelling with its placeholders filled in as the C program uses them."""
    for placeholder, directory in PLACEHOLDER_DIRS.items():
        text = text.replace(placeholder.value + "/", f"{directory}/pyvmm-{scenario.name}-")
        text = text.replace(placeholder.value, directory)
    return text.replace(Placeholder.CMA_HEAP.value, CMA_HEAP)


def expect(scenario: Scenario, answer: Answer) -> cexport.Expect:
    """``answer`` in the words of the C program's RESULT line.  The slot of a failed KVM_RUN is pyvmm's
    inference, not the kernel's, so it is not part of it."""
    if answer.rom_writes:
        raise _missing(scenario, "counting the guest's dropped ROM writes")
    if answer.call is not None and answer.errno is not None:
        out = cexport.Expect.call_fails(answer.errno, answer.call)
    elif answer.call is not None and answer.outcome is None:
        out = cexport.Expect.call_succeeds(answer.call)
    elif answer.outcome is ExitKind.GUEST_EXIT and answer.status is not None:
        out = cexport.Expect.guest_exit(answer.status)
    elif answer.outcome in SYSTEM_EVENTS:
        out = cexport.Expect.system_event(SYSTEM_EVENTS[answer.outcome])
    elif answer.exit_reason is not None:
        mmio = answer.exit_reason == "KVM_EXIT_MMIO"
        if mmio and answer.slot is None:
            raise _missing(scenario, "an MMIO exit outside the memslots (the program serves those)")
        out = cexport.Expect.exit_reason(answer.exit_reason, f"slot={answer.slot}" if mmio else "")
    else:
        raise _missing(scenario, f"the answer {answer.text()!r} in the program's words")
    return out


# Steps with no C counterpart: what the program would have to do.
HOST_WORK = {ReadGuestPage: "a host read of a page the protected guest owns and did not share (pyvmm's accessor, "
                            "then process_vm_readv) between two runs",
             ExhaustHugetlbPool: "exhausting the hugetlb pool (mapping one 2 MiB page more than this host has free)"}


def _steps(scenario: Scenario) -> tuple[cexport.Step, ...]:
    last = len(scenario.slots) - 1
    out = []
    for step in scenario.steps:
        mapped = _step(step)
        if mapped is None:
            raise _missing(scenario, HOST_WORK.get(type(step), f"the step '{step.describe()}'"))
        if getattr(step, "slot", last) != last:
            raise _missing(scenario, f"the step '{step.describe()}' on a slot that is not the last")
        out.append(mapped)
    confinement = scenario.confinement
    if confinement is not None:
        if confinement.memlock != 0 or confinement.uid != 65534:
            raise _missing(scenario, f"running {confinement.describe()} (the program sets RLIMIT_MEMLOCK 0 and "
                                     "becomes uid 65534)")
        out.append(cexport.Step.SET_RLIMIT_MEMLOCK_ZERO)
    if any(Placeholder.DISK in s.placeholders for s in scenario.slots):
        if Placeholder.DISK not in scenario.slots[-1].placeholders:
            raise _missing(scenario, "a file on a disk filesystem behind a slot that is not the last")
        out.insert(0, cexport.Step.FILE_ON_DISK)
    return tuple(out)


def _step(step: Step) -> cexport.Step | None:
    if isinstance(step, TruncateFile):
        return cexport.Step.TRUNCATE_FILE_BEFORE_RUN
    if isinstance(step, MapReadOnly):
        return cexport.Step.MPROTECT_READONLY_BEFORE_RUN
    if isinstance(step, DeleteSlot):
        return cexport.Step.DELETE_SLOT_AFTER_RUN
    return None


def _plan(scenario: Scenario) -> tuple[tuple[cexport.Memslot, ...], cexport.Expect, tuple[cexport.Expect, ...],
                                       tuple[cexport.Step, ...]]:
    """Everything but the guest image; raises NotExportable."""
    if not scenario.arch.fits("arm64"):
        raise _missing(scenario, f"it runs on {scenario.arch.value} only (the C reproducers are arm64)")
    if scenario.vcpus != 1:
        raise _missing(scenario, f"{scenario.vcpus} vCPUs (the program makes one)")
    steps = _steps(scenario)
    if not scenario.slots:
        raise _missing(scenario, "it has no memslots of its own")
    slots = tuple(cexport.Memslot(i, layout.RAM_BASE + s.offset, s.size, backing(scenario, s.backing), int(s.flags))
                  for i, s in enumerate(scenario.slots))
    expected = expect(scenario, scenario.expected.answer)
    alternatives = []
    for alt in scenario.expected.alternatives:
        words = expect(scenario, alt.answer)
        alternatives.append(cexport.Expect(words.result, f"{words.meaning}, the answer of {alt.hosts}: {alt.why}"))
    return slots, expected, tuple(alternatives), steps


def why_not(scenario: Scenario) -> str | None:
    """Why ``scenario`` cannot be written as C, or None (the guest need not be built)."""
    try:
        _plan(scenario)
    except NotExportable as err:
        return str(err)
    return None


def to_c(scenario: Scenario) -> cexport.CReproducer:
    """``scenario`` as a standalone arm64 C reproducer.  Raises NotExportable for what C cannot say, and
    ConfigError when its guest is not built."""
    slots, expected, alternatives, steps = _plan(scenario)
    if scenario.guest is None:
        image, gpa, entry, registers, guest = b"", layout.RAM_BASE, layout.RAM_BASE, (0,) * 5, "no guest"
    else:
        image, gpa, entry = cexport.guest_image(firmware_path("arm64", scenario.guest.name))
        registers, guest = cexport.firmware_registers(slots, scenario.protected), scenario.guest.name
    return cexport.CReproducer(scenario.name, scenario.explanation, scenario.protected, slots, image, gpa, entry,
                               registers, expected, steps, guest=guest, timeout=int(scenario.timeout),
                               title=scenario.title, alternatives=alternatives)


def exportable(scenarios) -> list[Scenario]:
    """Those of ``scenarios`` that C can reproduce, in their order."""
    return [s for s in scenarios if why_not(s) is None]


__all__ = ["CMA_HEAP", "NotExportable", "PLACEHOLDER_DIRS", "backing", "exportable", "expect", "to_c", "why_not"]
