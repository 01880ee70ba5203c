"""Where the bundled test guests live (``firmware/<arch>/build/``)."""

from __future__ import annotations

import os

from .kvm.errors import ConfigError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "firmware"))


def firmware_path(arch: str, name: str) -> str:
    path = os.path.join(ROOT, arch, "build", name)
    if not os.path.exists(path):
        raise ConfigError(f"bundled guest {name} for {arch} is not built ({path} missing): run `make -C firmware/{arch}`")
    return path
