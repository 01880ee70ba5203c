"""virtio-mmio devices on a VM: the KVM side of ``devices/virtio`` (which knows nothing of KVM).

Each device gets, from the architecture, an MMIO window and an interrupt (``arch.virtio_slot(i)``):

* the transport sits on the VM's MMIO bus, so every register access is an ordinary MMIO exit;
* QueueNotify writes are caught in the kernel with ``KVM_IOEVENTFD`` (one eventfd per queue,
  datamatch on the queue index) and served by the device's own thread, so a vCPU thread never
  processes a queue; without ioeventfd the write reaches the transport on the vCPU's exit path;
* the interrupt is an edge on a GIC SPI through ``KVM_IRQFD`` where KVM has it (an eventfd write
  from any thread, no exit to userspace), else ``KVM_IRQ_LINE``; on a VM without an in-kernel
  interrupt controller (x86 today) there is none: guests poll.

Guest memory, for a protected VM: a device sees only what the guest shared.  The VM gets a DMA pool
(``DmaPool``: a ``restricted-dma-pool`` in the device tree, which a pKVM guest kernel shares at boot and
bounces every virtio buffer through) and every device offers VIRTIO_F_ACCESS_PLATFORM, without which
Linux hands devices its private buffers.  Each device reaches guest memory through a ``DeviceMemory``
view that counts its accesses inside and outside shared memory; an access to a private page is refused
before anything is touched, the request fails, and the refusal is logged in one line with its likely
cause and recorded in the run's outcome (``Outcome.device_faults``).
"""

from __future__ import annotations

import os
import select
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.devices.virtio import MMIO_SIZE, VirtioDevice, VirtioMmioTransport
from pyvmm.devices.virtio.device import VIRTIO_F_ACCESS_PLATFORM, DeviceStatus
from pyvmm.devices.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY
from pyvmm.devices.virtio.queue import Virtqueue

from . import hostmem
from .kvm import uapi
from .kvm.errors import GuestMemoryError, KvmError, PrivatePageError
from .kvm.fd import close_all
from .memory.regions import pages
from .outcome import DeviceFault
from .vcpu import PROCESS_SIGNALS
from .logs import getLogger

if TYPE_CHECKING:
    from .vm import Vm

log = getLogger("pyvmm.virtio")
THREAD_JOIN = 5.0  # seconds a device thread gets to stop when the VM closes


DMA_POOL_ALIGN = 64 << 10  # covers every arm64 granule (4, 16, 64 KiB)
DEFAULT_DMA_POOL = 8 << 20  # a protected VM's pool when none is asked for (README: "The DMA pool")


