"""virtio-console (virtio 1.2 section 5.3), one port: queue 0 receives (host to guest), queue 1
transmits (guest to host).  The host side is ``output(bytes)`` for what the guest writes and ``feed()``
for what it should read; input that arrives before the driver has posted buffers waits (up to
``max_pending`` bytes; more is dropped and logged).  ``resize()`` sets cols/rows (VIRTIO_CONSOLE_F_SIZE).
"""

from __future__ import annotations

import struct
import threading
from typing import Callable

from .device import DEFAULT_QUEUE_SIZE, DeviceId, VirtioDevice
from .queue import CHUNK, AccessError, Fault, Virtqueue, gather, log, scatter

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RECEIVEQ, TRANSMITQ = 0, 1


class VirtioConsole(VirtioDevice):
    name = "virtio-console"
    device_id = DeviceId.VIRTIO_ID_CONSOLE

    def __init__(self, output: Callable[[bytes], None], cols: int = 0, rows: int = 0,
                 queue_size: int = DEFAULT_QUEUE_SIZE, max_pending: int = 64 << 10):
        super().__init__()
        self.output = output
        self.cols, self.rows = cols, rows
        self.queue_sizes = (queue_size, queue_size)
        self.max_pending = max_pending
        self.pending = bytearray()
        self._lock = threading.Condition()  # pending input: fed by a host thread, drained by the receive queue
        self._closed = False

    def device_features(self) -> int:
        return 1 << VIRTIO_CONSOLE_F_SIZE if self.cols or self.rows else 0

    def config(self) -> bytes:
        return struct.pack("<HHII", self.cols, self.rows, 1, 0)  # cols, rows, max_nr_ports, emerg_wr

    def resize(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.config_changed()

    def feed(self, data: bytes, block: bool = True) -> int:
        """Host input for the guest to read; returns how many bytes were taken.

        With ``block`` (what pyvmm's stdin forwarder does) the caller waits while ``max_pending`` bytes
        are already waiting for the guest, so a pipe is forwarded whole, at the guest's pace; it returns
        early only when the device is closed.  Without it, what does not fit is dropped (logged)."""
        view, taken = memoryview(bytes(data)), 0
        while view:
            with self._lock:
                while block and len(self.pending) >= self.max_pending and not self._closed:
                    self._lock.wait(0.2)
                if self._closed:
                    break
                room = self.max_pending - len(self.pending)
                if not block and room < len(view):
                    log.warning("%s: input buffer full; %d bytes dropped", self.name, len(view) - max(room, 0))
                    view = view[:max(room, 0)]
                chunk = view[:room]
                self.pending += chunk
                view, taken = view[len(chunk):], taken + len(chunk)
            self.wake(RECEIVEQ)
            if not block:
                break
        return taken

    def close(self) -> None:
        """No more input: a feeder waiting for room returns."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def process(self, queue: Virtqueue) -> None:
        if queue.index == TRANSMITQ:
            self._transmit(queue)
        else:
            self._receive(queue)

    def _transmit(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            if chain.fault is None and not chain.readable:
                queue.report(chain, Fault("no device-readable buffer"))
            elif chain.fault is None:
                try:
                    for offset in range(0, chain.readable_len, CHUNK):
                        self.output(gather(self.memory, chain.readable, offset, CHUNK))
                except AccessError as err:
                    queue.report(chain, err.fault)
            queue.push(chain.head, 0)

    def _receive(self, queue: Virtqueue) -> None:
        while self.pending and (chain := queue.pop()) is not None:
            written = 0
            if chain.fault is None and not chain.writable:
                queue.report(chain, Fault("no device-writable buffer"))
            elif chain.fault is None:
                with self._lock:
                    data = bytes(self.pending[:min(chain.writable_len, CHUNK)])
                    del self.pending[:len(data)]
                    self._lock.notify_all()  # room for a waiting feeder
                try:
                    written = scatter(self.memory, chain.writable, 0, data)
                except AccessError as err:
                    queue.report(chain, err.fault)
                    with self._lock:
                        self.pending[:0] = data  # not delivered: keep it for the next buffer
            queue.push(chain.head, written)
