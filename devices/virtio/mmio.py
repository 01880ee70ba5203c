"""The virtio-mmio transport, version 2 (virtio 1.2 section 4.2): the register file a driver sees.

``VirtioMmioTransport(device, memory, interrupt)`` sits on pyvmm's MMIO bus (``read``/``write``,
``MMIO_SIZE`` bytes).  Registers are 32-bit and aligned; any other access to them is ignored (reads
as 0) and logged.  The configuration space at 0x100 takes any width.  ``interrupt(level)`` follows
InterruptStatus: True when a bit is raised (every time), False when InterruptACK clears the last.
``notify(index)`` processes a queue: QueueNotify writes call it, and so does pyvmm's ioeventfd thread.
``platform_features`` are offered on top of the device's and the transport's own (VIRTIO_F_ACCESS_PLATFORM
for a protected VM); ``on_fault(queue, line, error)`` hears of every failed request and unusable queue.
Nothing a driver or a device does raises out of this class: a broken queue or a device that raises
sets DEVICE_NEEDS_RESET (with a configuration-change interrupt once DRIVER_OK is set).
"""

from __future__ import annotations

import threading
from typing import Callable

from .device import TRANSPORT_FEATURES, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from .device import DeviceStatus, VirtioDevice
from .queue import AVAIL_ALIGN, DESC_ALIGN, USED_ALIGN, VIRTQ_MAX_SIZE, Memory, QueueError, RateLimitedLog
from .queue import Virtqueue, log
from pyvmm.kvm.errors import GuestMemoryError

VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090  # "QueueDriver" in the spec
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0  # "QueueDevice"
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_QUEUE_RESET = 0x0C0
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = int.from_bytes(b"PVMM", "little")
MMIO_SIZE = 0x200

DRIVER_STATUS = (DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                 | DeviceStatus.DRIVER_OK | DeviceStatus.FAILED)

# Queue registers that may only change while the queue is not ready: (low/high, attribute).
_QUEUE_ADDR = {
    VIRTIO_MMIO_QUEUE_DESC_LOW: (0, "desc_addr"), VIRTIO_MMIO_QUEUE_DESC_HIGH: (32, "desc_addr"),
    VIRTIO_MMIO_QUEUE_AVAIL_LOW: (0, "driver_addr"), VIRTIO_MMIO_QUEUE_AVAIL_HIGH: (32, "driver_addr"),
    VIRTIO_MMIO_QUEUE_USED_LOW: (0, "device_addr"), VIRTIO_MMIO_QUEUE_USED_HIGH: (32, "device_addr"),
}


