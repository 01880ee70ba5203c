"""arm64 guest physical layout used by pyvmm (devices low, RAM from 2 GiB)."""

GIC_DIST = 0x0800_0000
GIC_DIST_SIZE = 0x1_0000
GIC_ITS = 0x0808_0000  # the ITS's two 64 KiB frames, between the distributor and the redistributors
GIC_ITS_SIZE = 0x2_0000
GIC_REDIST = 0x080A_0000
GIC_REDIST_SIZE = 0x2_0000  # per vCPU
UART = 0x0900_0000
MAX_VCPUS = (UART - GIC_REDIST) // GIC_REDIST_SIZE  # 123: the redistributors must end before the UART
UART_SIZE = 0x1000
UART_SPI = 1  # INTID 33
DEBUG_EXIT = 0x0901_0000
DEBUG_EXIT_SIZE = 0x1000
TEST_DEVICE = 0x0A00_0000
VIRTIO_BASE = 0x0B00_0000  # virtio-mmio windows, VIRTIO_STRIDE apart
VIRTIO_STRIDE = 0x200
VIRTIO_MAX = 64
VIRTIO_SPI_BASE = 16  # device i interrupts on SPI 16 + i (INTID 48 + i)
# Every device above, in one window that memslots may not overlap (pvmfw's slot lies beyond it).
DEVICE_REGION = (GIC_DIST, VIRTIO_BASE + VIRTIO_MAX * VIRTIO_STRIDE,
                 "the arm64 device region (GIC, UART, debug-exit, test device, virtio-mmio)")
PVMFW = 0x7FE0_0000  # Android pKVM ABI only: pvmfw's own memslot, just below RAM
RAM_BASE = 0x8000_0000
MIN_RAM = 4 << 20
DTB_MAX = 0x10_0000  # the DTB sits in the last 2 MiB of RAM
UART_CLOCK = 1_843_200

PMU_PPI = 7  # INTID 23

# Architected timer PPIs (GIC INTID - 16): secure phys, non-secure phys, virtual, hyp
TIMER_PPIS = (13, 14, 11, 10)
