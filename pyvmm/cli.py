"""The ``pyvmm`` command: ``run`` a guest, show this host's KVM ``caps``, ``check`` a configuration without
running it, run the backing ``matrix``, or run fault ``scenario``s.

Exit status of ``run``: ``EXIT_STATUSES`` (0 clean end, N the guest's status, 1 fault, 2 bad input,
124 timeout, 128 + the signal for SIGHUP, SIGINT and SIGTERM, which stop pyvmm cleanly at any moment).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import signal
import stat
import sys
import threading
from collections.abc import Callable

from . import __version__, logs
from .kvm import Kvm
from .kvm.errors import ConfigError, MissingFeature, PyvmmError
from .memory.backing import BackingKind, BackingSpec
from .outcome import ExitKind, Outcome
from .runloop import signal_stop_of, stop_runs_from_now
from .terminal import ESCAPE_HELP, StdinForwarder, discard_output
from .vcpu import ensure_kick_is_harmless
from .vm import MAX_TIMEOUT, Vm, file_echo, stdout_echo

EXIT_BAD_INPUT = 2
EXIT_FAULT = 1
EXIT_TIMEOUT = 124

MAX_SIZE = 1 << 52  # the largest guest physical address space (arm64 LPA, x86 MAXPHYADDR 52)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``0x1000``, ``64M``, ``2GiB``, ``512K``... -> bytes."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]{1,40}|\d{1,40})\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"bad size {text!r} (use e.g. 64M, 2G, 4096 or 0x100000)")
    digits = m.group(1)
    value = int(digits, 16 if digits[:2].lower() == "0x" else 10) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise ConfigError(f"bad size {text!r}: must be positive")
    if value > MAX_SIZE:
        raise ConfigError(f"bad size {text!r}: more than {MAX_SIZE >> 40} TiB (what a 52-bit guest address space holds)")
    return value


def parse_region(text: str) -> tuple[int, int, BackingSpec]:
    """``GPA,SIZE[,BACKING]`` -> (gpa, size, backing)."""
    parts = text.split(",", 2)
    if len(parts) < 2:
        raise ConfigError(f"bad region {text!r} (use GPA,SIZE[,BACKING], e.g. 0x10000000,2M,memfd)")
    try:
        gpa = int(parts[0].strip(), 0)
    except ValueError:
        raise ConfigError(f"bad region {text!r}: guest address {parts[0]!r} is not a number") from None
    if not 0 <= gpa < MAX_SIZE:
        raise ConfigError(f"bad region {text!r}: guest address {parts[0]!r} is outside [0, 2^52)")
    backing = BackingSpec.parse(parts[2]) if len(parts) > 2 else BackingSpec.parse("anon")
    return gpa, parse_size(parts[1]), backing


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _pool_size(text: str) -> int:
    from .virtio import DMA_POOL_ALIGN  # (the virtio machinery, imported only when --dma-pool is given)

    if re.fullmatch(r"\s*(0x)?0+[kKmMgG]?\s*", text):  # 0, 0M, 0x0: no pool
        return 0
    try:
        size = parse_size(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if size % DMA_POOL_ALIGN:
        raise argparse.ArgumentTypeError(f"{text}: must be a multiple of {DMA_POOL_ALIGN >> 10} KiB "
                                         "(the largest arm64 granule), or 0 for none")
    return size




def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds")
    if value <= 0 or value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{text!r}: the timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} "
                                         "seconds (a year)")
    return value


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and status 2.  A command's arguments are added (``arguments(parser)``) when that
    command is parsed or its help printed, and a callable ``epilog`` (run's exit-status table: textwrap) is called
    when its help is printed: argparse checks every argument as it is added, and building every command's parser
    took longer than running a small guest."""

    def __init__(self, *args, arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._arguments = arguments

    def _complete(self) -> None:
        if self._arguments is not None:
            add, self._arguments = self._arguments, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()

    def error(self, message: str):  # one line, status 2
        self.exit(EXIT_BAD_INPUT, f"pyvmm: error: {message} (see {self.prog} --help)\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse's own asks shutil for the terminal's width, and argparse makes one to check each argument added:
        # shutil (with bz2, lzma and zlib) was a tenth of pyvmm's start-up.  The same width, asked directly.
        return self.formatter_class(prog=self.prog, width=_help_width())


def _help_width() -> int:
    """The width argparse formats help for: shutil.get_terminal_size()'s columns ($COLUMNS, else the terminal's,
    else 80) less 2."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyvmm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log unclaimed accesses and run details")
    parser.add_argument("--kvm-device", default="/dev/kvm", metavar="PATH", help="the KVM device node (default /dev/kvm)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("run", help="boot a guest (default: the bundled hello)", arguments=_run_arguments,
                   description="Boot a guest image.  Without IMAGE, boots the bundled hello for this host.",
                   epilog=exit_status_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_parser("caps", help="show what this host's KVM can do", arguments=_caps_arguments,
                   description="API version, capabilities, VM types, protected VM support and usable backings.")
    sub.add_parser(
        "check", help="predict what a configuration will do, without running it", arguments=_check_arguments,
        description="Make the VM (its type, backings and memslots) as `pyvmm run` would, then predict its first "
                    "KVM_RUN from the kernel's rules and this host's facts (each slot's VMA flags, RLIMIT_MEMLOCK "
                    "and CAP_IPC_LOCK, the pKVM mode), without running it.  What fails while making the VM is "
                    "reported as it happened.",
        epilog="exit status: 0 predicted to run, 1 predicted to fail or refused, 2 bad input, 3 this host cannot "
               "make it (a missing backing or pKVM)")
    sub.add_parser(
        "matrix", help="every backing on a normal and a protected VM, predicted and run live", arguments=_matrix_arguments,
        description="For every backing kind this host offers (and one row per DMA-buf heap), on a normal and on a "
                    "protected VM: boot the bundled memtouch guest on 8 MiB of it, and print what `pyvmm check` "
                    "predicted beside what happened.",
        epilog="exit status: 0 every prediction agreed with the kernel, 1 a mismatch")
    add_scenario_parser(sub)
    return parser


def _shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The VM's shape: what `run` boots and what `check` predicts."""
    parser.add_argument("-m", "--memory", default="16M", help="guest RAM size (default 16M)")
    parser.add_argument("-b", "--backing", default="anon",
                        help="what backs guest RAM: anon, memfd, memfd-hugetlb, guest-memfd, udmabuf (the slot maps "
                             "the DMA-buf), udmabuf:memfd (the slot maps the memfd behind it), dma-heap:NAME, "
                             "file:PATH (default anon)")
    parser.add_argument("--region", action="append", default=[], metavar="GPA,SIZE[,BACKING]",
                        help="an extra memslot (repeatable), e.g. 0x40000000,2M,udmabuf")
    parser.add_argument("-c", "--vcpus", type=_positive_int, default=1, help="number of vCPUs (default 1)")
    parser.add_argument("--protected", action="store_true", help="arm64: create a pKVM protected VM")


def _run_arguments(run: argparse.ArgumentParser) -> None:
    _shape_arguments(run)
    run.add_argument("image", nargs="?", help="firmware (ELF or flat binary) or Linux kernel image")
    run.add_argument("-t", "--timeout", type=_timeout, default=None, help="stop the guest after this many seconds")
    run.add_argument("--report-json", metavar="FILE", help="write the outcome and any fault report as JSON")
    run.add_argument("--boot", default="auto", help="x86_64: auto, real, long or linux (default auto)")
    run.add_argument("--cmdline", default=None,
                     help="boot arguments: arm64 puts them in the device tree's /chosen/bootargs for every image; "
                          "x86_64 passes them to Linux only (Linux default: console=ttyS0, with earlycon on arm64; "
                          "console=hvc0 earlycon with --console virtio)")
    run.add_argument("--initrd", default=None,
                     help="initial ramdisk: arm64 loads it after any image and names it in /chosen "
                          "(linux,initrd-start/end); x86_64 passes it to Linux only")
    run.add_argument("--cpu-features", metavar="LIST",
                     help="arm64: turn vCPU/GIC features on or off, e.g. pmu=off,sve=on (pmu, sve, ptrauth, its; "
                          "default: every one KVM offers the VM's type, as pyvmm caps lists; asking for one the VM "
                          "type is not offered is an error)")
    run.add_argument("--sve-vector-lengths", metavar="BITS,...",
                     help="arm64: the SVE vector lengths (e.g. 128,256; default: all that KVM offers)")
    run.add_argument("--dma-pool", metavar="SIZE", type=_pool_size, default=None,
                     help="arm64: guest RAM for the restricted DMA pool every virtio device is confined to on a "
                          "protected VM (default with --protected: 8M, or an eighth of RAM if less; else none; 0: none)")
    run.add_argument("--pvmfw", metavar="FILE", help="arm64 protected VMs on Android's pKVM ABI: the pvmfw image")
    run.add_argument("--ipa-bits", type=int, default=None, help="arm64: guest physical address size in bits")
    run.add_argument("-q", "--quiet", action="store_true", help="do not echo the guest console")
    run.add_argument("--console-file", metavar="FILE",
                     help="write what the guest prints to FILE instead of stdout")
    run.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]",
                     help="a virtio-blk disk backed by a raw image file (repeatable: vda, vdb, ...); ro: read-only")
    run.add_argument("--net", action="append", default=[], metavar="tap[=NAME][,mac=MAC]",
                     help="a virtio-net device on a TAP (attached if NAME exists, else created for this run and "
                          "brought up with pyroute2); needs CAP_NET_ADMIN")
    run.add_argument("--rng", action="store_true", help="a virtio-rng device (entropy from the host's getrandom)")
    run.add_argument("--console", choices=("uart", "virtio"), default="uart",
                     help="where pyvmm's stdin goes and a Linux guest's console is: the 16550 UART (ttyS0, "
                          f"default) or a virtio console (hvc0). On a terminal input is raw: {ESCAPE_HELP}")


