"""Kernels: Debian sid's arm64 kernel (the lab host, also a pyvmm guest), and the pKVM-guest kernel built from
sid's linux-source with allnoconfig plus pkvm-guest.config (Debian's kernel has no ARM_PKVM_GUEST)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from .cache import CACHE, digest, run, say, stamp_ok, write_stamp
from .debian import fetch_debs

KERNEL_PACKAGE = "linux-binary-7.2.13+deb14-arm64"
MODULES_PACKAGE = KERNEL_PACKAGE.replace("linux-binary-", "linux-modules-")
SOURCE_PACKAGE = "linux-source-7.2"  # arch all: /usr/src/linux-source-7.2.tar.xz
FRAGMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pkvm-guest.config")
CROSS_COMPILE = "aarch64-linux-gnu-"
RECIPE_VERSION = "1"  # bump when the build steps below change: the pKVM-guest kernel is rebuilt from scratch
PROGRESS_EVERY = 20  # seconds between progress lines of a kernel build
# What building the kernel runs on this machine (command or file -> Debian package; plain apt, not backports).
BUILD_TOOLS = {
    "make": "make",
    "gcc": "gcc",  # HOSTCC: kconfig, fixdep, the build's host programs
    "/usr/include/stdio.h": "libc6-dev",
    f"{CROSS_COMPILE}gcc": "gcc-aarch64-linux-gnu",
    "flex": "flex",  # kconfig's lexer
    "bison": "bison",  # kconfig's parser
    "bc": "bc",  # kernel/time/timeconst.bc
    "xz": "xz-utils",  # the source tarball
}


def debian_image() -> str:
    """.cache/lab/Image: the vmlinuz of Debian sid's arm64 kernel package."""
    image = os.path.join(CACHE, "Image")
    deb = fetch_debs([KERNEL_PACKAGE])[KERNEL_PACKAGE]
    key = digest(os.path.basename(deb))
    if stamp_ok(image, key):
        return image
    say(f"extracting the kernel from {os.path.basename(deb)}")
    with tempfile.TemporaryDirectory() as tmp:
        run(["dpkg-deb", "-x", deb, tmp])
        found = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp) for f in fs if f.startswith("vmlinuz")]
        if not found:
            sys.exit(f"lab: no vmlinuz in {deb}")
        shutil.copy(found[0], image)
    write_stamp(image, key)
    return image


# --- the pKVM-guest kernel ----------------------------------------------------------
def linux_source() -> tuple[str, str]:
    """.cache/lab/linux-source: sid's kernel source tree, extracted once per .deb; returns (tree, .deb file name)."""
    deb = fetch_debs([SOURCE_PACKAGE])[SOURCE_PACKAGE]
    tree = os.path.join(CACHE, "linux-source")
    key = digest(os.path.basename(deb))
    if stamp_ok(tree, key):
        return tree, os.path.basename(deb)
    say(f"extracting the kernel source from {os.path.basename(deb)}")
    partial = tree + ".partial"
    for d in (tree, partial):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(partial)
    deb_tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
    tarball = subprocess.Popen(["tar", "-xO", "--wildcards", "./usr/src/linux-source-*.tar.xz"], stdin=deb_tar.stdout,
                               stdout=subprocess.PIPE)
    deb_tar.stdout.close()
    untar = subprocess.Popen(["tar", "-xJ", "--strip-components=1", "-C", partial], stdin=tarball.stdout)
    tarball.stdout.close()
    if untar.wait() or tarball.wait() or deb_tar.wait() or not os.path.isfile(os.path.join(partial, "Makefile")):
        sys.exit(f"lab: could not extract the kernel source tarball from {deb}")
    os.rename(partial, tree)
    write_stamp(tree, key)
    return tree, os.path.basename(deb)


