"""Loading a Linux arm64 ``Image`` by its header (Documentation/arch/arm64/booting.rst)."""

from __future__ import annotations

import struct

from ...kvm.errors import ConfigError
from ...record import Record

ARM64_MAGIC = b"ARM\x64"
HEADER = struct.Struct("<IIQQQQQQI")  # code0 code1 text_offset image_size flags res2 res3 res4 magic
SZ_2M = 2 << 20


class ImageHeader(Record):
    __slots__ = ("text_offset", "image_size", "flags")
    __hash__ = Record.value_hash

    def __init__(self, text_offset: int, image_size: int, flags: int):
        self.text_offset = text_offset
        self.image_size = image_size
        self.flags = flags


def is_arm64_image(data: bytes) -> bool:
    return len(data) >= 64 and data[56:60] == ARM64_MAGIC


def parse_header(data: bytes, file_size: int | None = None) -> ImageHeader:
    """``data``: the Image's first bytes at least (the whole of it by default); ``file_size``: the Image's size."""
    if file_size is None:
        file_size = len(data)
    if not is_arm64_image(data):
        raise ConfigError("kernel image: no arm64 Image header (magic 'ARM\\x64' at offset 56)")
    _c0, _c1, text_offset, image_size, flags, *_ = struct.unpack_from("<IIQQQQQQ", data, 0)
    if image_size == 0:  # pre-3.17 kernels: text_offset is 0x80000, size unknown
        text_offset, image_size = 0x80000, file_size
    if flags & 1:
        raise ConfigError("kernel image: big-endian kernels are not supported")
    return ImageHeader(text_offset, max(image_size, file_size), flags)


def kernel_load_address(ram_base: int, header: ImageHeader) -> int:
    """2 MiB-aligned base + text_offset, as booting.rst asks."""
    base = (ram_base + SZ_2M - 1) & ~(SZ_2M - 1)
    return base + header.text_offset
