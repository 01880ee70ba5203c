/*
 * cvmm: the C peer of pyvmm's benchmarks (the Python files of benchmarks/).  A minimal VMM that runs pyvmm's own firmware guests
 * (firmware/<arch>/build/NAME: ELF, as pyvmm loads them) on a VM set up as pyvmm sets it up, handles each exit
 * with as little work as C allows, and reports when things happened.  What a C VMM costs is the floor for
 * pyvmm's: the exit path (the bench guest's N exits), start-up (hello) and teardown (the bench guest touching
 * its RAM).  x86_64 and arm64 from the same source; built by benchmarks/Makefile (scripts/dev bench), for the
 * arm64 lab as a static binary (the lab has no compiler).
 *
 *   cvmm [OPTIONS] GUEST
 *     --ram MIB      guest RAM in MiB (default 16, pyvmm run's default)
 *     --count N      the bench guest's config register: N exits (default 0)
 *     --pio          x86_64: the bench guest exits by port I/O (outl to 0x520) instead of MMIO writes
 *     --touch        the bench guest writes to every 4 KiB page of its RAM instead (teardown)
 *     --protected    arm64: a pKVM protected VM (KVM_VM_TYPE_ARM_PROTECTED)
 *     --quiet        do not copy the guest's UART output to stdout
 *
 * The guest's UART output goes to stdout as it comes (unbuffered, as pyvmm's does).  Reports go to stderr, one
 * "cvmm: KEY=VALUE..." line each, times in ns of CLOCK_MONOTONIC (the clock of Python's time.monotonic_ns):
 *   cvmm: main=T                      main() started
 *   cvmm: first-run=T                 just before the first KVM_RUN (the guest's first instruction follows)
 *   cvmm: first-exit=T                the first KVM_RUN returned
 *   cvmm: end=T exits=N run-ns=D      the guest ended; D from the first KVM_RUN to its end, N exits
 *   cvmm: outcome=WORDS               how: guest-exit status=S, halt, system-event type=T, or what went wrong
 *   cvmm: teardown-ns=D vcpu-ns=A gic-ns=G vm-ns=B munmap-ns=C
 *                                     the close, in pyvmm's order: the vCPU (its kvm_run mapping and fd), the
 *                                     GIC (arm64), the VM fd, the guest RAM's munmap; D is the sum
 * Exit status 0 when the guest ended as guests end (the debug-exit register, HLT, a system event), else 1.
 *
 * Exits are handled minimally: the bench register answers its config and takes writes; the 16550 prints its
 * transmit register and says "ready" in its line status; the debug-exit register ends the run; anything else
 * reads as zeros.  No device tree is written (the firmware guests do not read it); the VM gets no PMU or SVE
 * (pyvmm offers every feature KVM has: its start-up does a few more ioctls).
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#if defined(__x86_64__)
/* pyvmm/arch/x86_64/layout.py */
#define RAM_BASE	0x0ULL
#define COM1		0x3f8
#define DEBUG_EXIT_PORT	0x501
#define BENCH		0xd0800000ULL	/* firmware/x86_64/bench.S */
#define BENCH_PORT	0x520
#define GDT_ADDR	0x500
#define PML4_ADDR	0x9000
#define PDPT_ADDR	0xa000
#define PD_ADDR		0xb000
#define STACK_TOP	0x80000
#define TSS_ADDR	0xfffbd000ULL
#define IDENTITY_MAP	0xfffbc000ULL
#define ELF_MACHINE	EM_X86_64
#elif defined(__aarch64__)
/* pyvmm/arch/arm64/layout.py */
#define RAM_BASE	0x80000000ULL
#define GIC_DIST	0x08000000ULL
#define GIC_REDIST	0x080a0000ULL
#define UART		0x09000000ULL
#define DEBUG_EXIT	0x09010000ULL
#define BENCH		0x0a800000ULL	/* firmware/arm64/bench.S */
#define ELF_MACHINE	EM_AARCH64
#ifndef KVM_VM_TYPE_ARM_PROTECTED
#define KVM_VM_TYPE_ARM_PROTECTED (1UL << 31)
#endif
#define BOOT_PSTATE	(PSR_MODE_EL1h | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT | PSR_D_BIT)
#define CORE_REG(member) (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(member))
#else
#error "cvmm runs on x86_64 and arm64"
#endif

