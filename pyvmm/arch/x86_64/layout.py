"""x86_64 guest physical layout used by pyvmm (RAM starts at 0)."""

GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000  # Linux zero page
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four pages: 4 GiB identity map with 2 MiB pages
STACK_TOP = 0x80000  # per vCPU: STACK_TOP - id * STACK_SIZE
STACK_SIZE = 0x1000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
REAL_MODE_DEFAULT_LOAD = 0x8000
KERNEL_LOAD = 0x100000  # flat/ELF 64-bit firmware and Linux's protected-mode part
EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000
MIN_RAM = 2 << 20

# Platform devices
COM1_PORT = 0x3F8
DEBUG_EXIT_PORT = 0x501
RESET_CONTROL_PORT = 0xCF9
TEST_DEVICE_MMIO = 0xD000_0000
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

# GDT selectors (Linux's boot protocol wants __BOOT_CS = 0x10, __BOOT_DS = 0x18)
BOOT_CS = 0x10
BOOT_DS = 0x18
