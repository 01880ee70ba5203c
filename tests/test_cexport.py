"""Standalone C reproducers (pyvmm/cexport.py), made from the scenario catalogue (pyvmm/scenarios/export.py,
``pyvmm scenario export NAME --c FILE``).

On this machine: each scenario maps onto the reproducer it describes (or is refused, naming what C cannot say);
the generated C says what pyvmm does (backings, memslot calls, vCPU, GIC, image, registers, EXPECTED) and
compiles with ``aarch64-linux-gnu-gcc -std=gnu11 -Wall -Wextra -Werror -static`` against Linux
7.2's uapi headers (missing compiler or headers: skip, or fail under PYVMM_REQUIRE_UAPI=1 as in test_uapi.py).
In the arm64 lab: the static binaries scripts/build-reproducers left in firmware/arm64/build/ (the lab has no
compiler) run, and each one's RESULT line is its EXPECTED line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess

import pytest

from pyvmm import cexport
from pyvmm.arch.arm64 import layout
from pyvmm.cexport import CReproducer, Expect, Memslot, Step
from pyvmm.kvm import uapi, uapi_arm64
from pyvmm.kvm.errors import ConfigError
from pyvmm.outcome import ExitKind
from pyvmm.scenarios import find, scenarios
from pyvmm.scenarios import export as scenario_export
from pyvmm.scenarios.host import CMA_HEAP_PREFERRED, DISK_FILESYSTEMS
from pyvmm.scenarios.model import MEMTOUCH, Alternative, Answer, Confinement, Expected, MiB, Scenario, Slot, Target
from pyvmm.scenarios.steps import TruncateFile
from tests.arm64 import FIRMWARE, require_arm64_kvm, require_pkvm
from tests.conftest import run_cli
from tests.test_uapi import uapi_include_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAM = layout.RAM_BASE
EXPORTABLE = scenario_export.exportable(scenarios())
NOT_EXPORTABLE = {"pkvm-host-read": "a host read of a page the protected guest owns",
                  "readonly-slot-write": "x86_64 only",
                  "hugetlb-exhausted": "exhausting the hugetlb pool"}


def missing(what: str) -> None:
    """Skip for a missing tool, or fail where the check must run (CI: PYVMM_REQUIRE_UAPI=1, as test_uapi.py)."""
    if os.environ.get("PYVMM_REQUIRE_UAPI") == "1":
        pytest.fail(f"PYVMM_REQUIRE_UAPI=1 but {what}")
    pytest.skip(what)


@pytest.fixture(scope="module")
def arm64_guests() -> str:
    """firmware/arm64/build with memtouch and hello: built here with the (cross) assembler, or prebuilt (the lab)."""
    assembler = "as" if os.uname().machine == "aarch64" else "aarch64-linux-gnu-as"
    if shutil.which(assembler) and shutil.which("make"):
        proc = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "firmware", "arm64")], capture_output=True,
                              text=True)
        if proc.returncode:
            missing(f"make -C firmware/arm64 failed: {proc.stderr[-1500:]}")
    for name in ("memtouch", "hello"):
        if not os.path.exists(os.path.join(FIRMWARE, name)):
            missing(f"the arm64 guests are not built and cannot be here (no {assembler}: Debian package "
                    "binutils-aarch64-linux-gnu)")
    return FIRMWARE


@pytest.fixture(scope="module")
def toolchain() -> tuple[str, str]:
    """(compiler, uapi include dir) for the arm64 C files."""
    cc, include = cexport.compiler(), uapi_include_dir()
    gaps = []
    if cc is None:
        gaps.append(f"no arm64 C compiler ({cexport.CROSS_CC}; Debian package gcc-aarch64-linux-gnu)")
    if include is None:
        gaps.append("no Linux 7.2 uapi headers (scripts/fetch-uapi-headers, or scripts/dev setup)")
    if gaps:
        missing(" and ".join(gaps))
    return cc, include


def everything(tmp: str) -> CReproducer:
    """Every backing kind, every step and an alternative in one reproducer (it only has to compile)."""
    slots = [Memslot(0, RAM, 4 << 20, "anon"), Memslot(1, RAM + (4 << 20), 2 << 20, "memfd"),
             Memslot(2, RAM + (6 << 20), 2 << 20, "memfd-hugetlb"), Memslot(3, RAM + (8 << 20), 1 << 20, "guest-memfd"),
             Memslot(4, RAM + (9 << 20), 1 << 20, "udmabuf:memfd"), Memslot(5, RAM + (10 << 20), 1 << 20, "udmabuf"),
             Memslot(6, RAM + (11 << 20), 1 << 20, "dma-heap:system"),
             Memslot(7, 1 << 32, 64 << 10, "anon", uapi.KVM_MEM_READONLY),
             Memslot(8, (1 << 32) + (1 << 20), 1 << 20, f"file:{tmp}/ram.img")]
    image, gpa, entry = cexport.guest_image(os.path.join(FIRMWARE, "memtouch"))
    return CReproducer("everything", "All of it.", False, slots, image, gpa, entry,
                       cexport.firmware_registers(slots, False), Expect.call_succeeds("KVM_SET_USER_MEMORY_REGION"),
                       tuple(Step), ipa_bits=40, guest="memtouch", title="every backing, every step",
                       alternatives=(Expect("KVM_RUN errno=EFAULT", 'on "some" hosts'),))


def compile_c(text: str, tmp_path, toolchain, name: str) -> str:
    cc, include = toolchain
    src, out = tmp_path / f"{name}.c", str(tmp_path / name)
    src.write_text(text)
    proc = subprocess.run(cexport.compile_command(str(src), out, include, cc), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cc} failed on {name}.c:\n{proc.stderr[-4000:]}"
    return out


def image_bytes(text: str) -> bytes:
    block = text.split("guest_image[] = {", 1)[1].split("};", 1)[0]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", block))


def backing_lines(i: int, backing: str) -> list[str]:
    """What the C text must say to make slot ``i`` on ``backing`` as pyvmm's backing.py makes it."""
    kind, _, arg = backing.partition(":")
    return {
        "anon": [f"make_anon(&slots[{i}]);", "MAP_PRIVATE | MAP_ANONYMOUS"],
        "memfd": [f"make_memfd(&slots[{i}]);", 'memfd("pyvmm-memfd", s->size, MFD_CLOEXEC)'],
        "udmabuf": [f"make_udmabuf(&slots[{i}], {0 if arg == 'memfd' else 1});", "MFD_CLOEXEC | MFD_ALLOW_SEALING",
                    "F_ADD_SEALS, F_SEAL_SHRINK", "UDMABUF_FLAGS_CLOEXEC", "IOCTL(dev, UDMABUF_CREATE, &create)"],
        "guest-memfd": [f"make_guest_memfd(kvm, vm, &slots[{i}]);",
                        "GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED", "KVM_CAP_GUEST_MEMFD_FLAGS",
                        "IOCTL(vm, KVM_CREATE_GUEST_MEMFD, &gmem)", "F_SETFD, FD_CLOEXEC",
                        "IOCTL(vm, KVM_SET_USER_MEMORY_REGION2, &region)", ".flags = s->flags | KVM_MEM_GUEST_MEMFD"],
        "memfd-hugetlb": [f"make_memfd_hugetlb(&slots[{i}]);", "MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB"],
        "dma-heap": [f'make_dma_heap(&slots[{i}], "{arg}", "/dev/dma_heap/{arg}");',
                     ".fd_flags = O_RDWR | O_CLOEXEC, .heap_flags = 0", "IOCTL(dev, DMA_HEAP_IOCTL_ALLOC, &alloc)"],
        "file": [f'make_file(&slots[{i}], "{arg}");', "O_RDWR | O_CREAT | O_CLOEXEC, 0600"],
    }[kind]