#define BENCH_SIZE	0x1000
#define CONFIG_PIO	(1ULL << 32)
#define CONFIG_TOUCH	(1ULL << 33)

static unsigned long long now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "cvmm: outcome=%s failed: %s\n", what, strerror(errno));
	exit(1);
}

static int xioctl(int fd, unsigned long request, const char *what, unsigned long arg)
{
	int ret = ioctl(fd, request, arg);

	if (ret < 0)
		die(what);
	return ret;
}

#define IOCTL(fd, request, arg) xioctl(fd, request, #request, (unsigned long)(arg))

static unsigned long long config;	/* what the bench register answers */
static int quiet;
static char *ram;
static unsigned long long ram_size;

/* The guest image: each PT_LOAD segment at its physical address, as pyvmm's loader.load_elf. */
static unsigned long long load_elf(const char *path)
{
	unsigned long long entry;
	struct stat st;
	unsigned char *file;
	Elf64_Ehdr *eh;
	int fd, i;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	file = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (file == MAP_FAILED)
		die("mmap of the guest");
	close(fd);
	eh = (Elf64_Ehdr *)file;
	if ((size_t)st.st_size < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_machine != ELF_MACHINE) {
		fprintf(stderr, "cvmm: outcome=%s is not an ELF64 image for this architecture\n", path);
		exit(1);
	}
	for (i = 0; i < eh->e_phnum; i++) {
		Elf64_Phdr *ph = (Elf64_Phdr *)(file + eh->e_phoff + (size_t)i * eh->e_phentsize);

		if (ph->p_type != PT_LOAD || !ph->p_memsz)
			continue;
		if (ph->p_paddr - RAM_BASE > ram_size || ph->p_memsz > ram_size - (ph->p_paddr - RAM_BASE)) {
			fprintf(stderr, "cvmm: outcome=segment at 0x%llx is outside RAM\n", (unsigned long long)ph->p_paddr);
			exit(1);
		}
		memcpy(ram + (ph->p_paddr - RAM_BASE), file + ph->p_offset, ph->p_filesz);
		memset(ram + (ph->p_paddr - RAM_BASE) + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
	}
	entry = eh->e_entry;
	munmap(file, (size_t)st.st_size);
	return entry;
}

#if defined(__x86_64__)
static const unsigned long long gdt[] = {
	0, 0,
	0x00AF9B000000FFFFULL,	/* 0x10 64-bit code */
	0x00CF93000000FFFFULL,	/* 0x18 data */
};

static void segment(struct kvm_segment *seg, unsigned selector)
{
	unsigned long long d = gdt[selector >> 3];

	memset(seg, 0, sizeof(*seg));
	seg->base = 0;
	seg->limit = 0xffffffff;
	seg->selector = (__u16)selector;
	seg->type = (d >> 40) & 0xf;
	seg->s = (d >> 44) & 1;
	seg->dpl = (d >> 45) & 3;
	seg->present = (d >> 47) & 1;
	seg->avl = (d >> 52) & 1;
	seg->l = (d >> 53) & 1;
	seg->db = (d >> 54) & 1;
	seg->g = (d >> 55) & 1;
}

/* As pyvmm's x86_64 prepare_vm, init_vcpus and boot (long mode): TSS and identity-map addresses, CPUID, the
 * GDT and a 4 GiB identity map of 2 MiB pages, then 64-bit mode at the entry with rdi = RAM size. */
static void setup_vm(int kvm, int vm)
{
	unsigned long long identity = IDENTITY_MAP;

	IOCTL(vm, KVM_SET_TSS_ADDR, TSS_ADDR);
	IOCTL(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity);
	(void)kvm;
}

static void setup_vcpu(int kvm, int vm, int vcpu, unsigned long long entry)
{
	struct kvm_cpuid2 *cpuid;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	unsigned long long *pd;
	int n = 64, i;

	(void)vm;
	for (;;) {
		cpuid = calloc(1, sizeof(*cpuid) + (size_t)n * sizeof(cpuid->entries[0]));
		cpuid->nent = (__u32)n;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
			break;
		if (errno != E2BIG)
			die("KVM_GET_SUPPORTED_CPUID");
		free(cpuid);
		n *= 2;
	}
	IOCTL(vcpu, KVM_SET_CPUID2, cpuid);
	free(cpuid);

	memcpy(ram + GDT_ADDR, gdt, sizeof(gdt));
	*(unsigned long long *)(ram + PML4_ADDR) = PDPT_ADDR | 3;
	for (i = 0; i < 4; i++)
		((unsigned long long *)(ram + PDPT_ADDR))[i] = (PD_ADDR + i * 0x1000ULL) | 3;
	pd = (unsigned long long *)(ram + PD_ADDR);
	for (i = 0; i < 4 * 512; i++)
		pd[i] = ((unsigned long long)i << 21) | 0x83;

	IOCTL(vcpu, KVM_GET_SREGS, &sregs);
	segment(&sregs.cs, 0x10);
	segment(&sregs.ds, 0x18);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.gdt.base = GDT_ADDR;
	sregs.gdt.limit = sizeof(gdt) - 1;
	sregs.idt.base = 0;
	sregs.idt.limit = 0;
	sregs.cr3 = PML4_ADDR;
	sregs.cr4 = 0x20;				/* PAE */
	sregs.cr0 = 0x80000000 | 0x20 | 0x10 | 0x1;	/* PG NE ET PE */
	sregs.efer = 0x500;				/* LMA LME */
	IOCTL(vcpu, KVM_SET_SREGS, &sregs);
	memset(&regs, 0, sizeof(regs));
	regs.rip = entry;
	regs.rsp = STACK_TOP;
	regs.rflags = 2;
	regs.rdi = ram_size;
	regs.rsi = 0;
	regs.rdx = 1;
	IOCTL(vcpu, KVM_SET_REGS, &regs);
}

/* KVM_EXIT_IO: 1 when the guest ended. */
static int handle_io(struct kvm_run *run, int *status)
{
	unsigned char *data = (unsigned char *)run + run->io.data_offset;
	unsigned port = run->io.port;

	if (run->io.direction == KVM_EXIT_IO_OUT) {
		if (port == BENCH_PORT)
			return 0;
		if (port == COM1) {
			if (!quiet)
				for (unsigned i = 0; i < run->io.count; i++)
					putchar(data[i * run->io.size]);
			return 0;
		}
		if (port == DEBUG_EXIT_PORT) {
			*status = 0;
			memcpy(status, data, run->io.size < 4 ? run->io.size : 4);
			return 1;
		}
		return 0;
	}
	memset(data, 0, (size_t)run->io.size * run->io.count);
	if (port == COM1 + 5)
		data[0] = 0x60;	/* LSR: THR empty, transmitter empty */
	return 0;
}
#else
static void set_reg(int vcpu, unsigned long long id, unsigned long long value)
{
	struct kvm_one_reg reg = { .id = id, .addr = (__u64)(uintptr_t)&value };

	IOCTL(vcpu, KVM_SET_ONE_REG, &reg);
}

static int gic = -1;

static void setup_vm(int kvm, int vm)
{
	(void)kvm;
	/* pyvmm enables KVM_CAP_ARM_NISV_TO_USER on normal VMs (not offered to protected ones) */
	if (ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_NISV_TO_USER) > 0) {
		struct kvm_enable_cap cap = { .cap = KVM_CAP_ARM_NISV_TO_USER };

		ioctl(vm, KVM_ENABLE_CAP, &cap);
	}
}

