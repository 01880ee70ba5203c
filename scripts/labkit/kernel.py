"""Kernels: Debian sid's arm64 kernel (the lab host, also a pyvmm guest), and kernels built from sid's
linux-source with allnoconfig plus a fragment of kernels/ (and its patches): the pKVM-guest kernel
(Debian's kernel has no ARM_PKVM_GUEST) and lab host kernels such as dma-heaps."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from .cache import CACHE, digest, run, say, stamp_ok, write_stamp
from .debian import fetch_debs

KERNEL_PACKAGE = "linux-binary-7.2.13+deb14-arm64"
MODULES_PACKAGE = KERNEL_PACKAGE.replace("linux-binary-", "linux-modules-")
# The lab host's page size (scripts/lab --pages): Debian builds the same kernel with 16 KiB pages as the -16k flavour.
PAGE_SIZES = ("4k", "16k")


def kernel_package(pages: str = "4k") -> str:
    return KERNEL_PACKAGE if pages == "4k" else f"{KERNEL_PACKAGE}-{pages}"


def modules_package(pages: str = "4k") -> str:
    return kernel_package(pages).replace("linux-binary-", "linux-modules-")


SOURCE_PACKAGE = "linux-source-7.2"  # arch all: /usr/src/linux-source-7.2.tar.xz
KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")  # NAME.config, NAME/*.patch
CROSS_COMPILE = "aarch64-linux-gnu-"
RECIPE_VERSION = "1"  # bump when the build steps below change: every built kernel is rebuilt from scratch
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
    "patch": "patch",  # kernels/NAME/*.patch
}


def debian_image(pages: str = "4k") -> str:
    """.cache/lab/Image: the vmlinuz of Debian sid's arm64 kernel package; with PAGES "16k", .cache/lab/Image-16k,
    that of its 16 KiB-page flavour."""
    image = os.path.join(CACHE, "Image" if pages == "4k" else f"Image-{pages}")
    package = kernel_package(pages)
    deb = fetch_debs([package])[package]
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


# --- kernels built from sid's source: kernels/NAME.config (+ kernels/NAME/*.patch) ----------------------
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
    """The cross compiler's and the cross linker's versions (binutils is a package of its own): part of every
    built kernel's key."""
    lines = [subprocess.run([f"{CROSS_COMPILE}{tool}", "--version"], capture_output=True, text=True,
                            check=True).stdout.splitlines()[0] for tool in ("gcc", "ld")]
    return " / ".join(lines)


def config_values(text: str) -> dict[str, str]:
    """{CONFIG_NAME: value} of a .config or fragment; "# CONFIG_X is not set" is "n"."""
    values = {}
    for line in text.splitlines():
        if m := re.match(r"(CONFIG_\w+)=(.*)$", line.strip()):
            values[m[1]] = m[2]
        elif m := re.match(r"# (CONFIG_\w+) is not set$", line.strip()):
            values[m[1]] = "n"
    return values


@dataclass(frozen=True)
class Recipe:
    """A kernel of kernels/: NAME.config (allnoconfig + these values) and the patches in kernels/NAME/, applied
    in name order.  The fragment's header says what the kernel is for: ``# role: host`` (the lab boots it:
    ``scripts/lab run --kernel NAME``) or ``# role: guest`` (pyvmm boots it inside the lab), and for a host
    ``# cmdline: ...``, words added to the lab's kernel command line."""

    name: str
    fragment: str  # the file
    text: str
    patches: tuple[str, ...]

    @property
    def role(self) -> str:
        return _header(self.text, "role") or "guest"

    @property
    def cmdline(self) -> str:
        return _header(self.text, "cmdline")

    def patch_texts(self) -> list[str]:
        out = []
        for p in self.patches:
            with open(p) as f:
                out.append(f.read())
        return out


def _header(text: str, field: str) -> str:
    m = re.search(rf"^# {field}: (.*)$", text, re.M)
    return m[1].strip() if m else ""


def recipes() -> dict[str, Recipe]:
    out = {}
    for fn in sorted(os.listdir(KERNELS)):
        if fn.endswith(".config"):
            name = fn[: -len(".config")]
            with open(os.path.join(KERNELS, fn)) as f:
                text = f.read()
            pdir = os.path.join(KERNELS, name)
            patches = tuple(sorted(os.path.join(pdir, p) for p in os.listdir(pdir) if p.endswith(".patch"))) \
                if os.path.isdir(pdir) else ()
            out[name] = Recipe(name, os.path.join(KERNELS, fn), text, patches)
    return out


def recipe(name: str) -> Recipe:
    known = recipes()
    if name not in known:
        sys.exit(f"lab: no kernel {name!r} (kernels: {', '.join(known)}; each is scripts/labkit/kernels/NAME.config)")
    return known[name]


