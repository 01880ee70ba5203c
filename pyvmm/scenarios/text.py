"""What ``pyvmm scenario`` prints: the list, one result in full, the table of ``--all``, and their JSON."""

from __future__ import annotations

import dataclasses
import textwrap

from ..arch import get_arch
from ..kvm.errors import ConfigError
from .model import Answer, Scenario, SlotFlag, Target
from .runner import Result, Verdict

WIDTH = 100


def size_text(size: int) -> str:
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size:#x} bytes"


def _ram_base(scenario: Scenario, machine: str) -> int | None:
    arch = machine if scenario.arch is Target.ANY else scenario.arch.value
    try:
        return get_arch(arch).ram_base
    except ConfigError:
        return None


def flag_names(flags: SlotFlag) -> list[str]:
    return [f.name for f in SlotFlag if f and f in flags]


def setup_lines(scenario: Scenario, machine: str) -> list[str]:
    base = _ram_base(scenario, machine)
    arch = f"{machine} (any arch)" if scenario.arch is Target.ANY else scenario.arch.value
    out = [f"VM: {scenario.vm_kind}, {arch}"
           + (f", {scenario.vcpus} vCPU{'s' if scenario.vcpus > 1 else ''}" if scenario.guest else "")]
    for i, slot in enumerate(scenario.slots):
        where = f"gpa {base + slot.offset:#x}" if base is not None else f"RAM base + {slot.offset:#x}"
        flags = ",".join(flag_names(slot.flags))
        out.append(f"slot {i}: {where}, {size_text(slot.size)}, {slot.backing}" + (f", {flags}" if flags else ""))
    if scenario.guest is not None:
        out.append(f"guest: {scenario.guest.name}: {scenario.guest.does}")
    for step in scenario.steps:
        out.append(f"step: {step.describe()}")
    if scenario.confinement is not None:
        out.append(f"runs {scenario.confinement.describe()}")
    return out


def list_text(scenarios: tuple[Scenario, ...], why_not: dict[str, str | None]) -> str:
    """NAME, ARCH/VM, whether it runs here, TITLE; the reasons it cannot, below."""
    rows = [("SCENARIO", "ARCH/VM", "HERE", "TITLE")]
    for s in scenarios:
        rows.append((s.name, f"{s.arch.value}/{s.vm_kind}", "no" if why_not[s.name] else "yes", s.title))
    out = _columns(rows)
    missing = [(s.name, why_not[s.name]) for s in scenarios if why_not[s.name]]
    if missing:
        out.append("")
        out.append("not on this host:")
        out.extend(textwrap.fill(f"{name}: {why}", WIDTH, initial_indent="  ", subsequent_indent="    ")
                   for name, why in missing)
    return "\n".join(out)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(r, widths)), r[-1]]).rstrip() for r in rows]


def verdict_text(result: Result) -> str:
    if result.verdict is Verdict.SKIPPED:
        return f"skipped: {result.skipped}"
    if result.error:
        return f"{result.verdict.value}: {result.error}"
    return result.verdict.value


def observed_text(result: Result) -> str:
    obs = result.observation
    if obs is None:
        return "-"
    return ("pyvmm refused; kernel: " if obs.refusals else "") + obs.answer.text()


def table_text(results: list[Result]) -> str:
    rows = [("SCENARIO", "EXPECTED", "OBSERVED", "VERDICT")]
    rows += [(r.scenario.name, r.scenario.expected.text(), observed_text(r), verdict_text(r)) for r in results]
    counts = {v: sum(r.verdict is v for r in results) for v in Verdict}
    summary = ", ".join(f"{n} {v.value.lower()}" for v, n in counts.items())
    return "\n".join([*_columns(rows), "", f"{len(results)} scenarios: {summary}"])


def _paragraph(text: str, indent: str = "") -> str:
    return textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent)


