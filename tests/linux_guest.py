"""Helpers for booting the lab's Linux guest with Debian's virtio modules (tests/test_virtio_linux.py).

The lab puts two files in its host (scripts/lab): /opt/lab/Image (Debian sid's 7.2 arm64 kernel) and
/opt/lab/virtio-initrd.cpio (busybox, Debian's virtio_mmio, virtio_blk, virtio_rng, failover, net_failover
and virtio_net modules, and an init that loads them and prints one ``pyvmm-virtio:`` line per step).  A test
gives the guest its shell script by appending a second newc archive holding ``/pyvmm-script``: Linux
unpacks concatenated archives in turn, and the init sources that file (in a subshell, so it can use the
init's ``say`` and ``waitfor PATH [SECONDS]``) when it is there.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time

import pytest

from tests.arm64 import require_arm64_kvm

IMAGE = "/opt/lab/Image"
VIRTIO_INITRD = "/opt/lab/virtio-initrd.cpio"
# ttyS0 carries the kernel's and the init's lines (hvc0 does not exist before virtio_mmio is loaded);
# oops=panic panic=-1: a guest crash resets (PSCI SYSTEM_RESET) and ends the run at once
CMDLINE = "console=ttyS0 earlycon=uart8250,mmio,0x9000000 oops=panic panic=-1 quiet"
MODULES = ["virtio_mmio", "virtio_blk", "virtio_rng", "failover", "net_failover", "virtio_net"]
MARK = "pyvmm-virtio: "


def require_virtio_linux(*api: str) -> None:
    """Skip unless this is the lab (arm64 KVM, the lab's Image and virtio initramfs) and ``Vm`` has ``api``."""
    require_arm64_kvm()
    for path in (IMAGE, VIRTIO_INITRD):
        if not os.path.exists(path):
            pytest.skip(f"{path} is made by the lab (scripts/lab test tests/test_virtio_linux.py)")
    from pyvmm.vm import Vm

    missing = [name for name in api if not hasattr(Vm, name)]
    if missing:
        pytest.skip(f"pyvmm has no {', '.join(missing)} yet (virtio-mmio is not wired into the VM)")


# --- newc archives ----------------------------------------------------------------------------------
def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _newc_entry(ino: int, name: str, mode: int, data: bytes) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    return _pad4(header + encoded) + _pad4(data)


def newc(files: dict[str, bytes | str]) -> bytes:
    """A newc ("070701") cpio archive of regular files (mode 0755, root-owned); parent directories are
    created for names with slashes.  Ends with the TRAILER!!! entry, padded to 4 bytes."""
    out, ino, dirs = [], 1, set()
    for name, data in files.items():
        name = name.lstrip("/")
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                out.append(_newc_entry(ino, d, 0o040755, b""))
                ino += 1
        out.append(_newc_entry(ino, name, 0o100755, data.encode() if isinstance(data, str) else data))
        ino += 1
    out.append(_newc_entry(0, "TRAILER!!!", 0, b""))
    return b"".join(out)


def initrd_with_script(directory: str, script: str) -> str:
    """The lab's virtio initramfs with ``/pyvmm-script`` appended as a second archive; returns its path."""
    path = os.path.join(directory, "initrd.cpio")
    with open(VIRTIO_INITRD, "rb") as f:
        base = f.read()
    with open(path, "wb") as f:
        f.write(_pad4(base))
        f.write(newc({"pyvmm-script": script}))
    return path


# --- running the guest ------------------------------------------------------------------------------
def boot(directory: str, script: str | None, setup=None, vcpus: int = 1, timeout: float = 300,
         protected: bool = False, memory: int = 256 << 20, image: str = IMAGE, dma_pool: int | None = None):
    """Boot the virtio guest with ``script`` (None: the init only loads the modules and reports).
    ``setup(vm)`` adds the devices.  Returns (outcome, console text)."""
    from pyvmm.vm import Vm

    initrd = VIRTIO_INITRD if script is None else initrd_with_script(directory, script)
    with Vm(protected=protected, dma_pool=dma_pool) as vm:
        vm.add_memory(memory)
        vm.create_vcpus(vcpus)
        if setup is not None:
            setup(vm)
        vm.boot(image, initrd=initrd, cmdline=CMDLINE)
        outcome = vm.run(timeout=timeout)
        console = vm.console.text()
    return outcome, console


def lines(console: str) -> list[str]:
    """The console's lines without carriage returns (hvc0 is a tty: ONLCR gives CRLF)."""
    return [line.rstrip("\r") for line in console.replace("\r\n", "\n").split("\n")]


def marked(console: str, prefix: str) -> list[str]:
    """The text after ``prefix`` on every console line that starts with it."""
    return [line[len(prefix):] for line in lines(console) if line.startswith(prefix)]


def assert_modules_loaded(console: str) -> None:
    got = marked(console, MARK + "insmod ")
    assert got == [f"{m} ok" for m in MODULES], "\n".join(lines(console)[-80:])


class Cli:
    """``python -m pyvmm run ...`` with pipes: ``send()`` writes to its stdin, ``expect()`` waits for a line."""

    def __init__(self, args: list[str], cwd: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", *args], cwd=cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.seen: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._lines.put(raw.decode(errors="replace").rstrip("\r\n"))
        self._lines.put(None)

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def expect(self, match, timeout: float) -> str:
        """The first new line for which ``match(line)`` is true; fails with everything seen on timeout or EOF."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no matching line within {timeout:.0f} s; output:\n" + "\n".join(self.seen[-80:]))
            if line is None:
                pytest.fail("pyvmm ended before a matching line; output:\n" + "\n".join(self.seen[-80:]))
            self.seen.append(line)
            if match(line):
                return line

    def finish(self, timeout: float) -> int:
        """Close stdin and wait for the exit status (the rest of the output goes into ``seen``)."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"pyvmm did not end within {timeout:.0f} s; output:\n" + "\n".join(self.seen[-80:]))
        while (line := self._lines.get(timeout=10)) is not None:
            self.seen.append(line)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
