"""The lab host's initramfs, as newc cpio parts concatenated at boot, each cached on its own: the base image
(busybox, Python 3.13, pure-Python packages, /opt/lab/Image and guest-initrd.cpio), the virtio guest, the
pKVM-guest kernel, and per boot the project with the command to run."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from .cache import CACHE, ROOT, digest, read_stamp, run, say, stamp_ok, write_stamp
from .debian import extract_modules, fetch_debs, load_order, module_release
from .kernel import MODULES_PACKAGE, modules_package

USERLAND = [
    "busybox-static", "python3.13-minimal", "libpython3.13-minimal", "libpython3.13-stdlib", "libc6",
    "libexpat1", "zlib1g", "libssl3t64", "libffi8", "libbz2-1.0", "liblzma5", "libzstd1", "libgcc-s1",
    "libsqlite3-0",  # pyroute2 imports sqlite3
]
PYTHON_PACKAGES = ["ioctl-opt", "fdt", "pyroute2", "pytest", "pytest-timeout", "hypothesis"]
LAB_VERSION = "6"  # bump to force a rebuild of the base image
EXIT_MARK = "PYVMM-LAB-EXIT="
# Run by the lab's Python under qemu-user: compiles "SOURCE<tab>NAME IN THE LAB<tab>PYC" lines from stdin, hash-checked
# bytecode (PEP 552) unless its argument is "timestamp"
PYC_COMPILER = r"""
import py_compile, sys
mode = py_compile.PycInvalidationMode.TIMESTAMP if sys.argv[1:] == ["timestamp"] else \
    py_compile.PycInvalidationMode.CHECKED_HASH
for line in sys.stdin:
    src, dfile, cfile = line.rstrip("\n").split("\t")
    try:
        py_compile.compile(src, cfile=cfile, dfile=dfile, doraise=True, invalidation_mode=mode)
    except py_compile.PyCompileError as err:
        print(err.msg, file=sys.stderr)
"""

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/usr/bin:/bin:/sbin HOME=/root PYTHONPATH=/opt/pylib PYTHONDONTWRITEBYTECODE=1 NO_COLOR=1 PYTHON_COLORS=0
# PyPI's fdt has regex strings Python 3.13 warns about when it compiles them (on stderr, in every pyvmm command)
export PYTHONWARNINGS=ignore::SyntaxWarning
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /root; mount -t tmpfs tmp /tmp
ulimit -l unlimited
# Debian's kernel: its own modules (tun for virtio-net's TAP); a lab kernel of kernels/ has them built in
if [ -f /opt/lab/host-modules/order ] && [ "$(uname -r)" = "$(cat /opt/lab/host-modules/release)" ]; then
  while read m; do insmod /opt/lab/host-modules/$m.ko || echo "lab: insmod $m failed"; done < /opt/lab/host-modules/order
fi
echo "lab: host kernel $(uname -r)"
cd /work/pyvmm
sh /lab/cmd
echo "PYVMM-LAB-EXIT=$?"
poweroff -f
"""
assert EXIT_MARK in INIT

GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "pyvmm-guest: Linux $(/bin/busybox uname -r) reached userspace"
/bin/busybox poweroff -f
"""

# The virtio guest (/opt/lab/virtio-initrd.cpio): busybox, Debian's own virtio modules for the lab's kernel and
# an init that loads them when it runs on that kernel (/lib/modules/release, from the modules' vermagic); other
# kernels (the pKVM-guest kernel) have the drivers built in.  virtio, virtio_ring, virtio_console and rng-core
# are built into Debian's arm64 kernel; these are modules, in linux-modules-VERSION (the image package has
# none).  Their dependencies (failover, net_failover) are read from the modules' .modinfo and loaded first.
VIRTIO_MODULES = ["virtio_mmio", "virtio_blk", "virtio_rng", "virtio_net"]
HOST_MODULES = ["tun"]  # for the lab host itself: /dev/net/tun (virtio-net's TAP)
VIRTIO_GUEST_PART_VERSION = "3"  # bump when build_virtio_guest() lays out its files differently
HOST_MODULES_PART_VERSION = "1"  # bump when build_host_modules() lays out its files differently
VIRTIO_GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
say() { echo "pyvmm-virtio: $*"; }
waitfor() {  # waitfor PATH [SECONDS]: until PATH exists (udev-less: devtmpfs nodes appear as drivers probe)
    n=$(( ${2:-10} * 10 )); while [ ! -e "$1" ] && [ $n -gt 0 ]; do usleep 100000; n=$((n - 1)); done
    [ -e "$1" ] || { say "timed out waiting for $1"; return 1; }
}
drain() {  # until the UART has sent what was written (8250 output is interrupt-driven: poweroff -f would cut it)
    # re-applying the tty's own settings is tcsetattr(TCSADRAIN): it returns once the output queue is sent
    stty -F /dev/ttyS0 "$(stty -F /dev/ttyS0 -g 2>/dev/null)" 2>/dev/null
    n=50; last=; while [ $n -gt 0 ]; do
        now=$(grep -o 'tx:[0-9]*' /proc/tty/driver/serial 2>/dev/null); [ "$now" = "$last" ] && break
        last=$now; usleep 200000; n=$((n - 1)); done
}
poweroff() { drain; /bin/busybox poweroff "$@"; }  # scripts end with poweroff -f: nothing they print is lost
say "Linux $(uname -r) reached userspace"
if [ "$(uname -r)" = "$(cat /lib/modules/release)" ]; then
    for m in $(cat /lib/modules/order); do
        if out=$(insmod /lib/modules/$m.ko 2>&1); then say "insmod $m ok"; else say "insmod $m FAILED: $out"; fi
    done
else
    say "drivers built in (Linux $(uname -r))"
fi
say "virtio drivers: $(ls /sys/bus/virtio/drivers | tr '\n' ' ')"
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] && say "virtio device $(basename $d) id $(cat $d/device) driver $(basename "$(readlink $d/driver)")"
done
if [ -f /pyvmm-script ]; then  # a test's script, from a newc archive the test appends to this one
    say "script start"
    ( . /pyvmm-script )
    say "script ended with status $?"
else
    say "no script"
fi
poweroff -f
"""


def pack_cpio(tree: str, out: str) -> None:
    with open(out, "wb") as f:
        names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=tree, check=True, capture_output=True).stdout
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=tree, input=names, stdout=f,
                       check=True)


def write_file(path: str, text: str | bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.chmod(path, mode)


# --- the base image: busybox, Python 3.13, pure-Python packages ------------------------
def build_base(kernel: str) -> str:
    """.cache/lab/base.cpio; KERNEL (Debian's Image) goes in as /opt/lab/Image."""
    cpio = os.path.join(CACHE, "base.cpio")
    debs = fetch_debs(USERLAND)
    key = digest(LAB_VERSION, INIT, GUEST_INIT, *sorted(os.path.basename(d) for d in debs.values()),
                 *PYTHON_PACKAGES, read_stamp(kernel))
    if stamp_ok(cpio, key):
        return cpio
    rootfs = os.path.join(CACHE, "rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    os.makedirs(rootfs)
    say("unpacking the arm64 userland")
    for deb in debs.values():
        run(["dpkg-deb", "-x", deb, rootfs])
    for d in ("bin", "sbin", "lib"):  # merged /usr
        link = os.path.join(rootfs, d)
        if not os.path.lexists(link):
            os.symlink(f"usr/{d}", link)
    os.makedirs(os.path.join(rootfs, "usr", "bin"), exist_ok=True)
    busybox = os.path.join(rootfs, "usr", "bin", "busybox")
    if not os.path.exists(busybox):
        shutil.move(os.path.join(rootfs, "bin", "busybox"), busybox)
    python = os.path.join(rootfs, "usr", "bin", "python3")
    if not os.path.lexists(python):
        os.symlink("python3.13", python)
    for d in ("proc", "sys", "dev", "tmp", "root", "lab", "work", "opt/pylib"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    write_file(os.path.join(rootfs, "init"), INIT, 0o755)
    say(f"installing {' '.join(PYTHON_PACKAGES)} for Python 3.13 (pure wheels from PyPI)")
    run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
         "--target", os.path.join(rootfs, "opt", "pylib"), "--only-binary=:all:", "--python-version", "3.13",
         "--implementation", "py", "--abi", "none", "--platform", "any", *PYTHON_PACKAGES],
        stderr=subprocess.DEVNULL)
    build_guest_files(rootfs, kernel)
    say("precompiling the standard library and packages with the arm64 Python (qemu-user)")
    precompile(rootfs, ["/usr/lib/python3.13", "/opt/pylib"])
    say("packing the base initramfs")
    pack_cpio(rootfs, cpio)
    write_stamp(cpio, key)
    return cpio


def build_guest_files(rootfs: str, kernel: str) -> None:
    """/opt/lab/Image (this same kernel) and /opt/lab/guest-initrd.cpio (busybox, prints a line, powers off):
    what the tests boot as a Linux guest of pyvmm."""
    lab = os.path.join(rootfs, "opt", "lab")
    os.makedirs(lab, exist_ok=True)
    shutil.copy(kernel, os.path.join(lab, "Image"))
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "bin"))
        os.makedirs(os.path.join(tmp, "proc"))
        shutil.copy(os.path.join(rootfs, "usr", "bin", "busybox"), os.path.join(tmp, "bin", "busybox"))
        write_file(os.path.join(tmp, "init"), GUEST_INIT, 0o755)
        pack_cpio(tmp, os.path.join(lab, "guest-initrd.cpio"))


