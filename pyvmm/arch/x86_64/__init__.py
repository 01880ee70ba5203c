"""x86_64: VM set-up, platform devices (COM1, debug-exit, reset, test device) and boot paths.

Boot modes: ``real`` (flat binary, CS based at the load address), ``long``
(ELF64 or flat binary entered in 64-bit mode with an identity map), ``linux``
(bzImage, 64-bit boot protocol).  ``auto`` picks by the image's format.

Entry registers for firmware: RDI = RAM size in bytes below the MMIO hole
(RAM beyond 3 GiB continues at 4 GiB; firmware sees only the part below the
hole, which its 4 GiB identity map covers), RSI = vCPU index, RDX = number of
vCPUs, RSP = a private stack below 0x80000.  Linux gets all of it in its E820 map.
"""

from __future__ import annotations


from ...kvm import uapi
from ...kvm.errors import ConfigError
from ...kvm.vcpu import VcpuFd
from ...loader import EM_X86_64, ImageFile, is_elf, load_elf, load_flat
from ...memory.regions import MemoryRules
from ...outcome import ExitKind, Outcome
from .. import RegisterDump
from . import cpu, layout, linux

from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.reset_control import ResetControl
from pyvmm.devices.testdev import SIZE as TESTDEV_SIZE
from pyvmm.devices.testdev import PORT_SIZE as PORT_TEST_SIZE
from pyvmm.devices.testdev import MmioTestDevice, PortTestDevice
from pyvmm.devices.uart16550 import Uart16550

TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time
if TYPE_CHECKING:  # imported where used: pyvmm check's rules, and the virtio machinery
    from ...preflight import RuleAnswer
    from ...virtio import VirtioSlot

BOOT_MODES = ("auto", "real", "long", "linux")