class VirtioMmioTransport:
    def __init__(self, device: VirtioDevice, memory: Memory, interrupt: Callable[[bool], None],
                 platform_features: int = 0,
                 on_fault: Callable[[Virtqueue | None, str, GuestMemoryError | None], None] | None = None):
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        self.platform_features = platform_features
        self.on_fault = on_fault
        self.lock = threading.RLock()
        self.rlog = RateLimitedLog()
        self.queues = [Virtqueue(memory, i, size, device.name, self.rlog)
                       for i, size in enumerate(device.queue_sizes)]
        for q in self.queues:
            q.on_fault = on_fault
        self.config_generation = 0
        device.bind(self.notify, self.config_changed)
        self._reset_registers()

    @property
    def offered_features(self) -> int:
        return self.device.device_features() | TRANSPORT_FEATURES | self.platform_features

    def _reset_registers(self) -> None:
        self.status = DeviceStatus(0)
        self.device_features_sel = self.driver_features_sel = self.queue_sel = self.shm_sel = 0
        self.driver_features = 0
        self.interrupt_status = 0
        for q in self.queues:
            q.reset()

    def reset(self) -> None:
        """What writing 0 to Status does: device, queues and interrupt back to their initial state."""
        with self.lock:
            asserted = self.interrupt_status != 0
            self._reset_registers()
            self._guard("reset", self.device.reset)
            if asserted:
                self._signal(False)

    # --- the bus interface ---------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= VIRTIO_MMIO_CONFIG:
                config = self._guard("config read", self.device.config) or b""
                start = offset - VIRTIO_MMIO_CONFIG
                return bytes(config[start:start + size]).ljust(size, b"\0")
            if size != 4 or offset % 4:
                self.rlog.warning(f"{self.device.name}: {size}-byte register read at {offset:#x} "
                                  "ignored (registers are 32-bit, aligned)")
                return bytes(size)
            return (self._read_register(offset) & 0xFFFFFFFF).to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset >= VIRTIO_MMIO_CONFIG:
                ok = self._guard("config write", self.device.write_config, offset - VIRTIO_MMIO_CONFIG, bytes(data))
                if not ok:
                    self.rlog.warning(f"{self.device.name}: config write of {len(data)} bytes at "
                                      f"{offset:#x} ignored (read-only field)")
                return
            if len(data) != 4 or offset % 4:
                self.rlog.warning(f"{self.device.name}: {len(data)}-byte register write at {offset:#x} "
                                  "ignored (registers are 32-bit, aligned)")
                return
            self._write_register(offset, int.from_bytes(data, "little"))

    # --- registers -----------------------------------------------------------------
    def _queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        q = self._queue()
        if offset == VIRTIO_MMIO_MAGIC_VALUE:
            return MAGIC
        if offset == VIRTIO_MMIO_VERSION:
            return VERSION
        if offset == VIRTIO_MMIO_DEVICE_ID:
            return self.device.device_id
        if offset == VIRTIO_MMIO_VENDOR_ID:
            return VENDOR_ID
        if offset == VIRTIO_MMIO_DEVICE_FEATURES:
            return self.offered_features >> (32 * self.device_features_sel) if self.device_features_sel < 2 else 0
        if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            return q.size if q else 0
        if offset == VIRTIO_MMIO_QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == VIRTIO_MMIO_STATUS:
            return self.status
        if offset in _QUEUE_ADDR:
            shift, attr = _QUEUE_ADDR[offset]
            return getattr(q, attr) >> shift if q else 0
        if offset in (VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions: length -1 (4.2.2)
        if offset == VIRTIO_MMIO_CONFIG_GENERATION:
            return self.config_generation
        return 0  # write-only and reserved registers

    def _write_register(self, offset: int, value: int) -> None:
        q = self._queue()
        if offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == VIRTIO_MMIO_STATUS:
            self._write_status(value)
        elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
            self.interrupt_status &= ~value
            if value and not self.interrupt_status:
                self._signal(False)
        elif offset == VIRTIO_MMIO_QUEUE_NOTIFY:
            self.notify(value & 0xFFFF)
        elif offset == VIRTIO_MMIO_SHM_SEL:
            self.shm_sel = value
        elif offset in (VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY) or offset in _QUEUE_ADDR:
            self._write_queue_register(q, offset, value)
        else:
            self.rlog.warning(f"{self.device.name}: write of {value:#x} to register {offset:#x} ignored")

    def _write_driver_features(self, value: int) -> None:
        if self.status & DeviceStatus.FEATURES_OK:
            self.rlog.warning(f"{self.device.name}: DriverFeatures written after FEATURES_OK; ignored")
            return
        if self.driver_features_sel >= 2:
            if value:  # bits the device cannot have offered: FEATURES_OK will be refused
                self.driver_features |= 1 << 64
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | value << shift

    def _write_queue_register(self, q: Virtqueue | None, offset: int, value: int) -> None:
        if q is None:
            self.rlog.warning(f"{self.device.name}: queue register {offset:#x} written with QueueSel "
                              f"{self.queue_sel}, which is no queue; ignored")
            return
        if offset == VIRTIO_MMIO_QUEUE_READY:
            if value & 1 and not q.ready:
                self._enable(q)
            elif not value & 1:
                q.ready = False
            return
        if q.ready:
            self.rlog.warning(f"{q}: register {offset:#x} written while the queue is ready; ignored")
        elif offset == VIRTIO_MMIO_QUEUE_NUM:
            q.size = value
        else:
            shift, attr = _QUEUE_ADDR[offset]
            setattr(q, attr, (getattr(q, attr) & ~(0xFFFFFFFF << shift)) | value << shift)

    def _enable(self, q: Virtqueue) -> None:
        size = q.size
        problem = None
        if not 0 < size <= min(q.max_size, VIRTQ_MAX_SIZE) or size & (size - 1):
            problem = f"QueueNum {size} is not a power of 2 in [1, {q.max_size}]"
        elif q.desc_addr % DESC_ALIGN or q.driver_addr % AVAIL_ALIGN or q.device_addr % USED_ALIGN:
            problem = "a ring address is misaligned (descriptors 16, driver area 2, device area 4)"
        if problem:
            self.rlog.warning(f"{q}: not made ready: {problem}")
            return
        q.ready = True
        q.last_avail = q.used_idx = q.signalled_used = 0

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status & DRIVER_STATUS
        new = DeviceStatus(value) & DRIVER_STATUS
        if old & ~new:
            self.rlog.warning(f"{self.device.name}: Status write {value:#x} clears bits of {int(old):#x}; ignored")
            return
        added = new & ~old
        if added & DeviceStatus.FEATURES_OK and not self._features_acceptable():
            new &= ~DeviceStatus.FEATURES_OK
        if added & DeviceStatus.DRIVER_OK and not new & DeviceStatus.FEATURES_OK:
            self.rlog.warning(f"{self.device.name}: DRIVER_OK without FEATURES_OK; ignored")
            new &= ~DeviceStatus.DRIVER_OK
        self.status = new | (self.status & DeviceStatus.DEVICE_NEEDS_RESET)
        if new & ~old & DeviceStatus.DRIVER_OK:
            self._activate()

    def _features_acceptable(self) -> bool:
        features, offered = self.driver_features, self.offered_features
        if features & ~offered:
            self.rlog.warning(f"{self.device.name}: driver accepted features {features & ~offered:#x} "
                              "that were not offered; FEATURES_OK refused")
            return False
        if not features >> VIRTIO_F_VERSION_1 & 1:
            self.rlog.warning(f"{self.device.name}: driver did not accept VIRTIO_F_VERSION_1 "
                              "(legacy drivers are not supported); FEATURES_OK refused")
            return False
        return True

    def _activate(self) -> None:
        for q in self.queues:
            q.event_idx = bool(self.driver_features >> VIRTIO_F_EVENT_IDX & 1)
            q.indirect_desc = bool(self.driver_features >> VIRTIO_F_INDIRECT_DESC & 1)
        self._guard("activate", self.device.activate, self.memory, self.driver_features)
        for q in self.queues:  # buffers made available before DRIVER_OK
            self.notify(q.index)

    # --- queues and interrupts -----------------------------------------------------
    def notify(self, index: int) -> None:
        """Process queue ``index`` (QueueNotify; a future ioeventfd thread; a device's own wake)."""
        with self.lock:
            if index >= len(self.queues):
                self.rlog.warning(f"{self.device.name}: notify for queue {index}, which does not exist")
                return
            q = self.queues[index]
            if (not q.ready or not self.status & DeviceStatus.DRIVER_OK
                    or self.status & DeviceStatus.DEVICE_NEEDS_RESET):
                return
            try:
                self.device.process(q)
                signal = q.should_signal()
            except QueueError as err:
                self.needs_reset(str(err))
                if self.on_fault is not None:
                    self.on_fault(q, str(err), err.error)
                return
            except Exception as err:  # a device bug must not reach the run loop
                log.exception("%s: queue %d: device raised", self.device.name, index)
                self.needs_reset(f"device raised {type(err).__name__}: {err}")
                return
            if signal:
                self._raise(VIRTIO_MMIO_INT_VRING)

    def needs_reset(self, why: str) -> None:
        """The device cannot go on until the driver resets it (2.1.2)."""
        with self.lock:
            if self.status & DeviceStatus.DEVICE_NEEDS_RESET:
                return
            self.rlog.warning(f"{self.device.name}: DEVICE_NEEDS_RESET: {why}")
            self.status |= DeviceStatus.DEVICE_NEEDS_RESET
            if self.status & DeviceStatus.DRIVER_OK:
                self._raise(VIRTIO_MMIO_INT_CONFIG)

    def config_changed(self) -> None:
        """The device changed its configuration space: new generation, and tell the driver."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & DeviceStatus.DRIVER_OK:
                self._raise(VIRTIO_MMIO_INT_CONFIG)

    def _raise(self, bit: int) -> None:
        self.interrupt_status |= bit
        self._signal(True)

    def _signal(self, level: bool) -> None:
        """The interrupt line; a host-side failure (a closed eventfd, a failed ioctl) is logged, never raised:
        InterruptStatus keeps the bit, so a driver that polls still sees it."""
        try:
            self.interrupt(level)
        except Exception as err:
            self.rlog.warning(f"{self.device.name}: raising the interrupt failed: {type(err).__name__}: {err}")

    def _guard(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as err:
            log.exception("%s: %s: device raised", self.device.name, what)
            self.needs_reset(f"{what}: device raised {type(err).__name__}: {err}")
            return None
