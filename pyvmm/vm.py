"""A virtual machine: the VM fd, its memory map, buses, vCPUs and platform devices.

Generic code only; the architecture (``pyvmm.arch``) decides the VM type, the
platform devices, how images are loaded and how vCPUs start.  A ``Vm`` is a
context manager: leaving it closes every vCPU, the VM, every backing and the
kernel-log watcher.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable

from .arch import Arch, host_arch
from .bus import Bus
from .hostinfo import KmsgWatcher
from .kvm import Kvm
from .kvm.errors import ConfigError
from .kvm.vcpu import VcpuFd
from .memory.backing import Backing, BackingSpec
from .memory.regions import GuestMemory, MemoryRegion
from .outcome import Outcome
from .runloop import RunLoop


class Console:
    """Collects what the guest prints; optionally echoes it (to a terminal, a file...)."""

    def __init__(self, echo: Callable[[bytes], None] | None = None):
        self.buffer = bytearray()
        self.echo = echo
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self.buffer += data
        if self.echo:
            self.echo(data)

    def text(self) -> str:
        return self.buffer.decode(errors="replace")


def stdout_echo(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


class Vm:
    def __init__(self, *, protected: bool = False, arch: Arch | None = None, kvm: Kvm | None = None,
                 ipa_bits: int | None = None, console: Console | None = None):
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vcpus: list[VcpuFd] = []
        self.fd = None
        self.memory: GuestMemory | None = None
        self.kmsg: KmsgWatcher | None = None
        self.on_close: list[Callable[[], None]] = []  # arch-owned fds (GIC...), closed before the VM fd
        self.irqchip = None  # the in-kernel interrupt controller's device fd, where the arch makes one
        self.dtb: bytes | None = None
        try:
            self.arch = arch or host_arch()
            self.kind = "protected" if protected else "normal"
            self.vm_type = self.arch.vm_type(self.kvm, protected, ipa_bits)
            self.kmsg = KmsgWatcher()  # before KVM_CREATE_VM: the report shows what the kernel says from here on
            self.fd = self.kvm.create_vm(self.vm_type)
            self.memory = GuestMemory(self.fd, self.arch.memory_rules(self))
            self.io_bus = Bus("io")
            self.mmio_bus = Bus("mmio")
            self.console = console or Console()
            self.devices: dict[str, object] = {}
            self.hypercall_handler: Callable[[int, list[int]], int] | None = None
            self._runloop: RunLoop | None = None
            self.arch.prepare_vm(self)
        except BaseException:
            self.close()
            raise

    @property
    def protected(self) -> bool:
        return self.kind == "protected"

    # --- building ------------------------------------------------------------
    def add_memory(self, size: int, backing: str | BackingSpec | Backing = "anon", gpa: int | None = None,
                   flags: int = 0) -> MemoryRegion:
        """Add a memslot of ``size`` bytes at ``gpa`` (default: after the last region, from the RAM base)."""
        if isinstance(backing, str):
            backing = BackingSpec.parse(backing)
        if gpa is None:
            gpa = self.memory.regions[-1].end if self.memory.regions else self.arch.ram_base
        return self.memory.add(gpa, size, backing, flags)

    def create_vcpus(self, count: int) -> list[VcpuFd]:
        if count < 1:
            raise ConfigError("a VM needs at least one vCPU")
        limit = self.kvm.check_extension(self.arch.max_vcpus_cap) or 1
        if count > limit:
            raise ConfigError(f"{count} vCPUs requested; this KVM allows {limit}")
        for _ in range(count):
            self.vcpus.append(self.fd.create_vcpu(len(self.vcpus)))
        self.arch.init_vcpus(self)
        return self.vcpus

    def boot(self, image: str | None = None, **options) -> None:
        """Load ``image`` (default: the bundled hello) and set every vCPU up to run it."""
        self.arch.boot(self, image, **options)

    # --- running -----------------------------------------------------------
    def run(self, timeout: float | None = None, precheck: bool = True) -> Outcome:
        """Run until the guest ends, faults or ``timeout`` passes; may be called again to resume.

        ``precheck=False`` skips the arch's checks of the kernel's rules (to see what KVM itself answers).
        """
        if not self.vcpus:
            raise ConfigError("the VM has no vCPUs")
        if precheck:
            self.arch.check_before_run(self)
        self._runloop = RunLoop(self)
        try:
            return self._runloop.run(timeout)
        finally:
            self._runloop = None

    def request_stop(self, outcome: Outcome) -> None:
        """For devices and hosts: end the current run with ``outcome``."""
        loop = self._runloop
        if loop is not None:
            loop.finish(outcome)

    # --- teardown ----------------------------------------------------------
    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        while self.on_close:
            self.on_close.pop()()
        if self.fd is not None:
            self.fd.close()
        if self.memory is not None:
            self.memory.close()  # after the VM fd: the slots went with the VM
        if self.kmsg is not None:
            self.kmsg.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
