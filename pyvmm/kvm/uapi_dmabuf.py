"""Mirror of Linux 7.2 ``include/uapi/linux/udmabuf.h``, ``linux/dma-heap.h`` and ``linux/dma-buf.h`` (its SYNC)."""

from __future__ import annotations

import ctypes

from ioctl_opt import IOW, IOWR

u32, u64 = ctypes.c_uint32, ctypes.c_uint64

UDMABUF_FLAGS_CLOEXEC = 0x01


class udmabuf_create(ctypes.Structure):
    _fields_ = [("memfd", u32), ("flags", u32), ("offset", u64), ("size", u64)]


UDMABUF_CREATE = IOW(ord("u"), 0x42, udmabuf_create)


class dma_heap_allocation_data(ctypes.Structure):
    _fields_ = [("len", u64), ("fd", u32), ("fd_flags", u32), ("heap_flags", u64)]


DMA_HEAP_IOC_MAGIC = ord("H")
DMA_HEAP_IOCTL_ALLOC = IOWR(DMA_HEAP_IOC_MAGIC, 0x0, dma_heap_allocation_data)


class dma_buf_sync(ctypes.Structure):
    _fields_ = [("flags", u64)]


DMA_BUF_SYNC_READ = 1 << 0
DMA_BUF_SYNC_WRITE = 2 << 0
DMA_BUF_SYNC_RW = DMA_BUF_SYNC_READ | DMA_BUF_SYNC_WRITE
DMA_BUF_SYNC_START = 0 << 2
DMA_BUF_SYNC_END = 1 << 2
DMA_BUF_BASE = ord("b")
DMA_BUF_IOCTL_SYNC = IOW(DMA_BUF_BASE, 0, dma_buf_sync)
