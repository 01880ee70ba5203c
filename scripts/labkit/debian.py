"""Debian sid arm64 packages, downloaded with a private apt configuration (never installed on this machine),
and kernel modules taken out of them (decompressed, with their dependencies, in load order)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

from .cache import CACHE, run, say

SID_SOURCES = ("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: sid\nComponents: main\n"
               "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")


def apt_opts() -> list[str]:
    base = os.path.join(CACHE, "apt")
    return ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={base}/sources",
            "-o", f"Dir::State::Lists={base}/lists", "-o", f"Dir::Cache={base}/cache",
            "-o", "Dir::State::Status=/dev/null", "-o", "APT::Architecture=arm64",
            "-o", "APT::Architectures::=arm64", "-o", "Debug::NoLocking=1", "-q"]


def _downloaded(debs: str) -> dict[str, str]:
    return {name.split("_")[0]: os.path.join(debs, name) for name in os.listdir(debs) if name.endswith(".deb")}


def fetch_debs(packages: list[str]) -> dict[str, str]:
    """{package: path of its .deb in .cache/lab/debs} for sid's arm64 (or arch all) PACKAGES, downloading the
    missing ones; the package lists are read once and re-read when a download fails (sid moves on)."""
    base = os.path.join(CACHE, "apt")
    debs = os.path.join(CACHE, "debs")
    for d in ("sources", "lists/partial", "cache/archives/partial"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    os.makedirs(debs, exist_ok=True)
    with open(os.path.join(base, "sources", "sid.sources"), "w") as f:
        f.write(SID_SOURCES)
    need = [p for p in packages if p not in _downloaded(debs)]
    if need:
        lists = os.listdir(os.path.join(base, "lists"))
        for attempt in ("first", "again"):
            if attempt == "again" or len(lists) <= 1:
                say("reading Debian sid's arm64 package lists")
                run(["apt-get", *apt_opts(), "update"], stdout=subprocess.DEVNULL)
            say(f"downloading {len(need)} arm64 packages from Debian sid: {' '.join(need)}")
            got = subprocess.run(["apt-get", *apt_opts(), "download", *need], cwd=debs, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            if got.returncode == 0:
                break
        else:
            sys.exit(f"lab: apt-get download failed: {got.stderr.strip()[-2000:]}")
    have = _downloaded(debs)
    missing = [p for p in packages if p not in have]
    if missing:
        sys.exit(f"lab: could not download {' '.join(missing)} from Debian sid")
    return {p: have[p] for p in packages}


def module_name(path: str) -> str:
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def extract_modules(deb: str, wanted: list[str]) -> dict[str, bytes]:
    """The named modules and everything they depend on, decompressed (busybox insmod takes plain ELF),
    from a linux-modules package: {name: ELF bytes}.  One pass over the package per level of dependencies."""
    import gzip
    import lzma
    import tarfile

    found: dict[str, bytes] = {}
    need = {module_name(w) for w in wanted}
    while need - set(found):
        missing = need - set(found)
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = module_name(member.name)
                if member.isfile() and ".ko" in os.path.basename(member.name) and name in missing:
                    data = tar.extractfile(member).read()
                    if member.name.endswith(".xz"):
                        data = lzma.decompress(data)
                    elif member.name.endswith(".zst"):
                        data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
                    elif member.name.endswith(".gz"):
                        data = gzip.decompress(data)
                    found[name] = data
        if proc.wait() != 0:
            sys.exit(f"lab: dpkg-deb could not read {deb}")
        if missing - set(found):
            sys.exit(f"lab: {os.path.basename(deb)} has no module {' '.join(sorted(missing - set(found)))}")
        for ko in list(found.values()):
            need |= {module_name(d) for d in modinfo(ko).get("depends", "").split(",") if d}
    return found


def modinfo(ko: bytes) -> dict[str, str]:
    """The key=value strings of a module's .modinfo section (little-endian ELF64: arm64), first value per key."""
    if ko[:4] != b"\x7fELF" or ko[4:6] != b"\x02\x01":
        raise ValueError("not a little-endian ELF64 module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3a)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    names = section(shstrndx)[1]
    info: dict[str, str] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        if ko[names + name:ko.index(b"\0", names + name)] == b".modinfo":
            for entry in ko[offset:offset + size].split(b"\0"):
                key, eq, value = entry.decode(errors="replace").partition("=")
                if eq:
                    info.setdefault(key, value)
    return info


def load_order(modules: dict[str, bytes], wanted: list[str]) -> list[tuple[str, bytes]]:
    """Dependencies before their users, otherwise in the order asked for."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            sys.exit(f"lab: module dependency cycle: {' -> '.join(path + (name,))}")
        for dep in modinfo(modules[name]).get("depends", "").split(","):
            if dep:
                visit(module_name(dep), path + (name,))
        order.append(name)

    for name in wanted:
        visit(module_name(name), ())
    return [(name, modules[name]) for name in order]


def module_release(ko: bytes) -> str:
    """The kernel release a module was built for: the first word of its vermagic."""
    vermagic = modinfo(ko).get("vermagic", "").split()
    if not vermagic:
        raise ValueError("module has no vermagic")
    return vermagic[0]