/* As pyvmm's arm64 init_vcpus and boot: KVM_ARM_VCPU_INIT (preferred target, PSCI 0.2, pointer authentication
 * when offered), the in-kernel GICv3 at pyvmm's addresses, then EL1h at the entry with x0 = where pyvmm puts the
 * device tree, x1 = RAM base, x2 = RAM size, x3 = x4 = 0 (no DMA pool). */
static void setup_vcpu(int kvm, int vm, int vcpu, unsigned long long entry)
{
	struct kvm_vcpu_init init;
	struct kvm_create_device dev = { .type = KVM_DEV_TYPE_ARM_VGIC_V3 };
	unsigned long long dist = GIC_DIST, redist = GIC_REDIST;
	struct kvm_device_attr attr = { .group = KVM_DEV_ARM_VGIC_GRP_ADDR };

	(void)kvm;
	memset(&init, 0, sizeof(init));
	IOCTL(vm, KVM_ARM_PREFERRED_TARGET, &init);
	init.features[0] = 1U << KVM_ARM_VCPU_PSCI_0_2;
	if (ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_PTRAUTH_ADDRESS) > 0 &&
	    ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_PTRAUTH_GENERIC) > 0)
		init.features[0] |= 1U << KVM_ARM_VCPU_PTRAUTH_ADDRESS | 1U << KVM_ARM_VCPU_PTRAUTH_GENERIC;
	IOCTL(vcpu, KVM_ARM_VCPU_INIT, &init);

	IOCTL(vm, KVM_CREATE_DEVICE, &dev);
	gic = (int)dev.fd;
	attr.attr = KVM_VGIC_V3_ADDR_TYPE_DIST;
	attr.addr = (__u64)(uintptr_t)&dist;
	IOCTL(gic, KVM_SET_DEVICE_ATTR, &attr);
	attr.attr = KVM_VGIC_V3_ADDR_TYPE_REDIST;
	attr.addr = (__u64)(uintptr_t)&redist;
	IOCTL(gic, KVM_SET_DEVICE_ATTR, &attr);
	attr.group = KVM_DEV_ARM_VGIC_GRP_CTRL;
	attr.attr = KVM_DEV_ARM_VGIC_CTRL_INIT;
	attr.addr = 0;
	IOCTL(gic, KVM_SET_DEVICE_ATTR, &attr);

	set_reg(vcpu, CORE_REG(regs.pstate), BOOT_PSTATE);
	set_reg(vcpu, CORE_REG(regs.regs[0]), RAM_BASE + ram_size - (2 << 20));
	set_reg(vcpu, CORE_REG(regs.regs[1]), RAM_BASE);
	set_reg(vcpu, CORE_REG(regs.regs[2]), ram_size);
	set_reg(vcpu, CORE_REG(regs.regs[3]), 0);
	set_reg(vcpu, CORE_REG(regs.regs[4]), 0);
	set_reg(vcpu, CORE_REG(regs.pc), entry);
}
#endif

