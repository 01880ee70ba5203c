"""Standalone C reproducers: one C99 file, no Python, no pyvmm, that sets an arm64 VM up as pyvmm does and
prints what the kernel answered, for a kernel developer to attach to a bug report.

``CReproducer`` describes the set-up as data (VM type, memslots and their backings, the guest image, the
entry registers, the expected answer and the alternatives some hosts give, a few optional steps); ``export_c``
writes the C file; ``build_static`` cross-compiles it into a static arm64 binary.  The reproducers themselves are
the ``pyvmm scenario`` catalogue's (``pyvmm/scenarios/export.py``: ``pyvmm scenario export NAME --c FILE``).

The program does, in pyvmm's order and with pyvmm's flags: ``KVM_CREATE_VM`` (normal VMs:
``KVM_CAP_ARM_NISV_TO_USER``), each backing exactly as ``pyvmm/memory/backing.py`` makes it, ``KVM_SET_USER_MEMORY_REGION`` (``…REGION2`` for guest_memfd),
``KVM_CREATE_VCPU`` + ``KVM_ARM_VCPU_INIT`` (PSCI 0.2, pointer authentication where offered), the in-kernel
GICv3 at pyvmm's addresses, the image copied into guest RAM, PSTATE/x0..x4/PC, then ``KVM_RUN`` in a loop that
prints the guest's 16550 output and stops at the debug-exit register, a system event, another exit, a failed
``KVM_RUN`` (errno name and meaning, exit reason) or a timeout.  A reproducer without a guest stops after
its memslots.  It ends with two lines in the same words::

    EXPECTED: KVM_RUN errno=EFAULT
    RESULT: KVM_RUN errno=EFAULT

RESULT is one of ``guest-exit status=N``, ``system-event type=SHUTDOWN|RESET|CRASH|N``, ``CALL errno=ENAME``
(``KVM_RUN``, or the set-up call that failed), ``CALL ok`` (a step's call succeeded), ``exit-reason=KVM_EXIT_…``
(``KVM_EXIT_MMIO slot=N`` for an MMIO exit inside a memslot), ``timeout seconds=N``, or ``unavailable WHY``
when the host lacks what the reproducer needs (a device node, a capability, pKVM, a disk directory).  Exit
status: 0 when RESULT is EXPECTED (or one of the alternatives, which the program then names), 1 when not, 77 when
unavailable.

No device tree is written: x0 holds the address where pyvmm puts it, and the bundled guests do not read it.
The UART is served as far as the bundled guests use it (THR, LSR, LCR), without interrupts.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import os
import platform
import shutil
import subprocess
import textwrap
import types
from dataclasses import dataclass
from typing import NamedTuple

from .arch.arm64 import layout, place_dma_pool
from .arch.arm64.cpu import BOOT_PSTATE
from .kvm import uapi
from .kvm.errors import ConfigError
from .loader import EM_AARCH64, is_elf, load_elf, read_image
from .memory.backing import BackingKind, BackingSpec, UdmabufMap

PSTATE_EXPR = "PSR_MODE_EL1h | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT | PSR_D_BIT"  # pyvmm's cpu.BOOT_PSTATE
CFLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-static"]
CROSS_CC = "aarch64-linux-gnu-gcc"
UNAVAILABLE_STATUS = 77  # the program's exit status when the host lacks something (automake's "skipped")


class Step(enum.Enum):
    """Optional extra steps; each acts on the last memslot of ``CReproducer.memslots`` (the memlock step on the
    process).  All but FILE_ON_DISK need a guest."""

    FILE_ON_DISK = "before the memslots: the directory of the last slot's file must be on a disk filesystem " \
                   "(page cache, not tmpfs or ramfs), else RESULT: unavailable"
    SET_RLIMIT_MEMLOCK_ZERO = "before the first KVM_RUN: RLIMIT_MEMLOCK 0, and without CAP_IPC_LOCK (as root: " \
                              "become nobody, which drops every capability)"
    MPROTECT_READONLY_BEFORE_RUN = "before the first KVM_RUN: mprotect the last slot's host mapping to PROT_READ"
    TRUNCATE_FILE_BEFORE_RUN = "before the first KVM_RUN: ftruncate the file behind the last slot to 0 bytes"
    DELETE_SLOT_AFTER_RUN = "when the guest has ended: delete the last slot (KVM_SET_USER_MEMORY_REGION, " \
                            "memory_size 0); RESULT is that call's answer"


class Memslot(NamedTuple):
    """(slot, gpa, size, backing, flags): ``backing`` is pyvmm's spelling (``--backing``), ``flags`` KVM_MEM_*."""

    slot: int
    gpa: int
    size: int
    backing: str
    flags: int = 0


@dataclass(frozen=True)
class Expect:
    """The expected answer: ``result`` in RESULT's words, ``meaning`` in a reader's."""

    result: str
    meaning: str

    @classmethod
    def guest_exit(cls, status: int = 0) -> "Expect":
        return cls(f"guest-exit status={status}", f"the guest runs and exits with status {status}")

    @classmethod
    def system_event(cls, kind: str = "SHUTDOWN") -> "Expect":
        return cls(f"system-event type={kind}", f"the guest runs and ends with a {kind} system event")

    @classmethod
    def call_fails(cls, errno_name: str, call: str = "KVM_RUN") -> "Expect":
        if not hasattr(errno_mod, errno_name):
            raise ConfigError(f"unknown errno name {errno_name!r}")
        return cls(f"{call} errno={errno_name}", f"{call} fails with {errno_name}")

    @classmethod
    def call_succeeds(cls, call: str) -> "Expect":
        return cls(f"{call} ok", f"{call} succeeds")

    @classmethod
    def exit_reason(cls, name: str, detail: str = "") -> "Expect":
        return cls(f"exit-reason={name}" + (f" {detail}" if detail else ""), f"the vCPU exits with {name}")


@dataclass(frozen=True)
class CReproducer:
    """An arm64 VM set-up, as data.  ``registers``: x0..x4 at entry; ``image`` is loaded at ``load_gpa`` (it must
    lie in one memslot) and entered at ``entry``; an empty ``image`` is no guest: the program stops after the
    memslots (no vCPU; ``registers`` unused).  ``ipa_bits`` 0 is KVM's default (40).  ``timeout``: seconds before
    the program gives up on the guest.  ``alternatives``: other answers some hosts give, each ``Expect``'s meaning
    naming the hosts and why; the program accepts them and says so."""

    name: str
    explanation: str
    protected: bool
    memslots: tuple[Memslot, ...]
    image: bytes
    load_gpa: int
    entry: int
    registers: tuple[int, int, int, int, int]
    expected: Expect
    steps: tuple[Step, ...] = ()
    ipa_bits: int = 0
    guest: str = "guest"  # what the image is, for the comments
    timeout: int = 120
    title: str = ""  # one line, after the name at the top of the file
    alternatives: tuple[Expect, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "memslots", tuple(Memslot(*m) for m in self.memslots))
        object.__setattr__(self, "steps", tuple(Step(s) for s in self.steps))
        object.__setattr__(self, "registers", tuple(self.registers))
        if not self.memslots:
            raise ConfigError(f"{self.name}: no memslots")
        if len(self.registers) != 5:
            raise ConfigError(f"{self.name}: registers are x0..x4 (5 values)")
        if len({m.slot for m in self.memslots}) != len(self.memslots):
            raise ConfigError(f"{self.name}: memslot numbers repeat")
        for m in self.memslots:
            spec = BackingSpec.parse(m.backing)  # pyvmm's own check of the spelling
            if m.size <= 0 or m.gpa % spec.alignment or m.size % spec.alignment:
                raise ConfigError(f"{self.name}: slot {m.slot}: gpa and size must be multiples of {spec.alignment:#x}")
            if m.flags & ~(uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY):
                raise ConfigError(f"{self.name}: slot {m.slot}: flags {m.flags:#x} (only LOG_DIRTY_PAGES, READONLY)")
        if self.boots:
            self.image_slot()  # raises when the image fits in no slot
        elif set(self.steps) - {Step.FILE_ON_DISK}:
            raise ConfigError(f"{self.name}: steps {', '.join(s.name for s in self.steps)} need a guest")
        if not 0 <= self.ipa_bits <= uapi.KVM_VM_TYPE_ARM_IPA_SIZE_MASK:
            raise ConfigError(f"{self.name}: IPA size {self.ipa_bits}")
        last = BackingSpec.parse(self.memslots[-1].backing)
        for step in (Step.TRUNCATE_FILE_BEFORE_RUN, Step.FILE_ON_DISK):
            if step in self.steps and last.kind is not BackingKind.FILE:
                raise ConfigError(f"{self.name}: {step.name} needs a file: backing in the last slot")

    @property
    def boots(self) -> bool:
        """Whether there is a guest to run (else the program stops after the memslots)."""
        return bool(self.image)

    @property
    def vm_type(self) -> int:
        """KVM_CREATE_VM's type, as pyvmm computes it (Arm64.vm_type)."""
        return self.ipa_bits | (uapi.KVM_VM_TYPE_ARM_PROTECTED if self.protected else 0)

    def image_slot(self) -> int:
        """The index in ``memslots`` of the slot holding the whole image."""
        end = self.load_gpa + len(self.image)
        for i, m in enumerate(self.memslots):
            if m.gpa <= self.load_gpa and end <= m.gpa + m.size:
                return i
        raise ConfigError(f"{self.name}: the image [{self.load_gpa:#x}, {end:#x}) is not inside one memslot")


