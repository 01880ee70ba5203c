"""Register dumps and the PC's guest-physical address for fault reports (``Arch.registers``,
``Arch.code_address``): on real x86_64 guests here, on arm64 guests (normal and pKVM protected) in the lab,
and the arm64 stage-1 walk and refusal paths against stand-ins everywhere."""

from __future__ import annotations

import errno
import os

import pytest

from pyvmm.arch import RegisterDump
from pyvmm.arch.arm64 import cpu as a64cpu
from pyvmm.arch.arm64.features import CpuFeature, FeatureRequest
from pyvmm.kvm import uapi_arm64 as a64
from pyvmm.kvm import uapi_x86 as x86
from pyvmm.kvm.errors import GuestMemoryError, KvmError
from pyvmm.outcome import ExitKind
from tests.arm64 import guest, require_arm64_kvm, require_pkvm

ARM64_RAM = 0x8000_0000


# --- x86_64, real guests -----------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_x86_triple_fault_registers_events_and_code(boot_x86):
    """shutdown-triple runs ud2 with an empty IDT: KVM_EXIT_SHUTDOWN with rip on the ud2."""
    from pyvmm.arch.x86_64 import layout

    seen = {}

    def inspect(vm):
        vcpu = vm.vcpus[0]
        seen["dump"] = vm.arch.registers(vcpu)
        gpa, why = vm.arch.code_address(vcpu, vm)
        seen["code"] = (gpa, why, vm.memory.read(gpa, 2) if gpa is not None else None)
        seen["unmapped"] = vcpu.translate(1 << 40)

    run = boot_x86("shutdown-triple", inspect=inspect)
    assert run.outcome.kind is ExitKind.SHUTDOWN
    dump = seen["dump"]
    assert isinstance(dump, RegisterDump) and dump.refused == {}
    v = dump.values
    names = list(v)
    assert names[:18] == [n for n, _ in x86.kvm_regs._fields_]  # GPRs, rip, rflags first
    for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        assert {f"{seg}_{p}" for p in ("selector", "base", "limit", "attrs")} <= set(v)
    assert v["cs_selector"] == layout.BOOT_CS and v["ds_selector"] == v["ss_selector"] == layout.BOOT_DS
    assert v["cs_attrs"] & 0xF == 0xB and v["cs_attrs"] >> 13 & 1  # code, accessed; L = 1 (64-bit)
    assert v["cs_attrs"] >> 7 & 1 and v["ds_attrs"] & 0xF == 0x3  # present; data read/write, accessed
    assert (v["gdt_base"], v["gdt_limit"]) == (layout.GDT_ADDR, 0x1F) and v["idt_limit"] == 0
    assert v["cr0"] & x86.X86_CR0_PG and v["cr0"] & x86.X86_CR0_PE and v["cr3"] == layout.PML4_ADDR
    assert v["efer"] & x86.EFER_LMA and v["cr4"] & x86.X86_CR4_PAE and "cr8" in v and "apic_base" in v
    # KVM_GET_VCPU_EVENTS: the #UD (vector 6) that could not be delivered
    assert dump.events["exception_nr"] == 6
    assert {"exception_injected", "exception_pending", "exception_error_code", "nmi_pending",
            "interrupt_injected", "triple_fault_pending"} <= set(dump.events)
    gpa, why, code = seen["code"]
    assert gpa == v["rip"] and "KVM_TRANSLATE" in why  # identity-mapped
    assert code == b"\x0f\x0b"  # ud2
    assert not seen["unmapped"].valid


@pytest.mark.timeout(60)
def test_x86_real_mode_code_address(boot_x86):
    seen = {}

    def inspect(vm):
        seen["dump"] = vm.arch.registers(vm.vcpus[0])
        seen["code"] = vm.arch.code_address(vm.vcpus[0], vm)

    run = boot_x86("hello16.bin", inspect=inspect)
    assert run.outcome.kind is ExitKind.HALT
    v = seen["dump"].values
    assert not v["cr0"] & x86.X86_CR0_PE and v["cs_base"] == v["cs_selector"] << 4
    gpa, why = seen["code"]
    assert gpa == v["cs_base"] + v["rip"] and why.startswith("real mode")


# --- stand-ins: refusals and the arm64 stage-1 walk -------------------------------------------------
class FakeArmVcpu:
    def __init__(self, regs: dict[int, int], refuse: dict[int, int] | None = None):
        self.regs, self.refuse = regs, refuse or {}

    def get_one_reg(self, reg_id: int) -> int:
        if reg_id in self.refuse:
            raise KvmError("KVM_GET_ONE_REG", self.refuse[reg_id])
        return self.regs.get(reg_id, 0)


class FakeMemory:
    def __init__(self, words: dict[int, int], private: tuple[int, int] | None = None):
        self.words, self.private = words, private

    def read_u64(self, gpa: int) -> int:
        if self.private and self.private[0] <= gpa < self.private[1]:
            raise GuestMemoryError(f"{gpa:#x} is a protected guest's private page")
        return self.words.get(gpa, 0)