def _caps_arguments(caps: argparse.ArgumentParser) -> None:
    caps.add_argument("--json", action="store_true", help="machine-readable output")


def _check_arguments(check: argparse.ArgumentParser) -> None:
    _shape_arguments(check)
    check.add_argument("--json", action="store_true", help="machine-readable output (prediction, rules, facts)")


def _matrix_arguments(matrix: argparse.ArgumentParser) -> None:
    matrix.add_argument("--json", action="store_true", help="machine-readable output (every cell)")
    matrix.add_argument("--backing", action="append", metavar="BACKING",
                        help="only this backing (repeatable; default: every kind, each DMA-buf heap)")
    matrix.add_argument("--kind", choices=("normal", "protected"), action="append",
                        help="only this VM kind (repeatable; default both)")


def add_scenario_parser(sub) -> None:
    sub.add_parser(
        "scenario", help="a catalogue of guest-fault classes: list them, run them against this kernel",
        arguments=_scenario_arguments,
        description="Each scenario is a self-contained reproducer of a guest-fault class: the VM type, the memslots "
                    "and their backings, a bundled guest, what the kernel is expected to answer and why.  Running one "
                    "compares the kernel's real answer with the expected one.")


def _scenario_arguments(scenario: argparse.ArgumentParser) -> None:
    actions = scenario.add_subparsers(dest="scenario_command", metavar="ACTION", parser_class=_Parser, required=True)
    listing = actions.add_parser("list", help="every scenario, and whether it can run on this host",
                                 description="Name, arch/VM kind and title of every scenario, whether it can run on "
                                             "this host and, if not, what the host lacks.")
    listing.add_argument("--json", action="store_true", help="machine-readable output (each scenario as data)")
    run = actions.add_parser("run", help="run one scenario (NAME) or all of them (--all)",
                             description="Run scenarios for real and compare the kernel's answer with the expected "
                                         "one.  A scenario this host cannot run is skipped with the reason.",
                             epilog="exit status: 0 every scenario run matched (skips are not mismatches), 1 a "
                                    "mismatch, 2 bad input or (for NAME) a scenario this host cannot run")
    run.add_argument("name", nargs="?", metavar="NAME", help="the scenario to run (pyvmm scenario list names them)")
    run.add_argument("--all", action="store_true",
                     help="run every scenario and print a table: scenario, expected, observed, verdict")
    run.add_argument("--json", action="store_true", help="machine-readable output (the scenario, the observation, "
                                                         "the verdict; a list with --all)")
    export = actions.add_parser(
        "export", help="write one scenario as a standalone C reproducer (arm64)",
        description="Write scenario NAME as one C file that needs neither Python nor pyvmm: it sets the same arm64 "
                    "VM up with the same memslots, backings, guest and steps, prints the guest's console, the errno "
                    "and exit reason, and ends with EXPECTED: and RESULT: lines (exit status 0 when they match, 1 "
                    "when not, 77 when the host lacks something), for a kernel developer to attach to a bug report.  "
                    "Its head comment says how to build it (aarch64-linux-gnu-gcc, Linux 7.2's uapi headers).  "
                    "Host-dependent parts are fixed: {tmp} files go in /tmp, {disk} files in /var/tmp, the CMA heap "
                    "is default_cma_region.",
        epilog="exit status: 0 written, 2 bad input or a scenario C cannot reproduce (the reason is printed)")
    export.add_argument("name", metavar="NAME", help="the scenario (pyvmm scenario list names them)")
    export.add_argument("--c", dest="c_file", metavar="FILE", required=True, help="the C file to write ('-': stdout)")


