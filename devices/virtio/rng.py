"""virtio-rng (virtio 1.2 section 5.4): one request queue whose device-writable buffers the device
fills with bytes from the host's getrandom(2)."""

from __future__ import annotations

import os

from .device import DEFAULT_QUEUE_SIZE, DeviceId, VirtioDevice
from .queue import CHUNK, AccessError, Fault, Virtqueue, scatter


class VirtioRng(VirtioDevice):
    name = "virtio-rng"
    device_id = DeviceId.VIRTIO_ID_RNG

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE, max_fill: int = CHUNK):
        super().__init__()
        self.queue_sizes = (queue_size,)
        self.max_fill = max_fill  # the device may return fewer bytes than a buffer holds

    def process(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            written = 0
            if chain.fault is None and not chain.writable:
                queue.report(chain, Fault("no device-writable buffer"))
            elif chain.fault is None:
                data = os.getrandom(min(chain.writable_len, self.max_fill))
                try:
                    written = scatter(self.memory, chain.writable, 0, data)
                except AccessError as err:
                    queue.report(chain, err.fault)
            queue.push(chain.head, written)
