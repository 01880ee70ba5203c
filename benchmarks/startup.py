"""Start-up: `pyvmm run` of the bundled hello, against `python3 -c pass` and the C peer running the same guest.

    scripts/dev bench startup                    (x86_64)
    .venv/bin/python benchmarks/startup.py [--rounds R]
    scripts/lab run -- python3 benchmarks/startup.py [--rounds R]       (arm64, in the lab)

Each Python figure is taken in a setup, an interpreter with its site-packages, and its peer ``python -c pass`` runs
in the same setup (the same interpreter, the same site start-up, the same environment), so that the difference is
pyvmm's own:

- "as run": how this benchmark was started: the venv's ``pyvmm`` script next to this Python when there is one (its
  interpreter is the script's #! line), else ``python3 -m pyvmm run`` with this Python (the lab).  In a development
  checkout that venv holds pyvmm as an editable install: every start of its interpreter, ``python -c pass``
  included, runs setuptools' ``__editable__.*.pth``, whose finder imports pathlib, urllib.parse, ipaddress, re,
  enum... (~16-20 ms here): a cost a user's installed copy does not have, and one that also imports modules pyvmm
  needs, so that the difference to ``python -c pass`` understates what pyvmm imports.
- "installed" (only where "as run" has an editable finder): a venv made for this run from the same base interpreter
  (``sys._base_executable``, ``-m venv --without-pip``) whose site-packages holds one .pth of plain path entries: the
  checkout (pyvmm found by the ordinary path finder, as in a wheel's install) and "as run"'s site-packages (the
  dependencies; their .pth files are not run); its ``pyvmm`` script is the one pip writes.  pyvmm's code is the
  checkout's in both.

Each round (rounds are interleaved) spawns, from this process, with the same environment:

1. in each setup, ``python -c pass``: the interpreter's own start-up, the floor for anything written in Python;
   then ``pyvmm run`` with no image: the bundled hello, as a user would run it.  pyvmm reports no timestamp of its
   first KVM_RUN, so its "first guest instruction" is approximated by the guest's first output byte on its stdout
   (after the guest's first UART exits: the C peer's figure for the same point shows what that adds);
2. the C peer (benchmarks/cvmm.c) running the bundled hello (firmware/<arch>/build/hello) on a VM set up as pyvmm
   sets it up: it reports when its main() started and when it entered KVM_RUN the first time (the guest's first
   instruction follows at once), and its output shows when the guest's first byte came out;
3. where pyvmm's time goes ("installed" when there is one, else "as run"): ``python -c DRIVER``, a driver that
   takes a timestamp as its first line, imports pyvmm.cli, runs ``pyvmm.__main__.entry()`` (the ``pyvmm``
   script's, with argv ``run``) and takes one after it: the interpreter's start-up, the module-level imports,
   main() (its lazy imports, the VM's set-up, the run, the close) and the exit after it (Python's finalization).

Once, after the rounds: ``python -X importtime`` of that setup's pyvmm command and of ``python -c pass``: the
imports only pyvmm's start does, the ten largest by cumulative time (nested as importtime nests them) and the
largest by their own time.  importtime's own bookkeeping inflates these (about 10%); they show where, not how much.

Python's bytecode: the Python commands run with their .pyc cached, as an installed package has them: in a
PYTHONPYCACHEPREFIX of this run's own (written by a first, untimed run of each; nothing is written into the tree),
PYTHONDONTWRITEBYTECODE unset.  When this environment sets PYTHONDONTWRITEBYTECODE (the lab does), pyvmm run is
also measured in the environment as it is ("as run"): every module without a .pyc beside it is then compiled at
every start.

Times run from the spawn (fork/exec included, the same for all) to the event (a report line's CLOCK_MONOTONIC
timestamp, or the first byte read from the child's stdout pipe) and to the child's exit (wait4).  The issue's
targets (issue 12): pyvmm run's hello <= 50 ms on x86_64, <= 0.6 s in the lab.
"""
# bench-arches: x86_64 arm64   (scripts/dev bench runs this file on these architectures)

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ARCH, ROOT, guest, header, in_lab, machine, peer, show, spawn  # noqa: E402

