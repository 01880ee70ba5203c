"""Booting a Linux bzImage with the x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry.

The protected-mode kernel goes to its preferred address (1 MiB if not
relocatable), the zero page (``struct boot_params``) is filled from the image's
setup header plus an e820 map, the command line and an optional initrd; the
vCPU enters ``startup_64`` (load address + 0x200) in long mode with RSI
pointing at the zero page.
"""

from __future__ import annotations

import struct

from ...kvm.errors import ConfigError
from ...loader import ImageFile
from ...memory.regions import GuestMemory
from ...record import Record
from . import layout

HDR_OFFSET = 0x1F1
HDRS_MAGIC = b"HdrS"
E820_RAM = 1
# Offsets in struct boot_params (arch/x86/include/uapi/asm/bootparam.h)
BP_E820_ENTRIES = 0x1E8
BP_HDR = 0x1F1
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
# Offsets in the setup header, relative to the start of the image / boot_params
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
HEADER = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
RELOCATABLE_KERNEL = 0x234
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
MIN_VERSION = 0x20C  # 64-bit entry point and xloadflags


class LinuxBoot(Record):
    __slots__ = ("entry", "boot_params", "kernel_addr", "kernel_size", "initrd")
    __hash__ = Record.value_hash

    def __init__(self, entry: int, boot_params: int, kernel_addr: int, kernel_size: int,
                 initrd: tuple[int, int] | None):
        self.entry = entry
        self.boot_params = boot_params
        self.kernel_addr = kernel_addr
        self.kernel_size = kernel_size
        self.initrd = initrd


def is_bzimage(data: bytes) -> bool:
    return len(data) > 0x210 and data[HEADER:HEADER + 4] == HDRS_MAGIC


def e820_map(ram: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """boot_params' E820 table (addr, size, type) for the guest's RAM ranges [start, end), the first from 0: it
    loses the legacy hole [EBDA, 1 MiB); the others (RAM above the MMIO hole) are listed whole."""
    (_, low_end), *rest = ram
    return ([(0, layout.EBDA_START, E820_RAM), (layout.HIGH_MEMORY, low_end - layout.HIGH_MEMORY, E820_RAM)]
            + [(start, end - start, E820_RAM) for start, end in rest])


def load_bzimage(memory: GuestMemory, ram: list[tuple[int, int]], image: ImageFile, cmdline: str,
                 initrd: ImageFile | None = None) -> LinuxBoot:
    """``ram``: the guest's RAM ranges [start, end), the first from 0 (the kernel and initrd go there).  The kernel
    and the initrd are copied from their files into guest memory a chunk at a time (``ImageFile.load``)."""
    ram_size = ram[0][1]
    data = image.head  # the setup header (the boot sector and its first fields: well inside ImageFile.HEAD)
    if not is_bzimage(data):
        raise ConfigError("kernel image: no 'HdrS' setup header (not a bzImage)")
    (version,) = struct.unpack_from("<H", data, VERSION)
    if version < MIN_VERSION:
        raise ConfigError(f"kernel image: boot protocol {version >> 8}.{version & 0xff} is older than 2.12")
    if not data[XLOADFLAGS] & XLF_KERNEL_64:
        raise ConfigError("kernel image: has no 64-bit entry point (XLF_KERNEL_64)")
    setup_sects = data[SETUP_SECTS] or 4
    setup_size = (setup_sects + 1) * 512
    kernel_size = max(image.size - setup_size, 0)  # the protected-mode kernel, after the setup sectors
    (init_size,) = struct.unpack_from("<I", data, INIT_SIZE)
    (pref_address,) = struct.unpack_from("<Q", data, PREF_ADDRESS)
    relocatable = data[RELOCATABLE_KERNEL]
    kernel_addr = pref_address if relocatable and pref_address else layout.KERNEL_LOAD
    if kernel_addr + max(init_size, kernel_size) > ram_size:
        raise ConfigError(f"kernel needs {(kernel_addr + init_size) >> 20} MiB of RAM at least; "
                          f"the guest has {ram_size >> 20} MiB")
    if kernel_size:
        image.load(memory, kernel_addr, offset=setup_size)

    cmd = cmdline.encode() + b"\0"
    (cmdline_size,) = struct.unpack_from("<I", data, CMDLINE_SIZE)
    if len(cmd) > min(cmdline_size + 1, layout.CMDLINE_MAX):
        raise ConfigError(f"kernel command line is {len(cmd) - 1} bytes; this kernel takes {cmdline_size}")
    memory.write(layout.CMDLINE_ADDR, cmd)

    # Zero page: the image's setup header, then what the loader fills in.
    hdr_end = 0x202 + data[0x201]
    params = bytearray(4096)
    params[BP_HDR:hdr_end] = data[HDR_OFFSET:hdr_end]
    params[TYPE_OF_LOADER] = 0xFF
    params[LOADFLAGS] |= CAN_USE_HEAP | LOADED_HIGH
    struct.pack_into("<H", params, HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", params, CMD_LINE_PTR, layout.CMDLINE_ADDR)
    initrd_at = None
    if initrd:
        (initrd_max,) = struct.unpack_from("<I", data, INITRD_ADDR_MAX)
        top = min(ram_size, initrd_max + 1)
        addr = (top - initrd.size) & ~0xFFF
        if addr < kernel_addr + init_size:
            raise ConfigError(f"initrd of {initrd.size} bytes does not fit in guest RAM above the kernel")
        initrd.load(memory, addr)
        struct.pack_into("<II", params, RAMDISK_IMAGE, addr, initrd.size)
        initrd_at = (addr, initrd.size)
    e820 = e820_map(ram)
    for i, (addr, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", params, BP_E820_TABLE + i * 20, addr, size, kind)
    params[BP_E820_ENTRIES] = len(e820)
    memory.write(layout.BOOT_PARAMS_ADDR, bytes(params))
    return LinuxBoot(entry=kernel_addr + 0x200, boot_params=layout.BOOT_PARAMS_ADDR,
                     kernel_addr=kernel_addr, kernel_size=kernel_size, initrd=initrd_at)