def lab_python(rootfs: str) -> list[str]:
    """The lab's arm64 Python 3.13, run here under qemu-user: what compiles its bytecode (this machine's Python is
    another version, and bytecode is per version, not per architecture)."""
    return ["qemu-aarch64-static", "-L", rootfs, os.path.join(rootfs, "usr", "bin", "python3.13")]


def precompile(rootfs: str, dirs: list[str]) -> None:
    """Bytecode for the standard library and /opt/pylib: the lab's init sets PYTHONDONTWRITEBYTECODE=1, and dpkg-deb
    -x and pip --no-compile leave no .pyc, so without this every lab Python compiles what it imports.  Only the
    CPython test suite and the GUI modules are left out (-x matches a whole path component: unittest and _pytest
    are compiled)."""
    for d in dirs:
        done = subprocess.run([*lab_python(rootfs), "-m", "compileall", "-q", "-d", d,
                               "-x", r"/(test|idlelib|tkinter|turtledemo)/", rootfs + d],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode:  # a file that does not compile (a package's Python 2 leftovers): say so, go on
            say(f"compileall {d}: status {done.returncode}: {done.stdout.strip()[-500:]}")
    # Debian links a few modules to /etc (sitecustomize.py, which every start imports): absolute links that dangle
    # here, so compileall skipped them; compile their targets into the link's __pycache__
    todo = []
    for d in dirs:
        for dirpath, _, names in os.walk(rootfs + d):
            for name in names:
                link = os.path.join(dirpath, name)
                if name.endswith(".py") and os.path.islink(link) and os.readlink(link).startswith("/"):
                    target = rootfs + os.readlink(link)
                    if os.path.isfile(target):
                        todo.append(f"{target}\t{link[len(rootfs):]}\t"
                                    f"{os.path.join(dirpath, '__pycache__', name[:-3] + '.cpython-313.pyc')}\n")
    if todo:
        done = subprocess.run([*lab_python(rootfs), "-c", PYC_COMPILER, "timestamp"], input="".join(todo), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if done.returncode or done.stderr.strip():
            say(f"compiling the linked modules failed: {done.stderr.strip()[-500:]}")


# --- the virtio guest ----------------------------------------------------------------
def build_virtio_guest() -> str:
    """.cache/lab/virtio-guest.cpio: /opt/lab/virtio-initrd.cpio (busybox, Debian's virtio modules for its 4 KiB-page
    kernel, the tests' Linux guest /opt/lab/Image, and VIRTIO_GUEST_INIT) for the lab's tests to boot."""
    out = os.path.join(CACHE, "virtio-guest.cpio")
    debs = fetch_debs(["busybox-static", MODULES_PACKAGE])
    key = digest(VIRTIO_GUEST_PART_VERSION, VIRTIO_GUEST_INIT, *VIRTIO_MODULES,
                 *sorted(os.path.basename(d) for d in debs.values()))
    if stamp_ok(out, key):
        return out
    say(f"building the virtio guest initramfs ({', '.join(VIRTIO_MODULES)} from {os.path.basename(debs[MODULES_PACKAGE])})")
    with tempfile.TemporaryDirectory() as tmp:
        guest = os.path.join(tmp, "guest")
        for d in ("bin", "proc", "sys", "dev", "tmp", "lib/modules"):
            os.makedirs(os.path.join(guest, d))
        unpacked = os.path.join(tmp, "busybox")
        run(["dpkg-deb", "-x", debs["busybox-static"], unpacked])
        busybox = [p for p in ("usr/bin/busybox", "bin/busybox") if os.path.isfile(os.path.join(unpacked, p))]
        if not busybox:
            sys.exit(f"lab: no busybox in {debs['busybox-static']}")
        shutil.copy(os.path.join(unpacked, busybox[0]), os.path.join(guest, "bin", "busybox"))
        modules = load_order(extract_modules(debs[MODULES_PACKAGE], VIRTIO_MODULES), VIRTIO_MODULES)
        releases = {module_release(ko) for _, ko in modules}
        if len(releases) != 1:
            sys.exit(f"lab: the virtio modules are for different kernels: {' '.join(sorted(releases))}")
        mod_dir = os.path.join(guest, "lib", "modules")
        for name, ko in modules:
            write_file(os.path.join(mod_dir, name + ".ko"), ko)
        write_file(os.path.join(mod_dir, "order"), "".join(name + "\n" for name, _ in modules))
        write_file(os.path.join(mod_dir, "release"), releases.pop() + "\n")
        write_file(os.path.join(guest, "init"), VIRTIO_GUEST_INIT, 0o755)
        wrapper = os.path.join(tmp, "wrapper")
        os.makedirs(os.path.join(wrapper, "opt", "lab"))
        pack_cpio(guest, os.path.join(wrapper, "opt", "lab", "virtio-initrd.cpio"))
        pack_cpio(wrapper, out)
    say("virtio guest modules, in load order: " + " ".join(name for name, _ in modules))
    write_stamp(out, key)
    return out


def build_host_modules(pages: str = "4k") -> str:
    """.cache/lab/host-modules.cpio (host-modules-16k.cpio for the 16 KiB-page host): the lab host's own modules
    (/opt/lab/host-modules: HOST_MODULES with their dependencies, the load order and the kernel release) from the
    modules package of the Debian kernel the lab boots with that page size."""
    package = modules_package(pages)
    out = os.path.join(CACHE, "host-modules.cpio" if pages == "4k" else f"host-modules-{pages}.cpio")
    deb = fetch_debs([package])[package]
    key = digest(HOST_MODULES_PART_VERSION, *HOST_MODULES, os.path.basename(deb))
    if stamp_ok(out, key):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        host_modules = os.path.join(tmp, "opt", "lab", "host-modules")
        loaded = load_order(extract_modules(deb, HOST_MODULES), HOST_MODULES)
        for name, ko in loaded:
            write_file(os.path.join(host_modules, name + ".ko"), ko)
        write_file(os.path.join(host_modules, "order"), "".join(name + "\n" for name, _ in loaded))
        write_file(os.path.join(host_modules, "release"), module_release(loaded[0][1]) + "\n")
        pack_cpio(tmp, out)
    say(f"lab host modules from {os.path.basename(deb)}: " + " ".join(name for name, _ in loaded))
    write_stamp(out, key)
    return out


# --- the pKVM-guest kernel -------------------------------------------------------------
def build_pkvm_guest_part(image: str) -> str:
    """.cache/lab/pkvm-guest.cpio: IMAGE (the pKVM-guest kernel) as /opt/lab/pkvm-guest/Image."""
    out = os.path.join(CACHE, "pkvm-guest.cpio")
    with open(image, "rb") as f:
        key = digest(f.read())  # the bytes: a rebuild from the same inputs has the same stamp, not the same Image
    if stamp_ok(out, key):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "opt", "lab", "pkvm-guest"))
        shutil.copy(image, os.path.join(tmp, "opt", "lab", "pkvm-guest", "Image"))
        pack_cpio(tmp, out)
    write_stamp(out, key)
    return out


