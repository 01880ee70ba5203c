"""The core's contracts: fd ownership and hygiene, teardown that leaks nothing, bus and layout edges."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys

import pytest

from pyvmm.devices.testdev import MmioTestDevice
from pyvmm.bus import Bus
from pyvmm.kvm import uapi
from pyvmm.kvm.errors import ConfigError, KvmError
from pyvmm.kvm.fd import close_all
from pyvmm.vm import Vm

pytestmark = pytest.mark.timeout(60)


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def test_every_fd_pyvmm_opens_is_close_on_exec(kvm_device, tmp_path):
    """Child processes must not inherit guest memory, VMs or vCPUs (guest_memfd comes without O_CLOEXEC)."""
    before = _fds()
    with Vm() as vm:
        vm.add_memory(2 << 20, "anon")
        vm.add_memory(2 << 20, "memfd")
        vm.add_memory(2 << 20, "guest-memfd")
        vm.add_memory(2 << 20, f"file:{tmp_path / 'ram'}")
        vm.create_vcpus(2)
        opened = {fd: what for fd, what in _fds().items() if before.get(fd) != what}
        kinds = " ".join(opened.values())
        for expected in ("kvm-vm", "kvm-vcpu:0", "kvm-vcpu:1", "memfd:pyvmm-memfd", "kvm-gmem", "ram", "/dev/kvm"):
            assert expected in kinds, f"{expected} not among the new fds {opened}"
        inheritable = {fd: what for fd, what in opened.items()
                       if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC}
        assert inheritable == {}
    assert _fds() == before


def test_vcpu_fd_is_closed_once_when_its_setup_fails(kvm_device, monkeypatch):
    """If mapping kvm_run fails, the vCPU fd is closed exactly once (not again by the half-built object)."""
    from pyvmm.kvm import vcpu as vcpu_mod

    closed: list[int] = []
    real_close = os.close

    def fail_mmap(*args, **kwargs):
        raise OSError(errno.ENOMEM, "injected mmap failure")

    with Vm() as vm:
        monkeypatch.setattr(vcpu_mod.mmap, "mmap", fail_mmap)
        monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd)))
        with pytest.raises(OSError, match="injected mmap failure"):
            vm.fd.create_vcpu(0)
        import gc

        gc.collect()  # the half-built VcpuFd is garbage now: its __del__ must not close the number again
        monkeypatch.undo()
    assert len(closed) == 1, f"the vCPU fd was closed {len(closed)} times: {closed}"


def test_teardown_closes_everything_then_raises_the_first_error():
    calls: list[str] = []

    def ok(name):
        return lambda: calls.append(name)

    def bad(name):
        def close():
            calls.append(name)
            raise OSError(errno.EIO, f"{name} failed")
        return close

    with pytest.raises(OSError, match="b failed"):
        close_all([ok("a"), bad("b"), ok("c"), bad("d"), ok("e")])
    assert calls == ["a", "b", "c", "d", "e"]


def test_vm_close_continues_past_a_failing_step(kvm_device):
    vm = Vm()
    region = vm.add_memory(2 << 20, "memfd")
    vm.create_vcpus(1)
    vcpu = vm.vcpus[0]

    def broken():
        raise RuntimeError("a device failed to close")

    vm.on_close.append(broken)
    with pytest.raises(RuntimeError, match="a device failed to close"):
        vm.close()
    assert vcpu.closed and vm.fd.closed and vm.kvm.closed
    assert region.backing.hva == 0 and vm.memory.regions == []


def test_has_device_attr_only_enxio_means_absent(kvm_device, monkeypatch):
    from pyvmm.kvm import device as device_mod

    with Vm() as vm:
        vm.add_memory(4 << 20)
        vm.create_vcpus(1)
        vcpu = vm.vcpus[0]
        assert vcpu.has_device_attr(0x7FFF, 0) is False  # the kernel's ENXIO: no such group
        if vm.arch.name == "x86_64":  # x86 VM fds do not take the attr ioctls at all: an error, not "absent"
            with pytest.raises(KvmError) as info:
                vm.fd.has_device_attr(0, 0)
            assert info.value.call == "KVM_HAS_DEVICE_ATTR" and info.value.errno == errno.ENOTTY

        def failing(fd, name, request, arg=None):
            raise KvmError(name, errno.EFAULT)

        monkeypatch.setattr(device_mod, "ioctl", failing)
        with pytest.raises(KvmError) as info:
            vcpu.has_device_attr(0, 0)
        assert info.value.errno == errno.EFAULT


def test_bus_access_straddling_a_device_end_never_reaches_it():
    bus = Bus("mmio")
    dev = MmioTestDevice()
    bus.insert(dev, 0x1000, 0x1000, "test")
    assert bus.read(0x1FFC, 8) == bytes(8)  # starts inside, runs 4 bytes past the end
    bus.write(0x1FFE, b"\x01\x02\x03\x04")
    assert dev.log == [] and bus.unclaimed_count == 2
    assert bus.read(0x1FF8, 8) == bytes(8) and len(dev.log) == 1  # ends exactly at the end: the device's
    assert dev.log[0].offset == 0xFF8


def test_elf_with_memsz_smaller_than_filesz_is_refused(kvm_device, tmp_path):
    # A minimal ELF64 header and one PT_LOAD whose p_memsz < p_filesz.
    ehdr = bytearray(64)
    ehdr[:4] = b"\x7fELF"
    ehdr[4], ehdr[5], ehdr[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", ehdr, 16, 2, 62, 1, 0x100000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x100000, 0x100000, 0x200, 0x100, 0x1000)
    image = tmp_path / "bad.elf"
    image.write_bytes(bytes(ehdr) + phdr + bytes(0x200))
    with Vm() as vm:
        vm.add_memory(4 << 20)
        vm.create_vcpus(1)
        with pytest.raises(ConfigError, match=r"segment 0 is malformed: p_memsz 0x100 is smaller than p_filesz 0x200"):
            vm.boot(str(image))


def test_x86_image_over_the_boot_tables_is_refused(x86_firmware, tmp_path):
    flat = tmp_path / "flat.bin"
    flat.write_bytes(b"\xf4" * 0x100)  # hlt
    with Vm() as vm:
        vm.add_memory(4 << 20)
        vm.create_vcpus(1)
        with pytest.raises(ConfigError, match=r"overlaps the boot GDT and page tables at \[0x500, 0xf000\)"):
            vm.boot(str(flat), mode="long", load_addr=0x9000)
        with pytest.raises(ConfigError, match=r"overlaps the vCPUs' boot stacks"):
            vm.boot(str(flat), mode="long", load_addr=0x7F000)


def test_vcpu_count_is_bounded_by_the_layout(kvm_device):
    from pyvmm.arch.arm64 import layout as arm64_layout

    assert arm64_layout.GIC_REDIST + arm64_layout.MAX_VCPUS * arm64_layout.GIC_REDIST_SIZE <= arm64_layout.UART
    assert arm64_layout.GIC_REDIST + (arm64_layout.MAX_VCPUS + 1) * arm64_layout.GIC_REDIST_SIZE > arm64_layout.UART
    with Vm() as vm:
        vm.add_memory(4 << 20)
        if vm.kvm.check_extension(uapi.KVM_CAP_MAX_VCPUS) > vm.arch.max_vcpus:
            with pytest.raises(ConfigError, match=f"layout has room for {vm.arch.max_vcpus}"):
                vm.create_vcpus(vm.arch.max_vcpus + 1)
        assert vm.vcpus == []


def test_kvm_run_mapping_keeps_close_on_exec(kvm_device):
    """Python's mmap dups the vCPU fd it maps: that copy is close-on-exec too, and goes with the vCPU."""
    with Vm() as vm:
        vm.add_memory(2 << 20)
        vm.create_vcpus(1)
        dups = [fd for fd, what in _fds().items() if what.startswith("anon_inode:kvm-vcpu")]
        assert len(dups) == (1 if sys.version_info >= (3, 13) else 2)  # before 3.13 mmap keeps a dup
        assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in dups)
    assert not [what for what in _fds().values() if what.startswith("anon_inode:kvm-vcpu")]


def test_kvm_run_is_decoded_in_one_place():
    """Only pyvmm/kvm/exits.py (and the vCPU fd that maps it) reads kvm_run's exit union."""
    import re

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyvmm")
    union = re.compile(r"\.kvm_run\b|\brun\.(exit_reason|io|mmio|internal|emulation_failure|memory_fault|system_event|"
                       r"hypercall|arm_nisv|arm_sea|fail_entry|hw|ex|debug)\b")
    allowed = {os.path.join("kvm", "exits.py"), os.path.join("kvm", "vcpu.py"), os.path.join("kvm", "uapi.py")}
    offenders = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if name.endswith(".py") and rel not in allowed:
                with open(os.path.join(dirpath, name)) as f:
                    offenders += [f"{rel}:{i}" for i, line in enumerate(f, 1) if union.search(line)]
    assert offenders == []
