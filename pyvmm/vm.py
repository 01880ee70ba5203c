"""A virtual machine: the VM fd, its memory map, buses, vCPUs and platform devices.

Generic code only; the architecture (``pyvmm.arch``) decides the VM type, the
platform devices, how images are loaded and how vCPUs start.  A ``Vm`` is a
context manager: leaving it closes every vCPU, the VM, every backing and the
kernel-log watcher.
"""

from __future__ import annotations

import errno
import math
import os
import select
import signal
import stat
import sys
import threading
from collections.abc import Callable

from .arch import host_arch
from .bus import Bus
from .kmsg import KmsgWatcher
from .kvm import Kvm
from .kvm.errors import ConfigError, PyvmmError
from .kvm.vcpu import VcpuFd
from .memory.backing import Backing, BackingKind, BackingSpec
from .memory.regions import GuestMemory, MemoryRegion, place_ram
from .kvm.fd import close_all
from .outcome import DeviceFault, ExitKind, Outcome
from .runloop import JOIN_LIMIT, RunLoop
from .terminal import discard_output
from .vcpu import KICK_SIGNAL, Vcpu
from .logs import getLogger

TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time
# The virtio machinery (pyvmm/virtio.py, pyvmm/devices/virtio, tap.py) is imported by the methods that add a
# device: a VM without one (the firmware guests, most tests) never loads it.
if TYPE_CHECKING:
    from pyvmm.devices.virtio import VirtioDevice

    from .arch import Arch
    from .virtio import DmaPool, VirtioMmio


log = getLogger("pyvmm.console")
MAX_TIMEOUT = 366 * 86400.0  # a year: beyond it a deadline overflows the clocks pyvmm waits on


ECHO_POLL_MS = 100  # how often an echo waiting on a reader that does not read looks whether to give up


class EchoStalled(OSError):
    """An echo gave up a write its reader did not take while the VM was stopping (``Console.stopping``)."""


class Console:
    """Collects what the guest prints; optionally echoes it (to a terminal, a file...).

    An echo that fails (a closed pipe: ``pyvmm run | head``; a hung-up terminal; a full disk; a file closed
    under it) is dropped with one log line: the guest keeps running and ``text()`` keeps everything.

    An echo whose reader does not read (``pyvmm run | sleep 1000``) holds the guest back (the thread that
    prints waits), but not a VM that is being stopped: ``stopping`` (set by the run loop when the run ends)
    and a vCPU thread's pending kick make an echo that can wait (``stdout_echo``) give the write up, so no
    vCPU or device thread stays stuck in it, holding its locks, when the VM should end."""

    def __init__(self, echo: Callable[[bytes], None] | None = None):
        self.buffer = bytearray()
        self.echo = echo
        self.stopping = False  # the VM is stopping or stopped: a write its reader does not take is dropped
        self.stalled_bytes = 0  # echo dropped because of that
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self.buffer += data
            echo = self.echo
            if echo is not None:
                try:
                    if getattr(echo, "can_give_up", False):
                        echo(data, give_up=self._give_up)
                    else:
                        echo(data)
                except EchoStalled:
                    if not self.stalled_bytes:
                        log.warning("console output is not being read; while the VM stops, what it cannot take "
                                    "is dropped (the guest's output is still collected)")
                    self.stalled_bytes += len(data)
                except (OSError, ValueError) as err:  # ValueError: "I/O operation on closed file"
                    self.echo = None
                    log.warning("console output can no longer be written (%s); the guest's output is still "
                                "collected", getattr(err, "strerror", None) or err)

    def _give_up(self) -> bool:
        """A write that cannot go on now should be dropped: the VM is stopping, or this thread is a vCPU's that
        the run loop kicked (the kick waits, blocked, for the thread to return to KVM_RUN)."""
        return self.stopping or KICK_SIGNAL in signal.sigpending()

    def text(self) -> str:
        return self.buffer.decode(errors="replace")


