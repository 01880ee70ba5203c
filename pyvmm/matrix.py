"""``pyvmm matrix``: every backing this host offers, on a normal and on a protected VM, each run live.

A cell is one tiny guest (the bundled ``memtouch``: it writes and reads back a pattern across its RAM) on
8 MiB of one backing, and what happened: it ran, or which ioctl failed with which errno and pyvmm's one-line
cause.  Beside it, ``pyvmm check``'s prediction for the same configuration (``preflight.check``), so the
kernel's rules as pyvmm states them are tested against the kernel on every run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from .firmware import firmware_path
from .kvm.errors import ConfigError, KvmError, MissingFeature
from .outcome import ExitKind
from .preflight import Prediction, RegionSpec, Verdict, check
from .scenarios.host import dma_heaps

RAM = 8 << 20  # memtouch's RAM: 2 MiB-aligned (hugetlb), above the arm64 minimum
KINDS = ("normal", "protected")
BASE_BACKINGS = ["anon", "memfd", "memfd-hugetlb", "guest-memfd", "file", "udmabuf", "udmabuf:memfd"]
RUN_TIMEOUT = 120.0  # seconds for one cell's guest


def backings_here() -> list[str]:
    """The matrix's rows: every backing kind, with one row per DMA-buf heap this host has (``dma-heap:NAME``);
    ``file`` is a file in a fresh temporary directory.  Kinds this host lacks stay, to show why."""
    return BASE_BACKINGS + ([f"dma-heap:{h}" for h in dma_heaps()] or ["dma-heap:system"])


@dataclass
class Cell:
    backing: str
    kind: str  # "normal" or "protected"
    predicted: Prediction
    observed: Prediction  # the same shape: what the run did
    console: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def agree(self) -> bool:
        p, o = self.predicted, self.observed
        return (p.verdict, p.errno) == (o.verdict, o.errno)

    def to_dict(self) -> dict:
        return {"backing": self.backing, "kind": self.kind, "predicted": self.predicted.to_dict(),
                "observed": self.observed.to_dict(), "agree": self.agree, "console": self.console}


def _spec(backing: str, tmp: str) -> str:
    return f"file:{os.path.join(tmp, 'guest-ram.img')}" if backing == "file" else backing


def observe(protected: bool, backing: str, kvm=None, timeout: float = RUN_TIMEOUT) -> tuple[Prediction, str]:
    """Run memtouch on RAM bytes of BACKING; what happened, in a Prediction's shape, and the console text."""
    from .vm import Vm

    try:
        vm = Vm(protected=protected, kvm=kvm)
    except (MissingFeature, ConfigError) as err:
        return Prediction(Verdict.UNAVAILABLE, reasons=[str(err)]), ""
    except KvmError as err:
        return Prediction(Verdict.FAILS, err.errno_name, err.call, [str(err)]), ""
    with vm:
        try:
            vm.add_memory(RAM, backing)
            vm.create_vcpus(1)
            vm.boot(firmware_path(vm.arch.name, "memtouch"))
        except MissingFeature as err:
            return Prediction(Verdict.UNAVAILABLE, reasons=[str(err)]), ""
        except KvmError as err:
            return Prediction(Verdict.FAILS, err.errno_name, err.call, [str(err)]), ""
        except ConfigError as err:
            return Prediction(Verdict.REFUSED, reasons=[str(err)]), ""
        try:
            outcome = vm.run(timeout=timeout, precheck=False)  # what KVM answers, not pyvmm's own refusal
        except ConfigError as err:
            return Prediction(Verdict.REFUSED, reasons=[str(err)]), vm.console.text()
        text = vm.console.text()
        if outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0:
            return Prediction(Verdict.RUNS, reasons=[text.strip().splitlines()[-1] if text.strip() else ""]), text
        r = outcome.report
        if outcome.kind is ExitKind.FAULT and r is not None and r.errno:
            causes = list(r.likely_cause) or [outcome.detail]
            return Prediction(Verdict.FAILS, r.errno_name, r.call, causes), text
        return Prediction(Verdict.FAILS, None, None, [f"{outcome.kind.value}: {outcome.detail}"]), text


def run_cell(backing: str, kind: str, kvm=None) -> Cell:
    protected = kind == "protected"
    with tempfile.TemporaryDirectory(prefix="pyvmm-matrix-") as tmp:  # file: a fresh file per cell
        spec = _spec(backing, tmp)
        predicted = check(protected, [RegionSpec(None, RAM, spec)], kvm=kvm)
        observed, console = (observe(protected, spec, kvm) if predicted.verdict is not Verdict.UNAVAILABLE
                             else (predicted, ""))
    return Cell(backing, kind, predicted, observed, console)


def run_matrix(backings: list[str] | None = None, kinds: tuple[str, ...] = KINDS, kvm=None, progress=None) -> list[Cell]:
    cells = []
    for backing in backings or backings_here():
        for kind in kinds:
            cell = run_cell(backing, kind, kvm)
            if progress:
                progress(cell)
            cells.append(cell)
    return cells


def format_table(cells: list[Cell], width: int = 100) -> str:
    """backing | normal: predicted / observed | protected: predicted / observed, then the causes below."""
    kinds = [k for k in KINDS if any(c.kind == k for c in cells)]
    rows = {}
    for c in cells:
        rows.setdefault(c.backing, {})[c.kind] = c
    head = ["backing"] + [f"{k}: predicted -> observed" for k in kinds]
    body = []
    for backing, by_kind in rows.items():
        line = [backing]
        for k in kinds:
            c = by_kind.get(k)
            if c is None:
                line.append("")
            elif c.observed.verdict is Verdict.UNAVAILABLE and c.agree:
                line.append("unavailable")
            else:
                mark = "" if c.agree else "   <-- MISMATCH"
                line.append(f"{c.predicted.summary()} -> {c.observed.summary()}{mark}")
        body.append(line)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in body]
    notes = []
    unavailable: dict[tuple[str, str], list[str]] = {}  # (kind, why) -> backings: one line for a whole column
    for c in cells:
        if c.observed.verdict is Verdict.UNAVAILABLE:
            unavailable.setdefault((c.kind, c.observed.cause()), []).append(c.backing)
    for (kind, why), backings in unavailable.items():
        which = "every backing" if len(backings) == len(rows) else ", ".join(backings)
        notes.append(f"{which} ({kind}): unavailable: {why}")
    for c in cells:
        if c.observed.verdict is Verdict.UNAVAILABLE:
            continue
        if c.observed.verdict is not Verdict.RUNS or not c.agree:
            notes.append(f"{c.backing} ({c.kind}): {c.observed.summary()}: {c.observed.cause()}")
            if not c.agree:
                notes.append(f"    predicted {c.predicted.summary()}: {c.predicted.cause()}")
    if notes:
        out += ["", *[n if len(n) <= width * 3 else n[: width * 3 - 3] + "..." for n in notes]]
    return "\n".join(out)
