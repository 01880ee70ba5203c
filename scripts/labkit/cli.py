"""The emulated arm64 lab: an arm64 host with EL2 under QEMU (TCG), running Debian's Linux 7.2 with
kvm-arm.mode=protected, with Python and pyvmm inside.  Built only from Debian and PyPI packages.

    scripts/lab run [--no-protected] [--pages 4k|16k] [--kernel NAME] [--append WORDS] -- COMMAND...
                                    boot the lab, run COMMAND in the project dir, return its status
    scripts/lab test [--pages 4k|16k] [--kernel NAME] [--append WORDS] [PYTEST-ARGS...]   the test suite inside
    scripts/lab build [--pages 4k|16k] [--kernel NAME]  build what is missing and stop
    scripts/lab shell [--pages 4k|16k] [--kernel NAME]  an interactive shell inside the lab
    scripts/lab kernels                                 the kernels it can build (scripts/labkit/kernels/)

--pages 16k boots Debian's 16 KiB-page flavour of the same kernel (linux-binary-7.2.13+deb14-arm64-16k, its
modules from linux-modules-...-16k) as the lab host, with the same kvm-arm.mode=protected; the guest kernels of
the tests stay as they are (4 KiB pages; README: 16 KiB pages).  Default: 4k.  Not with --kernel NAME.

--kernel NAME boots a host kernel built from sid's linux-source with scripts/labkit/kernels/NAME.config
(allnoconfig plus that fragment, and the patches in kernels/NAME/) instead of Debian's; e.g. dma-heaps:
KVM/pKVM plus the system and CMA DMA-buf heaps and udmabuf.  --append WORDS adds to the host's command line,
e.g. cma_heap.android66_vma=1: the dma-heaps kernel's CMA heap then maps as the crosvm report's kernel did.

What it builds is cached under .cache/lab and rebuilt only when its inputs change: QEMU 10 and the
cross tools (Debian bookworm-backports, installed with apt; the machine's other packages are not
upgraded), Debian sid's arm64 kernel and userland (downloaded with a private apt configuration, never
installed on this machine), Python packages for inside (pip, pure wheels), the arm64 test guests, and a
pKVM-guest kernel (/opt/lab/pkvm-guest/Image) built from sid's linux-source with
labkit/kernels/pkvm-guest.config, and any host kernel asked for with --kernel.  Python inside runs from bytecode
made here by the lab's own Python 3.13 under qemu-user: the standard library and packages when the base image is
built, the project's files at each boot (hash-checked .pyc, cached in .cache/lab/pyc by their contents).
"""

from __future__ import annotations

import argparse
import sys

from .cache import one_lab_at_a_time
from .initramfs import build_base, build_firmware, build_host_modules, build_pkvm_guest_part, build_virtio_guest
from .kernel import PAGE_SIZES, build_kernel, debian_image, pkvm_guest_image, recipe, recipes
from .qemu import boot, ensure_host_tools


def build_all(host_kernel: str | None = None, pages: str = "4k") -> tuple[str, str, list[str]]:
    """Everything a boot needs, built where missing (call with the lock held): (host kernel, extra command line,
    initramfs parts).  HOST_KERNEL names a kernels/ recipe with ``# role: host``; None is Debian's kernel, with
    PAGES ("4k" or "16k") its page-size flavour."""
    if host_kernel is not None and pages != "4k":
        sys.exit(f"lab: --pages {pages} boots Debian's {pages} kernel; a kernel of kernels/ (--kernel {host_kernel}) "
                 "is built with 4 KiB pages")
    ensure_host_tools()
    guest_kernel = debian_image()  # /opt/lab/Image, the Linux guest of the tests; by default also the host
    parts = [build_base(guest_kernel), build_virtio_guest(), build_host_modules(pages),
             build_pkvm_guest_part(pkvm_guest_image())]
    build_firmware()
    if host_kernel is None:
        return (guest_kernel if pages == "4k" else debian_image(pages)), "", parts
    r = recipe(host_kernel)
    if r.role != "host":
        sys.exit(f"lab: kernel {host_kernel!r} is a {r.role} kernel ({r.fragment} says '# role: {r.role}'), "
                 f"not a lab host")
    return build_kernel(host_kernel), r.cmdline, parts


