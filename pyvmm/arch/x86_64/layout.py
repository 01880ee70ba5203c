"""x86_64 guest physical layout used by pyvmm (RAM starts at 0)."""

GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000  # Linux zero page
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four pages: 4 GiB identity map with 2 MiB pages
STACK_TOP = 0x80000  # per vCPU: STACK_TOP - id * STACK_SIZE
STACK_SIZE = 0x1000
STACK_BOTTOM = 0x40000
MAX_VCPUS = (STACK_TOP - STACK_BOTTOM) // STACK_SIZE  # 64
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
REAL_MODE_DEFAULT_LOAD = 0x8000
KERNEL_LOAD = 0x100000  # flat/ELF 64-bit firmware and Linux's protected-mode part
EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000
MIN_RAM = 2 << 20

BOOT_TABLES_END = PD_ADDR + 4 * 0x1000


def reserved_ranges(nvcpus: int) -> list[tuple[int, int, str]]:
    """What the long-mode boot writes besides the image: a loaded image must not overlap these."""
    return [(GDT_ADDR, BOOT_TABLES_END, "the boot GDT and page tables"),
            (STACK_TOP - nvcpus * STACK_SIZE, STACK_TOP, "the vCPUs' boot stacks")]


# Platform devices
COM1_PORT = 0x3F8
DEBUG_EXIT_PORT = 0x501
RESET_CONTROL_PORT = 0xCF9
PORT_TEST_DEVICE_PORT = 0x510  # devices.testdev.PortTestDevice, PORT_SIZE (16) ports
TEST_DEVICE_MMIO = 0xD000_0000
VIRTIO_BASE = 0xD100_0000  # virtio-mmio windows, VIRTIO_STRIDE apart (no interrupts: no in-kernel irqchip yet)
VIRTIO_STRIDE = 0x200
VIRTIO_MAX = 64
TSS_ADDR = 0xFFFB_D000  # KVM_SET_TSS_ADDR: three pages
IDENTITY_MAP_ADDR = 0xFFFB_C000  # KVM_SET_IDENTITY_MAP_ADDR: one page

# The MMIO hole below 4 GiB, as on a PC: every device above lives in it, RAM never does (RAM that does not fit
# below it continues from 4 GiB).
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 1 << 32
MMIO_HOLE_NAME = (f"the x86 MMIO hole (test device at {TEST_DEVICE_MMIO:#x}, virtio-mmio from {VIRTIO_BASE:#x}, "
                  f"KVM's TSS and identity map at {IDENTITY_MAP_ADDR:#x})")

# GDT selectors (Linux's boot protocol wants __BOOT_CS = 0x10, __BOOT_DS = 0x18)
BOOT_CS = 0x10
BOOT_DS = 0x18