class FakeVm:
    def __init__(self, memory):
        self.memory = memory


def test_arm64_refused_registers_are_listed_not_dropped():
    vcpu = FakeArmVcpu({a64cpu.PC: 0x80000000}, refuse={a64.ESR_EL1: errno.EPERM, a64cpu.X[3]: errno.ENOENT})
    dump = a64cpu.registers(vcpu, protected=True)
    assert set(dump.values) | set(dump.refused) == {n for n, _ in a64cpu.REPORT_REGISTERS}
    assert set(dump.refused) == {"esr_el1", "x3"}
    assert "EPERM" in dump.refused["esr_el1"] and "hidden by pKVM" in dump.refused["esr_el1"]
    assert list(dump.values)[:4] == ["pc", "pstate", "sp_el0", "sp_el1"] and dump.events is None
    normal = a64cpu.registers(vcpu, protected=False)
    assert "pKVM" not in normal.refused["x3"] and "ENOENT" in normal.refused["x3"]


def _walk_setup(sctlr=1, tcr=None):
    """39-bit VAs, 4K granule.  TTBR0: VA 1 GiB block -> 0x80000000; VA 0x80203456 via L1/L2/L3 tables.
    TTBR1: 0xffffff8000001000 -> page 0x80400000."""
    l1, l2, l3, h1, h2, h3 = (0x8010_0000 + i * 0x1000 for i in range(6))
    words = {
        l1 + 1 * 8: 0x8000_0000 | 0x1,  # level-1 block
        l1 + 2 * 8: l2 | 0x3, l2 + 1 * 8: l3 | 0x3, l3 + 3 * 8: 0x8034_5000 | 0x3,
        h1 + 0: h2 | 0x3, h2 + 0: h3 | 0x3, h3 + 1 * 8: 0x8040_0000 | 0x3,
    }
    if tcr is None:
        tcr = 25 | (25 << 16) | (0b10 << 30)  # T0SZ = T1SZ = 25, TG0 = 4K, TG1 = 4K
    regs = {a64.SCTLR_EL1: sctlr, a64.TCR_EL1: tcr, a64.TTBR0_EL1: l1, a64.TTBR1_EL1: h1}
    return regs, words


@pytest.mark.parametrize("pc, expected", [
    (0x4000_1234, 0x8000_1234),  # block
    (0x8020_3456, 0x8034_5456),  # page through three levels
    (0xFFFF_FF80_0000_1ABC, 0x8040_0ABC),  # TTBR1
])
def test_arm64_stage1_walk(pc, expected):
    regs, words = _walk_setup()
    regs[a64cpu.PC] = pc
    gpa, why = a64cpu.code_address(FakeArmVcpu(regs), FakeVm(FakeMemory(words)))
    assert gpa == expected, why
    assert "stage-1 walk" in why


def test_arm64_code_address_reasons():
    regs, words = _walk_setup(sctlr=0)
    regs[a64cpu.PC] = 0x8000_0040
    assert a64cpu.code_address(FakeArmVcpu(regs), FakeVm(FakeMemory(words))) == \
        (0x8000_0040, "MMU off (SCTLR_EL1.M = 0): the PC is a physical address")
    regs, words = _walk_setup()
    regs[a64cpu.PC] = 0xC000_0000  # level-1 entry 3: invalid
    gpa, why = a64cpu.code_address(FakeArmVcpu(regs), FakeVm(FakeMemory(words)))
    assert gpa is None and "not mapped" in why
    regs[a64cpu.PC] = 0x8020_3456
    gpa, why = a64cpu.code_address(FakeArmVcpu(regs), FakeVm(FakeMemory(words, private=(0x8010_1000, 0x8010_2000))))
    assert gpa is None and "level-2 table at 0x80101000" in why and "private" in why
    regs, words = _walk_setup(tcr=25 | (0b01 << 14))  # TG0 = 64K
    regs[a64cpu.PC] = 0x4000_0000
    gpa, why = a64cpu.code_address(FakeArmVcpu(regs), FakeVm(FakeMemory(words)))
    assert gpa is None and "4K granule" in why
    gpa, why = a64cpu.code_address(FakeArmVcpu({}, refuse={a64cpu.PC: errno.EPERM}), FakeVm(FakeMemory({})))
    assert gpa is None and "EPERM" in why


# --- arm64, real guests (the lab) -------------------------------------------------------------------
def _boot_arm64(kind: str, name: str = "hello", feature_request=None):
    from pyvmm.vm import Vm

    vm = Vm(protected=kind == "protected", feature_request=feature_request)
    try:
        vm.add_memory(8 << 20, "anon")
        vm.create_vcpus(1)
        vm.boot(guest(name))
        outcome = vm.run(timeout=120)
    except BaseException:
        vm.close()
        raise
    return vm, outcome