def parse_disk(text: str) -> tuple[str, bool]:
    """``PATH[,ro]`` -> (path, readonly)."""
    path, sep, opts = text.partition(",")
    if not path:
        raise ConfigError(f"bad disk {text!r} (use PATH or PATH,ro)")
    if sep and opts != "ro":
        raise ConfigError(f"bad disk option {opts!r} in {text!r} (the only option is ro)")
    return path, opts == "ro"


def parse_net(text: str) -> tuple[str | None, str | None]:
    """``tap[=NAME][,mac=MAC]`` -> (TAP name or None, MAC or None)."""
    kind, _, rest = text.partition(",")
    backend, _, name = kind.partition("=")
    if backend != "tap":
        raise ConfigError(f"bad network {text!r}: the backend is a TAP (use tap, tap=NAME, tap=NAME,mac=MAC)")
    mac = None
    for opt in filter(None, rest.split(",")):
        key, _, value = opt.partition("=")
        if key != "mac" or not value:
            raise ConfigError(f"bad network option {opt!r} in {text!r} (the only option is mac=MAC)")
        from pyvmm.devices.virtio.net import parse_mac  # (the virtio devices: only for --net)

        try:
            parse_mac(value)  # checked before any VM exists
        except ValueError as err:
            raise ConfigError(str(err)) from None
        mac = value
    if "=" in kind and not name:
        raise ConfigError(f"bad network {text!r}: empty TAP name")
    return name or None, mac


