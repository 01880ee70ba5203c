"""``pyvmm scenario``: a catalogue of guest-fault classes, each a self-contained reproducer.

A scenario (``model.Scenario``) is data: the VM type, the memslots and their backings, the bundled guest,
the special steps (``steps.py``), what the kernel is expected to answer and a paragraph saying why.  The
catalogue is ``catalogue.CATALOGUE``; ``runner.run_scenario`` runs one for real (or skips it, naming what the
host lacks: ``host.HostFacts``) and compares; ``text`` prints the list, a result and the table.
"""

from __future__ import annotations

import difflib

from ..kvm.errors import ConfigError
from . import catalogue
from .host import HostFacts
from .model import Answer, Expected, Scenario
from .runner import Observation, Result, Verdict, run_scenario


def scenarios() -> tuple[Scenario, ...]:
    """The catalogue, in its order."""
    return catalogue.CATALOGUE


def find(name: str) -> Scenario:
    """The scenario called ``name``; ConfigError naming the close ones otherwise."""
    known = {s.name: s for s in scenarios()}
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown scenario {name!r} (pyvmm scenario list shows the {len(known)} scenarios{hint})")


def run_all(facts: HostFacts) -> list[Result]:
    return [run_scenario(s, facts) for s in scenarios()]


__all__ = ["Answer", "Expected", "HostFacts", "Observation", "Result", "Scenario", "Verdict", "find", "run_all",
           "run_scenario", "scenarios"]