# --- building reproducers from pyvmm's own rules ------------------------------------------------------------
class _Recorder:
    """What ``loader.load_elf`` needs of guest memory: everything fits, writes are recorded."""

    def __init__(self):
        self.writes: list[tuple[int, bytes]] = []

    def find(self, gpa: int):
        return types.SimpleNamespace(end=1 << 64)

    def write(self, gpa: int, data: bytes) -> None:
        self.writes.append((gpa, bytes(data)))


def guest_image(path: str) -> tuple[bytes, int, int]:
    """(bytes, load GPA, entry) of an arm64 guest as pyvmm loads it: an ELF's PT_LOAD segments (bss zeroed,
    gaps zeroed) as one block, or a flat binary at the RAM base."""
    data = read_image(path)
    if not is_elf(data):
        return data, layout.RAM_BASE, layout.RAM_BASE
    mem = _Recorder()
    img = load_elf(mem, data, what=path)
    if img.elf_machine != EM_AARCH64:
        raise ConfigError(f"{path}: not an arm64 ELF image (e_machine {img.elf_machine})")
    blob = bytearray(img.high - img.low)
    for gpa, chunk in mem.writes:
        blob[gpa - img.low:gpa - img.low + len(chunk)] = chunk
    return bytes(blob), img.low, img.entry


def firmware_registers(memslots, protected: bool) -> tuple[int, int, int, int, int]:
    """x0..x4 as pyvmm's arm64 firmware boot sets them (Arm64.boot): the device tree address (the last 2 MiB of
    RAM), RAM base, RAM size (the slots contiguous from the RAM base), DMA pool base and size (a protected VM's
    default pool, none for a normal VM)."""
    end = layout.RAM_BASE
    for m in sorted((Memslot(*m) for m in memslots), key=lambda m: m.gpa):
        if m.gpa == end:
            end += m.size
    ram = end - layout.RAM_BASE
    if ram < layout.MIN_RAM:
        raise ConfigError(f"arm64 guests need at least {layout.MIN_RAM >> 20} MiB of RAM at {layout.RAM_BASE:#x}")
    pool = place_dma_pool(ram, None if protected else 0)
    return (layout.RAM_BASE + ram - (2 << 20), layout.RAM_BASE, ram,
            pool.gpa if pool else 0, pool.size if pool else 0)


def binary_name(name: str) -> str:
    """The prebuilt binary's file name in firmware/arm64/build/ (flat: the lab copies that folder's files, not
    its subfolders)."""
    return f"repro-{name}"


# --- the C text ---------------------------------------------------------------------------------------------
def c_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("".join(f"\\{b:03o}" for b in ch.encode()))
    return '"' + "".join(out) + '"'


def _comment_text(text: str) -> str:
    return text.replace("*/", "* /")


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:#x} bytes"


def _flags_expr(flags: int) -> str:
    names = [n for n in ("KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY") if flags & getattr(uapi, n)]
    return " | ".join(names) or "0"


# What each backing is to the kernel: the comment above its creation.
BACKING_NOTES = {
    "anon": "private anonymous memory (pyvmm's default): swap-backed folios that GUP can pin",
    "memfd": "a memfd (shmem): swap-backed folios that GUP can pin",
    "memfd-hugetlb": "a memfd of 2 MiB huge pages: pinnable, but hugetlb folios are never folio_test_swapbacked() "
                     "(a protected VM: pkvm_mem_abort answers -EIO)",
    "guest-memfd": "a guest_memfd: its folios are not swap-backed (a protected VM: pkvm_mem_abort answers -EIO)",
    "udmabuf": "a udmabuf, the slot mapping the DMA-buf: udmabuf's mmap inserts PFNs (VM_PFNMAP|VM_IO), which GUP's "
               "check_vma_flags refuses to pin (a protected VM: pkvm_mem_abort answers -EFAULT)",
    "udmabuf:memfd": "a udmabuf, the slot mapping the memfd behind the DMA-buf: shmem folios GUP can pin; the DMA-buf "
                     "stays open over the same pages",
    "dma-heap": "a dma-heap buffer mapped through its DMA-buf: the heaps map raw PFNs (the system heap with "
                "remap_pfn_range: VM_PFNMAP|VM_IO), which GUP's check_vma_flags refuses to pin (a protected VM: "
                "pkvm_mem_abort answers -EFAULT)",
    "file": "a regular file mapped MAP_SHARED: page-cache folios, not swap-backed unless the file is on tmpfs (a "
            "protected VM: pkvm_mem_abort answers -EIO)",
}

ERRNO_NAMES = ("EPERM", "ENOENT", "ESRCH", "EINTR", "EIO", "ENXIO", "E2BIG", "EBADF", "EAGAIN", "ENOMEM", "EACCES",
               "EFAULT", "EBUSY", "EEXIST", "ENODEV", "ENOTDIR", "EISDIR", "EINVAL", "ENFILE", "EMFILE", "ENOTTY",
               "EFBIG", "ENOSPC", "EROFS", "ERANGE", "EDEADLK", "ENOSYS", "EOVERFLOW", "EOPNOTSUPP", "ETIMEDOUT",
               "EHWPOISON")
EXIT_NAMES = ("UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO", "IRQ_WINDOW_OPEN", "SHUTDOWN",
              "FAIL_ENTRY", "INTR", "INTERNAL_ERROR", "SYSTEM_EVENT", "ARM_NISV", "MEMORY_FAULT", "ARM_SEA",
              "ARM_LDST64B")


def _name_switch(func: str, ctype: str, names: list[str], fallback: str) -> str:
    cases = "".join(f"#ifdef {macro}\n\tcase {macro}: return \"{label}\";\n#endif\n" for macro, label in names)
    return (f"static const char *{func}({ctype} value)\n{{\n\tstatic char unknown[24];\n\n\tswitch (value) {{\n"
            f"{cases}\t}}\n\tsnprintf(unknown, sizeof(unknown), \"{fallback}\", (int)value);\n\treturn unknown;\n}}\n")


