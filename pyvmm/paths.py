"""What a path names, checked before pyvmm opens it: a FIFO with no writer would block ``open()`` forever and
``/dev/zero`` would read until memory runs out, so every file pyvmm reads or maps is stat'ed first and must be
the kind it expects.  Errors are one ``ConfigError`` line naming the path, what was found and what was expected."""

from __future__ import annotations

import os
import stat

from .kvm.errors import ConfigError

_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")]


def file_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a special file"


def stat_path(path: str, what: str) -> os.stat_result:
    """``os.stat``, its failures as one line (``what``: how the user named it, e.g. ``--initrd``)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{what} {path}: permission denied") from None
    except OSError as err:
        raise ConfigError(f"{what} {path}: {err.strerror}") from None


def regular_file(path: str, what: str, empty_ok: bool = False) -> os.stat_result:
    """``path`` must be a regular file (and not empty unless ``empty_ok``), else one ConfigError line."""
    st = stat_path(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path}: {file_kind(st.st_mode)}; a regular file is expected")
    if st.st_size == 0 and not empty_ok:
        raise ConfigError(f"{what} {path}: file is empty")
    return st


def open_regular(path: str, what: str, limit: int) -> tuple[int, int]:
    """A read-only fd on a regular file of at most ``limit`` bytes, and its size; anything else is refused before it
    is opened (and opened O_NONBLOCK, so a file swapped for a FIFO after the check cannot block either)."""
    st = regular_file(path, what)
    if st.st_size > limit:
        raise ConfigError(f"{what} {path}: {st.st_size} bytes, more than the {limit >> 20} MiB pyvmm loads")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        raise ConfigError(f"{what} {path}: permission denied") from None
    except OSError as err:
        raise ConfigError(f"{what} {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path}: {file_kind(st.st_mode)}; a regular file is expected")
        if st.st_size > limit:
            raise ConfigError(f"{what} {path}: more than the {limit >> 20} MiB pyvmm loads")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_regular(path: str, what: str, limit: int) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (``open_regular``'s checks)."""
    fd, _ = open_regular(path, what, limit)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} {path}: more than the {limit >> 20} MiB pyvmm loads")
    return data
