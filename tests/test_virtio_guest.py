"""The virtio guest (firmware/{x86_64,arm64}/virtio.S) on real KVM: a bare-metal driver of pyvmm's
virtio-mmio devices (blk at slot 0, rng at slot 1, console at slot 2), proving the KVM wiring: MMIO
exits for the registers, QueueNotify through KVM_IOEVENTFD and the device thread (or, with
``ioeventfd=False``, through the vCPU's exit path), and the devices' accesses to guest RAM.

The guest's exit status: 0, or a code naming the failing step (see the comment at the top of virtio.S);
0x50 is "the console's used ring never moved".  arm64 runs in the lab (scripts/lab test).
"""

from __future__ import annotations

import os

import pytest

from pyvmm.devices.virtio import VirtioBlock, VirtioConsole, VirtioRng
from pyvmm.devices.virtio.device import DeviceStatus
from pyvmm.devices.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY
from pyvmm.outcome import ExitKind

DISK_SIZE = 1 << 20
CONSOLE_TEXT = "hello from virtio-console\n"
STATUS_OK, STATUS_IOERR = 0, 1
TIMEOUT_CONSOLE = 0x50  # virtio.S: the console's used ring never moved


def expected_output(first16: bytes, status: int = STATUS_OK) -> str:
    data = first16.hex() if status == STATUS_OK else "00" * 16  # virtio-bad: the data buffer is not in RAM
    return ("virtio: blk rng console ready\n"
            + CONSOLE_TEXT
            + f"virtio: blk status {status:02x} sector0 {data}\n"
            + "virtio: rng used len 64\n"
            + "virtio: ok\n")


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISK_SIZE))
    return str(path)