def check_output_path(path: str, what: str) -> None:
    """An output file must be creatable: checked before any VM exists."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path}: is a directory")
    if os.path.exists(path):
        from .paths import file_kind

        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):  # a FIFO would block the open (or the final write)
            raise ConfigError(f"{what} {path}: {file_kind(mode)}; a regular file (or a device such as /dev/null) "
                              "is expected")
    if not os.path.isdir(parent):
        raise ConfigError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ConfigError(f"{what} {path}: permission denied")


EXIT_SIGNALLED = 128  # + the signal's number, as a shell reports a process a signal ended

# The exit statuses of `pyvmm run`, (status, meaning): the one table its --help and the README show.
EXIT_STATUSES: list[tuple[str, str]] = [
    ("0", "clean end: the guest halted, powered off or reset, wrote exit status 0, or a debug exit"),
    ("N", "the guest's exit status (1-255; larger ones are capped at 255): the debug-exit device (x86 port 0x501, "
          "arm64 register 0x09010000) or arm64 PSCI SYSTEM_RESET2 with reset type 0x80007079 and the status in x2.  A guest may choose any of the statuses below too (1 above all): "
          "the last `pyvmm: KIND: ...` line on stderr says which it was"),
    ("1", "a fault (KVM_RUN failed, a failure exit, the guest crashed or triple-faulted; a report is printed) or "
          "pyvmm's own error on a vCPU thread"),
    ("2", "bad input, or a host that cannot run the VM (one line, no traceback)"),
    ("124", "timeout (--timeout)"),
    ("129", "SIGHUP (128 + 1): the guest stopped, everything closed"),
    ("130", "SIGINT (128 + 2): Ctrl-C where stdin is not a terminal or before the guest runs, or Ctrl-] q on a "
            "terminal (raw mode: Ctrl-C goes to the guest)"),
    ("143", "SIGTERM (128 + 15): the guest stopped, everything closed"),
]


def _exit_status(outcome: Outcome) -> int:
    """The status `pyvmm run` ends with (EXIT_STATUSES)."""
    if outcome.kind in (ExitKind.HALT, ExitKind.POWER_OFF, ExitKind.RESET, ExitKind.DEBUG):
        return 0
    if outcome.kind is ExitKind.STOPPED:  # 128 + the signal that stopped it; Ctrl-] q (no signal) counts as SIGINT
        return min(EXIT_SIGNALLED + (outcome.status or signal.SIGINT), 255)
    if outcome.kind is ExitKind.GUEST_EXIT:
        return max(0, min(outcome.status or 0, 255))
    if outcome.kind is ExitKind.TIMEOUT:
        return EXIT_TIMEOUT
    return EXIT_FAULT


def exit_status_help() -> str:
    """EXIT_STATUSES as `pyvmm run --help` shows them."""
    import textwrap

    lines = ["exit status:"]
    for status, meaning in EXIT_STATUSES:
        wrapped = textwrap.wrap(meaning.replace("`", ""), 70)
        lines.append(f"  {status:<5}{wrapped[0]}")
        lines += [f"       {w}" for w in wrapped[1:]]
    return "\n".join(lines)


def _outcome_dict(outcome: Outcome) -> dict:
    return {"kind": outcome.kind.value, "vcpu": outcome.vcpu, "status": outcome.status,
            "detail": outcome.detail, "exits": outcome.exits,
            "device_faults": [f.as_dict() for f in outcome.device_faults],
            "device_faults_dropped": outcome.device_faults_dropped,
            "device_memory": outcome.device_memory}


SHOWN_DEVICE_FAULTS = 8


def print_device_faults(outcome: Outcome) -> None:
    """The refused device accesses of the run, after the outcome line (all of them in --report-json)."""
    faults = outcome.device_faults
    if not faults:
        return
    total = len(faults) + outcome.device_faults_dropped
    print(f"pyvmm: {total} device request(s) refused: they named memory the protected guest had not shared",
          file=sys.stderr)
    for fault in faults[:SHOWN_DEVICE_FAULTS]:
        print(f"pyvmm:   {fault.line}", file=sys.stderr)
    if total > SHOWN_DEVICE_FAULTS:
        kept = f"--report-json lists the first {len(faults)}" if outcome.device_faults_dropped else "--report-json lists them"
        print(f"pyvmm:   ... and {total - SHOWN_DEVICE_FAULTS} more ({kept})", file=sys.stderr)


# What pyvmm stops cleanly on.  SIGQUIT keeps its default action (quit and dump core): the way to get a core of a
# pyvmm that does not stop.  pyvmm/__main__.py handles these three while pyvmm itself is being imported.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_STOPPED_BY = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "stopped by SIGTERM",
               signal.SIGHUP: "stopped by SIGHUP"}  # the outcome's detail: "pyvmm: stopped: stopped by SIGTERM"


def signal_line(signum: int) -> str:
    """What pyvmm says when a signal ended it before any guest ran."""
    return "pyvmm: interrupted" if signum == signal.SIGINT else f"pyvmm: stopped by {signal.Signals(signum).name}"


class Signalled(BaseException):
    """The first SIGINT, SIGTERM or SIGHUP before the guest runs (or in a command that runs none): raised in the
    main thread, it unwinds the set-up, closing everything on its way; ``main`` says so in one line and returns
    128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _SignalStop:
    """pyvmm's answer to SIGINT, SIGTERM and SIGHUP, from the first line of ``main`` to its last:

    * the first one before the guest runs raises ``Signalled`` (the set-up unwinds; status 128 + signal);
    * the first one once the guest runs, or is about to, stops it: the handler asks the run loop
      (``SignalStop.request``: no lock, nothing raised), the run ends STOPPED and the command ends as it
      always does: console flushed, terminal restored, every fd closed, status 128 + signal;
    * the first one after the guest has run: while the VM is being closed, noted, and the next one gets the
      default action (so pyvmm can always be stopped); once the VM is closed, ``Signalled`` (status 128 + signal);
    * every later one, and any once the status is known: ignored.  So nothing is ever raised while
      anything is closed or joined: no half-closed VM, no traceback, no "release unlocked lock", and a
      second Ctrl-C a millisecond after the first changes nothing.

    Installed only on the main thread (the only one Python lets install handlers)."""

    def __init__(self):
        self.received: int | None = None  # the first signal
        self.ignored = 0  # signals after it (or after the end)
        self.finished = False  # the command's status is known: signals change nothing any more
        self.vm_boxes: list[list] = []  # stop_on_signals(vm_box): the VMs a signal stops instead of raising
        self._previous: dict[int, object] = {}

    def handle(self, signum: int, frame) -> None:
        if self.received is not None or self.finished:
            self.ignored += 1
            return
        self.received = signum
        outcome = Outcome(ExitKind.STOPPED, status=int(signum), detail=_STOPPED_BY[signum])
        for box in self.vm_boxes:
            for vm in box:
                stop = signal_stop_of(vm)
                if stop is None:
                    continue
                if stop.request(outcome):  # running or about to: the run loop stops it, nothing raised
                    return
                if not getattr(vm.fd, "closed", True):  # being closed: never raise into close(); a second
                    for sig in STOP_SIGNALS:            # signal gets the default action (no unkillable pyvmm)
                        signal.signal(sig, signal.SIG_DFL)
                    return
                # the VM is gone and pyvmm is still here (writing the report, blocked on stderr): stop now
                raise Signalled(signum)
        # Should code on the way swallow the exception (a bare except), the run it lets start stops at once
        stop_runs_from_now(outcome)
        raise Signalled(signum)

    def install(self) -> bool:
        global _active
        if threading.current_thread() is not threading.main_thread() or _active is not None:
            return False
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # all three at once: none half-handled
        try:
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is signal.SIG_IGN:  # ignored by who started pyvmm (nohup: SIGHUP; a
                    continue                                # script's `pyvmm ... &`: SIGINT): it stays ignored
                self._previous[sig] = signal.signal(sig, self.handle)
            _active = self
        finally:
            # one that came meanwhile is handled now; an inherited mask blocking them would keep them pending
            signal.pthread_sigmask(signal.SIG_SETMASK, set(held) - set(STOP_SIGNALS))
        ensure_kick_is_harmless()
        early = [old.received for old in self._previous.values() if getattr(old, "received", None)]
        if early:  # noted by pyvmm/__main__.py while pyvmm was imported: act on it now
            self.handle(early[0], None)
        return True

    def restore(self) -> None:
        """Put the previous handlers back; except those of pyvmm's entry point (pyvmm/__main__.py): the process
        ends now, and this one (finished: it ignores every signal) covers that last stretch."""
        global _active
        self.finished = True
        if _active is self:
            stop_runs_from_now(None)
        for sig, old in self._previous.items():
            if not getattr(old, "pyvmm_entry", False):
                signal.signal(sig, old)
        self._previous.clear()
        if _active is self:
            _active = None


