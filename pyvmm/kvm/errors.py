"""Errors raised by the KVM bindings: each carries the call, the errno and its meaning."""

from __future__ import annotations

import errno as errno_mod
import os


class PyvmmError(Exception):
    """Base of every error pyvmm raises on purpose (bad input, missing feature, failed call)."""


class KvmError(PyvmmError):
    """An ioctl (or other system call) on a KVM-related fd failed.

    ``call`` is the ioctl's uapi name (``KVM_RUN``, ``KVM_SET_USER_MEMORY_REGION2``...),
    ``errno`` the raw errno, ``meaning`` what the kernel means by it for this call.
    """

    def __init__(self, call: str, err: int, detail: str = ""):
        self.call = call
        self.errno = err
        self.errno_name = errno_mod.errorcode.get(err, f"E{err}")
        self.meaning = os.strerror(err)
        self.detail = detail
        self.exit = None  # KVM_RUN only: the exit KVM described with the error (exits.MemoryFault)
        text = f"{call} failed: {self.errno_name} ({self.meaning})"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class MissingFeature(PyvmmError):
    """The host lacks something pyvmm needs (a device node, a capability, a kernel option)."""


class ConfigError(PyvmmError):
    """The user asked for something that cannot work (bad size, overlap, unknown backing...)."""


class GuestMemoryError(PyvmmError):
    """The VMM could not read or write guest memory (address outside RAM, page not accessible)."""


class PrivatePageError(GuestMemoryError):
    """A protected guest's page the host may not touch (it was not shared): refused before any access.

    ``gpa`` is the first refused guest-physical address, ``write`` whether the refused access was a write."""

    def __init__(self, text: str, gpa: int, write: bool):
        super().__init__(text)
        self.gpa = gpa
        self.write = write