class _StdoutEcho:
    """Echo to stdout: straight to its fd, past Python's ``sys.stdout`` buffer (so no lock of that buffer is held
    while a write waits for the reader, and nothing is left in it: each write is flushed).

    With ``give_up`` (what ``Console`` passes) a write the reader does not take waits in slices of
    ``ECHO_POLL_MS`` and raises ``EchoStalled`` once ``give_up()`` says so.  When stdout is gone (its pipe
    closed, its terminal hung up) it is pointed at /dev/null (so Python's own flush at exit says nothing) and
    the error raised, for the ``Console`` to drop this echo."""

    can_give_up = True

    def __call__(self, data: bytes, give_up: Callable[[], bool] | None = None) -> None:
        if sys.stdout is None:  # fd 1 was closed when Python started (`pyvmm run >&-`): nowhere to echo
            raise OSError(errno.EBADF, "stdout is closed")
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
            buffer = getattr(sys.stdout, "buffer", None)
            if buffer is None:
                sys.stdout.write(data.decode(errors="replace"))
            else:
                buffer.write(data)
            sys.stdout.flush()
            return
        try:
            self._write_all(fd, memoryview(data), give_up)
        except EchoStalled:
            raise
        except OSError as err:
            if err.errno in (errno.EPIPE, errno.EIO, errno.ENXIO):
                discard_output(sys.stdout)
            raise

    @staticmethod
    def _write_all(fd: int, view: memoryview, give_up: Callable[[], bool] | None) -> None:
        poller = None
        if give_up is not None:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
        while view:
            if poller is not None:
                while not poller.poll(0 if give_up() else ECHO_POLL_MS):  # an error or hang-up counts as ready
                    if give_up():
                        raise EchoStalled(errno.EAGAIN, f"{len(view)} bytes not taken by the reader")
            # at most PIPE_BUF: a pipe with room (POLLOUT) takes it without blocking
            view = view[os.write(fd, view[:select.PIPE_BUF]):]


stdout_echo = _StdoutEcho()


def file_echo(path: str) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """An echo that appends to ``path`` (created or truncated now); returns (echo, close)."""
    f = open(path, "wb", buffering=0)

    def echo(data: bytes) -> None:
        f.write(data)

    return echo, f.close