# --- the project, per boot ---------------------------------------------------------------
def build_firmware() -> None:
    if os.path.exists(os.path.join(ROOT, "firmware", "arm64", "Makefile")):
        run(["make", "-s", "-C", os.path.join(ROOT, "firmware", "arm64")])
    # the benchmarks' C peer (benchmarks/cvmm.c), static, into firmware/arm64/build (shipped like the guests)
    if os.path.exists(os.path.join(ROOT, "benchmarks", "Makefile")) and subprocess.run(
            ["make", "-s", "-C", os.path.join(ROOT, "benchmarks"), "arm64"]).returncode:
        say("could not build benchmarks/cvmm.c for arm64; the benchmarks that compare with it will stop")


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    files = [f for f in out if f and os.path.isfile(os.path.join(ROOT, f))]
    build = os.path.join(ROOT, "firmware", "arm64", "build")
    if os.path.isdir(build):
        files += [os.path.relpath(os.path.join(build, f), ROOT) for f in os.listdir(build)]
    return files


def build_overlay(command: list[str], tmp: str) -> str:
    """TMP/overlay.cpio: the project at /work/pyvmm (git's files, tracked or not, and the arm64 guests, with the
    bytecode of its Python files) and /lab/cmd, the command the init runs."""
    tree = os.path.join(tmp, "overlay")
    dest = os.path.join(tree, "work", "pyvmm")
    files = project_files()
    for rel in files:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), target)
    add_bytecode(dest, [rel for rel in files if rel.endswith(".py")])
    write_file(os.path.join(tree, "lab", "cmd"), " ".join(shlex.quote(c) for c in command) + "\n")
    out = os.path.join(tmp, "overlay.cpio")
    pack_cpio(tree, out)
    return out