_active: _SignalStop | None = None  # main()'s, while it runs


@contextlib.contextmanager
def stop_on_signals(vm_box: list):
    """Within it, SIGINT, SIGTERM and SIGHUP stop the VM put in ``vm_box`` once it runs, instead of raising
    (``_SignalStop``).  Under ``main()`` (always, for the command) this attaches ``vm_box`` to main's handlers
    and leaves it attached: a signal after the run, while the outcome is printed, must still see that a guest ran.
    Called on its own, it installs the handlers for its duration."""
    if _active is not None:
        _active.vm_boxes.append(vm_box)
        yield
        return
    signals = _SignalStop()
    signals.vm_boxes.append(vm_box)
    signals.install()
    try:
        yield
    finally:
        signals.restore()


@contextlib.contextmanager
def _unless_gone(stream):
    """Writing to ``stream`` fails because it is gone (its pipe closed: ``pyvmm run | head``; its terminal hung
    up): drop the rest of the block's output there; the exit status and --report-json still count."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.EPIPE, errno.EIO, errno.ENXIO):
            raise
        discard_output(stream)


def _say(line: str) -> None:
    with _unless_gone(sys.stderr):
        print(line, file=sys.stderr, flush=True)


def _check_paths(args, backings: list[BackingSpec], disks: list[tuple[str, bool]]) -> None:
    """Every file the run will read or map, checked before any VM exists: the kind of file each option expects
    (a FIFO would block, /dev/zero read forever).  The files are read later; this is their kind and presence."""
    from .paths import regular_file

    def regular(path: str, what: str, may_be_missing: bool = False) -> None:
        if may_be_missing:
            try:
                os.stat(path)
            except FileNotFoundError:  # created when the backing is made (its directory is checked then)
                return
            except OSError:
                pass  # regular_file says what
        regular_file(path, what, empty_ok=may_be_missing)  # file: backings are extended to the slot's size

    for path, what in ((args.image, "guest image"), (args.initrd, "--initrd"), (args.pvmfw, "--pvmfw")):
        if path is not None:
            regular(path, what)
    for path, _readonly in disks:
        regular(path, "--disk")
    for spec in backings:
        if spec.kind is BackingKind.FILE:
            regular(spec.arg, "backing file", may_be_missing=True)  # created when missing


def _feature_request(args):
    """--cpu-features and --sve-vector-lengths -> arm64's FeatureRequest (None when neither is given)."""
    if args.cpu_features is None and args.sve_vector_lengths is None:
        return None
    from .arch.arm64.features import FeatureRequest, parse_features, parse_vector_lengths

    return FeatureRequest(parse_features(args.cpu_features) if args.cpu_features is not None else {},
                          parse_vector_lengths(args.sve_vector_lengths) if args.sve_vector_lengths is not None else None)