COMMON = r"""
static const char expected[] = @EXPECTED@;
/* Other answers some hosts give: { RESULT's words, which hosts and why }. */
static const char *const alternatives[][2] = {
@ALTERNATIVES@	{ NULL, NULL }
};

static int console_mid_line;	/* the guest's last character was not a newline */

static void end_console_line(void)
{
	if (console_mid_line)
		putchar('\n');
	console_mid_line = 0;
}

/* One line of what the program does or sees (never starts with RESULT: or EXPECTED:). */
static void __attribute__((format(printf, 1, 2))) note(const char *fmt, ...)
{
	va_list ap;

	end_console_line();
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
}

/* The last two lines: what was expected and what happened, in the same words, for a test to compare.
 * Exit status 0 when they match, 1 when not, 77 when this host lacks what the reproducer needs. */
static void __attribute__((noreturn)) report(const char *result)
{
	int i, alternative = 0;

	end_console_line();
	for (i = 0; alternatives[i][0]; i++)
		if (!strcmp(result, alternatives[i][0])) {
			printf("not the expected answer but another: %s\n", alternatives[i][1]);
			alternative = 1;
		}
	printf("EXPECTED: %s\nRESULT: %s\n", expected, result);
	if (!strncmp(result, "unavailable ", 12))
		exit(@UNAVAILABLE@);
	exit(strcmp(result, expected) && !alternative ? 1 : 0);
}

static void __attribute__((noreturn, format(printf, 1, 2))) finish(const char *fmt, ...)
{
	char result[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(result, sizeof(result), fmt, ap);
	va_end(ap);
	report(result);
}

/* The host lacks something the reproducer needs: RESULT: unavailable WHY. */
static void __attribute__((noreturn, format(printf, 1, 2))) unavailable(const char *fmt, ...)
{
	char result[256] = "unavailable ";
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(result + 12, sizeof(result) - 12, fmt, ap);
	va_end(ap);
	report(result);
}

@ERRNO_NAME@
@EXIT_NAME@
/* A call failed: its name, errno's name and meaning; that is the RESULT. */
static void __attribute__((noreturn)) fail(const char *call)
{
	int err = errno;

	note("%s failed: %s (%s)", call, errno_name(err), strerror(err));
	finish("%s errno=%s", call, errno_name(err));
}

/* Every ioctl of the set-up goes through here: a failure ends the program naming the call and errno. */
static int kvm_ioctl(int fd, unsigned long request, const char *call, unsigned long arg)
{
	int ret;

	do
		ret = ioctl(fd, request, arg);
	while (ret < 0 && errno == EINTR);
	if (ret < 0)
		fail(call);
	return ret;
}

#define IOCTL(fd, request, arg) kvm_ioctl(fd, request, #request, (unsigned long)(arg))
#define CHECK_EXTENSION(fd, cap) \
	kvm_ioctl(fd, KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION(" #cap ")", (unsigned long)(cap))

/* One memslot and what backs it. */
struct slot {
	__u32 slot;
	__u32 flags;		/* KVM_MEM_* asked for; KVM_MEM_GUEST_MEMFD is added for a guest_memfd */
	__u64 gpa, size;
	const char *backing;	/* pyvmm's spelling (pyvmm run --backing) */
	void *hva;		/* the slot's userspace_addr */
	int fd;			/* the fd mapped at hva; -1: anonymous memory */
	int memfd;		/* udmabuf: the memfd behind the DMA-buf */
	int dmabuf;		/* udmabuf, dma-heap: the DMA-buf */
	int guest_memfd;	/* guest-memfd: the fd KVM_SET_USER_MEMORY_REGION2 names; else -1 */
};

/* As pyvmm's hostmem.mmap_fd: read/write, MAP_SHARED for an fd, MAP_PRIVATE|MAP_ANONYMOUS without one. */
static void *map(int fd, __u64 size)
{
	int flags = fd < 0 ? MAP_PRIVATE | MAP_ANONYMOUS : MAP_SHARED;

	return mmap(NULL, size, PROT_READ | PROT_WRITE, flags, fd, 0);
}
"""

MAP_SLOT = r"""
static void map_slot(struct slot *s, int fd)
{
	s->fd = fd;
	s->hva = map(fd, s->size);
	if (s->hva == MAP_FAILED)
		fail("mmap");
}
"""

MEMFD = r"""
/* As pyvmm's _memfd: memfd_create, then ftruncate to the slot's size. */
static int memfd(const char *name, __u64 size, unsigned int flags)
{
	int fd = memfd_create(name, flags);

	if (fd < 0) {
		if ((flags & MFD_HUGETLB) && (errno == EINVAL || errno == ENOENT))
			unavailable("memfd_create(MFD_HUGETLB) failed with %s: this kernel has no hugetlbfs "
				    "(CONFIG_HUGETLBFS)", errno_name(errno));
		fail("memfd_create");
	}
	if (ftruncate(fd, (off_t)size) < 0)
		fail("ftruncate");
	return fd;
}
"""