# --- from a scenario to a reproducer ------------------------------------------------------------------------
def test_the_catalogue_splits_into_exportable_and_not():
    assert {s.name for s in scenarios()} - {s.name for s in EXPORTABLE} == set(NOT_EXPORTABLE)
    for name, words in NOT_EXPORTABLE.items():
        why = scenario_export.why_not(find(name))
        assert why.startswith(f"scenario {name} cannot be written as C: ") and words in why, why
        with pytest.raises(scenario_export.NotExportable, match=words):
            scenario_export.to_c(find(name))


@pytest.mark.parametrize("scenario", EXPORTABLE, ids=lambda s: s.name)
def test_to_c_is_the_scenario(scenario, arm64_guests):
    """Memslots at the arm64 RAM base + offset with placeholders filled, the guest as pyvmm loads it, pyvmm's
    entry registers, the kernel's answer, the scenario's own title and paragraph."""
    r = scenario_export.to_c(scenario)
    assert (r.name, r.title, r.explanation, r.protected) == (scenario.name, scenario.title, scenario.explanation,
                                                             scenario.protected)
    assert r.timeout == int(scenario.timeout) and r.ipa_bits == 0
    assert [(m.slot, m.gpa, m.size, m.flags) for m in r.memslots] == \
        [(i, RAM + s.offset, s.size, int(s.flags)) for i, s in enumerate(scenario.slots)]
    for m, s in zip(r.memslots, scenario.slots):
        assert "{" not in m.backing and m.backing == scenario_export.backing(scenario, s.backing)
    if scenario.guest is None:
        assert not r.boots and r.image == b""
    else:
        image, gpa, entry = cexport.guest_image(os.path.join(arm64_guests, scenario.guest.name))
        assert (r.image, r.load_gpa, r.entry, r.guest) == (image, gpa, entry, scenario.guest.name)
        assert r.registers == cexport.firmware_registers(r.memslots, scenario.protected)
    assert r.expected == scenario_export.expect(scenario, scenario.expected.answer)  # the kernel's, refused or not
    assert [a.result for a in r.alternatives] == \
        [scenario_export.expect(scenario, a.answer).result for a in scenario.expected.alternatives]