def cmd_run(args) -> int:
    memory = parse_size(args.memory)
    backing = BackingSpec.parse(args.backing)
    regions = [parse_region(r) for r in args.region]
    disks = [parse_disk(d) for d in args.disk]
    nets = [parse_net(n) for n in args.net]
    if args.console_file is not None:
        check_output_path(args.console_file, "--console-file")
    if args.report_json is not None:
        check_output_path(args.report_json, "--report-json")
    feature_request = _feature_request(args)
    _check_paths(args, [backing, *(spec for _, _, spec in regions)], disks)
    boot_opts = {"mode": args.boot, "console": args.console}
    for key in ("cmdline", "initrd", "pvmfw"):
        if getattr(args, key) is not None:
            boot_opts[key] = getattr(args, key)
    vm_box: list = []
    with stop_on_signals(vm_box), Kvm(args.kvm_device) as kvm, \
            Vm(protected=args.protected, kvm=kvm, ipa_bits=args.ipa_bits, dma_pool=args.dma_pool,
               feature_request=feature_request) as vm:
        vm_box.append(vm)
        if args.console_file is not None:
            vm.console.echo, close_console = file_echo(args.console_file)
            vm.on_close.append(close_console)
        elif not args.quiet:
            vm.console.echo = stdout_echo
        vm.add_memory(memory, backing)
        for gpa, size, spec in regions:
            vm.add_memory(size, spec, gpa=gpa)
        for path, readonly in disks:
            vm.add_virtio_blk(path, readonly)
        if args.rng:
            vm.add_virtio_rng()
        for tap, mac in nets:
            vm.add_virtio_net(tap, mac)
        virtio_console = vm.add_virtio_console().device if args.console == "virtio" else None
        console_input = (virtio_console or vm.devices["uart"]).feed
        vm.create_vcpus(args.vcpus)
        # after the vCPUs (SVE's vector lengths are known then); only with -v: an INFO line that is not written
        # would still import logging (~0.13 s of an arm64 start-up under the lab's emulation)
        if args.verbose and vm.cpu_features is not None:
            logs.getLogger("pyvmm.features").info("%s VM: %s", vm.kind, "; ".join(vm.cpu_features.describe()))
        vm.boot(args.image, **boot_opts)

        def escape() -> None:
            vm.request_stop(Outcome(ExitKind.STOPPED, detail="ended from the terminal (Ctrl-] q)"))

        with StdinForwarder(console_input, escape):
            try:
                outcome = vm.run(timeout=args.timeout)
            finally:
                if virtio_console is not None:
                    virtio_console.close()  # a forwarder waiting for the guest to take input returns
        unclaimed = [s for s in (vm.io_bus.summary(), vm.mmio_bus.summary()) if s]
    with _unless_gone(sys.stdout):  # the guest's console, all of it, before what pyvmm says
        if sys.stdout is not None:
            sys.stdout.flush()
    with _unless_gone(sys.stderr):
        print(f"pyvmm: {outcome.kind.value}: {outcome.detail}", file=sys.stderr)
        print_device_faults(outcome)
        for line in unclaimed:  # accesses no device served: the details are logged with -v
            print(f"pyvmm: {line}" + ("" if args.verbose else " (-v logs each address)"), file=sys.stderr)
        if outcome.report is not None:
            print(outcome.report.text(), file=sys.stderr)
        sys.stderr.flush()
    if args.report_json:
        with open(args.report_json, "w") as f:
            f.write(_json({"outcome": {**_outcome_dict(outcome), "unclaimed": unclaimed},
                           "report": outcome.report.to_dict() if outcome.report else None}) + "\n")
    return _exit_status(outcome)