MAKE = {
    "anon": r"""
static void make_anon(struct slot *s)
{
	map_slot(s, -1);
}
""",
    "memfd": r"""
/* A memfd (shmem) mapped MAP_SHARED: pyvmm's MemfdBacking. */
static void make_memfd(struct slot *s)
{
	map_slot(s, memfd("pyvmm-memfd", s->size, MFD_CLOEXEC));
}
""",
    "memfd-hugetlb": r"""
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)	/* log2(2 MiB) << MFD_HUGE_SHIFT (linux/memfd.h) */
#endif

/* A memfd of 2 MiB huge pages: pyvmm's MemfdBacking(hugetlb=True).  mmap reserves the huge pages
 * (hugetlb_reserve_pages), so a pool without enough free ones fails here. */
static void make_memfd_hugetlb(struct slot *s)
{
	s->fd = memfd("pyvmm-memfd-hugetlb", s->size, MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB);
	s->hva = map(s->fd, s->size);
	if (s->hva == MAP_FAILED)
		unavailable("memfd-hugetlb: cannot map %llu huge page(s) of 2 MiB: mmap failed with %s (reserve them: "
			    "echo N > /proc/sys/vm/nr_hugepages)", (unsigned long long)(s->size >> 21), errno_name(errno));
}
""",
    "guest-memfd": r"""
/* guest_memfd, as pyvmm's GuestMemfdBacking: mmap-able and shared from creation (GUEST_MEMFD_FLAG_MMAP |
 * GUEST_MEMFD_FLAG_INIT_SHARED) when KVM_CAP_GUEST_MEMFD_FLAGS offers both, and then the slot's
 * userspace_addr is the guest_memfd's own mapping; otherwise anonymous memory beside it. */
static void make_guest_memfd(int kvm, int vm, struct slot *s)
{
	__u64 wanted = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
	struct kvm_create_guest_memfd gmem = { .size = s->size };
	__u64 supported;

	if (!CHECK_EXTENSION(kvm, KVM_CAP_GUEST_MEMFD))
		unavailable("guest-memfd: this KVM lacks KVM_CAP_GUEST_MEMFD (Linux >= 6.8, CONFIG_KVM_GUEST_MEMFD)");
	if (!CHECK_EXTENSION(vm, KVM_CAP_USER_MEMORY2))
		unavailable("guest-memfd: this KVM lacks KVM_CAP_USER_MEMORY2");
	supported = (__u64)CHECK_EXTENSION(vm, KVM_CAP_GUEST_MEMFD_FLAGS);
	gmem.flags = (supported & wanted) == wanted ? wanted : 0;
	s->guest_memfd = IOCTL(vm, KVM_CREATE_GUEST_MEMFD, &gmem);
	/* The kernel makes this fd without O_CLOEXEC (unlike VM and vCPU fds); pyvmm sets it. */
	if (fcntl(s->guest_memfd, F_SETFD, FD_CLOEXEC) < 0)
		fail("fcntl(F_SETFD)");
	note("guest_memfd flags 0x%llx (%s)", (unsigned long long)gmem.flags,
	     gmem.flags ? "the slot maps the guest_memfd" : "not mmap-able: the slot maps anonymous memory");
	map_slot(s, gmem.flags ? s->guest_memfd : -1);
}
""",
    "udmabuf": r"""
/* pyvmm's UdmabufBacking: a memfd sealed against shrinking, a DMA-buf made from it with UDMABUF_CREATE, and
 * the slot mapping either the DMA-buf (udmabuf, udmabuf:dmabuf) or the memfd (udmabuf:memfd). */
static void make_udmabuf(struct slot *s, int map_dmabuf)
{
	struct udmabuf_create create = { .flags = UDMABUF_FLAGS_CLOEXEC, .offset = 0, .size = s->size };
	int dev;

	if (access("/dev/udmabuf", F_OK) < 0) {
		if (errno == ENOENT)
			unavailable("udmabuf: /dev/udmabuf does not exist (kernel option CONFIG_UDMABUF=y)");
		fail("access(/dev/udmabuf)");
	}
	s->memfd = memfd("pyvmm-udmabuf", s->size, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fcntl(s->memfd, F_ADD_SEALS, F_SEAL_SHRINK) < 0)
		fail("fcntl(F_ADD_SEALS, F_SEAL_SHRINK)");
	dev = open("/dev/udmabuf", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		fail("open(/dev/udmabuf)");
	create.memfd = (__u32)s->memfd;
	s->dmabuf = IOCTL(dev, UDMABUF_CREATE, &create);
	if (close(dev) < 0)
		fail("close(/dev/udmabuf)");
	map_slot(s, map_dmabuf ? s->dmabuf : s->memfd);
}
""",
    "dma-heap": r"""
/* pyvmm's DmaHeapBacking: a buffer from /dev/dma_heap/<heap> (DMA_HEAP_IOCTL_ALLOC), its DMA-buf mapped. */
static void make_dma_heap(struct slot *s, const char *heap, const char *node)
{
	struct dma_heap_allocation_data alloc = { .len = s->size, .fd_flags = O_RDWR | O_CLOEXEC, .heap_flags = 0 };
	struct stat st;
	int dev;

	if (stat("/dev/dma_heap", &st) < 0) {
		if (errno == ENOENT)
			unavailable("dma-heap:%s: /dev/dma_heap does not exist (kernel option CONFIG_DMABUF_HEAPS=y with a "
				    "heap, e.g. CONFIG_DMABUF_HEAPS_SYSTEM or CONFIG_DMABUF_HEAPS_CMA)", heap);
		fail("stat(/dev/dma_heap)");
	}
	if (stat(node, &st) < 0) {
		if (errno == ENOENT)
			unavailable("dma-heap:%s: %s does not exist", heap, node);
		fail("stat(dma-heap)");
	}
	dev = open(node, O_RDONLY | O_CLOEXEC);
	if (dev < 0)
		fail("open(dma-heap)");
	IOCTL(dev, DMA_HEAP_IOCTL_ALLOC, &alloc);
	if (close(dev) < 0)
		fail("close(dma-heap)");
	s->dmabuf = (int)alloc.fd;
	map_slot(s, s->dmabuf);
}
""",
    "file": r"""
/* pyvmm's FileBacking: the file created or extended to the slot's size, mapped MAP_SHARED. */
static void make_file(struct slot *s, const char *path)
{
	struct stat st;
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);

	if (fd < 0)
		fail("open(file)");
	if (fstat(fd, &st) < 0)
		fail("fstat");
	if ((__u64)st.st_size < s->size && ftruncate(fd, (off_t)s->size) < 0)
		fail("ftruncate");
	map_slot(s, fd);
}
""",
}

FILE_ON_DISK = r"""
/* The file must be page cache: on tmpfs it would be shmem (swap-backed), on ramfs neither. */
static void require_disk_directory(const char *dir)
{
	static const struct { unsigned long magic; const char *name; } disks[] = {
@DISKS@	};
	struct statfs fs;
	size_t i;

	if (statfs(dir, &fs) < 0) {
		if (errno == ENOENT)
			unavailable("%s does not exist (a directory on a disk filesystem is needed)", dir);
		fail("statfs");
	}
	for (i = 0; i < sizeof(disks) / sizeof(disks[0]); i++)
		if ((unsigned long)fs.f_type == disks[i].magic) {
			note("%s is on %s", dir, disks[i].name);
			return;
		}
	unavailable("%s is not on a disk filesystem (f_type 0x%lx): a file there is not page cache", dir,
		    (unsigned long)fs.f_type);
}
"""

# Disk filesystems by statfs f_type (linux/magic.h); the names are pyvmm/scenarios/host.py's DISK_FILESYSTEMS.
DISK_MAGIC = {"ext2": 0xEF53, "ext3": 0xEF53, "ext4": 0xEF53, "xfs": 0x58465342, "btrfs": 0x9123683E,
              "f2fs": 0xF2F52010, "vfat": 0x4D44, "exfat": 0x2011BAB0}

WRITE_FD = r"""
/* pwrite all of BUF at OFFSET (pyvmm's _fd_io). */
static void write_fd(int fd, __u64 offset, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = pwrite(fd, p, len, (off_t)offset);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n == 0)
				errno = EIO;
			fail("pwrite");
		}
		p += n;
		len -= (size_t)n;
		offset += (__u64)n;
	}
}
"""

REGION = r"""
/* KVM_SET_USER_MEMORY_REGION2 when a guest_memfd is involved, else KVM_SET_USER_MEMORY_REGION
 * (kvm_set_memory_region; arm64 checks the slot in kvm_arch_prepare_memory_region: a protected VM gets EPERM
 * for READONLY or LOG_DIRTY_PAGES slots). */
static void set_memory_region(int vm, const struct slot *s)
{
	if (s->guest_memfd >= 0) {
		struct kvm_userspace_memory_region2 region = {
			.slot = s->slot, .flags = s->flags | KVM_MEM_GUEST_MEMFD, .guest_phys_addr = s->gpa,
			.memory_size = s->size, .userspace_addr = (__u64)(uintptr_t)s->hva,
			.guest_memfd = (__u32)s->guest_memfd, .guest_memfd_offset = 0,
		};

		IOCTL(vm, KVM_SET_USER_MEMORY_REGION2, &region);
	} else {
		struct kvm_userspace_memory_region region = {
			.slot = s->slot, .flags = s->flags, .guest_phys_addr = s->gpa, .memory_size = s->size,
			.userspace_addr = (__u64)(uintptr_t)s->hva,
		};

		IOCTL(vm, KVM_SET_USER_MEMORY_REGION, &region);
	}
	note("slot %u: %s, %llu KiB at GPA 0x%llx, flags 0x%x, host address %p", s->slot, s->backing,
	     (unsigned long long)(s->size >> 10), (unsigned long long)s->gpa, s->flags, s->hva);
}
"""

