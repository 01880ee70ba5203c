"""Mirror of Linux 7.2 ``include/uapi/linux/udmabuf.h`` and ``linux/dma-heap.h``."""

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