def _json(value) -> str:
    """What --json and --report-json write (json is imported by the commands that write it, not by every one)."""
    import json

    return json.dumps(value, indent=2)


def cmd_caps(args) -> int:
    from .caps import format_caps, probe  # (caps reads every backing and arch's facts: only this command needs it)

    with Kvm(args.kvm_device) as kvm:
        caps = probe(kvm)
    print(_json(caps.to_dict()) if args.json else format_caps(caps))
    return 0


def cmd_scenario(args) -> int:
    from . import scenarios
    from .scenarios import text

    if args.scenario_command == "export":
        return _export_scenario(scenarios.find(args.name), args.c_file)
    facts = scenarios.HostFacts(args.kvm_device)
    if args.scenario_command == "list":
        listed = scenarios.scenarios()
        why_not = {s.name: facts.why_not(s) for s in listed}
        print(_json(text.list_dicts(listed, why_not, facts.machine)) if args.json
              else text.list_text(listed, why_not))
        return 0
    if args.all == (args.name is not None):
        raise ConfigError("name one scenario or give --all (not both)" if args.all
                          else "name a scenario to run, or give --all (pyvmm scenario list names them)")
    results = scenarios.run_all(facts) if args.all else [scenarios.run_scenario(scenarios.find(args.name), facts)]
    if args.json:
        dicts = [text.result_dict(r, facts.machine) for r in results]
        print(_json(dicts if args.all else dicts[0]))
    else:
        print(text.table_text(results) if args.all else text.result_text(results[0], facts.machine))
    if any(r.verdict is scenarios.Verdict.MISMATCH for r in results):
        return EXIT_FAULT
    return EXIT_BAD_INPUT if not args.all and results[0].verdict is scenarios.Verdict.SKIPPED else 0