VCPU = r"""
/* A core register's ONE_REG id (all of these are 64 bits). */
#define CORE_REG(member) (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(member))

static void set_reg(int vcpu, __u64 id, __u64 value)
{
	struct kvm_one_reg reg = { .id = id, .addr = (__u64)(uintptr_t)&value };

	IOCTL(vcpu, KVM_SET_ONE_REG, &reg);
}

static void show_pc(int vcpu)
{
	__u64 pc = 0;
	struct kvm_one_reg reg = { .id = CORE_REG(regs.pc), .addr = (__u64)(uintptr_t)&pc };

	if (ioctl(vcpu, KVM_GET_ONE_REG, &reg) < 0)
		note("pc: KVM_GET_ONE_REG failed: %s (%s)", errno_name(errno), strerror(errno));
	else
		note("pc 0x%llx", (unsigned long long)pc);
}

/* vCPU 0 as pyvmm's cpu.init_vcpus: KVM_ARM_PREFERRED_TARGET, then KVM_ARM_VCPU_INIT with PSCI 0.2 and pointer
 * authentication when the VM offers both halves (a guest that sees it in its ID registers but runs on a vCPU
 * without it takes UNDEF at its first key write).  pyvmm also turns on the PMU, SVE and the ITS where offered
 * (features.py); the bundled test guests use none of them, and the memory faults reproduced here do not
 * depend on them. */
static void init_vcpu(int vm, int vcpu)
{
	struct kvm_vcpu_init init;

	memset(&init, 0, sizeof(init));
	IOCTL(vm, KVM_ARM_PREFERRED_TARGET, &init);
	init.features[0] = 1U << KVM_ARM_VCPU_PSCI_0_2;
	if (CHECK_EXTENSION(vm, KVM_CAP_ARM_PTRAUTH_ADDRESS) && CHECK_EXTENSION(vm, KVM_CAP_ARM_PTRAUTH_GENERIC))
		init.features[0] |= 1U << KVM_ARM_VCPU_PTRAUTH_ADDRESS | 1U << KVM_ARM_VCPU_PTRAUTH_GENERIC;
	IOCTL(vcpu, KVM_ARM_VCPU_INIT, &init);
	note("vCPU 0: target %u, features[0] 0x%x", init.target, init.features[0]);
}

/* The in-kernel GICv3 as pyvmm's gic.create_gicv3, after the vCPUs are initialised: distributor and
 * redistributor addresses, then KVM_DEV_ARM_VGIC_CTRL_INIT (vgic_v3 init). */
static void create_gicv3(int vm)
{
	struct kvm_create_device gic = { .type = KVM_DEV_TYPE_ARM_VGIC_V3 };
	__u64 dist = GIC_DIST, redist = GIC_REDIST;
	struct kvm_device_attr attr = { .group = KVM_DEV_ARM_VGIC_GRP_ADDR };

	IOCTL(vm, KVM_CREATE_DEVICE, &gic);
	attr.attr = KVM_VGIC_V3_ADDR_TYPE_DIST;
	attr.addr = (__u64)(uintptr_t)&dist;
	IOCTL(gic.fd, KVM_SET_DEVICE_ATTR, &attr);
	attr.attr = KVM_VGIC_V3_ADDR_TYPE_REDIST;
	attr.addr = (__u64)(uintptr_t)&redist;
	IOCTL(gic.fd, KVM_SET_DEVICE_ATTR, &attr);
	attr.group = KVM_DEV_ARM_VGIC_GRP_CTRL;
	attr.attr = KVM_DEV_ARM_VGIC_CTRL_INIT;
	attr.addr = 0;
	IOCTL(gic.fd, KVM_SET_DEVICE_ATTR, &attr);
}
"""

RUN = r"""
static char outcome[200];	/* how the run ended, in RESULT's words */
static unsigned int unclaimed;	/* MMIO accesses nothing serves (reads return zeros) */
static __u8 uart_lcr;

/* The guest's MMIO exits, as pyvmm's arm64 platform serves them (devices/uart16550.py, devices/debug_exit.py):
 * the 16550's transmit register prints, its line status says "ready"; a write to the debug-exit register ends
 * the run with the written status; an MMIO exit inside a memslot is a guest write to a READONLY slot (dropped)
 * or a fault; anything else reads as zeros.  Returns 0 to go on, 1 when the guest ended, -1 on a fault. */
static int mmio(struct kvm_run *run, const struct slot *slots, int nslots)
{
	__u64 addr = run->mmio.phys_addr;
	__u32 len = run->mmio.len > 8 ? 8 : run->mmio.len;
	__u8 *data = run->mmio.data;
	int i;

	if (!run->mmio.is_write)
		memset(data, 0, len);
	if (addr >= UART && addr < UART + UART_SIZE) {
		__u64 reg = addr - UART;

		if (!run->mmio.is_write) {
			if (reg == 5)
				data[0] = 0x60;	/* LSR: THR empty, transmitter empty */
			else if (reg == 3)
				data[0] = uart_lcr;
		} else if (reg == 3) {
			uart_lcr = data[0];
		} else if (reg == 0 && !(uart_lcr & 0x80)) {	/* THR (DLAB clear) */
			putchar(data[0]);
			console_mid_line = data[0] != '\n';
		}
		return 0;
	}
	if (addr >= DEBUG_EXIT && addr < DEBUG_EXIT + DEBUG_EXIT_SIZE) {
		__u64 status = 0;

		if (!run->mmio.is_write)
			return 0;
		for (i = 0; i < (int)len; i++)
			status |= (__u64)data[i] << (8 * i);
		snprintf(outcome, sizeof(outcome), "guest-exit status=%llu", (unsigned long long)status);
		return 1;
	}
	for (i = 0; i < nslots; i++) {
		const struct slot *s = &slots[i];

		if (addr < s->gpa || addr - s->gpa >= s->size)
			continue;
		if (run->mmio.is_write && (s->flags & KVM_MEM_READONLY)) {
			note("guest write of %u bytes to READONLY slot %u at 0x%llx: dropped", len, s->slot,
			     (unsigned long long)addr);
			return 0;
		}
		note("KVM_EXIT_MMIO inside slot %u (%s) at 0x%llx, %s of %u bytes: the host could not reach the page",
		     s->slot, s->backing, (unsigned long long)addr, run->mmio.is_write ? "write" : "read", len);
		snprintf(outcome, sizeof(outcome), "exit-reason=KVM_EXIT_MMIO slot=%u", s->slot);
		return -1;
	}
	if (unclaimed++ < 8)
		note("unclaimed MMIO %s at 0x%llx (%u bytes)", run->mmio.is_write ? "write" : "read",
		     (unsigned long long)addr, len);
	return 0;
}

static struct kvm_run *volatile running;	/* for the alarm handler */
static volatile sig_atomic_t timed_out;

/* KVM_RUN returns EINTR at once with immediate_exit set, even when the alarm came just before it. */
static void on_alarm(int sig)
{
	(void)sig;
	timed_out = 1;
	if (running)
		running->immediate_exit = 1;
}

/* KVM_RUN until the guest ends (returns 1: the debug-exit register or a system event) or something else
 * happens (returns 0: a failed KVM_RUN, another exit, the timeout).  OUTCOME says which, in RESULT's words. */
static int run_guest(int vcpu, struct kvm_run *run, const struct slot *slots, int nslots)
{
	struct sigaction sa;
	int ret;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;	/* no SA_RESTART: KVM_RUN must return */
	if (sigaction(SIGALRM, &sa, NULL) < 0)
		fail("sigaction(SIGALRM)");
	running = run;
	alarm(TIMEOUT);
	note("KVM_RUN");
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			int err = errno;

			if (err == EINTR && timed_out) {
				note("the guest did not end within %d s", TIMEOUT);
				snprintf(outcome, sizeof(outcome), "timeout seconds=%d", TIMEOUT);
				return 0;
			}
			if (err == EINTR)
				continue;
			/* arm64: kvm_handle_guest_abort -> user_mem_abort (normal VM) or pkvm_mem_abort (protected) */
			note("KVM_RUN failed: %s (%s); exit_reason %u (%s)", errno_name(err), strerror(err),
			     run->exit_reason, exit_name(run->exit_reason));
			if (run->exit_reason == KVM_EXIT_MEMORY_FAULT)
				note("memory fault: gpa 0x%llx size 0x%llx flags 0x%llx",
				     (unsigned long long)run->memory_fault.gpa, (unsigned long long)run->memory_fault.size,
				     (unsigned long long)run->memory_fault.flags);
			show_pc(vcpu);
			snprintf(outcome, sizeof(outcome), "KVM_RUN errno=%s", errno_name(err));
			return 0;
		}
		switch (run->exit_reason) {
		case KVM_EXIT_MMIO:
			ret = mmio(run, slots, nslots);
			if (ret)
				return ret > 0;
			break;
		case KVM_EXIT_SYSTEM_EVENT:	/* PSCI SYSTEM_OFF, SYSTEM_RESET... */
			snprintf(outcome, sizeof(outcome), "system-event type=%s",
				 system_event_name(run->system_event.type));
			return 1;
		case KVM_EXIT_ARM_NISV:	/* io_mem_abort: a data abort without a valid syndrome (ISV = 0) */
			note("KVM_EXIT_ARM_NISV: fault_ipa 0x%llx esr_iss 0x%llx",
			     (unsigned long long)run->arm_nisv.fault_ipa, (unsigned long long)run->arm_nisv.esr_iss);
			show_pc(vcpu);
			snprintf(outcome, sizeof(outcome), "exit-reason=KVM_EXIT_ARM_NISV");
			return 0;
		default:
			note("unexpected exit %u (%s)", run->exit_reason, exit_name(run->exit_reason));
			show_pc(vcpu);
			snprintf(outcome, sizeof(outcome), "exit-reason=%s", exit_name(run->exit_reason));
			return 0;
		}
	}
}
"""


