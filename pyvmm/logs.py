"""pyvmm's loggers, with ``logging`` imported when the first message is written.

``import logging`` brings ``traceback``, ``tokenize``, ``linecache``, ``textwrap``, ``string`` and ``weakref``
along: a few milliseconds here, far more under the arm64 lab's emulation, for messages that a run without -v and
without trouble never writes.  So every pyvmm module names its logger with ``getLogger(name)``, which gives a
stand-in that becomes ``logging.getLogger(name)`` on first use, and the command's setup (``configure``: the level
-v picks, the "pyvmm: NAME: MESSAGE" format) is applied then, or at once when logging is already loaded (pytest,
a program using pyvmm as a library).
"""

from __future__ import annotations

import sys

INFO = 20  # logging.INFO, logging.ERROR
ERROR = 40

_pending: dict | None = None  # configure()'s arguments for logging.basicConfig, until logging is imported


def configure(**basic_config) -> None:
    """``logging.basicConfig(**basic_config)``, now if logging is loaded, else when a pyvmm logger first logs."""
    global _pending
    logging = sys.modules.get("logging")
    if logging is not None:
        _pending = None
        logging.basicConfig(**basic_config)
    else:
        _pending = basic_config


def load():
    """Import logging now and apply configure()'s setup; call it before importing a library that logs (pyroute2),
    so that its messages follow -v and the format too."""
    global _pending
    import logging

    if _pending is not None:
        config, _pending = _pending, None
        logging.basicConfig(**config)
    return logging


class _Logger:
    """Stands for ``logging.getLogger(name)``: every attribute (info, warning, isEnabledFor...) is the logger's."""

    __slots__ = ("name", "_logger")

    def __init__(self, name: str):
        self.name = name
        self._logger = None

    def __getattr__(self, attr: str):
        logger = self._logger
        if logger is None:
            logger = self._logger = load().getLogger(self.name)
        return getattr(logger, attr)

    def __repr__(self) -> str:
        return f"<pyvmm logger {self.name}>"


def getLogger(name: str) -> "logging.Logger":  # noqa: N802 (logging's name for it)
    return _Logger(name)  # type: ignore[return-value]
