"""The common part of every KVM file-descriptor wrapper: ownership and closing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from .errors import PyvmmError


def close_all(closers: Iterable[Callable[[], None]]) -> None:
    """Call every closer even when some fail, then raise the first failure (teardown leaks nothing)."""
    first: BaseException | None = None
    for close in closers:
        try:
            close()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the rest are closed
            if first is None:
                first = exc
    if first is not None:
        raise first


class OwnedFd:
    """Owns one fd; closes it exactly once (``close()``, ``with``, or garbage collection)."""

    kind = "fd"

    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise PyvmmError(f"{self.kind} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self._fd}>"