def _kinds(r: CReproducer) -> list[str]:
    """The backing kinds in use, by the keys of MAKE."""
    out = []
    for m in r.memslots:
        spec = BackingSpec.parse(m.backing)
        out.append(spec.kind.value)
    return list(dict.fromkeys(out))


def _is_dmabuf_mapped_udmabuf(spec: BackingSpec) -> bool:
    return spec.kind is BackingKind.UDMABUF and (spec.arg or UdmabufMap.DMABUF.value) == UdmabufMap.DMABUF.value


def _image_array(data: bytes) -> str:
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 12]) for i in range(0, len(data), 12)]
    return "static const unsigned char guest_image[] = {\n" + "".join(f"\t{row},\n" for row in rows) + "};\n"


def _header(r: CReproducer) -> str:
    wrap = lambda text, indent="": textwrap.fill(_comment_text(text), 104, initial_indent=" * " + indent,  # noqa: E731
                                                 subsequent_indent=" * " + indent)
    regs = r.registers
    type_text = (f"{r.vm_type:#x}: " + ("KVM_VM_TYPE_ARM_PROTECTED | " if r.protected else "")
                 + f"KVM_VM_TYPE_ARM_IPA_SIZE({r.ipa_bits})"
                 + (" (0: KVM's default, 40 bits)" if not r.ipa_bits else ""))
    lines = ["/*", f" * {_comment_text(r.name)}: a standalone reproducer (arm64 Linux, /dev/kvm)"]
    if r.title:
        lines.append(wrap(r.title))
    lines += [" *", wrap(r.explanation), " *", " * What it does, as pyvmm does it:",
             f" *   KVM_CREATE_VM type {type_text}"]
    for m in r.memslots:
        lines.append(f" *   memslot {m.slot}: GPA {m.gpa:#x}, {_size(m.size)}, {_comment_text(m.backing)}, "
                     f"flags {_flags_expr(m.flags)}")
    if r.boots:
        lines += [" *   vCPU 0: KVM_ARM_VCPU_INIT (preferred target, PSCI 0.2, pointer authentication where offered); "
                  "in-kernel GICv3",
                  f" *   guest: {_comment_text(r.guest)}, {len(r.image)} bytes at {r.load_gpa:#x}, entered at "
                  f"{r.entry:#x} in EL1h with DAIF masked",
                  f" *   x0 = {regs[0]:#x} (where pyvmm puts the device tree; none is written here), x1 = {regs[1]:#x} "
                  f"(RAM base),", f" *   x2 = {regs[2]:#x} (RAM size), x3 = {regs[3]:#x}, x4 = {regs[4]:#x} (DMA pool)"]
    else:
        lines.append(" *   no guest: the program stops after the memslots")
    for step in r.steps:
        lines.append(wrap(f"step: {step.value}", "  "))
    lines.append(wrap(f"expected: {r.expected.meaning}", "  "))
    for alt in r.alternatives:
        lines.append(wrap(f"or: {alt.meaning}", "  "))
    lines += [" *",
              " * Build: aarch64-linux-gnu-gcc " + " ".join(CFLAGS) + " -I UAPI -I UAPI/aarch64-linux-gnu \\",
              f" *            -o {r.name} {r.name}.c",
              " *   (UAPI: Linux 7.2's uapi headers, e.g. usr/include of Debian's linux-libc-dev; on an arm64",
              " *   host whose own linux-libc-dev is that recent, plain gcc with the same flags)",
              f" * Run:   ./{r.name}   (needs /dev/kvm" + ("; a protected VM needs a host booted with "
                                                         "kvm-arm.mode=protected" if r.protected else "") + ")",
              " * It prints the guest's console and what happens, then EXPECTED: and RESULT: lines in the same words;",
              f" * exit status 0 when they match, 1 when not, {UNAVAILABLE_STATUS} when this host lacks something "
              "(RESULT: unavailable ...).",
              f" * Generated by pyvmm (pyvmm scenario export {_comment_text(r.name)} --c FILE).", " */"]
    return "\n".join(lines) + "\n"


def _includes(r: CReproducer, kinds: list[str]) -> str:
    libc = ["errno.h", "fcntl.h", "signal.h", "stdarg.h", "stddef.h", "stdint.h", "stdio.h", "stdlib.h",
            "string.h", "sys/ioctl.h", "sys/mman.h", "sys/stat.h", "unistd.h"]
    if Step.SET_RLIMIT_MEMLOCK_ZERO in r.steps:
        libc += ["grp.h", "sys/resource.h"]
    if Step.FILE_ON_DISK in r.steps:
        libc.append("sys/vfs.h")
    linux = ["linux/kvm.h"] + (["linux/udmabuf.h"] if "udmabuf" in kinds else []) \
        + (["linux/dma-heap.h"] if "dma-heap" in kinds else [])
    return "#define _GNU_SOURCE\n" + "".join(f"#include <{h}>\n" for h in sorted(libc) + linux)


def _defines(r: CReproducer) -> str:
    consts = [("GIC_DIST", layout.GIC_DIST), ("GIC_REDIST", layout.GIC_REDIST), ("UART", layout.UART),
              ("UART_SIZE", layout.UART_SIZE), ("DEBUG_EXIT", layout.DEBUG_EXIT),
              ("DEBUG_EXIT_SIZE", layout.DEBUG_EXIT_SIZE)]
    out = "\n/* pyvmm's arm64 guest layout (pyvmm/arch/arm64/layout.py) */\n"
    out += "".join(f"#define {name:<16}0x{value:08x}ULL\n" for name, value in consts)
    vm_type = ("KVM_VM_TYPE_ARM_PROTECTED | " if r.protected else "") + f"KVM_VM_TYPE_ARM_IPA_SIZE({r.ipa_bits})"
    return out + (f"#define VM_TYPE\t\t({vm_type})\t/* {r.vm_type:#x} */\n"
                  f"#define BOOT_PSTATE\t({PSTATE_EXPR})\t/* {BOOT_PSTATE:#x} */\n"
                  f"#define TIMEOUT\t\t{int(r.timeout)}\t/* seconds before giving up on the guest */\n")