/* KVM_EXIT_MMIO: 1 when the guest ended. */
static int handle_mmio(struct kvm_run *run, int *status)
{
	unsigned long long addr = run->mmio.phys_addr;
	unsigned len = run->mmio.len > 8 ? 8 : run->mmio.len;
	unsigned char *data = run->mmio.data;

	if (addr - BENCH < BENCH_SIZE) {
		if (!run->mmio.is_write) {
			memset(data, 0, len);
			if (addr == BENCH)
				memcpy(data, &config, len);
		}
		return 0;
	}
#if defined(__aarch64__)
	if (addr - UART < 0x1000) {
		if (run->mmio.is_write) {
			if (addr == UART && !quiet)
				putchar(data[0]);
		} else {
			memset(data, 0, len);
			if (addr == UART + 5)
				data[0] = 0x60;	/* LSR: THR empty, transmitter empty */
		}
		return 0;
	}
	if (addr - DEBUG_EXIT < 0x1000 && run->mmio.is_write) {
		*status = 0;
		memcpy(status, data, len < 4 ? len : 4);
		return 1;
	}
#endif
	(void)status;
	if (!run->mmio.is_write)
		memset(data, 0, len);
	return 0;
}

int main(int argc, char **argv)
{
	unsigned long long t_main = now(), t_first_run, t_first_exit = 0, t_end, t0, t1, t2, t3, t4, entry;
	unsigned long long ram_mib = 16, count = 0, exits = 0;
	int kvm, vm, vcpu, run_size, protected = 0, status = -1, ended = 0, i;
	const char *guest = NULL, *outcome = "guest-exit";
	unsigned long vm_type = 0;
	struct kvm_userspace_memory_region region;
	struct kvm_run *run;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--ram") && i + 1 < argc)
			ram_mib = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--count") && i + 1 < argc)
			count = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--pio"))
			config |= CONFIG_PIO;
		else if (!strcmp(argv[i], "--touch"))
			config |= CONFIG_TOUCH;
		else if (!strcmp(argv[i], "--protected"))
			protected = 1;
		else if (!strcmp(argv[i], "--quiet"))
			quiet = 1;
		else if (argv[i][0] != '-' && !guest)
			guest = argv[i];
		else {
			fprintf(stderr, "usage: %s [--ram MIB] [--count N] [--pio] [--touch] [--protected] [--quiet] GUEST\n",
				argv[0]);
			return 2;
		}
	}
	if (!guest) {
		fprintf(stderr, "usage: %s [--ram MIB] [--count N] [--pio] [--touch] [--protected] [--quiet] GUEST\n", argv[0]);
		return 2;
	}
	config |= count & 0xffffffffULL;
	setvbuf(stdout, NULL, _IONBF, 0);
	fprintf(stderr, "cvmm: main=%llu\n", t_main);

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
#if defined(__aarch64__)
	if (protected)
		vm_type |= KVM_VM_TYPE_ARM_PROTECTED;
