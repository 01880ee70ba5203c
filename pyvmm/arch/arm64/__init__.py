"""arm64: normal and pKVM protected VMs, in-kernel GICv3, the architected timer, a 16550 UART on
MMIO, a generated device tree, and Linux ``Image`` or firmware loading.

Protected VMs (``Vm(protected=True)``) are created with ``KVM_VM_TYPE_ARM_PROTECTED`` ORed with the
IPA size.  The kernel's rules for them are checked before the ioctls: no READONLY or LOG_DIRTY
memslots, no slot delete/move after the first run, and RLIMIT_MEMLOCK large enough for the guest's
memory (every page the guest touches is pinned and charged to it) unless the VMM has CAP_IPC_LOCK.
After the first run, guest pages belong to the guest: the VMM reads only ranges declared shared
(``vm.memory.declare_shared``), since a host read of a guest-owned page makes the kernel reclaim it.
The DMA pool (``vm.dma_pool``, a protected VM's default) is such a range: it lies at the top of RAM,
just below the device tree, and the device tree names it as a ``restricted-dma-pool`` for every
virtio device (``fdt.py``).

Firmware entry registers: x0 = DTB address, x1 = RAM base, x2 = RAM size, x3 = DMA pool base,
x4 = DMA pool size (both 0 without a pool).  Every image finds its boot arguments and initrd in /chosen.

The vCPUs and GIC get what KVM offers the VM's type (``features.py``: PMU, SVE, pointer authentication, the ITS),
less what the user switched off.  A guest can end with a status through the debug-exit register or PSCI
SYSTEM_RESET2 with ``PSCI_RESET2_PYVMM_EXIT`` (``system_event``).
"""

from __future__ import annotations

from ...cmdline import kvm_arm_mode
from ...kvm import uapi
from ...kvm import uapi_arm64 as a64
from ...kvm.errors import ConfigError, KvmError, MissingFeature
from ...kvm.vcpu import VcpuFd
from ...loader import EM_AARCH64, ImageFile, is_elf, load_elf, load_flat, read_image
from ...memory.regions import MemoryRules
from ...outcome import ExitKind, Outcome
from .. import RegisterDump
from . import cpu, fdt, features, gic, layout, linux, pkvm

from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.testdev import SIZE as TESTDEV_SIZE
from pyvmm.devices.testdev import MmioTestDevice
from pyvmm.devices.uart16550 import Uart16550

DEFAULT_IPA_BITS = 40
# PSCI SYSTEM_RESET2's vendor-specific reset type (bit 31 set) by which a guest exits with status x2 (the cookie):
# 0x7079 is "py".  KVM passes every vendor reset type to the VMM (kvm_psci_1_x_call).
PSCI_RESET2_PYVMM_EXIT = 0x8000_7079

TYPE_CHECKING = False  # typing.TYPE_CHECKING (type checkers take it as true), without importing typing at run time
if TYPE_CHECKING:  # imported where used: pyvmm check's rules; the virtio machinery (a DMA pool, a device)
    from ...preflight import RuleAnswer
    from ...virtio import DmaPool, VirtioSlot


def place_dma_pool(ram: int, requested: int | None) -> DmaPool | None:
    """Where the DMA pool goes in a guest of RAM bytes: just below the device tree (the top 2 MiB), its base
    aligned down to DMA_POOL_ALIGN (swiotlb's set_memory_decrypted shares nothing from a base that is not
    granule-aligned).  REQUESTED: the size asked for (0: none), or None for the default (default_dma_pool),
    which is left out when the guest is too small to hold it.  Pure: tests/test_dma_pool.py."""
    size = requested
    if size is None:
        from ...virtio import default_dma_pool  # (the virtio machinery: a VM without a pool never imports it)

        size = default_dma_pool(ram)
    if not size:
        return None
    from ...virtio import DMA_POOL_ALIGN, DmaPool

    dtb_addr = layout.RAM_BASE + ram - (2 << 20)
    gpa = (dtb_addr - size) // DMA_POOL_ALIGN * DMA_POOL_ALIGN
    if gpa < layout.RAM_BASE + layout.MIN_RAM // 2:  # the lowest 2 MiB are the image's
        if requested is None:
            return None
        raise ConfigError(f"a {size >> 10} KiB DMA pool (--dma-pool) leaves too little of the guest's "
                          f"{ram >> 10} KiB of RAM: give it more memory or a smaller --dma-pool")
    return DmaPool(gpa, size)