def boot_lab(command: list[str], protected: bool = True, interactive: bool = False, timeout: float = 3000,
             kernel: str | None = None, append: str = "", pages: str = "4k") -> int:
    with one_lab_at_a_time():  # builds included: two runs must not rebuild the same cache at once
        image, extra, parts = build_all(kernel, pages)
        return boot(image, parts, command, protected, interactive, timeout, extra_cmdline=f"{extra} {append}".strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="cmd", required=True)
    kernel_help = "boot this host kernel (scripts/labkit/kernels/NAME.config) instead of Debian's"
    append_help = "add these words to the host kernel's command line"
    pages_help = "the lab host's page size: Debian's 4k (default) or 16k kernel"
    r = sub.add_parser("run", help="run a command inside the lab")
    r.add_argument("--no-protected", action="store_true", help="boot the host with kvm-arm.mode=nvhe instead")
    r.add_argument("--timeout", type=float, default=3000, help="give up after this many seconds")
    r.add_argument("--kernel", metavar="NAME", help=kernel_help)
    r.add_argument("--pages", choices=PAGE_SIZES, default="4k", help=pages_help)
    r.add_argument("--append", metavar="WORDS", default="", help=append_help)
    r.add_argument("command", nargs=argparse.REMAINDER)
    t = sub.add_parser("test", help="run the test suite inside the lab")
    t.add_argument("--no-protected", action="store_true", help="boot the host with kvm-arm.mode=nvhe instead")
    t.add_argument("--kernel", metavar="NAME", help=kernel_help)
    t.add_argument("--pages", choices=PAGE_SIZES, default="4k", help=pages_help)
    t.add_argument("--append", metavar="WORDS", default="", help=append_help)
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    b = sub.add_parser("build", help="build what is missing")
    b.add_argument("--kernel", metavar="NAME", help="also build this host kernel")
    b.add_argument("--pages", choices=PAGE_SIZES, default="4k", help=pages_help)
    sh = sub.add_parser("shell", help="interactive shell inside the lab")
    sh.add_argument("--kernel", metavar="NAME", help=kernel_help)
    sh.add_argument("--pages", choices=PAGE_SIZES, default="4k", help=pages_help)
    sub.add_parser("kernels", help="list the kernels the lab can build")
    args = parser.parse_args(argv)
    if getattr(args, "kernel", None):  # a mistyped name or a guest kernel: say so now, before building anything
        r = recipe(args.kernel)
        if r.role != "host":
            parser.error(f"--kernel {args.kernel}: a {r.role} kernel ({r.fragment}), not a lab host")
        if getattr(args, "pages", "4k") != "4k":
            parser.error(f"--pages {args.pages} and --kernel {args.kernel} together: --pages boots Debian's "
                         f"{args.pages} kernel, and the kernels of scripts/labkit/kernels/ are built with 4 KiB pages")
    if args.cmd == "kernels":
        for r in recipes().values():
            extra = f", command line +{r.cmdline!r}" if r.cmdline else ""
            print(f"{r.name}: {r.role} kernel, {len(r.patches)} patch(es){extra}  ({r.fragment})")
        return 0
    if args.cmd == "build":
        with one_lab_at_a_time():
            build_all(args.kernel, args.pages)
        return 0
    if args.cmd == "shell":
        return boot_lab(["sh"], interactive=True, kernel=args.kernel, pages=args.pages)
    if args.cmd == "test":
        return boot_lab(["python3", "-m", "pytest", "-p", "no:cacheprovider", *(args.pytest_args or ["tests"])],
                        protected=not args.no_protected, kernel=args.kernel, append=args.append, pages=args.pages)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a COMMAND (scripts/lab run -- COMMAND...)")
    return boot_lab(command, protected=not args.no_protected, timeout=args.timeout, kernel=args.kernel,
                    append=args.append, pages=args.pages)