def cross_gcc_version() -> str:
    out = subprocess.run([f"{CROSS_COMPILE}gcc", "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0]


def config_values(text: str) -> dict[str, str]:
    """{CONFIG_NAME: value} of a .config or fragment; "# CONFIG_X is not set" is "n"."""
    values = {}
    for line in text.splitlines():
        if m := re.match(r"(CONFIG_\w+)=(.*)$", line.strip()):
            values[m[1]] = m[2]
        elif m := re.match(r"# (CONFIG_\w+) is not set$", line.strip()):
            values[m[1]] = "n"
    return values


def pkvm_guest_image() -> str:
    """.cache/lab/pkvm-guest/Image, built when the source .deb, the fragment, the cross gcc or the recipe changed."""
    source, deb = linux_source()
    with open(FRAGMENT) as f:
        fragment = f.read()
    gcc = cross_gcc_version()
    out = os.path.join(CACHE, "pkvm-guest")
    image = os.path.join(out, "Image")
    key = digest(RECIPE_VERSION, deb, fragment, gcc)
    if stamp_ok(image, key):
        return image
    build = os.path.join(out, "build")  # make's O=: kept between builds that differ only in the fragment
    tree_key = digest(RECIPE_VERSION, deb, gcc)
    if not stamp_ok(build, tree_key):
        shutil.rmtree(build, ignore_errors=True)
    os.makedirs(build, exist_ok=True)
    write_stamp(build, tree_key)
    make = ["make", "-C", source, f"O={build}", "ARCH=arm64", f"CROSS_COMPILE={CROSS_COMPILE}"]
    configure(make, build, fragment)
    compile_image(make, build)
    shutil.copy(os.path.join(build, "arch", "arm64", "boot", "Image"), image + ".partial")
    os.replace(image + ".partial", image)
    write_stamp(image, key)
    say(f"built the pKVM guest kernel: {os.path.relpath(image, os.getcwd())}, "
        f"{os.path.getsize(image) / (1 << 20):.1f} MiB, {linux_banner(image)}")
    return image


def configure(make: list[str], build: str, fragment: str) -> None:
    """allnoconfig with the fragment's values forced (KCONFIG_ALLCONFIG), olddefconfig, then every value the
    fragment asks for is checked in the final .config."""
    say(f"configuring the pKVM guest kernel: allnoconfig + {os.path.basename(FRAGMENT)}")
    for target, env in (("allnoconfig", {"KCONFIG_ALLCONFIG": FRAGMENT}), ("olddefconfig", {})):
        done = subprocess.run([*make, target], env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if done.returncode:
            sys.exit(f"lab: make {target} failed for the pKVM guest kernel:\n{done.stdout[-4000:]}")
    with open(os.path.join(build, ".config")) as f:
        got = config_values(f.read())
    wrong = [f"{name}={want} (got {got.get(name, 'n')})" for name, want in config_values(fragment).items()
             if got.get(name, "n") != want]
    if wrong:
        sys.exit(f"lab: options of {FRAGMENT} that did not stick (unmet dependencies? see their Kconfig "
                 f"'depends on'): " + ", ".join(wrong))


def compile_image(make: list[str], build: str) -> None:
    """make Image on every core, a progress line every PROGRESS_EVERY seconds, the log's tail if it fails."""
    log = os.path.join(build, "build.log")
    jobs = os.cpu_count() or 2
    say(f"building the pKVM guest kernel (make -j{jobs} Image; log in {os.path.relpath(log, os.getcwd())})")
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen([*make, f"-j{jobs}", "Image"], stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    proc.wait(PROGRESS_EVERY)
                    break
                except subprocess.TimeoutExpired:
                    say(f"building the pKVM guest kernel: {compiled(log)} objects compiled, "
                        f"{time.monotonic() - start:.0f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode:
        with open(log, errors="replace") as f:
            tail = f.read().splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        sys.exit(f"lab: the pKVM guest kernel build failed (make status {proc.returncode}); full log: {log}")
    say(f"compiled the pKVM guest kernel: {compiled(log)} objects in {time.monotonic() - start:.0f} s")


def compiled(log: str) -> int:
    with open(log, errors="replace") as f:
        return sum(1 for line in f if line.startswith("  CC "))


def linux_banner(image: str) -> str:
    """The "Linux version ..." string of an uncompressed arm64 Image."""
    with open(image, "rb") as f:
        m = re.search(rb"Linux version [0-9][^\n\0]{0,200}?#[0-9][^\n\0]{0,100}", f.read())  # linux_banner
    return m[0].decode(errors="replace").strip() if m else "no Linux version string"
