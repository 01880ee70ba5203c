"""``Record``: a small base for the plain data classes on ``pyvmm run``'s path (exits, outcomes, memslots...).

They were dataclasses.  ``@dataclass`` compiles each class's methods when the module is imported (a third of a
millisecond a class here, tens under the arm64 lab's emulation) and ``import dataclasses`` brings ``inspect``,
``ast`` and ``dis`` along: together most of the start-up of a small guest.  A ``Record`` subclass writes its own
``__init__`` and lists its fields in ``__slots__``; this base gives it what the dataclass gave: ``repr()``,
``==`` (same class, equal fields) and ``as_dict()`` (``dataclasses.asdict``, one level: the fields of these
classes are plain values).  Like a dataclass with ``eq=True``, a record is unhashable unless its class says
``__hash__ = Record.value_hash`` (those that were ``frozen=True``); such records are never modified.
"""

from __future__ import annotations


class Record:
    __slots__ = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]

    def value_hash(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({fields})"

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}
