"""virtio-net (virtio 1.2 section 5.1): one receive and one transmit queue over a packet fd.

The backend is any file descriptor that reads and writes whole frames, each led by a 12-byte
``struct virtio_net_hdr_v1`` (a TAP opened with IFF_VNET_HDR and TUNSETVNETHDRSZ 12): the header
passes between the guest's buffers and the fd unchanged, except ``num_buffers``, which the device
sets to 1 on receive (no VIRTIO_NET_F_MRG_RXBUF).  No offloads are offered, so every frame is whole
and checksummed.  A thread of the device's own waits for frames on the fd; it holds one frame while
the guest has no receive buffer posted, and the fd queues the rest.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import threading

from .device import DEFAULT_QUEUE_SIZE, DeviceId, VirtioDevice
from .queue import AccessError, Fault, Virtqueue, gather, scatter
from pyvmm.logs import getLogger

log = getLogger("pyvmm.virtio")

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (VIRTIO_F_VERSION_1)
NUM_BUFFERS_OFFSET = 10
MAX_FRAME = VIRTIO_NET_HDR_SIZE + 65536  # header + the largest frame a TAP hands over without GSO
RECEIVEQ, TRANSMITQ = 0, 1


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {text!r} (use six hex bytes, e.g. 52:54:00:12:34:56)")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address")
    return mac


class VirtioNet(VirtioDevice):
    name = "virtio-net"
    device_id = DeviceId.VIRTIO_ID_NET

    def __init__(self, fd: int, mac: bytes, queue_size: int = DEFAULT_QUEUE_SIZE):
        """``fd``: the backend (owned from here on: ``close()`` closes it)."""
        super().__init__()
        self.fd = fd
        self.mac = mac
        self.queue_sizes = (queue_size, queue_size)
        self.rx_frames = self.tx_frames = self.rx_dropped = 0
        self._held: bytes | None = None  # a received frame waiting for a guest buffer
        self._held_lock = threading.Lock()
        self._room_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # written when the held frame goes
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None

    def device_features(self) -> int:
        return 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS

    def config(self) -> bytes:
        return self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP)

    def activate(self, memory, features: int) -> None:
        super().activate(memory, features)
        if self._thread is None:
            self._thread = threading.Thread(target=self._receive_loop, name="pyvmm-virtio-net-rx", daemon=True)
            self._thread.start()

    # --- transmit --------------------------------------------------------------------------
    def process(self, queue: Virtqueue) -> None:
        if queue.index == TRANSMITQ:
            self._transmit(queue)
        else:
            self._deliver(queue)

    def _transmit(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            if chain.fault is None and chain.readable_len <= VIRTIO_NET_HDR_SIZE:
                queue.report(chain, Fault(f"transmit chain of {chain.readable_len} bytes: no frame after the header"))
            elif chain.fault is None and chain.readable_len > MAX_FRAME:
                queue.report(chain, Fault(f"transmit chain of {chain.readable_len} bytes: larger than a frame"))
            elif chain.fault is None:
                try:
                    frame = gather(self.memory, chain.readable, 0, chain.readable_len)
                except AccessError as err:
                    queue.report(chain, err.fault)
                    frame = None
                if frame is not None and (frame[0] or frame[1]):  # flags, gso_type: no offload was negotiated
                    queue.report(chain, Fault(f"transmit header asks for offloads (flags {frame[0]:#x}, gso_type "
                                              f"{frame[1]:#x}) that were not negotiated"))
                elif frame is not None:
                    try:
                        os.write(self.fd, frame)
                        self.tx_frames += 1
                    except OSError as err:  # the link is down, the TAP gone: the frame is lost, as on a wire
                        log.debug("virtio-net: transmit failed: %s", err.strerror)
            queue.push(chain.head, 0)

    # --- receive ----------------------------------------------------------------------------
    def _receive_loop(self) -> None:
        """Read a frame whenever none is held; while one is held, wait for the guest to take it (no polling)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
        while True:
            waiting = [self._stop_r, self._room_fd] + ([self.fd] if self._held is None else [])
            ready = select.select(waiting, [], [])[0]
            if self._stop_r in ready:
                return
            if self._room_fd in ready:
                try:
                    os.eventfd_read(self._room_fd)
                except BlockingIOError:
                    pass
                continue
            try:
                frame = os.read(self.fd, MAX_FRAME)
            except BlockingIOError:
                continue
            except OSError as err:
                log.warning("virtio-net: receive failed (%s); no more frames for the guest", err.strerror)
                return
            if len(frame) <= VIRTIO_NET_HDR_SIZE:
                continue
            with self._held_lock:
                self._held = frame
            self.wake(RECEIVEQ)

    def _deliver(self, queue: Virtqueue) -> None:
        with self._held_lock:
            frame = self._held
            if frame is None:
                return
            chain = queue.pop()
            if chain is None:
                return  # the guest has no buffer yet: its next notify brings us back
            written = 0
            if chain.fault is None and chain.writable_len < len(frame):
                queue.report(chain, Fault(f"receive buffer of {chain.writable_len} bytes for a "
                                          f"{len(frame)}-byte frame"))
                self.rx_dropped += 1
            elif chain.fault is None:
                data = bytearray(frame)
                data[NUM_BUFFERS_OFFSET:NUM_BUFFERS_OFFSET + 2] = (1).to_bytes(2, "little")
                try:
                    written = scatter(self.memory, chain.writable, 0, bytes(data))
                    self.rx_frames += 1
                except AccessError as err:
                    queue.report(chain, err.fault)
                    self.rx_dropped += 1
            queue.push(chain.head, written)
            self._held = None
        self._signal_room()

    def _signal_room(self) -> None:
        """Wake the receive thread: no frame is held any more."""
        fd = self._room_fd
        if fd is not None:
            os.eventfd_write(fd, 1)

    # --- lifetime ---------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        with self._held_lock:
            self._held = None
        self._signal_room()

    def close(self) -> None:
        """Stop the receive thread, then close the fds; if the thread does not stop, its fds stay open
        (closing them under it could hit a reused fd number)."""
        if self._stop_w is not None:
            os.write(self._stop_w, b"x")
        stopped = True
        if self._thread is not None:
            self._thread.join(5)
            stopped = not self._thread.is_alive()
        if not stopped:
            log.error("virtio-net: the receive thread did not stop; its fds are left open")
            return
        for fd in (self._stop_r, self._stop_w, self._room_fd, self.fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = self._room_fd = None
        self.fd = -1
