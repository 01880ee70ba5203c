"""Installing pyvmm as a user would: ``python -m build`` (an sdist, then the wheel built from it), the wheel installed
into a fresh virtual environment, and pyvmm run from an unrelated directory: the bundled hello, ``caps``,
``--version``; only ``pyvmm`` in site-packages (the checkout's ``devices/`` is ``pyvmm.devices`` there).

One build for the module.  The build's own setuptools and pyvmm's dependencies come from PyPI (pip's cache makes
it quick): without PyPI, or without ``build`` and ``ensurepip`` (the arm64 lab has neither, nor a network), the
tests skip and say which."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import ROOT, default_signals

pytestmark = pytest.mark.timeout(600)  # the build and the install (240 s each at most); a test's own checks take seconds

HELLO = {"x86_64": "Hello from a pyvmm guest (x86_64, long mode)\n", "arm64": "Hello from a pyvmm guest (arm64)\n"}
# what pip and build print when the package index cannot be reached
OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
                     r"Name or service not known|Network is unreachable|No route to host|Connection refused|"
                     r"ConnectTimeout|Read timed out|ProxyError|Max retries exceeded|Could not fetch URL")
# (not "No matching distribution found": pip says that for a wrong pin too, which must fail, not skip)
# the checkout's folders and files that are no source: the copy the build starts from leaves them out
NOT_SOURCE = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "*.pyc")


def _arch() -> str:
    from pyvmm.arch import machine_name

    return machine_name()


def _run(cmd, cwd, timeout=180, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def _needs_pypi(step: str, res: subprocess.CompletedProcess) -> None:
    """A failed build or install: a skip when PyPI was out of reach, else the test's failure."""
    out = res.stdout + res.stderr
    if OFFLINE.search(out):
        last = [line for line in out.splitlines() if OFFLINE.search(line)][-1].strip()
        pytest.skip(f"{step} needs PyPI, which is out of reach here: {last[:300]}")
    pytest.fail(f"{step} failed (status {res.returncode}):\n{out[-4000:]}")