def place_initrd(size: int, image_end: int, below: int, linux: bool, what: str = "initrd",
                 limit: str = "the device tree") -> int:
    """Where an initrd of SIZE bytes goes: for Linux at the first 2 MiB boundary after the kernel (as before);
    for firmware as high as it fits, page-aligned, ending below BELOW (the DMA pool or the device tree), which
    keeps it away from the scratch memory test guests use just above their image.  Pure: tests/test_arm64_fdt.py."""
    if linux:
        start = (image_end + (2 << 20) - 1) & ~((2 << 20) - 1)
    else:
        start = (below - size) & ~0xFFF
    if start < image_end or start + size > below:
        raise ConfigError(f"{what} ({size} bytes) does not fit in guest RAM between the image (ending at "
                          f"{image_end:#x}) and {limit} at {below:#x}; give the guest more memory")
    return start


class Arm64:
    name = "arm64"
    ram_base = layout.RAM_BASE
    max_vcpus_cap = uapi.KVM_CAP_MAX_VCPUS
    max_vcpus = layout.MAX_VCPUS
    max_vcpus_why = (f"one {layout.GIC_REDIST_SIZE >> 10} KiB GICv3 redistributor per vCPU between "
                     f"{layout.GIC_REDIST:#x} and the UART at {layout.UART:#x}")
    default_image = "hello"
    dma_pool_supported = True

    def device_access_cause(self, vm, access_platform: bool | None) -> str:
        return pkvm.device_access_cause(vm.dma_pool, access_platform)

    def vm_type(self, kvm, protected: bool, ipa_bits: int | None) -> int:
        limit = kvm.check_extension(uapi.KVM_CAP_ARM_VM_IPA_SIZE) or DEFAULT_IPA_BITS
        if ipa_bits is not None and not 32 <= ipa_bits <= limit:
            raise ConfigError(f"IPA size {ipa_bits} bits: this KVM supports 32 to {limit}")
        vm_type = ipa_bits or 0  # 0 = the default 40 bits
        if protected:
            vm_type |= pkvm.vm_type_bits()
        return vm_type

    def memory_rules(self, vm) -> MemoryRules:
        ipa = vm.vm_type & uapi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK or DEFAULT_IPA_BITS
        rules = MemoryRules(max_slots=vm.kvm.check_extension(uapi.KVM_CAP_NR_MEMSLOTS) or 32, max_gpa=1 << ipa,
                            vm_kind=vm.kind, device_windows=self.device_windows(vm))
        return pkvm.restrict_memory_rules(rules) if vm.protected else rules

    def device_windows(self, vm) -> list[tuple[int, int, str]]:
        return [layout.DEVICE_REGION]  # the same for every VM

    def prepare_vm(self, vm) -> None:
        uart = Uart16550(vm.console.write, irq=lambda level: self.irq_line(vm, layout.UART_SPI, level))
        vm.mmio_bus.insert(uart, layout.UART, layout.UART_SIZE, "uart (16550)")

        def guest_exit(status: int) -> None:
            vm.request_stop(Outcome(ExitKind.GUEST_EXIT, status=status, detail=f"guest wrote {status:#x} to the exit register"))

        vm.mmio_bus.insert(DebugExit(guest_exit), layout.DEBUG_EXIT, layout.DEBUG_EXIT_SIZE, "debug-exit")
        testdev = MmioTestDevice()
        vm.mmio_bus.insert(testdev, layout.TEST_DEVICE, TESTDEV_SIZE, "test-device")
        vm.devices.update(uart=uart, testdev=testdev)
        if vm.protected:
            vm.memory.access_guard = pkvm.access_guard(vm.memory)
        self._enable_nisv(vm)
        # what this VM type is offered, and what the user switched on or off (features.py): before any vCPU exists
        vm.cpu_features = features.resolve(vm.feature_request, features.offers(vm.fd), vm.kind)
        if features.CpuFeature.PMU in vm.cpu_features and kvm_arm_mode() == "protected":
            vm.cpu_features.why[features.CpuFeature.PMU] += "; " + features.PKVM_PMU_CAVEAT

    def _enable_nisv(self, vm) -> None:
        """KVM_CAP_ARM_NISV_TO_USER: a data abort outside memslots without a valid syndrome becomes a
        KVM_EXIT_ARM_NISV exit (esr_iss, fault_ipa) the report can explain, instead of KVM_RUN failing
        with ENOSYS.  ``vm.nisv_to_user`` records the answer (or why not)."""
        if vm.protected:
            vm.nisv_to_user = f"not enabled: {pkvm.NISV_REFUSED}"
            return
        if not vm.fd.check_extension(uapi.KVM_CAP_ARM_NISV_TO_USER):
            vm.nisv_to_user = "not offered by this KVM"
            return
        try:
            vm.fd.enable_cap(uapi.KVM_CAP_ARM_NISV_TO_USER)
        except KvmError as err:
            vm.nisv_to_user = f"KVM_ENABLE_CAP failed: {err.errno_name}"
        else:
            vm.nisv_to_user = "enabled"

    def virtio_slot(self, index: int) -> VirtioSlot:
        from ...virtio import VirtioSlot

        if index >= layout.VIRTIO_MAX:
            raise ConfigError(f"at most {layout.VIRTIO_MAX} virtio devices")
        return VirtioSlot(index, layout.VIRTIO_BASE + index * layout.VIRTIO_STRIDE, layout.VIRTIO_SPI_BASE + index)

    def irq_line(self, vm, spi: int, level: bool) -> None:
        """Drive shared peripheral interrupt ``spi`` with KVM_IRQ_LINE (once the GIC exists)."""
        if vm.irqchip is not None and not vm.fd.closed:
            vm.fd.irq_line(gic.spi_irq_line(spi), int(level))

    def init_vcpus(self, vm) -> None:
        """KVM_ARM_VCPU_INIT with the VM's features; SVE's vector lengths, then KVM_ARM_VCPU_FINALIZE; the GICv3
        (the PMU's interrupt is set between its creation and its CTRL_INIT, the PMU initialised after); the ITS."""
        feats = vm.cpu_features
        SVE, PMU, ITS = features.CpuFeature.SVE, features.CpuFeature.PMU, features.CpuFeature.ITS
        cpu.init_vcpus(vm.fd, vm.vcpus, feats.vcpu_feature_bits())
        if SVE in feats:
            with features.setting_up(SVE):
                for vcpu in vm.vcpus:
                    feats.sve_vector_lengths = features.configure_sve(vcpu, vm.feature_request.sve_vector_lengths
                                                                      if vm.feature_request else None)

        def pmu_irqs() -> None:
            with features.setting_up(PMU):
                for vcpu in vm.vcpus:
                    features.set_pmu_irq(vcpu)

        vm.irqchip = gic.create_gicv3(vm.fd, before_init=pmu_irqs if PMU in feats else None)  # per VM, not per Arch
        vm.on_close.append(vm.irqchip.close)
        if PMU in feats:
            with features.setting_up(PMU):
                for vcpu in vm.vcpus:
                    features.init_pmu(vcpu)
        if ITS in feats:
            with features.setting_up(ITS):
                its = gic.create_its(vm.fd)
            vm.on_close.append(its.close)
            vm.devices["its"] = its

    def _ram_size(self, vm) -> int:
        end = layout.RAM_BASE
        for region in vm.memory.regions:
            if region.gpa == end:
                end = region.end
        size = end - layout.RAM_BASE
        if size < layout.MIN_RAM:
            raise ConfigError(f"arm64 guests need at least {layout.MIN_RAM >> 20} MiB of RAM at {layout.RAM_BASE:#x} "
                              f"(have {size:#x} bytes)")
        return size

    def check_before_run(self, vm) -> None:
        """pKVM pins every page the guest touches and charges it to RLIMIT_MEMLOCK (pkvm.check_memlock)."""
        if vm.protected:
            pkvm.check_memlock(vm)

    def predict_first_run(self, vm, slots) -> list[RuleAnswer]:
        from ...preflight import RuleAnswer, bad_page_map_answer

        if vm.protected:
            return pkvm.predict_first_run(vm, slots)
        return [a for a in map(bad_page_map_answer, slots) if a] or [
            RuleAnswer(None, "a normal VM's stage-2 faults are resolved by KVM without pinning "
                             "(user_mem_abort follows PFN mappings too): every backing runs")]

    def load_pvmfw(self, vm, path: str) -> int:
        """Android's pKVM ABI: put pvmfw in its own memslot and tell KVM its IPA (KVM_CAP_ARM_PROTECTED_VM,
        flag SET_FW_IPA).  Upstream pKVM has no pvmfw: that is an error naming the ABI."""
        if not vm.protected:
            raise ConfigError("--pvmfw is for protected VMs (--protected)")
        if not vm.fd.check_extension(uapi.KVM_CAP_ARM_PROTECTED_VM):
            raise MissingFeature("--pvmfw needs Android's pKVM ABI (KVM_CAP_ARM_PROTECTED_VM, 0xffbadab1); this "
                                 "kernel has the upstream protected-VM ABI, which has no pvmfw")
        data = read_image(path, "--pvmfw")
        size = (len(data) + (2 << 20) - 1) & ~((2 << 20) - 1)
        region = vm.add_memory(size, "memfd", gpa=layout.PVMFW)
        vm.memory.write(region.gpa, data)
        vm.fd.enable_cap(uapi.KVM_CAP_ARM_PROTECTED_VM, layout.PVMFW,
                         flags=uapi.KVM_CAP_ARM_PROTECTED_VM_FLAGS_SET_FW_IPA)
        return region.gpa

    def boot(self, vm, image: str | None, mode: str = "auto", cmdline: str | None = None,
             initrd: str | None = None, load_addr: int | None = None, pvmfw: str | None = None,
             console: str = "uart") -> None:
        """Load IMAGE (a Linux ``Image`` or firmware: ELF or flat).  Every image gets ``cmdline`` as
        /chosen/bootargs and ``initrd`` at /chosen/linux,initrd-start/end in its device tree; a Linux kernel without
        ``cmdline`` gets ``console=ttyS0 earlycon`` (``console="virtio"``: hvc0), firmware gets no bootargs."""
        from ...firmware import firmware_path

        if pvmfw is not None:
            self.load_pvmfw(vm, pvmfw)
        if mode not in ("auto", "linux", "firmware"):
            raise ConfigError(f"unknown boot mode {mode!r} for arm64 (choose from auto, linux, firmware)")
        if not vm.vcpus:
            raise ConfigError("create the vCPUs before booting")
        ram = self._ram_size(vm)
        ram_end = layout.RAM_BASE + ram
        dtb_addr = ram_end - (2 << 20)
        pool = place_dma_pool(ram, vm.dma_pool_size)
        below = pool.gpa if pool else dtb_addr  # what the kernel, initrd or firmware must end below
        with ImageFile(image or firmware_path(self.name, self.default_image)) as kernel:
            mode, entry, image_end, args, cmdline = self._load_image(vm, kernel, mode, cmdline, console, load_addr,
                                                                     ram, dtb_addr, pool, below)
        initrd_range = None
        if initrd:
            with ImageFile(initrd, "--initrd") as blob:
                start = place_initrd(blob.size, image_end, below, linux=mode == "linux",
                                     what=f"initrd {initrd}", limit="the DMA pool" if pool else "the device tree")
                load_flat(vm.memory, blob, start, "initrd")
                initrd_range = (start, start + blob.size)
        virtio = [(d.slot.base, d.slot.size, d.slot.irq) for d in vm.virtio]
        dma_pool = None
        if pool:
            from ...virtio import DMA_POOL_ALIGN

            dma_pool = (pool.gpa, pool.size, DMA_POOL_ALIGN)
        feats = vm.cpu_features
        dtb = fdt.build(fdt.DeviceTreeConfig(
            layout.RAM_BASE, ram, [cpu.mpidr(v.vcpu_id) for v in vm.vcpus], cmdline or "", initrd_range, virtio,
            dma_pool,
            pmu_ppi=layout.PMU_PPI if features.CpuFeature.PMU in feats else None,
            its=(layout.GIC_ITS, layout.GIC_ITS_SIZE) if features.CpuFeature.ITS in feats else None))
        if len(dtb) > layout.DTB_MAX:
            raise ConfigError("device tree too large")
        vm.memory.write(dtb_addr, dtb)
        vm.dtb = dtb
        vm.dma_pool = pool
        if pool and vm.protected:  # the guest shares it at boot (swiotlb's set_memory_decrypted: MEM_SHARE)
            vm.memory.declare_shared(pool.gpa, pool.size)
        cpu.enter(vm.vcpus[0], entry, args)

    def _load_image(self, vm, kernel: ImageFile, mode: str, cmdline: str | None, console: str,
                    load_addr: int | None, ram: int, dtb_addr: int, pool: DmaPool | None, below: int):
        """boot()'s kernel or firmware: loaded from its file a chunk at a time; returns the mode, the entry point,
        where the image ends, the entry registers and the command line."""
        image = kernel.path
        if mode == "auto":
            mode = "linux" if linux.is_arm64_image(kernel.head) else "firmware"
        if mode == "linux" and cmdline is None:
            cmdline = f"console={'hvc0' if console == 'virtio' else 'ttyS0'} earlycon"
        if mode == "linux":
            header = linux.parse_header(kernel.head, kernel.size)
            entry = linux.kernel_load_address(layout.RAM_BASE, header)
            if entry + header.image_size > below:
                raise ConfigError(f"kernel needs {header.image_size >> 20} MiB"
                                  + (f" below the {pool.size >> 10} KiB DMA pool" if pool else "")
                                  + "; give the guest more memory")
            load_flat(vm.memory, kernel, entry, "kernel")
            image_end = entry + header.image_size
            args = {0: dtb_addr, 1: 0, 2: 0, 3: 0}
        else:
            avoid = [(pool.gpa, pool.end, "the DMA pool")] if pool else []
            if is_elf(kernel.head):
                img = load_elf(vm.memory, kernel.read(), avoid=avoid)  # firmware: small, read whole to parse
                if img.elf_machine != EM_AARCH64:
                    raise ConfigError(f"{image}: not an arm64 ELF image (e_machine {img.elf_machine})")
            else:
                img = load_flat(vm.memory, kernel, layout.RAM_BASE if load_addr is None else load_addr, avoid=avoid)
            entry = img.entry
            image_end = img.high
            args = {0: dtb_addr, 1: layout.RAM_BASE, 2: ram, 3: pool.gpa if pool else 0, 4: pool.size if pool else 0}
        return mode, entry, image_end, args, cmdline

    def system_event(self, vcpu: VcpuFd, event) -> tuple[ExitKind, int | None, str] | None:
        """PSCI SYSTEM_RESET2 with pyvmm's vendor reset type ends the run with the guest's status (x2, the
        cookie); SYSTEM_OFF2 is a power-off that says so.  None: the generic meaning of the event."""
        flags = event.data[0] if event.data else 0
        if event.type == uapi.KVM_SYSTEM_EVENT_RESET and flags & a64.KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2:
            try:  # KVM leaves x1 (reset type) and x2 (cookie) as the guest passed them; SMC32 ones zero-extended
                reset_type, cookie = vcpu.get_one_reg(cpu.X[1]), vcpu.get_one_reg(cpu.X[2])
            except KvmError as err:  # a pKVM that hides a protected vCPU's registers: a plain reset
                return ExitKind.RESET, event.type, f"PSCI SYSTEM_RESET2 (x1/x2 unreadable: {err})"
            if reset_type & 0xFFFF_FFFF == PSCI_RESET2_PYVMM_EXIT:  # the status as given: pyvmm run caps it at 255
                return (ExitKind.GUEST_EXIT, cookie,
                        f"guest exited with status {cookie} (PSCI SYSTEM_RESET2, pyvmm exit type "
                        f"{PSCI_RESET2_PYVMM_EXIT:#x})")
            return ExitKind.RESET, event.type, f"PSCI SYSTEM_RESET2 type {reset_type:#x} cookie {cookie:#x}"
        if event.type == uapi.KVM_SYSTEM_EVENT_SHUTDOWN and flags & a64.KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2:
            return ExitKind.POWER_OFF, event.type, "PSCI SYSTEM_OFF2 (hibernate-off)"
        return None

    def registers(self, vcpu: VcpuFd) -> RegisterDump:
        return cpu.registers(vcpu)

    def code_address(self, vcpu: VcpuFd, vm) -> tuple[int | None, str]:
        return cpu.code_address(vcpu, vm)

    def pc(self, vcpu: VcpuFd) -> int:
        return vcpu.get_one_reg(cpu.PC)