@pytest.mark.timeout(300)
def test_arm64_registers_normal_and_protected():
    """pKVM in Linux 7.2 does not hide a protected vCPU's registers: KVM_GET_ONE_REG answers with the
    same values as a normal VM running the same guest (measured in the lab), so nothing is refused."""
    require_arm64_kvm()
    require_pkvm()
    dumps, sve = {}, {}
    for kind in ("normal", "protected"):
        vm, outcome = _boot_arm64(kind)
        with vm:
            assert outcome.kind is ExitKind.POWER_OFF
            dumps[kind] = vm.arch.registers(vm.vcpus[0])
            sve[kind] = CpuFeature.SVE in vm.cpu_features
            gpa, why = vm.arch.code_address(vm.vcpus[0], vm)
            assert gpa == dumps[kind].values["pc"] and "MMU off" in why
    expected = [n for n, _ in a64cpu.REPORT_REGISTERS]
    for kind, dump in dumps.items():
        assert dump.refused == {}, (kind, dump.refused)
        assert list(dump.values) == expected + (["zcr_el1"] if sve[kind] else [])  # SVE vCPUs: ZCR_EL1 too
        assert ARM64_RAM <= dump.values["pc"] < ARM64_RAM + (8 << 20)
        assert dump.values["mpidr_el1"] & 0xFFFFFF == 0
    for name in ("pc", "sp_el1", "x30", "pstate", "sctlr_el1"):  # the guest's own state, both kinds
        assert dumps["protected"].values[name] == dumps["normal"].values[name], name


@pytest.mark.timeout(300)
def test_arm64_core_register_sizes_on_kvm():
    """V registers are 128-bit, FPSR/FPCR 32-bit: KVM accepts the ids with those sizes (on a vCPU without SVE:
    with SVE the V registers live in the Z registers and KVM refuses them as core registers)."""
    require_arm64_kvm()
    vm, _ = _boot_arm64("normal")
    with vm:
        if CpuFeature.SVE in vm.cpu_features:
            with pytest.raises(KvmError) as err:
                vm.vcpus[0].get_one_reg(a64cpu.V[7])
            assert err.value.errno == errno.EINVAL
    vm, _ = _boot_arm64("normal", feature_request=FeatureRequest({CpuFeature.SVE: False}))
    with vm:
        vcpu = vm.vcpus[0]
        value = (0x0123456789ABCDEF << 64) | 0xFEDCBA9876543210
        vcpu.set_one_reg(a64cpu.V[7], value)
        assert vcpu.get_one_reg(a64cpu.V[7]) == value
        vcpu.set_one_reg(a64cpu.FPSR, 0x08000000)
        assert vcpu.get_one_reg(a64cpu.FPSR) == 0x08000000
        vcpu.get_one_reg(a64cpu.FPCR)
        with pytest.raises(KvmError):  # the old, wrong id (U64 at the 8-byte-misplaced offset)
            vcpu.get_one_reg(a64.KVM_REG_ARM64 | a64.KVM_REG_SIZE_U64 | a64.KVM_REG_ARM_CORE | (848 - 8) // 4)


def _identity_tables(vm, base: int) -> None:
    """Level-1 table at ``base`` (39-bit VA, 4K): VA 0 -> 1 GiB block at 0 (devices), VA 2 GiB -> RAM."""
    vm.memory.write(base, bytes(4096), force=True)
    vm.memory.write_u64(base + 0 * 8, 0x0000_0000 | 0x1 | (0 << 2) | (1 << 10))  # AttrIndx 0, AF
    vm.memory.write_u64(base + 2 * 8, 0x8000_0000 | 0x1 | (1 << 2) | (1 << 10))  # AttrIndx 1, AF


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["normal", "protected"])
def test_arm64_code_address_with_mmu_on(kind):
    """With SCTLR_EL1.M set the PC is walked through the guest's tables; on a protected VM that has run,
    the tables are the guest's private memory and the walk says so instead of reading them."""
    require_arm64_kvm()
    if kind == "protected":
        require_pkvm()
    vm, _ = _boot_arm64(kind)
    with vm:
        tables = ARM64_RAM + (6 << 20)
        if kind == "normal":
            _identity_tables(vm, tables)
        vcpu = vm.vcpus[0]
        vcpu.set_one_reg(a64.TCR_EL1, 25 | (1 << 23))  # T0SZ 25, TG0 4K, EPD1
        vcpu.set_one_reg(a64.TTBR0_EL1, tables)
        vcpu.set_one_reg(a64.SCTLR_EL1, vcpu.get_one_reg(a64.SCTLR_EL1) | 1)
        vcpu.set_one_reg(a64cpu.PC, ARM64_RAM + 0x40)
        gpa, why = vm.arch.code_address(vcpu, vm)
        if kind == "normal":
            assert gpa == ARM64_RAM + 0x40 and "stage-1 walk" in why
        else:
            assert gpa is None and f"level-1 table at {tables:#x}" in why, why
    assert os.path.exists(guest("hello"))