@pytest.mark.parametrize("name, result, steps, alternatives", [
    ("pkvm-udmabuf", "KVM_RUN errno=EFAULT", [], []),
    ("pkvm-udmabuf-memfd", "guest-exit status=0", [], []),
    ("pkvm-guest-memfd", "KVM_RUN errno=EIO", [], []),
    ("pkvm-file", "KVM_RUN errno=EIO", [Step.FILE_ON_DISK], []),
    ("pkvm-memlock", "KVM_RUN errno=ENOMEM", [Step.SET_RLIMIT_MEMLOCK_ZERO], []),
    ("pkvm-slot-delete", "KVM_SET_USER_MEMORY_REGION errno=EPERM", [Step.DELETE_SLOT_AFTER_RUN], []),
    ("pkvm-readonly-slot", "KVM_SET_USER_MEMORY_REGION errno=EPERM", [], []),
    ("memslot-overlap", "KVM_SET_USER_MEMORY_REGION errno=EEXIST", [], []),
    ("nisv-readonly-writeback", "exit-reason=KVM_EXIT_ARM_NISV", [], ["KVM_RUN errno=ENOSYS"]),
    ("file-truncated", "KVM_RUN errno=EFAULT", [Step.TRUNCATE_FILE_BEFORE_RUN], ["exit-reason=KVM_EXIT_MMIO slot=1"]),
    ("host-mapping-readonly", "KVM_RUN errno=EFAULT", [Step.MPROTECT_READONLY_BEFORE_RUN],
     ["exit-reason=KVM_EXIT_MMIO slot=1"]),
])
def test_answers_and_steps_in_the_programs_words(name, result, steps, alternatives, arm64_guests):
    scenario = find(name)
    r = scenario_export.to_c(scenario)
    assert (r.expected.result, list(r.steps), [a.result for a in r.alternatives]) == (result, steps, alternatives)
    for alt, a in zip(r.alternatives, scenario.expected.alternatives):
        assert a.hosts in alt.meaning and a.why in alt.meaning


def test_placeholders_are_fixed_values():
    """{tmp} and {disk} files go in /tmp and /var/tmp (the program creates the file, not the directory), named
    after the scenario; {cma_heap} is the name pyvmm looks for first."""
    s = find("file-truncated")
    assert scenario_export.backing(s, "file:{tmp}/guest-ram.img") == "file:/tmp/pyvmm-file-truncated-guest-ram.img"
    assert scenario_export.backing(s, "file:{disk}/x") == "file:/var/tmp/pyvmm-file-truncated-x"
    assert scenario_export.backing(s, "dma-heap:{cma_heap}") == f"dma-heap:{CMA_HEAP_PREFERRED}"
    assert scenario_export.CMA_HEAP == CMA_HEAP_PREFERRED == "default_cma_region"
    assert set(cexport.DISK_MAGIC) == set(DISK_FILESYSTEMS)  # the program's disk check is pyvmm's