# What a setup's interpreter says about its own start-up (run once per setup, untimed).
PROBE = """import sys
modules = len(sys.modules)
import json, os, site
dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
print(json.dumps({"executable": sys.executable, "base": getattr(sys, "_base_executable", sys.executable),
                  "venv": sys.prefix != sys.base_prefix, "site": dirs,
                  "pth": sorted(f for d in dirs for f in os.listdir(d) if f.endswith(".pth")),
                  "editable": sorted(m for m in sys.modules if m.startswith("__editable__")),
                  "modules": modules}))
"""

# The start-up's phases: its first line runs once the interpreter and site are up.
DRIVER = """import time
t0 = time.monotonic_ns()
import os, sys
sys.argv = ["pyvmm", "run"]
import pyvmm.cli
t1 = time.monotonic_ns()
from pyvmm.__main__ import entry
try:
    status = entry()
finally:
    os.write(2, f"bench-phases: start={t0} imported={t1} main-end={time.monotonic_ns()}\\n".encode())
sys.exit(status)
"""

# What pip writes as a console script for pyvmm's [project.scripts] entry (the dev venv's has the same lines).
SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from pyvmm.__main__ import entry
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(entry())
"""


class Setup:
    """An interpreter with its site-packages: ``python`` (for ``-c pass``) and the pyvmm command run in it."""

    def __init__(self, key: str, what: str, python: str, vmm: list[str]):
        self.key, self.what, self.python, self.vmm = key, what, python, vmm
        self.info: dict = {}

    def probe(self, env: dict) -> dict:
        out = subprocess.run([self.python, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
        self.info = json.loads(out.stdout)
        return self.info

    def describe(self) -> str:
        i = self.info
        pth = ", ".join(i["pth"]) or "none"
        finder = f"; at start-up it imports {', '.join(i['editable'])}" if i["editable"] else ""
        return (f"  [{self.key}] {self.what}\n"
                f"      interpreter {self.python} ({'a venv of ' if i['venv'] else ''}{i['base']})\n"
                f"      site-packages {', '.join(i['site']) or 'none'}\n"
                f"      .pth files run at start-up: {pth}{finder}; {i['modules']} modules after start-up\n"
                f"      timed: {self.python} -c pass;  {' '.join(self.vmm)}")


def shebang(script: str) -> str | None:
    with open(script, "rb") as f:
        line = f.readline()
    python = line[2:].strip().decode() if line.startswith(b"#!") else ""
    return python if python and " " not in python else None  # an interpreter with arguments: not ours to split


def as_run() -> Setup:
    """The setup this benchmark was started in: the venv's pyvmm script next to this Python (its #! interpreter for
    ``-c pass``), else ``python3 -m pyvmm run`` with this Python (the lab)."""
    script = os.path.join(os.path.dirname(sys.executable), "pyvmm")
    if os.path.exists(script) and not in_lab():
        python = shebang(script) or sys.executable
        return Setup("as run", "this benchmark's environment: its venv's pyvmm script", python, [script, "run"])
    return Setup("as run", "this benchmark's Python with the checkout as the current directory (python3 -m pyvmm)",
                 sys.executable, [sys.executable, "-m", "pyvmm", "run"])


def installed(base: str, deps: list[str], where: str, env: dict) -> Setup:
    """A venv of BASE in WHERE whose site-packages finds pyvmm in the checkout and its dependencies in DEPS through
    plain path entries (no editable finder, no other .pth), with pip's pyvmm script."""
    subprocess.run([base, "-m", "venv", "--without-pip", where], env=env, check=True, capture_output=True)
    python = os.path.join(where, "bin", "python3")
    site_dir = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], env=env,
                              check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site_dir, "pyvmm-checkout.pth"), "w") as f:
        f.write("".join(f"{path}\n" for path in [ROOT, *deps]))
    script = os.path.join(where, "bin", "pyvmm")
    with open(script, "w") as f:
        f.write(SCRIPT.format(python=python))
    os.chmod(script, 0o755)
    return Setup("installed", "pyvmm as a user's installed copy runs: a venv of the same base interpreter with pyvmm "
                 "and its dependencies on plain path entries (one .pth: the checkout, the dev venv's site-packages)",
                 python, [script, "run"])


IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (.*)$")


def import_times(cmd: list[str], env: dict) -> list[tuple[int, int, str]]:
    """(self µs, cumulative µs, name as importtime indents it) of every import CMD's Python does."""
    got = spawn(cmd, env)
    return [(int(m[1]), int(m[2]), m[3]) for m in map(IMPORTTIME.match, got["err"].splitlines()) if m]


def breakdown(setup: Setup, env: dict, phases: dict[str, list[float]], rounds: int) -> None:
    header(f"where pyvmm run's time goes, [{setup.key}] ({rounds} interleaved rounds of python -c DRIVER; "
           "times from the spawn)")
    show("  to the driver's first line (interpreter, site)", phases["start"], "ms", width=60)
    show("  import pyvmm.cli (module-level imports)", phases["import"], "ms", width=60)
    show("  pyvmm.__main__.entry(): main() (set-up, run, close)", phases["main"], "ms", width=60)
    show("  after it, to exit (Python's finalization)", phases["final"], "ms", width=60)
    show("  the driver, to exit", phases["exit"], "ms", width=60)
    base = [setup.python, "-X", "importtime"]
    vmm_args = setup.vmm[1:] if setup.vmm[0] == setup.python else setup.vmm  # a script: run it with -X importtime
    ours = import_times([*base, *vmm_args], env)
    floor = {name.strip() for _, _, name in import_times([*base, "-c", "pass"], env)}
    extra = [(own, cum, name) for own, cum, name in ours if name.strip() not in floor]
    print(f"\n  python -X importtime {' '.join(vmm_args)}  (once): {len(ours)} imports, {len(extra)} of them not in "
          f"python -c pass,\n  taking {sum(o for o, _, _ in extra) / 1e3:.1f} ms of their own (importtime's bookkeeping "
          "included).  The ten largest by cumulative time,\n  in importtime's order (a module after what it imports, "
          "which is indented deeper):")
    top = sorted(sorted(extra, key=lambda e: -e[1])[:10], key=extra.index)
    for own, cum, name in top:
        print(f"    {cum / 1e3:7.1f} ms cumulative {own / 1e3:6.1f} ms own  {name}")
    largest = sorted(extra, key=lambda e: -e[0])[:10]
    print("  the largest own times: " + ", ".join(f"{name.strip()} {own / 1e3:.1f}" for own, _, name in largest)
          + " ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5 if ARCH == "arm64" else 20,
                        help="interleaved rounds (default 20; 5 on arm64)")
    args = parser.parse_args()
    hello = guest("hello")
    c_cmd = [peer(), hello]
    print(f"startup: {machine()}")
    as_is = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as scratch:
        pycache = os.path.join(scratch, "pyc")
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = pycache
        setups = [as_run()]
        dev = setups[0].probe(cached)
        if dev["editable"] or any(p.startswith("__editable__") for p in dev["pth"]):
            try:
                setups.append(installed(dev["base"], dev["site"], os.path.join(scratch, "venv"), cached))
                setups[-1].probe(cached)
            except (OSError, subprocess.CalledProcessError) as err:
                print(f"  no [installed] setup: making its venv failed: {getattr(err, 'stderr', '') or err}")
                setups.pop()
        print("  setups (each pyvmm figure's python -c pass runs in the same setup):")
        for setup in setups:
            print(setup.describe())
        if len(setups) == 1:
            print("  (no editable install in this setup: it starts as an installed copy would)")
        print(f"  C peer: {os.path.relpath(c_cmd[0], ROOT)} {os.path.relpath(hello, ROOT)}; cwd {ROOT}; pyc cached in "
              f"a PYTHONPYCACHEPREFIX of this run's")
        probe = setups[-1]  # where the breakdown runs: the installed setup when there is one
        driver = [probe.python, "-c", DRIVER]
        for setup in setups:  # untimed: the .pyc written, the caches warm
            spawn([setup.python, "-c", "pass"], cached)
            spawn(setup.vmm, cached)
        spawn(driver, cached)
        figures: dict[str, list[float]] = {}
        phases: dict[str, list[float]] = {k: [] for k in ("start", "import", "main", "final", "exit")}

        def add(key: str, value: float) -> None:
            figures.setdefault(key, []).append(value)

        for _ in range(args.rounds):
            for setup in setups:
                add(f"{setup.key}:python", spawn([setup.python, "-c", "pass"], cached)["exit"])
                v = spawn(setup.vmm, cached)
                if b"Hello" not in v["out"]:
                    raise SystemExit(f"pyvmm run printed no greeting: {v['out'][-500:]!r}")
                add(f"{setup.key}:first", v["first"])
                add(f"{setup.key}:exit", v["exit"])
            c = spawn(c_cmd)
            add("c_main", c["report"]["main"])
            add("c_run", c["report"]["first-run"])
            add("c_first", c["first"])
            add("c_exit", c["exit"])
            if as_is:
                v = spawn(setups[0].vmm)
                add("asis_first", v["first"])
                add("asis_exit", v["exit"])
            d = spawn(driver, cached)
            if b"Hello" not in d["out"]:
                raise SystemExit(f"the start-up driver printed no greeting: {d['out'][-500:]!r}\n{d['err'][-1000:]}")
            line = re.search(r"bench-phases: start=(\d+) imported=(\d+) main-end=(\d+)", d["err"])
            if line:
                start, imported, end = ((int(t) - d["t0"]) / 1e9 for t in line.groups())
                phases["start"].append(start)
                phases["import"].append(imported - start)
                phases["main"].append(end - imported)
                phases["final"].append(d["exit"] - end)
                phases["exit"].append(d["exit"])
        f = figures
        header(f"start-up, the bundled hello ({args.rounds} interleaved rounds; times from the spawn)")
        show("  C peer, to its main()", f["c_main"], "ms", width=60)
        show("  C peer, to its first KVM_RUN", f["c_run"], "ms", width=60)
        show("  C peer, to the guest's first output byte", f["c_first"], "ms", width=60)
        show("  C peer, to exit", f["c_exit"], "ms", width=60)
        target = "0.6 s" if ARCH == "arm64" else "50 ms"
        for setup in setups:
            k = setup.key
            python, first, done = f[f"{k}:python"], f[f"{k}:first"], f[f"{k}:exit"]
            show(f"  [{k}] python -c pass, to exit", python, "ms", [(f["c_exit"], "C")], width=60)
            show(f"  [{k}] pyvmm run, to the guest's first output byte", first, "ms", [(f["c_first"], "C")],
                 width=60, note="(~ its first guest instruction)")
            show(f"  [{k}] pyvmm run, to exit", done, "ms", [(f["c_exit"], "C"), (python, "python -c pass")],
                 width=60, note=f"(target: <= {target})")
            if as_is and setup is setups[0]:
                show(f"  [{k}] pyvmm run, to exit, PYTHONDONTWRITEBYTECODE set", f["asis_exit"], "ms",
                     [(done, "cached"), (f["c_exit"], "C")], width=60, note="(no .pyc: compiled at each start)")
            extra = [v - p for v, p in zip(done, python)]
            show(f"  [{k}] pyvmm run's own part (to exit - python -c pass)", extra, "ms", width=60)
            print(f"  [{k}] (medians: pyvmm run {statistics.median(done) * 1e3:.1f} ms = python -c pass "
                  f"{statistics.median(python) * 1e3:.1f} ms + pyvmm {statistics.median(extra) * 1e3:.1f} ms)")
        breakdown(probe, cached, phases, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