def _export_scenario(scenario, path: str) -> int:
    from .cexport import export_c
    from .scenarios.export import to_c

    if path != "-":
        check_output_path(path, "C file")
    text = export_c(to_c(scenario))
    if path == "-":
        sys.stdout.write(text)
        return 0
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as err:
        raise ConfigError(f"C file {path}: {err.strerror}") from None
    print(f"pyvmm: wrote {path} ({scenario.name}: {len(text.splitlines())} lines)", file=sys.stderr)
    return 0


EXIT_UNAVAILABLE = 3


def cmd_check(args) -> int:
    from .preflight import Prediction, RegionSpec, Verdict, check, format_prediction

    BackingSpec.parse(args.backing)  # bad input is a usage error, before any VM exists
    regions = [RegionSpec(None, parse_size(args.memory), args.backing)]
    regions += [RegionSpec(gpa, size, str(spec)) for gpa, size, spec in (parse_region(r) for r in args.region)]
    try:
        kvm = Kvm(args.kvm_device)
    except MissingFeature as err:  # no KVM here at all: the host cannot make it
        prediction = Prediction(Verdict.UNAVAILABLE, reasons=[str(err)])
    else:
        with kvm:
            prediction = check(args.protected, regions, args.vcpus, kvm=kvm)
    print(_json(prediction.to_dict()) if args.json else format_prediction(prediction))
    return {Verdict.RUNS: 0, Verdict.UNAVAILABLE: EXIT_UNAVAILABLE}.get(prediction.verdict, EXIT_FAULT)


def cmd_matrix(args) -> int:
    from .matrix import KINDS, format_table, run_matrix

    for b in args.backing or []:
        if b != "file":
            BackingSpec.parse(b)
    with Kvm(args.kvm_device) as kvm:
        progress = None if args.json else (lambda c: print(f"pyvmm: {c.backing} on a {c.kind} VM: "
                                                           f"{c.observed.summary()}", file=sys.stderr, flush=True))
        cells = run_matrix(args.backing, tuple(args.kind or KINDS), kvm=kvm, progress=progress)
    print(_json([c.to_dict() for c in cells]) if args.json else format_table(cells))
    return 0 if all(c.agree for c in cells) else EXIT_FAULT


COMMANDS = {"run": cmd_run, "caps": cmd_caps, "scenario": cmd_scenario, "check": cmd_check, "matrix": cmd_matrix}


def main(argv: list[str] | None = None) -> int:
    """The pyvmm command; returns its exit status.  SIGINT, SIGTERM and SIGHUP are pyvmm's from the first line
    (``_SignalStop``): a clean stop, one line, status 128 + signal."""
    signals = _SignalStop()
    try:
        try:
            signals.install()
            status = _main(argv)
        finally:
            signals.finished = True
    except BaseException as exc:  # Signalled; KeyboardInterrupt (main() on a thread of its own)
        signum = _signal_of(exc)
        if signum is None:
            raise
        _say(signal_line(signum))
        status = EXIT_SIGNALLED + signum
    finally:
        signals.restore()
    with _unless_gone(sys.stdout):  # pyvmm ... | head: what stdout still holds goes nowhere, quietly
        if sys.stdout is not None:
            sys.stdout.flush()
    return status


def _signal_of(exc: BaseException | None) -> int | None:
    """The signal behind ``exc``: a ``Signalled``, a KeyboardInterrupt, or an exception some code turned one of
    them into (Python itself does: an exception in ``__set_name__`` becomes a RuntimeError)."""
    for _ in range(8):
        if exc is None or isinstance(exc, (SystemExit, PyvmmError)):
            return None
        if isinstance(exc, Signalled):
            return exc.signum
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        exc = exc.__cause__ or exc.__context__
    return None


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(level=logs.INFO if args.verbose else logs.ERROR, format="pyvmm: %(name)s: %(message)s")
    if args.command is None:  # plain `pyvmm`: boot the bundled hello
        args = parser.parse_args([*(sys.argv[1:] if argv is None else argv), "run"])
    try:
        with _unless_gone(sys.stdout):  # `pyvmm caps | head -1`: the reader went away, not an error of ours
            return COMMANDS[args.command](args)
        return 0
    except PyvmmError as err:
        _say(f"pyvmm: error: {err}")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
