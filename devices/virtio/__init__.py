"""virtio devices on the virtio-mmio transport (version 2, split virtqueues).

``VirtioMmioTransport(device, memory, interrupt)`` is what goes on the MMIO bus (``MMIO_SIZE``
bytes); the device is one of ``VirtioBlock``, ``VirtioConsole``, ``VirtioNet``, ``VirtioRng``.  Like every device
here, none of them knows KVM: guest memory is reached only through the accessor they are given.
"""

from .blk import VirtioBlock
from .console import VirtioConsole
from .device import DeviceId, DeviceStatus, VirtioDevice
from .mmio import MMIO_SIZE, VirtioMmioTransport
from .net import VirtioNet
from .queue import Chain, Fault, QueueError, Segment, Virtqueue
from .rng import VirtioRng

__all__ = [
    "Chain", "DeviceId", "DeviceStatus", "Fault", "MMIO_SIZE", "QueueError", "Segment", "VirtioBlock",
    "VirtioConsole", "VirtioDevice", "VirtioMmioTransport", "VirtioNet", "VirtioRng", "Virtqueue",
]
