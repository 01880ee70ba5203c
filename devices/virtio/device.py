"""What every virtio device shares: status bits, feature bits, device IDs, and the base class the
transport drives (virtio 1.2 sections 2.1, 5 and 6)."""

from __future__ import annotations

import enum
from typing import Callable

from .queue import Memory, Virtqueue


class DeviceStatus(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DeviceId(enum.IntEnum):
    VIRTIO_ID_NET = 1
    VIRTIO_ID_BLOCK = 2
    VIRTIO_ID_CONSOLE = 3
    VIRTIO_ID_RNG = 4


# Reserved (device-independent) feature bits, virtio 1.2 section 6.
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33  # the device sees guest memory through the platform (a bounce pool, an IOMMU)

# What the transport offers for every device, on top of the device's own bits.
TRANSPORT_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX

DEFAULT_QUEUE_SIZE = 256


class VirtioDevice:
    """Subclasses set ``name``, ``device_id``, ``queue_sizes`` (the maximum size of each queue) and
    implement ``process(queue)``: pop chains, push them used.  The transport calls everything under
    its lock; a device that is woken from a host thread (console input) calls ``wake(queue_index)``."""

    name = "virtio"
    device_id: DeviceId
    queue_sizes: tuple[int, ...] = (DEFAULT_QUEUE_SIZE,)

    def __init__(self) -> None:
        self.memory: Memory | None = None
        self.features = 0  # negotiated, set at DRIVER_OK
        self.wake: Callable[[int], None] = lambda index: None
        self.config_changed: Callable[[], None] = lambda: None

    def bind(self, wake: Callable[[int], None], config_changed: Callable[[], None]) -> None:
        """Called by the transport: how the device asks for a queue to be processed, and how it
        announces a change of its configuration space."""
        self.wake, self.config_changed = wake, config_changed

    def device_features(self) -> int:
        return 0

    def config(self) -> bytes:
        """The device-specific configuration space, as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> bool:
        """A driver write to the configuration space; False if that field is not writable."""
        return False

    def activate(self, memory: Memory, features: int) -> None:
        """DRIVER_OK: the driver is ready; ``features`` were negotiated."""
        self.memory, self.features = memory, features

    def reset(self) -> None:
        self.features = 0

    def process(self, queue: Virtqueue) -> None:
        raise NotImplementedError
