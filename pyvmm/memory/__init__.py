"""Guest memory: backing stores (``backing``) and the memslot map with its safe accessor (``regions``)."""

from .backing import Backing, BackingKind, BackingSpec, backing_availability
from .regions import GuestMemory, MemoryRegion, MemoryRules

__all__ = ["Backing", "BackingKind", "BackingSpec", "GuestMemory", "MemoryRegion", "MemoryRules",
           "backing_availability"]
