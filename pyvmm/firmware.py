"""Where the bundled test guests live.

An installed pyvmm (a wheel, ``pip install .``) carries those of the architecture it was built on as package data,
``pyvmm/guests/<arch>/NAME`` (setup.py builds them).  Run from a source checkout, they are the checkout's
``firmware/<arch>/build/NAME`` (``make -C firmware/<arch>``).  The package's come first."""

from __future__ import annotations

import os

from .kvm.errors import ConfigError

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guests")  # an installed pyvmm's
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "firmware"))  # a checkout's (sources + build/)


def firmware_path(arch: str, name: str) -> str:
    bundled = os.path.join(PACKAGE, arch, name)
    if os.path.exists(bundled):
        return bundled
    source = os.path.join(ROOT, arch)
    if os.path.isfile(os.path.join(source, "Makefile")):  # a checkout: its guests are built there
        path = os.path.join(source, "build", name)
        if os.path.exists(path):
            return path
        rel = os.path.relpath(source)
        raise ConfigError(f"bundled guest {name} for {arch} is not built ({path} missing): "
                          f"run `make -C {source if rel.startswith('..') else rel}`")
    have = sorted(os.listdir(PACKAGE)) if os.path.isdir(PACKAGE) else []
    raise ConfigError(f"bundled guest {name} for {arch} is not part of this pyvmm installation ({PACKAGE} holds "
                      f"{'the guests for ' + ', '.join(have) if have else 'no guests'}): a pyvmm wheel carries the "
                      f"guests of the machine it was built on, so build and install pyvmm on {arch}, "
                      f"or run pyvmm from its source tree, where firmware/{arch}/Makefile builds them")