def test_answers_c_cannot_check_are_refused():
    s = find("memslot-overlap")
    words = {Answer(ExitKind.POWER_OFF): "system-event type=SHUTDOWN",
             Answer(ExitKind.RESET): "system-event type=RESET",
             Answer(call="KVM_CREATE_VCPU"): "KVM_CREATE_VCPU ok",
             Answer(ExitKind.GUEST_EXIT, status=3): "guest-exit status=3",
             Answer(ExitKind.FAULT, call="KVM_RUN", errno="EIO", slot=0): "KVM_RUN errno=EIO",
             Answer(ExitKind.FAULT, exit_reason="KVM_EXIT_MMIO", slot=2): "exit-reason=KVM_EXIT_MMIO slot=2"}
    for answer, result in words.items():
        assert scenario_export.expect(s, answer).result == result
    for answer, why in [(Answer(ExitKind.HALT, rom_writes=1), "ROM writes"),
                        (Answer(ExitKind.GUEST_EXIT), "in the program's words"),
                        (Answer(ExitKind.FAULT, exit_reason="KVM_EXIT_MMIO"), "outside the memslots")]:
        with pytest.raises(scenario_export.NotExportable, match=why):
            scenario_export.expect(s, answer)


def test_set_ups_c_cannot_make_are_refused():
    base = Scenario(name="made-up", title="t", arch=Target.ARM64, protected=True, slots=(Slot(0, 8 * MiB, "anon"),),
                    guest=MEMTOUCH, expected=Expected(Answer(ExitKind.GUEST_EXIT, status=0)), explanation="x")
    assert scenario_export.why_not(base) is None
    for change, words in [({"arch": Target.X86_64}, "x86_64 only"), ({"vcpus": 2}, "2 vCPUs"),
                          ({"confinement": Confinement(memlock=4096)}, "RLIMIT_MEMLOCK 4096"),
                          ({"slots": (Slot(0, 8 * MiB, "file:{disk}/a"), Slot(8 * MiB, 2 * MiB, "anon"))},
                           "not the last"),
                          ({"steps": (TruncateFile(0),), "slots": (
                              Slot(0, 8 * MiB, "file:{tmp}/a"), Slot(8 * MiB, 2 * MiB, "anon"))}, "not the last"),
                          ({"expected": Expected(Answer(ExitKind.HALT, rom_writes=1))}, "ROM writes"),
                          ({"expected": Expected(Answer(ExitKind.GUEST_EXIT, status=0), alternatives=(
                              Alternative(Answer(ExitKind.TIMEOUT), "slow hosts", "slow"),))}, "timeout")]:
        with pytest.raises(scenario_export.NotExportable, match=words):
            scenario_export.to_c(dataclasses.replace(base, **change))
    assert isinstance(scenario_export.NotExportable("x"), ConfigError)