def build_kernel(name: str) -> str:
    """.cache/lab/kernels/NAME/Image, built when the source .deb, the fragment, the patches, the cross gcc or the
    recipe changed (the stamp holds a hash of them all)."""
    r = recipe(name)
    source, deb = linux_source()
    gcc = cross_gcc_version()
    patches = r.patch_texts()
    out = os.path.join(CACHE, "kernels", name)
    image = os.path.join(out, "Image")
    key = digest(RECIPE_VERSION, deb, r.text, gcc, *patches)
    if stamp_ok(image, key):
        return image
    os.makedirs(out, exist_ok=True)
    if patches:
        source = patched_source(source, r, digest(RECIPE_VERSION, deb, *patches))
    build = os.path.join(out, "build")  # make's O=: kept between builds that differ only in the fragment
    tree_key = digest(RECIPE_VERSION, deb, gcc, *patches)
    if not stamp_ok(build, tree_key):
        shutil.rmtree(build, ignore_errors=True)
    os.makedirs(build, exist_ok=True)
    write_stamp(build, tree_key)
    make = ["make", "-C", source, f"O={build}", "ARCH=arm64", f"CROSS_COMPILE={CROSS_COMPILE}"]
    configure(make, build, r)
    compile_image(make, build, r.name)
    shutil.copy(os.path.join(build, "arch", "arm64", "boot", "Image"), image + ".partial")
    os.replace(image + ".partial", image)
    write_stamp(image, key)
    say(f"built the {name} kernel: {os.path.relpath(image, os.getcwd())}, "
        f"{os.path.getsize(image) / (1 << 20):.1f} MiB, {linux_banner(image)}")
    return image


def patched_source(source: str, r: Recipe, key: str) -> str:
    """.cache/lab/kernels/NAME/src: the source tree as hard links (cp -al: seconds, no copy) with the patches
    applied; GNU patch writes each file it changes anew, so the shared tree is never modified."""
    tree = os.path.join(CACHE, "kernels", r.name, "src")
    if stamp_ok(tree, key):
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    if os.path.exists(tree):  # cp -al would copy into it, not over it
        sys.exit(f"lab: could not remove {tree}")
    say(f"linking the kernel source for {r.name} and applying {len(r.patches)} patch(es)")
    run(["cp", "-al", source, tree])
    for p in r.patches:
        done = subprocess.run(["patch", "-p1", "--no-backup-if-mismatch", "-d", tree, "-i", p],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode:
            sys.exit(f"lab: {os.path.relpath(p, os.getcwd())} does not apply to {SOURCE_PACKAGE}:\n{done.stdout}")
        with open(p) as f:  # patch writes each file anew; a file still hard-linked would mean the shared tree changed
            shared = [m for m in re.findall(r"^\+\+\+ b/(\S+)", f.read(), re.M)
                      if os.stat(os.path.join(tree, m)).st_nlink > 1]
        if shared:
            sys.exit(f"lab: patching {r.name} changed files still linked to {source}: {', '.join(shared)}")
    write_stamp(tree, key)
    return tree


def pkvm_guest_image() -> str:
    """The pKVM-guest kernel (kernels/pkvm-guest.config): Debian's kernel has no ARM_PKVM_GUEST."""
    return build_kernel("pkvm-guest")


def configure(make: list[str], build: str, r: Recipe) -> None:
    """allnoconfig with the fragment's values forced (KCONFIG_ALLCONFIG), olddefconfig, then every value the
    fragment asks for is checked in the final .config."""
    say(f"configuring the {r.name} kernel: allnoconfig + {os.path.relpath(r.fragment, os.getcwd())}")
    for target, env in (("allnoconfig", {"KCONFIG_ALLCONFIG": r.fragment}), ("olddefconfig", {})):
        done = subprocess.run([*make, target], env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if done.returncode:
            sys.exit(f"lab: make {target} failed for the {r.name} kernel:\n{done.stdout[-4000:]}")
    with open(os.path.join(build, ".config")) as f:
        got = config_values(f.read())
    wrong = [f"{name}={want} (got {got.get(name, 'n')})" for name, want in config_values(r.text).items()
             if got.get(name, "n") != want]
    if wrong:
        sys.exit(f"lab: options of {r.fragment} that did not stick (unmet dependencies? see their Kconfig "
                 f"'depends on'): " + ", ".join(wrong))


def compile_image(make: list[str], build: str, name: str) -> None:
    """make Image on every core, a progress line every PROGRESS_EVERY seconds, the log's tail if it fails."""
    log = os.path.join(build, "build.log")
    jobs = os.cpu_count() or 2
    say(f"building the {name} kernel (make -j{jobs} Image; log in {os.path.relpath(log, os.getcwd())})")
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen([*make, f"-j{jobs}", "Image"], stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)  # its own group: killpg below
        try:
            while True:
                try:
                    proc.wait(PROGRESS_EVERY)
                    break
                except subprocess.TimeoutExpired:
                    say(f"building the {name} kernel: {compiled(log)} objects compiled, "
                        f"{time.monotonic() - start:.0f} s")
        finally:
            if proc.poll() is None:  # interrupted: stop make and every compiler it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode:
        with open(log, errors="replace") as f:
            tail = f.read().splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        sys.exit(f"lab: the {name} kernel build failed (make status {proc.returncode}); full log: {log}")
    say(f"compiled the {name} kernel: {compiled(log)} objects in {time.monotonic() - start:.0f} s")


def compiled(log: str) -> int:
    with open(log, errors="replace") as f:
        return sum(1 for line in f if line.startswith("  CC "))


def linux_banner(image: str) -> str:
    """The "Linux version ..." string of an uncompressed arm64 Image."""
    with open(image, "rb") as f:
        m = re.search(rb"Linux version [0-9][^\n\0]{0,200}?#[0-9][^\n\0]{0,100}", f.read())  # linux_banner
    return m[0].decode(errors="replace").strip() if m else "no Linux version string"