def _main(r: CReproducer, kinds: list[str]) -> str:
    body: list[str] = []
    add = body.append
    add("int main(void)\n{\n" + ("\tint kvm, vm, vcpu, run_size;\n\tstruct kvm_run *run;\n\n" if r.boots
                                  else "\tint kvm, vm;\n\n"))
    add("\tsetvbuf(stdout, NULL, _IONBF, 0);\n")
    add(f"\tnote(\"{r.name}: expected: %s\", {c_string(r.expected.meaning)});\n\n")
    add("\tkvm = open(\"/dev/kvm\", O_RDWR | O_CLOEXEC);\n\tif (kvm < 0) {\n\t\tif (errno == ENOENT)\n"
        "\t\t\tunavailable(\"/dev/kvm does not exist: no KVM here (CONFIG_KVM, or virtualization off)\");\n"
        "\t\tfail(\"open(/dev/kvm)\");\n\t}\n"
        "\tif (IOCTL(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)\n"
        "\t\tunavailable(\"KVM API version is not %d\", KVM_API_VERSION);\n\n")
    if r.protected:
        add("\t/* kvm_arch_init_vm -> pkvm_init_host_vm: the protected type is accepted only when pKVM is on\n"
            "\t * (is_protected_kvm_enabled(): the host booted with kvm-arm.mode=protected), else EINVAL. */\n")
    add("\tdo\n\t\tvm = ioctl(kvm, KVM_CREATE_VM, (unsigned long)VM_TYPE);\n"
        "\twhile (vm < 0 && errno == EINTR);\n")
    if r.protected:
        add("\tif (vm < 0 && errno == EINVAL)\n"
            "\t\tunavailable(\"KVM_CREATE_VM with KVM_VM_TYPE_ARM_PROTECTED failed with EINVAL: protected VMs need \"\n"
            "\t\t\t    \"pKVM (boot the host with kvm-arm.mode=protected)\");\n")
    add("\tif (vm < 0)\n\t\tfail(\"KVM_CREATE_VM\");\n")
    add(f"\tnote(\"KVM_CREATE_VM type 0x%lx: a {'protected' if r.protected else 'normal'} VM\", "
        "(unsigned long)VM_TYPE);\n")
    if not r.protected:
        add("\t/* pyvmm enables KVM_CAP_ARM_NISV_TO_USER on normal VMs: a data abort without a valid syndrome then\n"
            "\t * exits with KVM_EXIT_ARM_NISV instead of failing KVM_RUN with ENOSYS (io_mem_abort).  Not fatal. */\n"
            "\tif (CHECK_EXTENSION(vm, KVM_CAP_ARM_NISV_TO_USER)) {\n"
            "\t\tstruct kvm_enable_cap cap = { .cap = KVM_CAP_ARM_NISV_TO_USER };\n\n"
            "\t\tif (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0)\n"
            "\t\t\tnote(\"KVM_ENABLE_CAP(KVM_CAP_ARM_NISV_TO_USER) failed: %s\", errno_name(errno));\n\t}\n")
    add("\n")
    for i, m in enumerate(r.memslots):
        spec = BackingSpec.parse(m.backing)
        note_key = "udmabuf:memfd" if spec.kind is BackingKind.UDMABUF and spec.arg else spec.kind.value
        add(textwrap.fill(_comment_text(f"slot {m.slot}: {BACKING_NOTES[note_key]}"), 108, initial_indent="\t/* ",
                          subsequent_indent="\t * ") + " */\n")
        target = f"&slots[{i}]"
        k = spec.kind
        if k is BackingKind.ANON:
            add(f"\tmake_anon({target});\n")
        elif k is BackingKind.MEMFD:
            add(f"\tmake_memfd({target});\n")
        elif k is BackingKind.MEMFD_HUGETLB:
            add(f"\tmake_memfd_hugetlb({target});\n")
        elif k is BackingKind.GUEST_MEMFD:
            add(f"\tmake_guest_memfd(kvm, vm, {target});\n")
        elif k is BackingKind.UDMABUF:
            add(f"\tmake_udmabuf({target}, {1 if _is_dmabuf_mapped_udmabuf(spec) else 0});"
                f"\t/* 1: map the DMA-buf, 0: map the memfd */\n")
        elif k is BackingKind.DMA_HEAP:
            add(f"\tmake_dma_heap({target}, {c_string(spec.arg)}, {c_string('/dev/dma_heap/' + spec.arg)});\n")
        else:
            if Step.FILE_ON_DISK in r.steps and i == len(r.memslots) - 1:
                add(f"\trequire_disk_directory({c_string(os.path.dirname(spec.arg) or '.')});\n")
            add(f"\tmake_file({target}, {c_string(spec.arg)});\n")
        add(f"\tset_memory_region(vm, {target});\n")
    if not r.boots:
        last_call = "KVM_SET_USER_MEMORY_REGION" + ("2" if kinds[-1:] == ["guest-memfd"] else "")
        add(f"\n\t/* No guest: every memslot was accepted. */\n\tfinish(\"{last_call} ok\");\n}}\n")
        return "".join(body)
    add("\n\t/* vCPU 0 with its kvm_run page, initialised; then the GIC (it needs the initialised vCPUs). */\n"
        "\tvcpu = IOCTL(vm, KVM_CREATE_VCPU, 0);\n\trun_size = IOCTL(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);\n"
        "\trun = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);\n"
        "\tif (run == MAP_FAILED)\n\t\tfail(\"mmap(kvm_run)\");\n\tinit_vcpu(vm, vcpu);\n\tcreate_gicv3(vm);\n\n")
    i = r.image_slot()
    m = r.memslots[i]
    off = r.load_gpa - m.gpa
    if _is_dmabuf_mapped_udmabuf(BackingSpec.parse(m.backing)):
        add("\t/* The image, through the memfd behind the DMA-buf (same pages; pyvmm writes a DMA-buf-mapped\n"
            "\t * udmabuf this way, leaving the DMA-buf mapping untouched until the guest runs). */\n"
            f"\twrite_fd(slots[{i}].memfd, {off:#x}, guest_image, sizeof(guest_image));\n")
    else:
        add("\t/* The image, into the slot's mapping (pyvmm: process_vm_writev on it; before the first KVM_RUN the\n"
            "\t * pages are still the host's). */\n"
            f"\tmemcpy((char *)slots[{i}].hva + {off:#x}, guest_image, sizeof(guest_image));\n")
    add(f"\tnote(\"{r.guest}: %zu bytes at 0x%llx\", sizeof(guest_image), {r.load_gpa:#x}ULL);\n")
    add("\n\t/* Entry as pyvmm's cpu.enter: EL1h with D, A, I, F masked; x0..x4 as pyvmm's firmware boot sets them;\n"
        "\t * then the PC. */\n")
    add("\tset_reg(vcpu, CORE_REG(regs.pstate), BOOT_PSTATE);\n")
    for n, value in enumerate(r.registers):
        add(f"\tset_reg(vcpu, CORE_REG(regs.regs[{n}]), {value:#x}ULL);\n")
    add(f"\tset_reg(vcpu, CORE_REG(regs.pc), {r.entry:#x}ULL);\n\n")
    last = f"slots[{len(r.memslots) - 1}]"
    if Step.MPROTECT_READONLY_BEFORE_RUN in r.steps:
        add(f"\t/* Step: the host mapping of slot {r.memslots[-1].slot} becomes read-only; the memslot does not "
            "know. */\n"
            f"\tif (mprotect({last}.hva, {last}.size, PROT_READ) < 0)\n\t\tfail(\"mprotect\");\n"
            f"\tnote(\"step: slot %u's host mapping is now PROT_READ\", {last}.slot);\n")
    if Step.TRUNCATE_FILE_BEFORE_RUN in r.steps:
        add(f"\t/* Step: the file behind slot {r.memslots[-1].slot} loses its pages. */\n"
            f"\tif (ftruncate({last}.fd, 0) < 0)\n\t\tfail(\"ftruncate\");\n"
            f"\tnote(\"step: the file behind slot %u is truncated to 0 bytes\", {last}.slot);\n")
    if Step.SET_RLIMIT_MEMLOCK_ZERO in r.steps:
        add("\t/* Step: RLIMIT_MEMLOCK 0, and without CAP_IPC_LOCK: root becomes nobody, which drops every\n"
            "\t * capability; the fds stay usable. */\n"
            "\t{\n\t\tstruct rlimit none = { 0, 0 };\n\n"
            "\t\tif (setrlimit(RLIMIT_MEMLOCK, &none) < 0)\n\t\t\tfail(\"setrlimit(RLIMIT_MEMLOCK)\");\n"
            "\t\tif (geteuid() == 0) {\n\t\t\tif (setgroups(0, NULL) < 0)\n\t\t\t\tfail(\"setgroups\");\n"
            "\t\t\tif (setgid(65534) < 0)\n\t\t\t\tfail(\"setgid\");\n"
            "\t\t\tif (setuid(65534) < 0)\n\t\t\t\tfail(\"setuid\");\n\t\t}\n"
            "\t\tnote(\"step: RLIMIT_MEMLOCK 0, uid %d\", (int)geteuid());\n\t}\n")
    nslots = "(int)(sizeof(slots) / sizeof(slots[0]))"
    if Step.DELETE_SLOT_AFTER_RUN in r.steps:
        m = r.memslots[-1]
        add(f"\tif (!run_guest(vcpu, run, slots, {nslots}))\n\t\tfinish(\"%s\", outcome);\n"
            "\tnote(\"first run: %s\", outcome);\n"
            f"\t/* Step: delete slot {m.slot} (memory_size 0) after the first run. */\n"
            "\t{\n\t\tstruct kvm_userspace_memory_region gone = {\n"
            f"\t\t\t.slot = {last}.slot, .flags = 0, .guest_phys_addr = {last}.gpa, .memory_size = 0,\n"
            f"\t\t\t.userspace_addr = (__u64)(uintptr_t){last}.hva,\n\t\t}};\n\n"
            "\t\tIOCTL(vm, KVM_SET_USER_MEMORY_REGION, &gone);\n\t}\n"
            "\tfinish(\"KVM_SET_USER_MEMORY_REGION ok\");\n}\n")
    else:
        add(f"\trun_guest(vcpu, run, slots, {nslots});\n\tfinish(\"%s\", outcome);\n}}\n")
    return "".join(body)