class X86_64:
    name = "x86_64"
    ram_base = 0
    max_vcpus_cap = uapi.KVM_CAP_MAX_VCPUS
    max_vcpus = layout.MAX_VCPUS
    max_vcpus_why = (f"one {layout.STACK_SIZE:#x}-byte boot stack per vCPU between {layout.STACK_BOTTOM:#x} "
                     f"and {layout.STACK_TOP:#x}")
    default_image = "hello"

    dma_pool_supported = False  # no device tree to describe one

    def device_access_cause(self, vm, access_platform: bool | None) -> str:
        return "x86_64 VMs have no private memory"  # not reached: only protected (arm64) VMs refuse accesses

    def vm_type(self, kvm, protected: bool, ipa_bits: int | None) -> int:
        if protected:
            raise ConfigError("protected VMs (--protected) are arm64 pKVM VMs; this host is x86_64")
        if ipa_bits is not None:
            raise ConfigError("--ipa-bits is an arm64 option")
        return uapi.KVM_X86_DEFAULT_VM

    def memory_rules(self, vm) -> MemoryRules:
        return MemoryRules(max_slots=vm.kvm.check_extension(uapi.KVM_CAP_NR_MEMSLOTS) or 32,
                           max_gpa=1 << 46, readonly_allowed=bool(vm.kvm.check_extension(uapi.KVM_CAP_READONLY_MEM)),
                           vm_kind=vm.kind, device_windows=self.device_windows(vm))

    def device_windows(self, vm) -> list[tuple[int, int, str]]:
        return [(layout.MMIO_HOLE_START, layout.MMIO_HOLE_END, layout.MMIO_HOLE_NAME)]  # the same for every VM

    def prepare_vm(self, vm) -> None:
        if vm.feature_request is not None:
            raise ConfigError("--cpu-features and --sve-vector-lengths are for arm64 VMs (PMU, SVE, pointer "
                              "authentication, ITS); an x86_64 VM's CPUID is what KVM_GET_SUPPORTED_CPUID offers")
        vm.fd.set_tss_addr(layout.TSS_ADDR)
        vm.fd.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        uart = Uart16550(vm.console.write)
        vm.io_bus.insert(uart, layout.COM1_PORT, 8, "COM1 (16550)")

        def guest_exit(status: int) -> None:
            vm.request_stop(Outcome(ExitKind.GUEST_EXIT, status=status, detail=f"guest wrote {status:#x} to the exit port"))

        def reset() -> None:
            vm.request_stop(Outcome(ExitKind.RESET, detail="guest wrote the reset bit to port 0xcf9"))

        vm.io_bus.insert(DebugExit(guest_exit), layout.DEBUG_EXIT_PORT, 4, "debug-exit")
        vm.io_bus.insert(ResetControl(reset), layout.RESET_CONTROL_PORT, 1, "reset-control")
        testdev = MmioTestDevice()
        vm.mmio_bus.insert(testdev, layout.TEST_DEVICE_MMIO, TESTDEV_SIZE, "test-device")
        porttest = PortTestDevice()
        vm.io_bus.insert(porttest, layout.PORT_TEST_DEVICE_PORT, PORT_TEST_SIZE, "port-test-device")
        vm.devices.update(uart=uart, testdev=testdev, porttest=porttest)

    def init_vcpus(self, vm) -> None:
        supported = vm.kvm.supported_cpuid()
        for vcpu in vm.vcpus:
            cpu.set_cpuid(vcpu, supported)

    def _ram_ranges(self, vm) -> list[tuple[int, int]]:
        """The guest's RAM as [start, end) ranges: contiguous memslots from 0 and, when they fill everything
        below the MMIO hole, contiguous memslots from 4 GiB (where ``Vm.add_memory`` puts the rest)."""
        def contiguous_end(start: int) -> int:
            end = start
            for region in vm.memory.regions:  # sorted by gpa
                if region.gpa == end:
                    end = region.end
            return end

        low = contiguous_end(0)
        if low < layout.MIN_RAM:
            raise ConfigError(f"x86_64 guests need at least {layout.MIN_RAM >> 20} MiB of RAM at address 0 "
                              f"(have {low:#x} bytes)")
        high = contiguous_end(layout.MMIO_HOLE_END)
        if low == layout.MMIO_HOLE_START and high > layout.MMIO_HOLE_END:
            return [(0, low), (layout.MMIO_HOLE_END, high)]
        return [(0, low)]  # memory at 4 GiB past a gap below the hole is a region of the user's, not RAM

    def boot(self, vm, image: str | None, mode: str = "auto", cmdline: str | None = None,
             initrd: str | None = None, load_addr: int | None = None, pvmfw: str | None = None,
             console: str = "uart") -> None:
        """Load IMAGE: a bzImage (``cmdline``, default ``console=ttyS0``, and ``initrd`` through boot_params; all
        RAM in its E820 map), or firmware (ELF: long mode; flat: real mode), which gets rdi = RAM size below the
        MMIO hole, rsi = vCPU index, rdx = vCPU count and nothing else: a command line or initrd for firmware is
        refused, since there is nowhere to put it."""
        from ...firmware import firmware_path

        if pvmfw is not None:
            raise ConfigError("--pvmfw is for arm64 protected VMs (Android's pKVM ABI)")
        if mode not in BOOT_MODES:
            raise ConfigError(f"unknown boot mode {mode!r} (choose from {', '.join(BOOT_MODES)})")
        if not vm.vcpus:
            raise ConfigError("create the vCPUs before booting")
        ranges = self._ram_ranges(vm)
        with ImageFile(image or firmware_path(self.name, self.default_image)) as kernel:
            self._load(vm, kernel, ranges, mode, cmdline, initrd, load_addr, console)

    def _load(self, vm, kernel: ImageFile, ranges: list[tuple[int, int]], mode: str, cmdline: str | None,
              initrd: str | None, load_addr: int | None, console: str) -> None:
        image = kernel.path
        ram = ranges[0][1]  # what firmware gets in rdi: RAM below the hole, all of it identity-mapped (cpu.py)
        if mode == "auto":
            mode = "linux" if linux.is_bzimage(kernel.head) else "long" if is_elf(kernel.head) else "real"
        if mode != "linux":
            for what, value in (("--cmdline", cmdline), ("--initrd", initrd)):
                if value is not None:
                    raise ConfigError(f"{what} is only for Linux kernels on x86_64: firmware gets rdi = RAM size, "
                                      "rsi = vCPU index, rdx = vCPU count, and no command line or initrd")
        if cmdline is None:
            cmdline = "console=hvc0 earlycon" if console == "virtio" else "console=ttyS0"
        nvcpus = len(vm.vcpus)
        if mode == "real":
            if is_elf(kernel.head):
                raise ConfigError("real mode takes a flat binary, not an ELF file")
            addr = layout.REAL_MODE_DEFAULT_LOAD if load_addr is None else load_addr
            if addr % 16 or addr + kernel.size > 0xA0000:
                raise ConfigError(f"real-mode load address {addr:#x} must be 16-byte aligned and the image must end below 0xa0000")
            load_flat(vm.memory, kernel, addr, "real-mode image")
            for vcpu in vm.vcpus:
                cpu.enter_real_mode(vcpu, addr, addr, 0x7000 - vcpu.vcpu_id * 0x100,
                                    dict(rdi=ram, rsi=vcpu.vcpu_id, rdx=nvcpus))
            return
        if mode == "linux":
            if nvcpus != 1:
                raise ConfigError("Linux boot on x86_64 supports one vCPU (no in-kernel irqchip or MP tables yet)")
            initrd_file = ImageFile(initrd, "--initrd") if initrd else None
            try:
                cpu.write_boot_tables(vm.memory)
                boot = linux.load_bzimage(vm.memory, ranges, kernel, cmdline, initrd_file)
            finally:
                if initrd_file is not None:
                    initrd_file.close()
            cpu.enter_long_mode(vm.vcpus[0], boot.entry, layout.STACK_TOP, dict(rsi=boot.boot_params))
            return
        reserved = layout.reserved_ranges(nvcpus)
        if is_elf(kernel.head):
            img = load_elf(vm.memory, kernel.read(), avoid=reserved)  # firmware: small, read whole to parse
            if img.elf_machine != EM_X86_64 or img.elf_class != 2:
                raise ConfigError(f"{image}: not an x86_64 ELF64 image (e_machine {img.elf_machine})")
        else:
            img = load_flat(vm.memory, kernel, layout.KERNEL_LOAD if load_addr is None else load_addr, avoid=reserved)
        cpu.write_boot_tables(vm.memory)  # after the image: a load that would overlap them was refused
        for vcpu in vm.vcpus:
            cpu.enter_long_mode(vcpu, img.entry, layout.STACK_TOP - vcpu.vcpu_id * layout.STACK_SIZE,
                                dict(rdi=ram, rsi=vcpu.vcpu_id, rdx=nvcpus))

    def system_event(self, vcpu, event):
        return None

    def virtio_slot(self, index: int) -> VirtioSlot:
        from ...virtio import VirtioSlot

        if index >= layout.VIRTIO_MAX:
            raise ConfigError(f"at most {layout.VIRTIO_MAX} virtio devices")
        return VirtioSlot(index, layout.VIRTIO_BASE + index * layout.VIRTIO_STRIDE, None)

    def irq_line(self, vm, irq: int, level: bool) -> None:
        raise ConfigError("x86_64 VMs have no in-kernel interrupt controller yet")

    def check_before_run(self, vm) -> None:
        pass

    def predict_first_run(self, vm, slots) -> list[RuleAnswer]:
        from ...preflight import RuleAnswer, bad_page_map_answer

        return [a for a in map(bad_page_map_answer, slots) if a] or [
            RuleAnswer(None, "an x86 VM's EPT faults are resolved by KVM without long-term pinning: every "
                             "backing runs")]

    def registers(self, vcpu: VcpuFd) -> RegisterDump:
        return cpu.registers(vcpu)

    def code_address(self, vcpu: VcpuFd, vm) -> tuple[int | None, str]:
        return cpu.code_address(vcpu)

    def pc(self, vcpu: VcpuFd) -> int:
        return vcpu.get_regs().rip
