"""The lab's cache (.cache/lab): paths, content keys and stamps, and the lock that serialises builds and boots."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, ".cache", "lab")


def say(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def stamp_ok(path: str, key: str) -> bool:
    """True when PATH exists and PATH.stamp holds KEY (the key of the inputs PATH was built from)."""
    try:
        with open(path + ".stamp") as f:
            return f.read() == key and os.path.exists(path)
    except OSError:
        return False


def write_stamp(path: str, key: str) -> None:
    with open(path + ".stamp", "w") as f:
        f.write(key)


def read_stamp(path: str) -> str:
    with open(path + ".stamp") as f:
        return f.read()


@contextlib.contextmanager
def one_lab_at_a_time():
    """The machine has two cores and a lab boot or a kernel build takes both: a second one waits for the first."""
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, "boot.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another lab is running on this machine; waiting for it to end")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
