"""pyvmm's build steps that pyproject.toml cannot say (all metadata is in pyproject.toml):

- ``build_py`` builds the test guests of the build machine's architecture with their Makefile
  (``firmware/<arch>/Makefile``) and puts them into the package as ``pyvmm/guests/<arch>/NAME``, where an
  installed pyvmm finds them (``pyvmm/firmware.py``).  An editable install builds none: it runs from the
  checkout, which finds ``firmware/<arch>/build/``.
- ``bdist_wheel`` tags the wheel ``py3-none-linux_<arch>``: the Python code is pure, but the guests in it are
  machine code for one architecture, so an ``any`` wheel would install on the other one and fail there.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel  # setuptools >= 70.1
except ImportError:  # older setuptools: the wheel package's
    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
# uname -m -> pyvmm's name for the architecture (pyvmm.arch.machine_name) and the folder of its guests' sources
ARCHES = {"x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


class build_py(_build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            work = os.path.join(self.get_finalized_command("build").build_temp, "guests")
            self._guests = build_guests(os.path.join(self.build_lib, "pyvmm", "guests"), work)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *getattr(self, "_guests", [])]


def build_guests(dest: str, work: str) -> list[str]:
    """Build this machine's test guests in WORK and copy them (not their object files) into DEST/<arch>/."""
    arch = ARCHES.get(platform.machine())
    source = os.path.join(HERE, "firmware", arch or "-")
    if arch is None or not os.path.isfile(os.path.join(source, "Makefile")):
        print(f"pyvmm: no test guests for {platform.machine()} (pyvmm runs on x86_64 and arm64); the wheel has none")
        return []
    out = os.path.join(os.path.abspath(work), arch)
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["make", "-s", "-C", source, f"B={out}"]  # B: the Makefile's build folder; firmware/<arch>/build stays as it is
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"pyvmm: building the bundled test guests failed ({' '.join(cmd)}: {err}); they need make and "
                         f"GNU binutils (Debian: make binutils{', gcc' if arch == 'arm64' else ''})") from None
    os.makedirs(os.path.join(dest, arch), exist_ok=True)
    copied = []
    for name in sorted(os.listdir(out)):
        if not name.endswith(".o"):
            copied.append(shutil.copy2(os.path.join(out, name), os.path.join(dest, arch, name)))
    return copied


class bdist_wheel(_bdist_wheel):
    def get_tag(self) -> tuple[str, str, str]:
        # the platform as for a wheel with compiled code (the guests are machine code: see the top); the files still
        # install as pure Python (Root-Is-Purelib), and any Python 3 takes them: no C extension, no ABI
        pure, self.root_is_pure = self.root_is_pure, False
        try:
            _, _, plat = super().get_tag()
        finally:
            self.root_is_pure = pure
        return "py3", "none", plat


setup(cmdclass={"build_py": build_py, "bdist_wheel": bdist_wheel})