def result_text(result: Result, machine: str) -> str:
    """``pyvmm scenario run NAME``: the explanation, the setup, the expectation, what happened, the verdict."""
    s = result.scenario
    out = [f"{s.name}: {s.title}", "", _paragraph(s.explanation), "", "setup:"]
    out += [textwrap.fill(line, WIDTH, initial_indent="  ", subsequent_indent="    ") for line in setup_lines(s, machine)]
    out.append("expected:")
    out.append(f"  {'pyvmm refuses first, then the kernel answers' if s.expected.pyvmm_refuses else 'the kernel answers'}: "
               f"{s.expected.answer.text()}")
    for alt in s.expected.alternatives:
        out.append(_paragraph(f"or, on {alt.hosts}: {alt.answer.text()} ({alt.why})", "  "))
    out.append("observed:")
    obs = result.observation
    if result.error:
        out.append(_paragraph(f"the scenario failed: {result.error}", "  "))
    elif obs is None:
        out.append("  (not run)")
    else:
        out += [_paragraph(f"pyvmm refused: {r}", "  ") for r in obs.refusals]
        out += [_paragraph(f"note: {n}", "  ") for n in obs.notes]
        if obs.outcome:
            out.append(_paragraph(f"outcome: {obs.outcome}", "  "))
        out.append(f"  kernel's answer: {obs.answer.text()}")
        if obs.answer.errno:
            out.append(f"  errno: {obs.answer.errno}" + (f" ({obs.errno_meaning})" if obs.errno_meaning else ""))
        if obs.likely_cause:
            out.append("  likely cause (pyvmm's fault report):")
            out += [textwrap.fill(c, WIDTH, initial_indent="    - ", subsequent_indent="      ") for c in obs.likely_cause]
        if obs.console:
            out.append("  guest console (last lines):")
            out += ["    | " + line for line in obs.console]
    verdict = verdict_text(result)
    if result.verdict is Verdict.MATCH and result.matched != "expected":
        verdict += f" (the answer of {result.matched})"
    out.append(_paragraph(f"verdict: {verdict}"))
    return "\n".join(out)


def _answer_dict(answer: Answer) -> dict:
    return {k: v for k, v in answer.to_dict().items() if v is not None}


def scenario_dict(scenario: Scenario, machine: str) -> dict:
    """The scenario as data (what a program reproducing it needs)."""
    base = _ram_base(scenario, machine)
    return {
        "name": scenario.name, "title": scenario.title, "arch": scenario.arch.value, "vm": scenario.vm_kind,
        "vcpus": scenario.vcpus,
        "slots": [{"slot": i, "offset": s.offset, "gpa": None if base is None else base + s.offset, "size": s.size,
                   "backing": s.backing, "flags": flag_names(s.flags)} for i, s in enumerate(scenario.slots)],
        "guest": dataclasses.asdict(scenario.guest) if scenario.guest else None,
        "steps": [{"step": type(step).__name__, "when": step.when.name, **dataclasses.asdict(step),
                   "does": step.describe()} for step in scenario.steps],
        "confinement": dataclasses.asdict(scenario.confinement) if scenario.confinement else None,
        "expected": {"answer": _answer_dict(scenario.expected.answer), "pyvmm_refuses": scenario.expected.pyvmm_refuses,
                     "alternatives": [{"answer": _answer_dict(a.answer), "hosts": a.hosts, "why": a.why}
                                      for a in scenario.expected.alternatives]},
        "needs": [f.name for f in scenario.features()],
        "explanation": scenario.explanation,
    }


def result_dict(result: Result, machine: str) -> dict:
    return {"scenario": scenario_dict(result.scenario, machine), "verdict": result.verdict.value,
            "skipped": result.skipped, "matched": result.matched, "error": result.error,
            "observed": result.observation.to_dict() if result.observation else None}


def list_dicts(scenarios: tuple[Scenario, ...], why_not: dict[str, str | None], machine: str) -> list[dict]:
    return [{"name": s.name, "title": s.title, "arch": s.arch.value, "vm": s.vm_kind, "runs_here": not why_not[s.name],
             "why_not": why_not[s.name], "scenario": scenario_dict(s, machine)} for s in scenarios]