PYC_CACHE = os.path.join(CACHE, "pyc")
PYC_KEEP_DAYS = 14  # cached bytecode unused this long is removed


def add_bytecode(dest: str, sources: list[str]) -> None:
    """DEST/**/__pycache__/NAME.cpython-313.pyc for each of SOURCES (paths under DEST), so that no Python in the lab
    compiles pyvmm again (its init sets PYTHONDONTWRITEBYTECODE=1: each of them would, +0.5 s a start under TCG).
    Hash-checked bytecode (PEP 552): valid for its source's bytes whatever the file's time, so it is cached in
    .cache/lab/pyc by the source's bytes, its path in the lab (the code's file name) and the base image (the
    Python); what is not cached is compiled here by the lab's own Python under qemu-user, in one run."""
    rootfs = os.path.join(CACHE, "rootfs")
    if not os.path.isfile(os.path.join(rootfs, "usr", "bin", "python3.13")):
        say("no .cache/lab/rootfs: the project goes in without bytecode (scripts/lab build makes it)")
        return
    python_key = read_stamp(os.path.join(CACHE, "base.cpio"))
    os.makedirs(PYC_CACHE, exist_ok=True)
    wanted: dict[str, str] = {}  # cached .pyc -> where it goes
    todo = []
    for rel in sources:
        src = os.path.join(dest, rel)
        with open(src, "rb") as f:
            cached = os.path.join(PYC_CACHE, digest(python_key, rel, f.read()) + ".pyc")
        directory, name = os.path.split(src)
        wanted[cached] = os.path.join(directory, "__pycache__", name[:-3] + ".cpython-313.pyc")
        if not os.path.exists(cached):
            todo.append(f"{src}\t/work/pyvmm/{rel}\t{cached}\n")
    if todo:
        say(f"compiling {len(todo)} of the project's {len(sources)} Python files for the lab (qemu-user)")
        done = subprocess.run([*lab_python(rootfs), "-c", PYC_COMPILER], input="".join(todo), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if done.returncode or done.stderr.strip():
            say(f"some files did not compile (they compile in the lab, as before): {done.stderr.strip()[-1000:]}")
    now = time.time()
    for cached, target in wanted.items():
        if os.path.exists(cached):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(cached, target)
            os.utime(cached, (now, now))
    for name in os.listdir(PYC_CACHE):
        path = os.path.join(PYC_CACHE, name)
        if path not in wanted and now - os.path.getmtime(path) > PYC_KEEP_DAYS * 86400:
            os.unlink(path)