def first16(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


class NotifyWrites:
    """Counts the QueueNotify writes that reach a transport through the MMIO bus (the exit path)."""

    def __init__(self, attached):
        self.values: list[int] = []
        transport = attached.transport
        write = transport.write

        def counting_write(offset: int, data: bytes) -> None:
            if offset == VIRTIO_MMIO_QUEUE_NOTIFY:
                self.values.append(int.from_bytes(data, "little"))
            write(offset, data)

        transport.write = counting_write  # the bus calls device.write: the instance attribute wins


def attach(vm, disk: str, ioeventfd: bool) -> list[NotifyWrites]:
    """blk, rng, console in that order (slots 0, 1, 2), as the guest expects."""
    if ioeventfd:  # the convenience forms (ioeventfd is their default)
        devices = [vm.add_virtio_blk(disk), vm.add_virtio_rng(), vm.add_virtio_console()]
    else:
        devices = [vm.add_virtio(VirtioBlock(disk), ioeventfd=False), vm.add_virtio(VirtioRng(), ioeventfd=False),
                   vm.add_virtio(VirtioConsole(vm.console.write), ioeventfd=False)]
    return [NotifyWrites(d) for d in devices]


def run_guest(vm, image: str, disk: str, ioeventfd: bool, memory: int, timeout: float):
    vm.add_memory(memory)
    counters = attach(vm, disk, ioeventfd)
    vm.create_vcpus(1)
    vm.boot(image)
    return vm.run(timeout=timeout), counters


def check_served(vm, counters, ioeventfd: bool) -> None:
    """Each used queue completed exactly one chain; the notifications took the expected path."""
    blk, rng, console = vm.virtio
    assert [blk.transport.queues[0].used_idx, rng.transport.queues[0].used_idx,
            console.transport.queues[1].used_idx] == [1, 1, 1]
    for d in vm.virtio:
        assert d.transport.status == (DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                                      | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)
    if ioeventfd:
        # KVM_IOEVENTFD took every QueueNotify write in the kernel: none reached the MMIO bus.
        assert [len(d.notify_fds) for d in vm.virtio] == [1, 1, 2]
        assert [c.values for c in counters] == [[], [], []]
    else:
        assert [d.notify_fds for d in vm.virtio] == [[], [], []]
        assert [c.values for c in counters] == [[0], [0], [1]]


# --- x86_64 (this host) --------------------------------------------------------------------------
# Register accesses of virtio.S (x86): per device 3 probe reads, reset write + 1 read, 2 status writes,
# 2 feature reads and 2 selector writes, 4 feature writes, FEATURES_OK write + read, QueueSel write,
# QueueReady read, QueueNumMax read, QueueNum write, 6 address writes, QueueReady write + read,
# DRIVER_OK write (30); 3 notifies; 3 final status reads.
MMIO_EXITS_X86 = 3 * 30 + 3 + 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ioeventfd", [True, False], ids=["ioeventfd", "exit-path"])
def test_x86_virtio_guest(x86_firmware, disk, ioeventfd):
    from pyvmm.vm import Vm

    with Vm() as vm:
        outcome, counters = run_guest(vm, os.path.join(x86_firmware, "virtio"), disk, ioeventfd, 4 << 20, 60)
        assert vm.console.text() == expected_output(first16(disk))
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, outcome
        check_served(vm, counters, ioeventfd)
        # 3 fewer MMIO exits with ioeventfd: its notifications never left the kernel.
        assert outcome.exits["KVM_EXIT_MMIO"] == MMIO_EXITS_X86 - (3 if ioeventfd else 0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ioeventfd", [True, False], ids=["ioeventfd", "exit-path"])
def test_x86_virtio_guest_bad_blk_buffer(x86_firmware, disk, ioeventfd):
    """The blk data descriptor points outside RAM: the request completes with IOERR, the device (and the
    VM) carry on, and the rng request after it still works."""
    from pyvmm.vm import Vm

    with Vm() as vm:
        outcome, counters = run_guest(vm, os.path.join(x86_firmware, "virtio-bad"), disk, ioeventfd, 4 << 20, 60)
        assert vm.console.text() == expected_output(first16(disk), STATUS_IOERR)
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, outcome
        check_served(vm, counters, ioeventfd)
        assert vm.virtio[0].transport.queues[0].faults == 1


class SilentConsole(VirtioConsole):
    """A console that takes chains and never completes them: the guest's poll must give up."""

    def process(self, queue) -> None:
        pass


def run_silent_console(vm, image: str, disk: str, ioeventfd: bool, memory: int):
    vm.add_memory(memory)
    vm.add_virtio(VirtioBlock(disk), ioeventfd=ioeventfd)
    vm.add_virtio(VirtioRng(), ioeventfd=ioeventfd)
    vm.add_virtio(SilentConsole(vm.console.write), ioeventfd=ioeventfd)
    vm.create_vcpus(1)
    vm.boot(image)
    outcome = vm.run(timeout=120)
    assert vm.console.text() == "virtio: blk rng console ready\nvirtio: FAIL 50\n"
    assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == TIMEOUT_CONSOLE, outcome


@pytest.mark.timeout(120)
def test_x86_virtio_guest_poll_is_bounded(x86_firmware, disk):
    """The console never answers: the guest gives up after its bounded poll (~2.5 s here) with 0x50."""
    from pyvmm.vm import Vm

    with Vm() as vm:
        run_silent_console(vm, os.path.join(x86_firmware, "virtio"), disk, True, 4 << 20)


# --- arm64 (the lab) -------------------------------------------------------------------------------
@pytest.fixture(params=["normal", "protected"])
def arm64_kind(request):
    from tests.arm64 import require_arm64_kvm, require_pkvm

    require_arm64_kvm()
    if request.param == "protected":
        require_pkvm()
    return request.param


@pytest.mark.timeout(300)
@pytest.mark.parametrize("image, status", [("virtio", STATUS_OK), ("virtio-bad", STATUS_IOERR)])
@pytest.mark.parametrize("ioeventfd", [True, False], ids=["ioeventfd", "exit-path"])
def test_arm64_virtio_guest(arm64_kind, disk, ioeventfd, image, status, caplog):
    from pyvmm.vm import Vm
    from tests.arm64 import guest

    if arm64_kind == "protected" and image == "virtio-bad":
        pytest.skip("virtio-bad in a protected VM stops where virtio does (its rings are private, outside the "
                    "DMA pool); the protected case of the virtio image asserts that refusal")
    with Vm(protected=arm64_kind == "protected") as vm:
        outcome, counters = run_guest(vm, guest(image), disk, ioeventfd, 8 << 20, 240)
        text = vm.console.text()
        if arm64_kind == "normal":
            assert text == expected_output(first16(disk), status)
            assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, outcome
            check_served(vm, counters, ioeventfd)
            assert [d.slot.irq for d in vm.virtio] == [16, 17, 18]
            assert all(d.irqfd is not None for d in vm.virtio)  # interrupts are wired by irqfd (the guest polls)
            return
        # Protected: the rings are guest-private pages outside the DMA pool (virtio.S knows nothing of pKVM;
        # virtio-pkvm.S is the guest that shares: tests/test_virtio_pkvm.py), so the device may not read them:
        # pyvmm's accessor refuses, the queue fails, the device sets DEVICE_NEEDS_RESET, and the guest's
        # bounded poll gives up with its own code.
        assert text.startswith("virtio: blk rng console ready\n")
        assert CONSOLE_TEXT not in text
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == TIMEOUT_CONSOLE, outcome
        assert text.endswith("virtio: FAIL 50\n")
        # Every device gave up at DRIVER_OK already (the transport looks at each queue then).
        assert [d.transport.status & DeviceStatus.DEVICE_NEEDS_RESET for d in vm.virtio] == \
            [DeviceStatus.DEVICE_NEEDS_RESET] * 3
        assert vm.virtio[2].transport.queues[1].used_idx == 0
        assert "is private to the protected guest, outside the DMA pool" in caplog.text
        assert [f.device.split("@")[0] for f in outcome.device_faults] == ["virtio-blk", "virtio-rng", "virtio-console"]
        assert all(0x80200000 <= f.gpa < 0x80203000 and not f.write for f in outcome.device_faults)
        assert vm.dma_pool.size == 1 << 20  # an eighth of the 8 MiB guest


@pytest.mark.timeout(300)
def test_arm64_virtio_guest_poll_is_bounded(disk):
    from pyvmm.vm import Vm
    from tests.arm64 import guest, require_arm64_kvm

    require_arm64_kvm()
    with Vm() as vm:
        run_silent_console(vm, guest("virtio"), disk, True, 8 << 20)
