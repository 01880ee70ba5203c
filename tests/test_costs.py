"""pyvmm's own costs (issue 12), and that cutting them changed no behaviour: the KVM_RUN fast path still fails with
the typed error, exits decoded straight from kvm_run match the uapi mirror, kernels and initrds streamed into guest
memory land byte for byte (without being held whole), a sparse 64 GiB guest runs on a host with less RAM, and
`pyvmm run` imports only what it uses."""

from __future__ import annotations

import errno
import os
import re
import resource
import struct
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli

GIB = 1 << 30


# --- the exit path ---------------------------------------------------------------------------------------------
def _vcpu_vm(x86_firmware, name="hello"):
    from pyvmm.vm import Vm

    vm = Vm()
    vm.add_memory(4 << 20)
    vm.create_vcpus(1)
    vm.boot(os.path.join(x86_firmware, name))
    return vm


def test_kvm_run_failure_is_the_typed_error_with_errno(x86_firmware):
    """The KVM_RUN fast path (no argtypes) still raises KvmError naming the call, with the errno and its meaning."""
    from pyvmm.kvm.errors import KvmError

    with _vcpu_vm(x86_firmware) as vm:
        vcpu = vm.vcpus[0]
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null, vcpu.fileno())  # the vCPU's fd number now names /dev/null: KVM_RUN is ENOTTY there
        finally:
            os.close(null)
        with pytest.raises(KvmError) as info:
            vcpu.run()
        assert (info.value.call, info.value.errno, info.value.errno_name) == ("KVM_RUN", errno.ENOTTY, "ENOTTY")
        assert info.value.exit is None  # no KVM_EXIT_MEMORY_FAULT comes with ENOTTY
        assert str(info.value).startswith("KVM_RUN failed: ENOTTY (")
        vcpu.close()
        with pytest.raises(KvmError) as info:  # a closed vCPU: EBADF, the same way
            vcpu.run()
        assert (info.value.call, info.value.errno) == ("KVM_RUN", errno.EBADF)


def test_kvm_run_eintr_is_the_intr_exit(x86_firmware):
    from pyvmm.kvm import exits

    with _vcpu_vm(x86_firmware) as vm:
        vcpu = vm.vcpus[0]
        vcpu.set_immediate_exit(True)  # KVM_RUN returns EINTR at once
        assert isinstance(vcpu.run(), exits.Intr)


def test_decoding_from_kvm_run_matches_the_uapi_mirror(x86_firmware):
    """decode() reads io and mmio with struct at fixed offsets: they must say what the ctypes mirror says.  An
    access seen before is the same exit object, whose data is still kvm_run's bytes."""
    from pyvmm.kvm import exits, uapi

    with _vcpu_vm(x86_firmware) as vm:
        vcpu = vm.vcpus[0]
        run, view, seen = vcpu.kvm_run, vcpu._view, {}
        run.exit_reason = uapi.KVM_EXIT_IO
        run.io.direction, run.io.size, run.io.port, run.io.count = uapi.KVM_EXIT_IO_OUT, 2, 0x3F8, 3
        run.io.data_offset = 4096 + 40
        view[4096 + 40:4096 + 46] = b"abcdef"
        io = exits.decode(run, view, seen)
        assert (type(io), io.port, io.size, io.count, io.is_write, bytes(io.data)) == (
            exits.Io, 0x3F8, 2, 3, True, b"abcdef")
        assert exits.decode(run, view, seen) is io
        run.io.direction = 0
        assert exits.decode(run, view, seen).is_write is False

        run.exit_reason = uapi.KVM_EXIT_MMIO
        run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xD000_0108, 4, 0
        mmio = exits.decode(run, view, seen)
        assert (type(mmio), mmio.addr, mmio.is_write, len(mmio.data)) == (exits.Mmio, 0xD000_0108, False, 4)
        assert exits.decode(run, view, seen) is mmio
        mmio.data[:] = b"\x11\x22\x33\x44"  # a read is completed through the exit's view, into kvm_run
        assert bytes(run.mmio.data[:4]) == b"\x11\x22\x33\x44"
        run.mmio.is_write = 1
        assert exits.decode(run, view, seen).is_write is True
        assert exits.decode(run, view) == mmio.__class__(0xD000_0108, True, view[exits.MMIO_DATA_OFFSET:][:4])

        run.exit_reason = uapi.KVM_EXIT_HLT
        assert isinstance(exits.decode(run, view, seen), exits.Hlt)
        for i in range(exits.SEEN_LIMIT + 5):  # what decode() keeps stays bounded
            run.exit_reason = uapi.KVM_EXIT_MMIO
            run.mmio.phys_addr = 0xD000_0000 + 8 * i
            exits.decode(run, view, seen)
        assert len(seen) <= exits.SEEN_LIMIT


