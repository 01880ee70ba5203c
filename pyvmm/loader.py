"""Guest image loading: flat binaries and ELF executables into guest memory."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from .paths import open_regular, read_regular
from .kvm.errors import ConfigError
from .memory.regions import GuestMemory
from .record import Record

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183


class LoadedImage(Record):
    __slots__ = ("entry", "low", "high", "elf_machine", "elf_class")
    __hash__ = Record.value_hash

    def __init__(self, entry: int, low: int, high: int, elf_machine: int | None = None, elf_class: int | None = None):
        self.entry = entry
        self.low = low
        self.high = high
        self.elf_machine = elf_machine  # None for flat binaries
        self.elf_class = elf_class  # 1 = 32-bit, 2 = 64-bit


MAX_IMAGE = 1 << 30  # what pyvmm reads into memory for a kernel, firmware or initrd


def read_image(path: str, what: str = "guest image") -> bytes:
    """A kernel, firmware or initrd: a regular, non-empty file of at most MAX_IMAGE bytes (paths.read_regular)."""
    return read_regular(path, what, MAX_IMAGE)


class ImageFile:
    """A kernel, firmware or initrd opened for loading, with read_image's checks: ``head``, its first HEAD bytes,
    tell its format; ``load()`` copies it (or a part) into guest memory a chunk at a time, so that a kernel or
    initrd is never held whole in pyvmm's memory (a 48 MB arm64 Image used to cost twice that again); ``read()``
    gives the whole file as bytes, for the small ones that need parsing (ELF firmware).  Close it (``with``)."""

    HEAD = 4096  # every header pyvmm reads (ELF's first bytes, a bzImage's setup header, an arm64 Image's) is in it

    def __init__(self, path: str, what: str = "guest image"):
        self.path = path
        self.what = what
        self.fd, self.size = open_regular(path, what, MAX_IMAGE)
        try:
            self.head = os.pread(self.fd, self.HEAD, 0)
        except BaseException:
            self.close()
            raise

    def read(self) -> bytes:
        data = os.pread(self.fd, self.size + 1, 0)
        if len(data) != self.size:
            raise ConfigError(f"{self.what} {self.path}: changed while being loaded")
        return data

    def load(self, memory: GuestMemory, gpa: int, offset: int = 0) -> int:
        """Copy the file from ``offset`` to its end into guest memory at ``gpa``; returns the bytes copied."""
        length = self.size - offset
        memory.write_file(gpa, self.fd, offset, length, f"{self.what} {self.path}")
        return length

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


Avoid = Sequence[tuple[int, int, str]]  # (start, end, what): ranges an image must not overlap


def _check_fits(memory: GuestMemory, what: str, gpa: int, size: int, avoid: Avoid = ()) -> None:
    for start, end, name in avoid:
        if gpa < end and start < gpa + size:
            raise ConfigError(f"{what} [{gpa:#x}, {gpa + size:#x}) overlaps {name} at [{start:#x}, {end:#x}); "
                              "load it elsewhere")
    pos = gpa
    while pos < gpa + size:
        region = memory.find(pos)
        if region is None:
            raise ConfigError(f"{what} [{gpa:#x}, {gpa + size:#x}) does not fit in guest RAM "
                              f"(nothing at {pos:#x}); give the guest more memory")
        pos = region.end


def load_flat(memory: GuestMemory, data: bytes | ImageFile, gpa: int, what: str = "image",
              avoid: Avoid = ()) -> LoadedImage:
    """A flat binary at ``gpa``: bytes, or an ImageFile (copied from the file a chunk at a time)."""
    size = data.size if isinstance(data, ImageFile) else len(data)
    _check_fits(memory, what, gpa, size, avoid)
    if isinstance(data, ImageFile):
        data.load(memory, gpa)
    else:
        memory.write(gpa, data)
    return LoadedImage(entry=gpa, low=gpa, high=gpa + size)


def load_elf(memory: GuestMemory, data: bytes, what: str = "ELF image", avoid: Avoid = ()) -> LoadedImage:
    if len(data) < 52 or not is_elf(data):
        raise ConfigError(f"{what}: not an ELF file")
    elf_class, endian = data[4], data[5]
    if endian != 1:
        raise ConfigError(f"{what}: big-endian ELF is not supported")
    if elf_class == 2:
        (e_machine,) = struct.unpack_from("<H", data, 18)
        e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
        ph_fmt = "<IIQQQQQQ"  # type flags offset vaddr paddr filesz memsz align
    elif elf_class == 1:
        (e_machine,) = struct.unpack_from("<H", data, 18)
        e_entry, e_phoff = struct.unpack_from("<II", data, 24)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
        ph_fmt = "<IIIIIIII"  # type offset vaddr paddr filesz memsz flags align
    else:
        raise ConfigError(f"{what}: unknown ELF class {elf_class}")
    low, high = None, None
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if off + struct.calcsize(ph_fmt) > len(data):
            raise ConfigError(f"{what}: truncated program header table")
        fields = struct.unpack_from(ph_fmt, data, off)
        if elf_class == 2:
            p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = fields
        else:
            p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _flags, _align = fields
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_offset + p_filesz > len(data):
            raise ConfigError(f"{what}: segment {i} extends past the end of the file")
        if p_memsz < p_filesz:
            raise ConfigError(f"{what}: segment {i} is malformed: p_memsz {p_memsz:#x} is smaller than "
                              f"p_filesz {p_filesz:#x}")
        _check_fits(memory, f"{what} segment {i}", p_paddr, p_memsz, avoid)
        memory.write(p_paddr, data[p_offset:p_offset + p_filesz] + bytes(p_memsz - p_filesz))
        low = p_paddr if low is None else min(low, p_paddr)
        high = p_paddr + p_memsz if high is None else max(high, p_paddr + p_memsz)
    if low is None:
        raise ConfigError(f"{what}: no loadable segments")
    return LoadedImage(entry=e_entry, low=low, high=high, elf_machine=e_machine, elf_class=elf_class)