def _slots_table(r: CReproducer) -> str:
    rows = []
    for m in r.memslots:
        rows.append(f"\t{{ .slot = {m.slot}, .flags = {_flags_expr(m.flags)}, .gpa = {m.gpa:#x}ULL, "
                    f".size = {m.size:#x}ULL, .backing = {c_string(m.backing)},\n"
                    "\t  .fd = -1, .memfd = -1, .dmabuf = -1, .guest_memfd = -1 },\n")
    return "static struct slot slots[] = {\n" + "".join(rows) + "};\n"


def export_c(r: CReproducer) -> str:
    """The reproducer as one C99 file for arm64 Linux (see the module's docstring for what it does and prints)."""
    kinds = _kinds(r)
    errno_switch = _name_switch("errno_name", "int", [(n, n) for n in ERRNO_NAMES], "%d")
    exit_switch = _name_switch("exit_name", "__u32", [(f"KVM_EXIT_{n}", f"KVM_EXIT_{n}") for n in EXIT_NAMES],
                               "exit %d")
    event_switch = _name_switch("system_event_name", "__u32",
                                [(f"KVM_SYSTEM_EVENT_{n}", n) for n in ("SHUTDOWN", "RESET", "CRASH")], "%d")
    alternatives = "".join(f"\t{{ {c_string(a.result)}, {c_string(a.meaning)} }},\n" for a in r.alternatives)
    common = (COMMON.replace("@EXPECTED@", c_string(r.expected.result)).replace("@ALTERNATIVES@", alternatives)
              .replace("@UNAVAILABLE@", str(UNAVAILABLE_STATUS))
              .replace("@ERRNO_NAME@", errno_switch)
              .replace("@EXIT_NAME@", exit_switch + "\n" + event_switch if r.boots else ""))
    parts = [_header(r), _includes(r, kinds), _defines(r), common]
    if set(kinds) - {"memfd-hugetlb"}:
        parts.append(MAP_SLOT)
    if {"memfd", "memfd-hugetlb", "udmabuf"} & set(kinds):
        parts.append(MEMFD)
    parts += [MAKE[k] for k in kinds]
    if Step.FILE_ON_DISK in r.steps:
        by_magic: dict[int, list[str]] = {}
        for name, magic in DISK_MAGIC.items():
            by_magic.setdefault(magic, []).append(name)
        parts.append(FILE_ON_DISK.replace("@DISKS@", "".join(f"\t\t{{ {magic:#x}, \"{'/'.join(names)}\" }},\n"
                                                             for magic, names in by_magic.items())))
    parts.append(REGION)
    if r.boots:
        if _is_dmabuf_mapped_udmabuf(BackingSpec.parse(r.memslots[r.image_slot()].backing)):
            parts.append(WRITE_FD)
        parts += [VCPU, RUN]
    parts += ["\n", _slots_table(r)]
    if r.boots:
        parts += ["\n/* " + _comment_text(r.guest) + ", as pyvmm loads it */\n", _image_array(r.image)]
    parts += ["\n", _main(r, kinds)]
    return "".join(parts)


# --- compiling ----------------------------------------------------------------------------------------------
def compiler() -> str | None:
    """The arm64 C compiler here: the cross compiler, or gcc on an arm64 host."""
    names = [CROSS_CC] + (["gcc"] if platform.machine().lower() in ("aarch64", "arm64") else [])
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def compile_command(source: str, out_path: str, include: str, cc: str) -> list[str]:
    """The compiler command for SOURCE: CFLAGS with the uapi headers INCLUDE (and their aarch64 asm/)."""
    return [cc, *CFLAGS, "-I", include, "-I", os.path.join(include, "aarch64-linux-gnu"), "-o", out_path, source]


def build_static(r: CReproducer, out_path: str, include: str, cc: str | None = None) -> str:
    """Write ``out_path``.c and cross-compile it into the static arm64 binary ``out_path``; returns out_path.
    ``include``: the uapi headers (scripts/fetch-uapi-headers prints where).  Raises ConfigError naming what is
    missing or what the compiler said."""
    cc = cc or compiler()
    if cc is None:
        raise ConfigError(f"no arm64 C compiler ({CROSS_CC}: Debian package gcc-aarch64-linux-gnu)")
    if not os.path.isfile(os.path.join(include, "linux", "kvm.h")):
        raise ConfigError(f"{include}: no linux/kvm.h (run scripts/fetch-uapi-headers)")
    source = out_path + ".c"
    with open(source, "w") as f:
        f.write(export_c(r))
    proc = subprocess.run(compile_command(source, out_path, include, cc), capture_output=True, text=True)
    if proc.returncode:
        raise ConfigError(f"{cc} failed on {source}:\n{proc.stderr[-4000:]}")
    return out_path


__all__ = ["CReproducer", "Memslot", "Expect", "Step", "export_c", "build_static", "guest_image", "firmware_registers",
           "binary_name", "compiler", "compile_command"]