def default_dma_pool(ram: int) -> int:
    """DEFAULT_DMA_POOL, or an eighth of a guest's RAM when that is less (small test guests)."""
    return min(DEFAULT_DMA_POOL, ram // 8 // DMA_POOL_ALIGN * DMA_POOL_ALIGN)
MAX_DEVICE_FAULTS = 64  # refusals kept per VM (later ones are counted)


@dataclass(frozen=True)
class DmaPool:
    """The guest RAM a protected guest shares for device DMA: [gpa, gpa + size)."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end

    def __str__(self) -> str:
        return f"[{self.gpa:#x}, {self.end:#x})"


@dataclass
class AccessCounts:
    """A device's accesses to guest memory: inside the DMA pool or declared-shared pages, outside them
    (normal VMs only: a protected VM refuses those), and refused (a protected guest's private pages)."""

    shared: int = 0
    outside: int = 0
    refused: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"shared": self.shared, "outside": self.outside, "refused": self.refused}


class DeviceMemory:
    """The guest memory one device sees: ``GuestMemory.read/write`` with its accesses counted, and a
    refused private page explained (which pool, whether the driver negotiated ACCESS_PLATFORM)."""

    def __init__(self, attached: "VirtioMmio"):
        self._attached = attached
        self._memory = attached.vm.memory
        self.counts = AccessCounts()
        self._lock = threading.Lock()  # vCPU threads (MMIO notify), ioeventfd and rx threads all count

    def _count(self, gpa: int, length: int) -> None:
        pool = self._attached.vm.dma_pool
        shared = self._memory.shared_pages
        inside = (pool is not None and pool.contains(gpa, length)) or bool(shared and all(p in shared for p in pages(gpa, length)))
        with self._lock:
            if inside:
                self.counts.shared += 1
            else:
                self.counts.outside += 1

    def _refused(self, err: PrivatePageError) -> PrivatePageError:
        with self._lock:
            self.counts.refused += 1
        page = err.gpa - err.gpa % hostmem.PAGE_SIZE
        pool = self._attached.vm.dma_pool
        where = f"outside the DMA pool {pool}" if pool is not None else "and the VM has no DMA pool"
        return PrivatePageError(f"guest page {page:#x} is private to the protected guest, {where}: not touched "
                                f"(a host access would make pKVM reclaim it); likely cause: {self._attached.cause()}",
                                err.gpa, err.write)

    def read(self, gpa: int, length: int) -> bytes:
        try:
            data = self._memory.read(gpa, length)
        except PrivatePageError as err:
            raise self._refused(err) from None
        self._count(gpa, length)
        return data

    def write(self, gpa: int, data: bytes) -> None:
        try:
            self._memory.write(gpa, data)
        except PrivatePageError as err:
            raise self._refused(err) from None
        self._count(gpa, len(data))


@dataclass(frozen=True)
class VirtioSlot:
    """Where device number ``index`` lives: its MMIO window and its interrupt (arm64: the SPI number)."""

    index: int
    base: int
    irq: int | None  # None: no interrupt controller (the guest polls)
    size: int = MMIO_SIZE


class VirtioMmio:
    """One virtio device attached to a VM."""

    def __init__(self, vm: "Vm", device: VirtioDevice, slot: VirtioSlot, ioeventfd: bool = True, irqfd: bool = True):
        self.vm = vm
        self.device = device
        self.slot = slot
        self.use_ioeventfd = ioeventfd
        self.use_irqfd = irqfd
        self.memory = DeviceMemory(self)
        platform = 1 << VIRTIO_F_ACCESS_PLATFORM if vm.protected or vm.dma_pool_size else 0  # None: a default pool
        self.transport = VirtioMmioTransport(device, self.memory, self._interrupt, platform, self._fault)
        self.name = f"{device.name}@{slot.base:#x}"
        self.irqfd: int | None = None
        self.notify_fds: list[int] = []  # one eventfd per queue, while KVM_IOEVENTFD is assigned
        self._stop_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = False  # set under the transport's lock: from then on no interrupt is raised
        vm.mmio_bus.insert(self.transport, slot.base, slot.size, self.name)

    # --- refused accesses --------------------------------------------------------------------
    def access_platform(self) -> bool | None:
        """Whether the driver negotiated VIRTIO_F_ACCESS_PLATFORM (None: it has not set FEATURES_OK yet)."""
        t = self.transport
        if not t.status & DeviceStatus.FEATURES_OK:
            return None
        return bool(t.driver_features >> VIRTIO_F_ACCESS_PLATFORM & 1)

    def cause(self) -> str:
        return self.vm.arch.device_access_cause(self.vm, self.access_platform())

    def _fault(self, queue: Virtqueue | None, line: str, error: GuestMemoryError | None) -> None:
        """The transport's on_fault: a refused private page becomes one of the run's device faults."""
        if isinstance(error, PrivatePageError):
            self.vm.record_device_fault(DeviceFault(self.name, queue.index if queue is not None else None,
                                                    error.gpa, error.write, self.cause(), line))

    # --- interrupts -----------------------------------------------------------------------
    def _interrupt(self, level: bool) -> None:
        """The transport's interrupt line (called under its lock, from any thread)."""
        if self.slot.irq is None or self._closed:
            return
        if self.irqfd is not None:
            if level:  # an edge per raised interrupt bit; the driver reads and ACKs InterruptStatus
                os.eventfd_write(self.irqfd, 1)
            return
        if level and not self.vm.fd.closed:  # the same edge with KVM_IRQ_LINE: a pulse
            self.vm.arch.irq_line(self.vm, self.slot.irq, True)
            self.vm.arch.irq_line(self.vm, self.slot.irq, False)

    # --- activation ----------------------------------------------------------------------------
    def start(self) -> None:
        """Before the first run, once the interrupt controller exists: irqfd, ioeventfds, the device thread."""
        if self._thread is not None:
            return
        vm = self.vm
        if self.slot.irq is not None and self.use_irqfd and vm.kvm.check_extension(uapi.KVM_CAP_IRQFD):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                vm.fd.irqfd(fd, self.slot.irq)
            except KvmError as err:
                os.close(fd)
                log.warning("%s: KVM_IRQFD failed (%s): using KVM_IRQ_LINE", self.name, err.errno_name)
            else:
                self.irqfd = fd
        if self.use_ioeventfd and vm.kvm.check_extension(uapi.KVM_CAP_IOEVENTFD):
            addr = self.slot.base + VIRTIO_MMIO_QUEUE_NOTIFY
            for q in self.transport.queues:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                try:
                    vm.fd.ioeventfd(fd, addr, 4, flags=uapi.KVM_IOEVENTFD_FLAG_DATAMATCH, datamatch=q.index)
                except BaseException:
                    os.close(fd)
                    raise
                self.notify_fds.append(fd)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._serve, name=f"pyvmm-{self.device.name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """The device thread: a kicked queue eventfd means QueueNotify for that queue."""
        signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
        poller = select.poll()
        queues = {fd: index for index, fd in enumerate(self.notify_fds)}
        for fd in (*queues, self._stop_fd):
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_fd:
                    return
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                try:
                    self.transport.notify(queues[fd])  # a bad queue sets DEVICE_NEEDS_RESET, it does not raise
                except Exception:  # a backstop: this thread must outlive any bug, or the device goes deaf
                    log.exception("%s: queue %d", self.name, queues[fd])

    # --- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Detach from KVM and close every fd, in an order that leaves no thread using a closed fd:
        interrupts off first (under the transport's lock), then the threads that produce work (this
        device's notify thread, the device's own threads), then KVM's side, then the fds.  A thread that
        does not stop keeps its fds open (logged): closing them under it could hit a reused fd number."""
        with self.transport.lock:
            self._closed = True
        steps = []
        thread_stopped = True
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join(THREAD_JOIN)
            thread_stopped = not self._thread.is_alive()
            if not thread_stopped:
                log.error("%s: device thread did not stop within %.0f s; its eventfds are left open",
                          self.name, THREAD_JOIN)
        closer = getattr(self.device, "close", None)
        if closer is not None:
            steps.append(closer)  # stops the device's own threads, then closes its fds (disk, TAP)
        vm_open = not self.vm.fd.closed
        addr = self.slot.base + VIRTIO_MMIO_QUEUE_NOTIFY
        for index, fd in enumerate(self.notify_fds):
            if vm_open:
                steps.append(lambda fd=fd, index=index: self.vm.fd.ioeventfd(
                    fd, addr, 4, flags=uapi.KVM_IOEVENTFD_FLAG_DATAMATCH | uapi.KVM_IOEVENTFD_FLAG_DEASSIGN,
                    datamatch=index))
            if thread_stopped:
                steps.append(lambda fd=fd: os.close(fd))
        if self.irqfd is not None:
            if vm_open:
                steps.append(lambda fd=self.irqfd: self.vm.fd.irqfd(fd, self.slot.irq, flags=uapi.KVM_IRQFD_FLAG_DEASSIGN))
            steps.append(lambda fd=self.irqfd: os.close(fd))
        if self._stop_fd is not None and thread_stopped:
            steps.append(lambda fd=self._stop_fd: os.close(fd))
        self.notify_fds, self.irqfd, self._stop_fd = [], None, None
        close_all(steps)
