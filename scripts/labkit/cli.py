"""The emulated arm64 lab: an arm64 host with EL2 under QEMU (TCG), running Debian's Linux 7.2 with
kvm-arm.mode=protected, with Python and pyvmm inside.  Built only from Debian and PyPI packages.

    scripts/lab run [--no-protected] -- COMMAND...   boot the lab, run COMMAND in the project dir, return its status
    scripts/lab test [PYTEST-ARGS...]                run the test suite inside the lab
    scripts/lab build                                build what is missing and stop
    scripts/lab shell                                an interactive shell inside the lab

What it builds is cached under .cache/lab and rebuilt only when its inputs change: QEMU 10 and the
cross tools (Debian bookworm-backports, installed with apt; the machine's other packages are not
upgraded), Debian sid's arm64 kernel and userland (downloaded with a private apt configuration, never
installed on this machine), Python packages for inside (pip, pure wheels), the arm64 test guests, and a
pKVM-guest kernel (/opt/lab/pkvm-guest/Image) built from sid's linux-source with labkit/pkvm-guest.config.
"""

from __future__ import annotations

import argparse

from .cache import one_lab_at_a_time
from .initramfs import build_base, build_firmware, build_pkvm_guest_part, build_virtio_guest
from .kernel import debian_image, pkvm_guest_image
from .qemu import boot, ensure_host_tools


def build_all() -> tuple[str, list[str]]:
    """Everything a boot needs, built where missing (call with the lock held): (kernel, initramfs parts)."""
    ensure_host_tools()
    kernel = debian_image()
    parts = [build_base(kernel), build_virtio_guest(), build_pkvm_guest_part(pkvm_guest_image())]
    build_firmware()
    return kernel, parts


def boot_lab(command: list[str], protected: bool = True, interactive: bool = False, timeout: float = 3000) -> int:
    with one_lab_at_a_time():  # builds included: two runs must not rebuild the same cache at once
        kernel, parts = build_all()
        return boot(kernel, parts, command, protected, interactive, timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a command inside the lab")
    r.add_argument("--no-protected", action="store_true", help="boot the host with kvm-arm.mode=nvhe instead")
    r.add_argument("--timeout", type=float, default=3000, help="give up after this many seconds")
    r.add_argument("command", nargs=argparse.REMAINDER)
    t = sub.add_parser("test", help="run the test suite inside the lab")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    sub.add_parser("build", help="build what is missing")
    sub.add_parser("shell", help="interactive shell inside the lab")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        with one_lab_at_a_time():
            build_all()
        return 0
    if args.cmd == "shell":
        return boot_lab(["sh"], interactive=True)
    if args.cmd == "test":
        return boot_lab(["python3", "-m", "pytest", "-p", "no:cacheprovider", *(args.pytest_args or ["tests"])])
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a COMMAND (scripts/lab run -- COMMAND...)")
    return boot_lab(command, protected=not args.no_protected, timeout=args.timeout)