# --- what the text says ------------------------------------------------------------------------------------
def test_guest_image_is_what_pyvmm_loads(arm64_guests):
    """The embedded bytes are what pyvmm's own ELF loader writes into guest memory (a real memslot, here)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm to load the image through pyvmm's accessor")
    from pyvmm.loader import load_elf
    from pyvmm.vm import Vm

    for name in ("memtouch", "hello"):
        path = os.path.join(arm64_guests, name)
        image, gpa, entry = cexport.guest_image(path)
        with Vm() as vm:
            vm.add_memory(4 << 20, "anon", gpa=RAM)
            with open(path, "rb") as f:
                loaded = load_elf(vm.memory, f.read())
            assert (gpa, entry, gpa + len(image)) == (loaded.low, loaded.entry, loaded.high)
            assert vm.memory.read(gpa, len(image)) == image
        assert entry == RAM and image[:4] != b"\x7fELF"


def test_entry_registers_are_pyvmms():
    """x0 = the device tree (last 2 MiB), x1/x2 = RAM, x3/x4 = the DMA pool: a protected VM's default pool is an
    eighth of RAM (64 KiB-aligned) just below the device tree; a normal VM has none, nor has a 4 MiB guest."""
    eight = [Memslot(0, RAM, 8 << 20, "anon")]
    assert cexport.firmware_registers(eight, False) == (RAM + (6 << 20), RAM, 8 << 20, 0, 0)
    assert cexport.firmware_registers(eight, True) == (RAM + (6 << 20), RAM, 8 << 20, RAM + (5 << 20), 1 << 20)
    four = [Memslot(0, RAM, 4 << 20, "anon")]
    assert cexport.firmware_registers(four, True) == (RAM + (2 << 20), RAM, 4 << 20, 0, 0)
    split = [Memslot(1, RAM + (4 << 20), 4 << 20, "memfd"), Memslot(0, RAM, 4 << 20, "anon"),
             Memslot(2, 1 << 32, 1 << 20, "anon")]  # contiguous from the RAM base, in any order; a far slot is not RAM
    assert cexport.firmware_registers(split, False)[:3] == (RAM + (6 << 20), RAM, 8 << 20)
    with pytest.raises(ConfigError):
        cexport.firmware_registers([Memslot(0, RAM + (1 << 20), 8 << 20, "anon")], False)



@pytest.mark.parametrize("scenario", EXPORTABLE, ids=lambda s: s.name)
def test_text_sets_the_vm_up_as_pyvmm(scenario, arm64_guests):
    r = scenario_export.to_c(scenario)
    text = cexport.export_c(r)
    assert f"static const char expected[] = \"{r.expected.result}\";" in text
    assert 'printf("EXPECTED: %s\\nRESULT: %s\\n", expected, result);' in text
    for alt in r.alternatives:
        assert f"\t{{ {cexport.c_string(alt.result)}, {cexport.c_string(alt.meaning)} }},\n" in text
    # only the kernel's uapi headers the brief allows, the rest libc
    linux = [h for h in re.findall(r"#include <([^>]+)>", text) if h.startswith(("linux/", "asm/"))]
    assert set(linux) <= {"linux/kvm.h", "linux/udmabuf.h", "linux/dma-heap.h"}
    # the VM type, as pyvmm computes it
    vm_type = ("KVM_VM_TYPE_ARM_PROTECTED | " if r.protected else "") + "KVM_VM_TYPE_ARM_IPA_SIZE(0)"
    assert f"#define VM_TYPE\t\t({vm_type})\t/* {r.vm_type:#x} */" in text
    assert "ioctl(kvm, KVM_CREATE_VM, (unsigned long)VM_TYPE);" in text
    assert r.vm_type == (uapi.KVM_VM_TYPE_ARM_PROTECTED if r.protected else 0)
    assert ("KVM_CAP_ARM_NISV_TO_USER" in text) is not r.protected  # pyvmm's prepare_vm: normal VMs only
    assert ("kvm-arm.mode=protected" in text) is r.protected
    # each backing, made as pyvmm's backing.py makes it, then its memslot
    for m in r.memslots:
        for line in backing_lines(m.slot, m.backing):
            assert line in text, line
        assert f".backing = {cexport.c_string(m.backing)}" in text
    assert "IOCTL(vm, KVM_SET_USER_MEMORY_REGION, &region)" in text and ".guest_memfd = -1 }" in text
    main = text[text.index("int main(void)"):]
    if not r.boots:  # no guest: the program ends after the memslots
        assert "run_guest(" not in text and "guest_image" not in text and "KVM_CREATE_VCPU" not in text
        assert main.rstrip().endswith('finish("KVM_SET_USER_MEMORY_REGION ok");\n}')
        return
    if any(m.backing == "udmabuf" for m in r.memslots[:1]):
        assert "write_fd(slots[0].memfd, 0x0, guest_image, sizeof(guest_image));" in text
    else:
        assert "memcpy((char *)slots[0].hva + 0x0, guest_image" in text
    if scenario.guest.name == "hello":
        assert '"system-event type=%s"' in text and "system_event_name(run->system_event.type)" in text
    # vCPU, GIC at pyvmm's addresses, in pyvmm's order: vCPU init, then the GIC, then image and registers
    assert f"#define GIC_DIST        0x{layout.GIC_DIST:08x}ULL" in text
    assert f"#define GIC_REDIST      0x{layout.GIC_REDIST:08x}ULL" in text
    assert f"#define UART            0x{layout.UART:08x}ULL" in text
    assert f"#define DEBUG_EXIT      0x{layout.DEBUG_EXIT:08x}ULL" in text
    assert "init.features[0] = 1U << KVM_ARM_VCPU_PSCI_0_2;" in text
    assert "KVM_ARM_VCPU_PTRAUTH_ADDRESS | 1U << KVM_ARM_VCPU_PTRAUTH_GENERIC" in text
    order = ["vcpu = IOCTL(vm, KVM_CREATE_VCPU, 0);", "\tinit_vcpu(vm, vcpu);", "\tcreate_gicv3(vm);",
             "guest_image, sizeof(guest_image));", "CORE_REG(regs.pstate), BOOT_PSTATE", "CORE_REG(regs.pc)", "run_guest(vcpu"]
    assert [main.index(s) for s in order] == sorted(main.index(s) for s in order)
    for n, value in enumerate(r.registers):
        assert f"set_reg(vcpu, CORE_REG(regs.regs[{n}]), {value:#x}ULL);" in text
    assert f"set_reg(vcpu, CORE_REG(regs.pc), {r.entry:#x}ULL);" in text
    a64 = uapi_arm64
    assert f"#define BOOT_PSTATE\t({cexport.PSTATE_EXPR})" in text
    assert eval(cexport.PSTATE_EXPR, {n: getattr(a64, n) for n in dir(a64) if n.startswith("PSR_")}) == 0x3C5
    assert image_bytes(text) == r.image
    header = text.split("*/", 1)[0]
    assert " ".join(scenario.explanation.split()[:6]) in " ".join(header.replace(" * ", " ").split())


def test_steps_and_slot_flags(tmp_path, arm64_guests):
    text = cexport.export_c(everything(str(tmp_path)))
    for line in ("setrlimit(RLIMIT_MEMLOCK, &none)", "setuid(65534)",
                 "mprotect(slots[8].hva, slots[8].size, PROT_READ)",
                 "ftruncate(slots[8].fd, 0)", ".memory_size = 0,", 'finish("KVM_SET_USER_MEMORY_REGION ok");',
                 ".flags = KVM_MEM_READONLY, .gpa = 0x100000000ULL", f'make_file(&slots[8], "{tmp_path}/ram.img");',
                 f'require_disk_directory("{tmp_path}");', "{ 0xef53, \"ext2/ext3/ext4\" },", "#include <sys/vfs.h>",
                 '{ "KVM_RUN errno=EFAULT", "on \\"some\\" hosts" },',
                 "(KVM_VM_TYPE_ARM_IPA_SIZE(40))\t/* 0x28 */", "#include <grp.h>", "#include <linux/dma-heap.h>"):
        assert line in text, line
    assert text.count("static void make_udmabuf(") == 1 and "make_udmabuf(&slots[4], 0);" in text
    main = text[text.index("int main(void)"):]
    assert main.index("require_disk_directory(") < main.index("make_file(&slots[8]")


def test_bad_reproducers_are_refused(arm64_guests):
    good = scenario_export.to_c(find("normal-udmabuf"))
    fields = dict(good.__dict__)
    for change, words in [({"memslots": ()}, "no memslots"),
                          ({"load_gpa": RAM + (9 << 20)}, "not inside one memslot"),
                          ({"memslots": (Memslot(0, RAM, 8 << 20, "ramfs"),)}, "unknown backing"),
                          ({"memslots": (Memslot(0, RAM, 8 << 20, "anon"), Memslot(0, 1 << 32, 1 << 20, "anon"))},
                           "repeat"),
                          ({"memslots": (Memslot(0, RAM, 3 << 20, "memfd-hugetlb"),)}, "multiples"),
                          ({"steps": (Step.TRUNCATE_FILE_BEFORE_RUN,)}, "file: backing"),
                          ({"steps": (Step.FILE_ON_DISK,)}, "file: backing"),
                          ({"image": b"", "steps": (Step.MPROTECT_READONLY_BEFORE_RUN,)}, "need a guest"),
                          ({"registers": (0, 1)}, "x0..x4")]:
        with pytest.raises(ConfigError, match=words):
            CReproducer(**{**fields, **change})
    with pytest.raises(ConfigError):
        Expect.call_fails("EWHATEVER")
    assert cexport.c_string('a "b"\\\n\t') == '"a \\"b\\"\\\\\\n\\011"'


# --- what the compiler says --------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", EXPORTABLE, ids=lambda s: s.name)
def test_compiles_for_arm64(scenario, arm64_guests, toolchain, tmp_path):
    compile_c(cexport.export_c(scenario_export.to_c(scenario)), tmp_path, toolchain, scenario.name)


def test_every_backing_and_step_compiles(arm64_guests, toolchain, tmp_path):
    compile_c(cexport.export_c(everything(str(tmp_path))), tmp_path, toolchain, "everything")


def test_build_static_makes_a_static_arm64_binary(arm64_guests, toolchain, tmp_path):
    cc, include = toolchain
    reproducer = scenario_export.to_c(find("pkvm-udmabuf"))
    out = cexport.build_static(reproducer, str(tmp_path / "repro"), include, cc)
    with open(out, "rb") as f:
        elf = f.read()
    assert elf[:4] == b"\x7fELF" and struct.unpack_from("<H", elf, 18)[0] == 183  # EM_AARCH64
    phoff, (phentsize, phnum) = struct.unpack_from("<Q", elf, 32)[0], struct.unpack_from("<HH", elf, 54)
    types = {struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)}
    assert 3 not in types  # no PT_INTERP: static
    assert open(out + ".c").read() == cexport.export_c(reproducer)
    with pytest.raises(ConfigError, match="no linux/kvm.h"):
        cexport.build_static(reproducer, str(tmp_path / "x"), str(tmp_path), cc)


# --- pyvmm scenario export ---------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_cli_export_writes_a_c_file_that_compiles(arm64_guests, toolchain, tmp_path):
    path = tmp_path / "pkvm-udmabuf.c"
    res = run_cli("scenario", "export", "pkvm-udmabuf", "--c", str(path))
    assert res.returncode == 0 and res.stdout == "", res.stdout + res.stderr
    assert res.stderr.strip() == f"pyvmm: wrote {path} (pkvm-udmabuf: {len(path.read_text().splitlines())} lines)"
    assert path.read_text() == cexport.export_c(scenario_export.to_c(find("pkvm-udmabuf")))
    compile_c(path.read_text(), tmp_path, toolchain, "pkvm-udmabuf")
    res = run_cli("scenario", "export", "memslot-overlap", "--c", "-")
    assert res.returncode == 0 and res.stdout == cexport.export_c(scenario_export.to_c(find("memslot-overlap")))


@pytest.mark.parametrize("args, message", [
    (["scenario", "export", "hugetlb-exhausted", "--c", "{out}"],
     "scenario hugetlb-exhausted cannot be written as C: exhausting the hugetlb pool"),
    (["scenario", "export", "readonly-slot-write", "--c", "{out}"], "x86_64 only"),
    (["scenario", "export", "no-such-scenario", "--c", "{out}"], "unknown scenario 'no-such-scenario'"),
    (["scenario", "export", "memslot-overlap"], "the following arguments are required: --c"),
    (["scenario", "export", "memslot-overlap", "--c", "/no/such/dir/x.c"], "directory /no/such/dir does not exist"),
])
@pytest.mark.timeout(60)
def test_cli_export_refusals_are_one_line_and_status_2(args, message, tmp_path):
    out = tmp_path / "x.c"
    res = run_cli(*[a.replace("{out}", str(out)) for a in args])
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert res.stdout == "" and not out.exists()


@pytest.mark.timeout(60)
def test_cli_export_help():
    res = run_cli("scenario", "export", "--help")
    assert res.returncode == 0 and "usage: pyvmm scenario export" in res.stdout and "--c FILE" in res.stdout
    assert "export" in run_cli("scenario", "--help").stdout


# --- in the lab ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(400)
@pytest.mark.parametrize("scenario", EXPORTABLE, ids=lambda s: s.name)
def test_reproducer_in_the_lab(scenario):
    """The prebuilt binary's RESULT is its EXPECTED (arm64 with /dev/kvm only: the lab)."""
    require_arm64_kvm()
    binary = os.path.join(FIRMWARE, cexport.binary_name(scenario.name))
    if not os.path.exists(binary):
        pytest.skip(f"{os.path.relpath(binary, ROOT)} is not built: run scripts/build-reproducers on the build "
                    "machine before the lab starts")
    reproducer = scenario_export.to_c(scenario)
    with open(binary + ".c") as f:
        assert f.read() == cexport.export_c(reproducer), \
            f"{binary} is stale (pyvmm, its scenarios or the guest changed): rerun scripts/build-reproducers"
    if scenario.protected:
        require_pkvm()
    proc = subprocess.run([binary], capture_output=True, text=True, timeout=360)
    out = proc.stdout + proc.stderr
    expected = re.findall(r"^EXPECTED: (.*)$", proc.stdout, re.M)
    result = re.findall(r"^RESULT: (.*)$", proc.stdout, re.M)
    assert len(expected) == len(result) == 1, out
    if result[0].startswith("unavailable "):
        assert proc.returncode == cexport.UNAVAILABLE_STATUS, out
        pytest.skip(f"{scenario.name}: {result[0]}")
    assert (result[0], proc.returncode) == (expected[0], 0), out
    assert expected[0] == reproducer.expected.result