# --- streamed image loading ------------------------------------------------------------------------------------
def _random(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def test_a_flat_image_is_loaded_byte_for_byte_from_its_file(x86_firmware, tmp_path):
    """Larger than the copy's chunk, and not a multiple of it: guest memory holds the file exactly."""
    from pyvmm.arch.x86_64 import layout
    from pyvmm.memory.regions import GuestMemory
    from pyvmm.vm import Vm

    data = _random(2 * GuestMemory.FILE_CHUNK + 12345, 1)
    path = tmp_path / "flat.bin"
    path.write_bytes(data)
    with Vm() as vm:
        vm.add_memory(16 << 20)
        vm.create_vcpus(1)
        vm.boot(str(path), mode="long")
        assert vm.memory.read(layout.KERNEL_LOAD, len(data)) == data
        assert vm.memory.read(layout.KERNEL_LOAD + len(data), 4096) == bytes(4096)


def _bzimage(kernel: bytes, init_size: int) -> bytes:
    """A bzImage with a 2.15 setup header (one setup sector) and ``kernel`` after it."""
    from pyvmm.arch.x86_64 import linux

    head = bytearray(1024)
    head[linux.SETUP_SECTS] = 1
    head[0x201] = 0x6A
    head[linux.HEADER:linux.HEADER + 4] = linux.HDRS_MAGIC
    struct.pack_into("<H", head, linux.VERSION, 0x20F)
    head[linux.XLOADFLAGS] = linux.XLF_KERNEL_64
    struct.pack_into("<I", head, linux.CMDLINE_SIZE, 255)
    struct.pack_into("<I", head, linux.INIT_SIZE, init_size)
    struct.pack_into("<I", head, linux.INITRD_ADDR_MAX, 0x7FFFFFFF)
    return bytes(head) + kernel


def test_a_bzimage_and_its_initrd_are_loaded_byte_for_byte(x86_firmware, tmp_path):
    from pyvmm.arch.x86_64 import layout, linux
    from pyvmm.vm import Vm

    kernel, initrd = _random(3 << 20, 2), _random((5 << 20) + 777, 3)
    (tmp_path / "bzImage").write_bytes(_bzimage(kernel, 4 << 20))
    (tmp_path / "initrd").write_bytes(initrd)
    with Vm() as vm:
        vm.add_memory(64 << 20)
        vm.create_vcpus(1)
        vm.boot(str(tmp_path / "bzImage"), mode="linux", initrd=str(tmp_path / "initrd"))
        assert vm.memory.read(layout.KERNEL_LOAD, len(kernel)) == kernel
        params = vm.memory.read(layout.BOOT_PARAMS_ADDR, 4096)
        addr, size = struct.unpack_from("<II", params, linux.RAMDISK_IMAGE)
        assert size == len(initrd) and addr % 4096 == 0
        assert vm.memory.read(addr, size) == initrd


def test_image_files_keep_read_images_checks(tmp_path):
    from pyvmm.kvm.errors import ConfigError
    from pyvmm.loader import ImageFile

    with pytest.raises(ConfigError, match="file is empty"):
        (tmp_path / "empty").write_bytes(b"")
        ImageFile(str(tmp_path / "empty"), "--initrd")
    with pytest.raises(ConfigError, match="a directory; a regular file is expected"):
        ImageFile(str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        ImageFile(str(tmp_path / "missing"))


def test_a_file_that_shrinks_while_it_loads_is_an_error(x86_firmware, tmp_path):
    from pyvmm.kvm.errors import ConfigError
    from pyvmm.loader import ImageFile, load_flat
    from pyvmm.vm import Vm

    path = tmp_path / "shrinks"
    path.write_bytes(_random(1 << 20, 4))
    with Vm() as vm, ImageFile(str(path), "--initrd") as image:
        vm.add_memory(16 << 20)
        os.truncate(path, 4096)
        with pytest.raises(ConfigError, match=r"--initrd .*shrinks: ends at 4096 bytes, short of 1048576"):
            load_flat(vm.memory, image, 2 << 20)


def test_the_arm64_image_header_takes_the_file_size():
    """parse_header reads the first bytes only; a pre-3.17 Image (image_size 0) is as long as its file."""
    from pyvmm.arch.arm64 import linux

    head = bytearray(64)
    head[56:60] = linux.ARM64_MAGIC
    assert linux.parse_header(bytes(head), 48 << 20).image_size == 48 << 20
    struct.pack_into("<QQ", head, 8, 0, 64 << 20)
    header = linux.parse_header(bytes(head), 48 << 20)
    assert (header.text_offset, header.image_size) == (0, 64 << 20)


PEAK_SCRIPT = r"""
import os, sys
from pyvmm.vm import Vm

def hwm():
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmHWM"))

with Vm() as vm:
    vm.add_memory(128 << 20)
    vm.create_vcpus(1)
    before = hwm()
    vm.boot(sys.argv[1], mode="long")
    print(hwm() - before)
"""


def test_loading_an_image_costs_the_guest_pages_and_little_more(x86_firmware, tmp_path):
    """A 64 MiB image: the guest's 64 MiB, not a copy (or two) of the file besides (the peak RSS of a fresh process)."""
    path = tmp_path / "big.bin"
    path.write_bytes(_random(64 << 20, 5))
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    grew = int(res.stdout)
    assert grew < (64 << 20) + (16 << 20), f"peak RSS grew by {grew >> 20} MiB loading a 64 MiB image"


# --- sparse guests larger than the host ------------------------------------------------------------------------
def _big_guests_possible(size: int) -> None:
    with open("/proc/sys/vm/overcommit_memory") as f:
        mode = int(f.read())
    if mode == 2:  # strict accounting: MAP_NORESERVE is ignored, the whole size is charged
        with open("/proc/meminfo") as f:
            limit = next(int(line.split()[1]) << 10 for line in f if line.startswith("CommitLimit:"))
        if limit < size:
            pytest.skip(f"vm.overcommit_memory=2 (strict): MAP_NORESERVE is ignored, and CommitLimit "
                        f"({limit >> 30} GiB) is below {size >> 30} GiB")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft < 2 * size:
        pytest.skip(f"RLIMIT_AS ({soft >> 30} GiB) leaves no room for {size >> 30} GiB of guest address space")


def test_a_sparse_64g_anonymous_guest_runs(x86_firmware):
    """64 GiB of anonymous RAM (3 GiB below the MMIO hole, 61 above 4 GiB), whatever the host's RAM: reserved with
    MAP_NORESERVE, so only what is touched counts.  The guest runs, and a page at the very top works."""
    from pyvmm import hostinfo
    from pyvmm.outcome import ExitKind
    from pyvmm.vm import Vm

    _big_guests_possible(64 * GIB)
    with Vm() as vm:
        vm.add_memory(64 * GIB)
        assert [(r.gpa, r.size) for r in vm.memory.regions] == [(0, 3 * GIB), (4 * GIB, 61 * GIB)]
        for region in vm.memory.regions:
            vmas = hostinfo.vmas_covering(hostinfo.read_smaps(), region.hva, region.size)
            assert vmas and all("nr" in v.vmflags for v in vmas), [v.vmflags for v in vmas]  # VM_NORESERVE
        vm.create_vcpus(1)
        vm.boot(os.path.join(x86_firmware, "memtouch"))
        # memtouch writes and reads back its RAM below the hole (rdi): all 3 GiB would take minutes on a host where
        # each first touch is slow, so this guest is told 8 MiB (rdi only bounds its loop)
        vm.vcpus[0].set_regs(_with_rdi(vm.vcpus[0].get_regs(), 8 << 20))
        outcome = vm.run(timeout=300)
        top = 65 * GIB - 4096  # the last page of the 61 GiB slot at 4 GiB
        vm.memory.write(top, b"top of a 64 GiB guest")
        assert vm.memory.read(top, 21) == b"top of a 64 GiB guest"
        rss = next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmRSS"))
    assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, (outcome.detail, vm.console.text())
    line = vm.console.text()
    assert re.match(r"memtouch: start=0x0*200000 end=0x0*800000 checksum=0x[0-9a-f]+ errors=0x0+\n", line), line
    assert rss < 2 * GIB  # sparse: the guest touched 6 MiB of it, the host one page


def _with_rdi(regs, value):
    regs.rdi = value
    return regs


def test_pyvmm_run_boots_a_64g_guest(x86_firmware):
    _big_guests_possible(64 * GIB)
    res = run_cli("run", "-m", "64G", timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "Hello from a pyvmm guest (x86_64, long mode)\n"


# --- start-up ------------------------------------------------------------------------------------------------
MODULES_SCRIPT = r"""
import sys
from pyvmm.cli import main
status = main(["run", "-q"])
print(" ".join(sorted(sys.modules)))
sys.exit(status)
"""


def test_pyvmm_run_imports_only_what_it_uses(x86_firmware):
    """The bundled hello on x86: no other arch, no virtio, no fault reports, no caps, no pyvmm check, no logging
    (nothing was logged), no dataclasses or typing (their import and class creation were most of start-up)."""
    res = subprocess.run([sys.executable, "-c", MODULES_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    modules = set(res.stdout.split())
    unwanted = {"pyvmm.arch.arm64", "pyvmm.virtio", "pyvmm.devices.virtio", "pyvmm.tap", "pyvmm.report",
                "pyvmm.preflight", "pyvmm.caps", "pyvmm.hostinfo", "pyvmm.scenarios", "pyvmm.matrix",
                "pyvmm.cexport", "logging", "json", "dataclasses", "inspect", "typing", "ctypes.util", "platform",
                "textwrap", "shutil"}
    assert not modules & unwanted, sorted(modules & unwanted)
    assert {"pyvmm.vm", "pyvmm.arch.x86_64", "pyvmm.kvm.vcpu"} <= modules


LOGS_SCRIPT = r"""
import sys
from pyvmm import logs
from pyvmm.bus import Bus

logs.configure(level=logs.INFO if sys.argv[1] == "-v" else logs.ERROR, format="pyvmm: %(name)s: %(message)s")
assert "logging" not in sys.modules  # nothing logged yet: logging not imported
Bus("io").read(0x80, 1)  # an unclaimed access: a warning
print("logging" in sys.modules)
"""


@pytest.mark.parametrize("verbose", [True, False])
def test_logging_is_imported_when_a_message_is_written_and_configured_then(verbose):
    """What `pyvmm -v` shows (and a run without -v does not), now that logging is imported by the first message."""
    res = subprocess.run([sys.executable, "-c", LOGS_SCRIPT, "-v" if verbose else "-"], capture_output=True,
                         text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "True\n"
    expected = "pyvmm: pyvmm.bus: io bus: unclaimed read of 1 bytes at 0x80 (reads as 0)\n"
    assert res.stderr == (expected if verbose else "")