#else
	if (protected) {
		fprintf(stderr, "cvmm: outcome=protected VMs are arm64 pKVM VMs\n");
		return 1;
	}
#endif
	vm = IOCTL(kvm, KVM_CREATE_VM, vm_type);
	setup_vm(kvm, vm);

	ram_size = ram_mib << 20;
	ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ram == MAP_FAILED)
		die("mmap of guest RAM");
	region = (struct kvm_userspace_memory_region){ .slot = 0, .guest_phys_addr = RAM_BASE,
						       .memory_size = ram_size, .userspace_addr = (__u64)(uintptr_t)ram };
	IOCTL(vm, KVM_SET_USER_MEMORY_REGION, &region);

	vcpu = IOCTL(vm, KVM_CREATE_VCPU, 0);
	run_size = IOCTL(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap of kvm_run");
	entry = load_elf(guest);
	setup_vcpu(kvm, vm, vcpu, entry);

	t_first_run = now();
	while (!ended) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		exits++;
		if (!t_first_exit)
			t_first_exit = now();
		switch (run->exit_reason) {
		case KVM_EXIT_MMIO:
			ended = handle_mmio(run, &status);
			break;
#if defined(__x86_64__)
		case KVM_EXIT_IO:
			ended = handle_io(run, &status);
			break;
		case KVM_EXIT_HLT:
			outcome = "halt";
			ended = 1;
			break;
#endif
		case KVM_EXIT_SYSTEM_EVENT:
			outcome = "system-event";
			status = (int)run->system_event.type;
			ended = 1;
			break;
		case KVM_EXIT_INTR:
			break;
		default:
			fprintf(stderr, "cvmm: outcome=exit reason %u\n", run->exit_reason);
			return 1;
		}
	}
	t_end = now();
	fprintf(stderr, "cvmm: first-run=%llu\ncvmm: first-exit=%llu\ncvmm: end=%llu exits=%llu run-ns=%llu\n"
		"cvmm: outcome=%s status=%d\n", t_first_run, t_first_exit, t_end, exits, t_end - t_first_run, outcome,
		status);

	/* Teardown in pyvmm's order (Vm.close): the vCPU, the GIC, the VM fd, then the guest RAM. */
	t0 = now();
	munmap(run, (size_t)run_size);
	close(vcpu);
	t1 = now();
#if defined(__aarch64__)
	if (gic >= 0)
		close(gic);
#endif
	t2 = now();
	close(vm);
	t3 = now();
	munmap(ram, ram_size);
	t4 = now();
	close(kvm);
	fprintf(stderr, "cvmm: teardown-ns=%llu vcpu-ns=%llu gic-ns=%llu vm-ns=%llu munmap-ns=%llu\n", t4 - t0, t1 - t0,
		t2 - t1, t3 - t2, t4 - t3);
	return 0;
}