class Vm:
    def __init__(self, *, protected: bool = False, arch: Arch | None = None, kvm: Kvm | None = None,
                 ipa_bits: int | None = None, console: Console | None = None, dma_pool: int | None = None,
                 feature_request=None):
        """``dma_pool``: bytes of guest RAM for the restricted DMA pool (arm64), which virtio devices are
        confined to on a protected VM; default ``default_dma_pool(ram)`` for a protected VM and none (0) for a
        normal one, where a pool makes a pool-aware guest bounce its DMA just the same.

        ``feature_request``: arm64's ``features.FeatureRequest`` (PMU, SVE and its vector lengths, pointer
        authentication, the ITS switched on or off); default: every feature KVM offers this VM's type.  What the
        VM got is ``vm.cpu_features`` once it exists."""
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vcpus: list[VcpuFd] = []  # what the arch code sets up (registers, init)
        self._runners: list[Vcpu] = []  # the same vCPUs with their threads (pyvmm/vcpu.py)
        self._runloop: RunLoop | None = None
        self._run_lock = threading.Lock()
        self._idle = threading.Event()  # clear while run() is in progress
        self._idle.set()
        self._last_counts: dict[str, int] = {}
        self.fd = None
        self.memory: GuestMemory | None = None
        self.kmsg: KmsgWatcher | None = None
        self.on_close: list[Callable[[], None]] = []  # arch-owned fds (GIC...), closed before the VM fd
        self.irqchip = None  # the in-kernel interrupt controller's device fd, where the arch makes one
        self.virtio: list[VirtioMmio] = []  # virtio-mmio devices, in the order added (the guest's order)
        self.dtb: bytes | None = None
        self.booted = False
        self.dma_pool: DmaPool | None = None  # placed by the arch at boot
        self.device_faults: list[DeviceFault] = []  # the first MAX_DEVICE_FAULTS refused device accesses
        self.device_faults_dropped = 0
        self._device_faults_lock = threading.Lock()
        self.feature_request = feature_request
        self.cpu_features = None  # the arch's answer to feature_request (arm64: features.FeatureSet)
        try:
            self.arch = arch or host_arch()
            self.kind = "protected" if protected else "normal"
            self.dma_pool_size = self._check_dma_pool(protected, dma_pool)
            self.vm_type = self.arch.vm_type(self.kvm, protected, ipa_bits)
            self.kmsg = KmsgWatcher()  # before KVM_CREATE_VM: the report shows what the kernel says from here on
            self.fd = self.kvm.create_vm(self.vm_type)
            self.memory = GuestMemory(self.fd, self.arch.memory_rules(self))
            self.io_bus = Bus("io")
            self.mmio_bus = Bus("mmio")
            self.console = console or Console()
            self.devices: dict[str, object] = {}
            self.hypercall_handler: Callable[[int, list[int]], int] | None = None
            self.arch.prepare_vm(self)
        except BaseException:
            self.close()
            raise

    @property
    def protected(self) -> bool:
        return self.kind == "protected"

    def _check_dma_pool(self, protected: bool, size: int | None) -> int | None:
        """The pool size asked for; None: the default, sized by the arch at boot (``default_dma_pool``)."""
        if size is None:
            return None if protected and self.arch.dma_pool_supported else 0
        if size < 0:
            raise ConfigError(f"DMA pool size {size}: must not be negative (0 for none)")
        if size and not self.arch.dma_pool_supported:
            raise ConfigError(f"a DMA pool (--dma-pool) is a device-tree restricted-dma-pool: arm64 only, not {self.arch.name}")
        from .virtio import DMA_POOL_ALIGN

        if size % DMA_POOL_ALIGN:
            raise ConfigError(f"DMA pool size {size:#x}: must be a multiple of {DMA_POOL_ALIGN >> 10} KiB "
                              "(the largest arm64 granule), or 0 for none")
        return size

    def record_device_fault(self, fault: DeviceFault) -> None:
        """A device's refused access to guest memory (from any device or vCPU thread): the first
        MAX_DEVICE_FAULTS are kept, later ones counted in ``device_faults_dropped``."""
        from .virtio import MAX_DEVICE_FAULTS

        with self._device_faults_lock:
            if len(self.device_faults) < MAX_DEVICE_FAULTS:
                self.device_faults.append(fault)
            else:
                self.device_faults_dropped += 1

    def device_memory(self) -> dict[str, dict[str, int]]:
        """Per virtio device: its accesses to guest memory inside shared memory (the DMA pool, pages declared
        shared), outside it, and refused."""
        return {d.name: d.memory.counts.as_dict() for d in self.virtio}

    # --- building ------------------------------------------------------------
    def add_memory(self, size: int, backing: str | BackingSpec | Backing = "anon", gpa: int | None = None,
                   flags: int = 0) -> MemoryRegion:
        """Add ``size`` bytes of memory: at ``gpa``, one memslot; without ``gpa``, RAM after the last region (from
        the arch's RAM base) in as many memslots as it takes to step over the platform's device windows, each with
        its own backing of the kind asked for (x86: what does not fit below the MMIO hole continues at 4 GiB).
        Returns the first (lowest) memslot; ``memory.regions`` has them all."""
        if isinstance(backing, str):
            backing = BackingSpec.parse(backing)
        if gpa is not None:
            return self.memory.add(gpa, size, backing, flags)
        start = self.memory.regions[-1].end if self.memory.regions else self.arch.ram_base
        pieces = place_ram(start, size, self.memory.rules.device_windows)
        if len(pieces) > 1 and not (isinstance(backing, BackingSpec) and backing.kind is not BackingKind.FILE):
            # Each piece needs a backing of its own: a created one is one piece's, a file mapped from offset 0
            # twice would alias the two.
            low_end = pieces[0][0] + pieces[0][1]
            window = next(name for lo, _, name in self.memory.rules.device_windows if lo == low_end)
            what = backing.describe() if isinstance(backing, Backing) else str(backing)
            raise ConfigError(f"{size:#x} bytes of memory from {start:#x} run into {window}: the rest would go to "
                              f"{pieces[1][0]:#x} in another memslot, and {what} can back only one; ask for at most "
                              f"{pieces[0][1]:#x} bytes and add the rest as a region with its own backing")
        added: list[MemoryRegion] = []
        try:
            for piece_gpa, piece_size in pieces:
                added.append(self.memory.add(piece_gpa, piece_size, backing, flags))
        except BaseException:
            for region in reversed(added):  # all or nothing: delete the slots made and close their backings
                self.memory.remove(region)
            raise
        return added[0]

    # --- virtio devices ------------------------------------------------------------------
    def add_virtio(self, device: VirtioDevice, ioeventfd: bool = True, irqfd: bool = True) -> VirtioMmio:
        """Attach a virtio device (``devices/virtio``) on virtio-mmio; call before ``boot()`` (the device tree).

        ``ioeventfd=False`` handles QueueNotify on the vCPU's exit path instead of a device thread;
        ``irqfd=False`` raises the interrupt with KVM_IRQ_LINE instead of an eventfd (for comparison)."""
        from .virtio import VirtioMmio

        try:
            if self.booted:
                raise ConfigError("add virtio devices before boot(): the guest learns of them from the device tree")
            attached = VirtioMmio(self, device, self.arch.virtio_slot(len(self.virtio)), ioeventfd, irqfd)
        except BaseException:
            closer = getattr(device, "close", None)
            if closer is not None:
                closer()
            raise
        self.virtio.append(attached)
        return attached

    def add_virtio_blk(self, path: str, readonly: bool = False) -> VirtioMmio:
        """A virtio-blk disk backed by the raw image ``path`` (read-only disks answer writes with IOERR)."""
        try:
            st = os.stat(path)
        except OSError as err:
            raise ConfigError(f"disk {path}: {err.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"disk {path}: not a regular file (a raw disk image is expected)")
        if st.st_size < 512:
            raise ConfigError(f"disk {path}: {st.st_size} bytes; a disk needs at least one 512-byte sector")
        from pyvmm.devices.virtio import VirtioBlock

        try:
            device = VirtioBlock(path, readonly=readonly)
        except PermissionError:
            raise ConfigError(f"disk {path}: permission denied" + ("" if readonly else " (try ,ro)")) from None
        return self.add_virtio(device)

    def add_virtio_rng(self) -> VirtioMmio:
        """A virtio-rng device: bytes from the host's getrandom()."""
        from pyvmm.devices.virtio import VirtioRng

        return self.add_virtio(VirtioRng())

    def add_virtio_console(self) -> VirtioMmio:
        """A virtio console (the guest's hvc0) printing into ``vm.console``; ``feed()`` its device for input."""
        from pyvmm.devices.virtio import VirtioConsole

        return self.add_virtio(VirtioConsole(self.console.write))

    def add_virtio_net(self, tap: str | None = None, mac: str | bytes | None = None) -> VirtioMmio:
        """A virtio-net device on the TAP ``tap`` (attached if it exists, else created and gone with the VM),
        with ``mac`` ("52:54:00:12:34:56"; random locally administered by default).  Needs CAP_NET_ADMIN."""
        from pyvmm.devices.virtio.net import VirtioNet, parse_mac

        from .tap import open_tap, random_mac

        if isinstance(mac, str):
            try:
                mac = parse_mac(mac)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        fd, ifname = open_tap(tap)
        device = VirtioNet(fd, mac or random_mac())
        device.ifname = ifname
        return self.add_virtio(device)

    def create_vcpus(self, count: int) -> list[VcpuFd]:
        if count < 1:
            raise ConfigError("a VM needs at least one vCPU")
        limit = self.kvm.check_extension(self.arch.max_vcpus_cap) or 1
        if count > limit:
            raise ConfigError(f"{count} vCPUs requested; this KVM allows {limit}")
        if count > self.arch.max_vcpus:
            raise ConfigError(f"{count} vCPUs requested; pyvmm's {self.arch.name} layout has room for "
                              f"{self.arch.max_vcpus} ({self.arch.max_vcpus_why})")
        if self.vcpus:
            raise ConfigError("the VM's vCPUs are already created")
        for _ in range(count):
            fd = self.fd.create_vcpu(len(self.vcpus))
            self.vcpus.append(fd)
            self._runners.append(Vcpu(fd))
        self.arch.init_vcpus(self)
        return self.vcpus

    def boot(self, image: str | None = None, **options) -> None:
        """Load ``image`` (default: the bundled hello) and set every vCPU up to run it."""
        self.arch.boot(self, image, **options)
        self.booted = True

    # --- running -----------------------------------------------------------
    def run(self, timeout: float | None = None, precheck: bool = True) -> Outcome:
        """Run until the guest ends, faults or ``timeout`` passes; may be called again to resume.

        ``precheck=False`` skips the arch's checks of the kernel's rules (to see what KVM itself answers).
        """
        if not self.vcpus:
            raise ConfigError("the VM has no vCPUs")
        if timeout is not None and not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
            raise ConfigError(f"timeout {timeout!r}: a finite number of seconds, more than 0 and at most a year")
        if precheck:
            self.arch.check_before_run(self)
        if not self._run_lock.acquire(blocking=False):
            raise ConfigError("the VM is already running (Vm.run() was called from another thread)")
        self._idle.clear()
        try:
            stuck = [v.index for v in self._runners if v.alive]
            if stuck:
                raise ConfigError(f"vCPU {', '.join(map(str, stuck))} of a previous run never left KVM_RUN; "
                                  "this VM cannot run again")
            for device in self.virtio:  # irqfd needs the interrupt controller: the vCPUs exist by now
                device.start()
            self.memory.has_run = True
            self._runloop = RunLoop(self, self._runners)
            try:
                outcome = self._runloop.run(timeout)
            finally:
                self._last_counts = self._runloop.exit_counts()
                self._runloop = None
            if outcome.kind is ExitKind.TIMEOUT and self.protected:
                from .arch.arm64.pkvm import timeout_hint

                outcome.detail += timeout_hint()
            return outcome
        finally:
            self._idle.set()
            self._run_lock.release()

    def request_stop(self, outcome: Outcome) -> None:
        """For devices and hosts, from any thread: end the current run with ``outcome``.
        Does nothing when the VM is not running (a stop is not remembered for a later ``run()``)."""
        loop = self._runloop
        if loop is not None:
            loop.finish(outcome)

    @property
    def running(self) -> bool:
        """True while ``run()`` is in progress (``request_stop`` reaches it)."""
        return self._runloop is not None

    def exit_counts(self) -> dict[str, int]:
        """KVM exits of the current run (or the last one) by exit reason name, all vCPUs together."""
        loop = self._runloop
        return loop.exit_counts() if loop is not None else dict(self._last_counts)

    def vcpu_tids(self) -> dict[int, int]:
        """vCPU index -> kernel task id of its thread, for the vCPUs running now (kernel-log attribution)."""
        return {v.index: v.tid for v in self._runners if v.tid is not None}

    def vcpu_all_tids(self) -> set[int]:
        """Every task id any of this VM's vCPU threads has had (threads of earlier runs included)."""
        return {tid for v in self._runners for tid in v.tids}

    def vcpu_states(self) -> dict[int, str]:
        return {v.index: v.state.value for v in self._runners}

    # --- teardown ----------------------------------------------------------
    def close(self) -> None:
        """Close everything this VM owns, even when a step fails; then raise the first failure."""
        loop = self._runloop
        if loop is not None:  # closed while another thread runs it: stop it and let run() return first
            loop.finish(Outcome(ExitKind.STOPPED, detail="the VM was closed"))
            self._idle.wait(JOIN_LIMIT + 1)
        stuck = [v for v in self._runners if v.alive]
        if stuck:  # a thread still in KVM_RUN would use freed fds and memory: keep them, say so
            raise PyvmmError(f"vCPU {', '.join(str(v.index) for v in stuck)} never left KVM_RUN: the VM's fds and "
                             "guest memory are left open (closing them under a running vCPU is not safe)")
        vcpus, self.vcpus, self._runners = self.vcpus, [], []
        on_close, self.on_close = self.on_close, []
        virtio, self.virtio = self.virtio, []
        close_all([
            *(d.close for d in virtio),  # threads first; ioeventfd/irqfd detach while the VM fd is open
            *(v.close for v in vcpus),
            *reversed(on_close),  # arch-owned fds (GIC...), before the VM fd
            *([self.fd.close] if self.fd is not None else []),
            *([self.memory.close] if self.memory is not None else []),  # after the VM fd: the slots went with it
            *([self.kmsg.close] if self.kmsg is not None else []),
            *([self.kvm.close] if self._own_kvm else []),
        ])

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
