"""This machine's side: the host tools (QEMU 10 from bookworm-backports, cross tools, the kernel build's tools,
installed with apt), and booting the arm64 host under QEMU TCG with its output streamed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from .cache import run, say
from .initramfs import EXIT_MARK, build_overlay
from .kernel import BUILD_TOOLS

HOST_TOOLS = {  # command -> Debian package (bookworm-backports where QEMU needs it)
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-aarch64-static": "qemu-user-static",
    "aarch64-linux-gnu-as": "binutils-aarch64-linux-gnu",
    "dtc": "device-tree-compiler",
    "cpio": "cpio",
}
BACKPORTS_SOURCE = "/etc/apt/sources.list.d/pyvmm-lab-backports.sources"
QEMU_MIN_MAJOR = 10
KERNEL_CMDLINE = "console=ttyAMA0 kvm-arm.mode=protected arm64.nolva rdinit=/init quiet"


def _present(tool: str) -> bool:
    return os.path.exists(tool) if tool.startswith("/") else shutil.which(tool) is not None


def ensure_host_tools() -> None:
    """Install what is missing: HOST_TOOLS from bookworm-backports (QEMU 10), BUILD_TOOLS from the usual suites."""
    backports = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if not _present(cmd)})
    plain = sorted({pkg for tool, pkg in BUILD_TOOLS.items() if not _present(tool)})
    if shutil.which("qemu-system-aarch64"):
        out = subprocess.run(["qemu-system-aarch64", "--version"], capture_output=True, text=True).stdout
        m = re.search(r"version (\d+)", out)
        if (not m or int(m.group(1)) < QEMU_MIN_MAJOR) and "qemu-system-arm" not in backports:
            backports.append("qemu-system-arm")
    if not backports and not plain:
        return
    if os.getuid() != 0:
        sys.exit(f"lab: install these Debian packages (QEMU from bookworm-backports): {' '.join(backports + plain)}")
    if backports and not os.path.exists(BACKPORTS_SOURCE):
        say("adding the bookworm-backports suite for QEMU 10")
        with open(BACKPORTS_SOURCE, "w") as f:
            f.write("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n"
                    "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    run(["apt-get", "update", "-qq"])
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if backports:
        say(f"installing {' '.join(backports)} (apt, bookworm-backports)")
        run(["apt-get", "install", "-y", "-qq", "-t", "bookworm-backports", *backports], env=env,
            stdout=subprocess.DEVNULL)
    if plain:
        say(f"installing {' '.join(plain)} (apt; to build the pKVM guest kernel)")
        run(["apt-get", "install", "-y", "-qq", *plain], env=env, stdout=subprocess.DEVNULL)


def boot(kernel: str, parts: list[str], command: list[str], protected: bool = True, interactive: bool = False,
         timeout: float = 3000, extra_cmdline: str = "") -> int:
    """Boot KERNEL with the initramfs PARTS plus the project overlay running COMMAND; its exit status."""
    cmdline = KERNEL_CMDLINE if protected else KERNEL_CMDLINE.replace("kvm-arm.mode=protected", "kvm-arm.mode=nvhe")
    cmdline = f"{cmdline} {extra_cmdline}".strip()
    with tempfile.TemporaryDirectory(prefix="pyvmm-lab-") as tmp:
        overlay = build_overlay(command, tmp)
        initrd = os.path.join(tmp, "initrd.cpio")
        with open(initrd, "wb") as out:
            for part in (*parts, overlay):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        qemu = ["qemu-system-aarch64", "-M", "virt,virtualization=on,gic-version=3", "-cpu", "max", "-smp", "2",
                "-m", "2G", "-accel", "tcg,thread=multi", "-nographic", "-no-reboot", "-kernel", kernel,
                "-initrd", initrd, "-append", cmdline]
        say(f"booting the arm64 host (QEMU TCG, {os.path.relpath(kernel, os.getcwd())}, {cmdline})")
        if interactive:
            return subprocess.call(qemu)
        return stream(qemu, timeout)


def stream(qemu: list[str], timeout: float) -> int:
    """Run QEMU, echo its console, and return the status the init printed after EXIT_MARK (1 if none)."""
    start = time.monotonic()
    proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    status = None
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith(EXIT_MARK):
                status = int(line[len(EXIT_MARK):] or 1)
                continue
            print(line, flush=True)
            if time.monotonic() - start > timeout:
                say(f"timeout after {timeout:.0f} s")
                break
    finally:
        if proc.poll() is None:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if status is None:
        say("the lab ended without reporting the command's exit status")
        return 1
    say(f"command exited with status {status} after {time.monotonic() - start:.0f} s")
    return status
