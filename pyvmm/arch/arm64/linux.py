"""Loading a Linux arm64 ``Image`` by its header (Documentation/arch/arm64/booting.rst)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...kvm.errors import ConfigError

ARM64_MAGIC = b"ARM\x64"
HEADER = struct.Struct("<IIQQQQQQI")  # code0 code1 text_offset image_size flags res2 res3 res4 magic
SZ_2M = 2 << 20


@dataclass(frozen=True)
class ImageHeader:
    text_offset: int
    image_size: int
    flags: int


def is_arm64_image(data: bytes) -> bool:
    return len(data) >= 64 and data[56:60] == ARM64_MAGIC


def parse_header(data: bytes) -> ImageHeader:
    if not is_arm64_image(data):
        raise ConfigError("kernel image: no arm64 Image header (magic 'ARM\\x64' at offset 56)")
    _c0, _c1, text_offset, image_size, flags, *_ = struct.unpack_from("<IIQQQQQQ", data, 0)
    if image_size == 0:  # pre-3.17 kernels: text_offset is 0x80000, size unknown
        text_offset, image_size = 0x80000, len(data)
    if flags & 1:
        raise ConfigError("kernel image: big-endian kernels are not supported")
    return ImageHeader(text_offset, max(image_size, len(data)), flags)


def kernel_load_address(ram_base: int, header: ImageHeader) -> int:
    """2 MiB-aligned base + text_offset, as booting.rst asks."""
    base = (ram_base + SZ_2M - 1) & ~(SZ_2M - 1)
    return base + header.text_offset