class Installed:
    def __init__(self, base: str):
        self.base = base
        self.dist = os.path.join(base, "dist")
        self.venv = os.path.join(base, "venv")
        self.elsewhere = os.path.join(base, "elsewhere")  # the user's directory: no checkout in sight
        self.bin = os.path.join(self.venv, "bin")
        self.python = os.path.join(self.bin, "python")

    def pyvmm(self, *args, timeout=60) -> subprocess.CompletedProcess:
        return _run([os.path.join(self.bin, "pyvmm"), *args], self.elsewhere, timeout=timeout,
                    preexec_fn=default_signals)  # as from a terminal, whatever this test run's parent ignored

    def py(self, code: str) -> subprocess.CompletedProcess:
        return _run([self.python, "-c", code], self.elsewhere, timeout=60)

    @property
    def site_packages(self) -> str:
        res = self.py("import sysconfig; print(sysconfig.get_paths()['purelib'])")
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def file(self, suffix: str) -> str:
        (name,) = [n for n in os.listdir(self.dist) if n.endswith(suffix)]
        return os.path.join(self.dist, name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    for module, what in (("build", "build (PyPI)"), ("ensurepip", "ensurepip (Debian: python3-venv)"),
                         ("venv", "venv")):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"no {what} in this Python: the wheel cannot be built and installed here (the arm64 lab has "
                        f"no pip, build or network; packaging is tested on the build machine)")
    if shutil.which("make") is None:
        pytest.skip("no make: the wheel's bundled test guests cannot be built (Debian: make binutils)")
    inst = Installed(str(tmp_path_factory.mktemp("packaging")))
    src = os.path.join(inst.base, "src")  # a fresh checkout's files: nothing the checkout built or installed
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    os.makedirs(inst.elsewhere)
    res = _run([sys.executable, "-m", "build", "--outdir", inst.dist, src], inst.base, timeout=240)
    if res.returncode:
        _needs_pypi("python -m build", res)
    res = _run([sys.executable, "-m", "venv", inst.venv], inst.base)
    assert res.returncode == 0, res.stderr
    res = _run([inst.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", inst.file(".whl")],
               inst.elsewhere, timeout=240)
    if res.returncode:
        _needs_pypi("pip install (the wheel's dependencies)", res)
    return inst


def test_wheel_is_tagged_for_this_platform_and_sdist_has_the_guest_sources(installed):
    wheel = os.path.basename(installed.file(".whl"))
    # the guests inside are machine code for one architecture (setup.py): not a py3-none-any wheel
    assert wheel.endswith(f"-py3-none-linux_{platform.machine()}.whl"), wheel
    with tarfile.open(installed.file(".tar.gz")) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    for arch in ("x86_64", "arm64"):
        assert {f"firmware/{arch}/Makefile", f"firmware/{arch}/hello.S", f"firmware/{arch}/lib.S"} <= names
    assert not [n for n in names if n.startswith("firmware/") and "/build" in n]  # sources, not build outputs
    assert {"setup.py", "pyproject.toml", "devices/__init__.py", "devices/virtio/mmio.py"} <= names


def test_version(installed):
    from pyvmm import __version__

    res = installed.pyvmm("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"pyvmm {__version__}\n"


def test_run_boots_the_bundled_hello(installed, kvm_device):
    res = installed.pyvmm("run")
    assert res.returncode == 0, res.stderr
    assert res.stdout == HELLO[_arch()]
    # the guest came from the package, not from a checkout
    res = installed.py(f"from pyvmm.firmware import firmware_path; print(firmware_path({_arch()!r}, 'hello'))")
    assert res.stdout.strip() == os.path.join(installed.site_packages, "pyvmm", "guests", _arch(), "hello"), res.stderr


def test_missing_guests_say_what_to_do_without_a_checkout(installed):
    other = "arm64" if _arch() == "x86_64" else "x86_64"
    res = installed.py(f"from pyvmm.firmware import firmware_path; firmware_path({other!r}, 'hello')")
    assert res.returncode == 1
    message = res.stderr.strip().splitlines()[-1]
    assert "not part of this pyvmm installation" in message and f"install pyvmm on {other}" in message, message
    assert "make -C" not in message  # no checkout to run it in


def test_caps(installed, kvm_device):
    res = installed.pyvmm("caps")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("KVM at /dev/kvm: API version 12, ")


def test_only_pyvmm_in_site_packages(installed):
    res = installed.py("import devices")
    assert res.returncode == 1 and "ModuleNotFoundError: No module named 'devices'" in res.stderr, res.stderr
    res = installed.py("import pyvmm.devices.virtio.net as m; print(m.__file__)")
    assert res.returncode == 0, res.stderr
    site = installed.site_packages
    assert res.stdout.strip() == os.path.join(site, "pyvmm", "devices", "virtio", "net.py")
    assert not {"devices", "firmware", "tests", "scripts"} & set(os.listdir(site))
    (info,) = [n for n in os.listdir(site) if n.startswith("pyvmm-") and n.endswith(".dist-info")]
    with open(os.path.join(site, info, "RECORD")) as f:
        tops = {line.split(",")[0].split("/")[0] for line in f if line.strip()}
    assert tops <= {"pyvmm", info, ".."}, tops  # "..": the pyvmm script in bin/


def test_every_module_of_the_checkout_is_installed(installed):
    """pyproject lists the packages one by one (devices/ is renamed): a package added later and not listed there
    would be missing from the wheel."""
    site = installed.site_packages
    for folder, installed_as in (("pyvmm", "pyvmm"), ("devices", os.path.join("pyvmm", "devices"))):
        top = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), top)
                    assert os.path.isfile(os.path.join(site, installed_as, rel)), f"{folder}/{rel} is not installed"
    guests = os.listdir(os.path.join(site, "pyvmm", "guests", _arch()))
    assert "hello" in guests and not [g for g in guests if g.endswith(".o")], guests
