/* platform: a bare-metal arm64 guest (C) that reports what the VMM's platform gives it:
 * the device tree (/chosen bootargs and initrd, the PMU and GIC ITS nodes), the ID registers, the
 * debug and PMU features (and whether the PMU works), the SVE vector length, and the ITS registers.
 * It then exits the way a word in bootargs asks: exit=debug:N, exit=reset2:N, exit=off2, or by
 * default PSCI SYSTEM_OFF.  platform-start.S enters main(dtb) with the MMU off (all data accesses
 * are Device memory, so nothing here may do an unaligned access: built with -mstrict-align) and
 * turns synchronous exceptions into a recorded trap plus a skipped instruction. */

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long u64;

#define UART		((volatile u8 *)0x09000000UL)	/* 16550: THR at 0, LSR at 5 */
#define DEBUG_EXIT	((volatile u32 *)0x09010000UL)

#define PSCI_SYSTEM_OFF		0x84000008UL
#define PSCI_SYSTEM_RESET2_64	0xC4000012UL
#define PSCI_SYSTEM_OFF2_64	0xC4000015UL
#define RESET2_VENDOR_PY	0x80007079UL		/* vendor-specific reset type "py" */

/* ---- console and exit ---- */

static void putch(char c)
{
	while (!(UART[5] & 0x20))	/* LSR.THRE */
		;
	UART[0] = (u8)c;
}

static void puts(const char *s)
{
	while (*s)
		putch(*s++);
}

/* 0x + lowercase hex: the digits needed, or at least `digits` of them */
static void puthex_w(u64 v, int digits)
{
	int n = 1;

	while (n < 16 && (v >> (4 * n)))
		n++;
	if (n < digits)
		n = digits;
	puts("0x");
	while (n--)
		putch("0123456789abcdef"[(v >> (4 * n)) & 0xf]);
}

static void puthex(u64 v)
{
	puthex_w(v, 0);
}

static void putdec(u64 v)
{
	char buf[21];
	int i = 0;

	do
		buf[i++] = (char)('0' + v % 10);
	while ((v /= 10));
	while (i)
		putch(buf[--i]);
}

static void __attribute__((noreturn)) debug_exit(u32 status)
{
	*DEBUG_EXIT = status;
	for (;;)
		asm volatile("wfi");
}

/* SMCCC call through HVC: x0 = function, x1, x2 = arguments; returns x0 */
static u64 hvc_call(u64 fn, u64 a1, u64 a2)
{
	register u64 x0 asm("x0") = fn;
	register u64 x1 asm("x1") = a1;
	register u64 x2 asm("x2") = a2;
	register u64 x3 asm("x3") = 0;

	asm volatile("hvc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) : :
		     "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12", "x13", "x14", "x15",
		     "x16", "x17", "memory");
	return x0;
}

/* ---- exceptions (called from platform-start.S) ---- */

/* The first synchronous trap since trap_count was last cleared: its ESR_EL1. */
volatile u32 trap_count;
volatile u64 trap_esr;

void exception_unexpected(u64 n, u64 esr, u64 elr);

/* Synchronous exception at EL1: record it; the caller then skips the instruction. */
void exception_sync(u64 esr, u64 elr)
{
	u32 ec = (u32)(esr >> 26) & 0x3f;

	/* an instruction abort or a bad PC can't be skipped: that's a guest bug */
	if (ec == 0x21 || ec == 0x22)
		exception_unexpected(4, esr, elr);
	if (trap_count++ == 0)
		trap_esr = esr;
}

void __attribute__((noreturn)) exception_unexpected(u64 n, u64 esr, u64 elr)
{
	puts("unexpected exception ");
	putdec(n);
	puts(" ESR=");
	puthex(esr);
	puts(" ELR=");
	puthex(elr);
	puts("\n");
	debug_exit(0xEE);
}

/* ---- strings ---- */

static u32 strlen(const char *s)
{
	u32 n = 0;

	while (s[n])
		n++;
	return n;
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* ---- flattened device tree ---- */

#define FDT_MAGIC	0xd00dfeed
#define FDT_BEGIN_NODE	1
#define FDT_END_NODE	2
#define FDT_PROP	3
#define FDT_NOP		4
#define FDT_END		9
#define MAX_DEPTH	16

static const u8 *fdt_struct, *fdt_struct_end;	/* the structure block */
static const char *fdt_strings;			/* the strings block */

static u32 be32(const void *p)
{
	const u8 *b = p;

	return (u32)b[0] << 24 | (u32)b[1] << 16 | (u32)b[2] << 8 | b[3];
}

/* a 4- or 8-byte big-endian cell value */
static u64 be_cells(const u8 *p, u32 len)
{
	return len == 8 ? (u64)be32(p) << 32 | be32(p + 4) : be32(p);
}

static u32 align4(u32 n)
{
	return (n + 3) & ~3u;
}

/* A node is the address of its FDT_BEGIN_NODE token; its name follows the token. */
static const char *node_name(const u8 *node)
{
	return (const char *)node + 4;
}

/* the first token after a node's name */
static const u8 *node_body(const u8 *node)
{
	return node + 4 + align4(strlen(node_name(node)) + 1);
}

/* A property of node (properties come before subnodes): its value and *len, or 0 if absent. */
static const u8 *get_prop(const u8 *node, const char *name, u32 *len)
{
	const u8 *p = node_body(node);

	while (p < fdt_struct_end) {
		u32 tok = be32(p);

		if (tok == FDT_NOP) {
			p += 4;
			continue;
		}
		if (tok != FDT_PROP)
			return 0;
		if (streq(fdt_strings + be32(p + 8), name)) {
			*len = be32(p + 4);
			return p + 12;
		}
		p += 12 + align4(be32(p + 4));
	}
	return 0;
}

/* A node's place in the tree while walking: node[0] is the root, node[depth] the current one. */
struct walk {
	const u8 *node[MAX_DEPTH];
	int depth;
};

typedef int (*match_fn)(const struct walk *w, const char *arg);

/* Walk the structure block depth-first; the first node match() accepts, with *w its ancestors. */
static const u8 *fdt_find(match_fn match, const char *arg, struct walk *w)
{
	const u8 *p = fdt_struct;

	w->depth = -1;
	while (p < fdt_struct_end) {
		switch (be32(p)) {
		case FDT_BEGIN_NODE:
			if (++w->depth >= MAX_DEPTH)
				return 0;
			w->node[w->depth] = p;
			if (match(w, arg))
				return p;
			p = node_body(p);
			break;
		case FDT_END_NODE:
			w->depth--;
			p += 4;
			break;
		case FDT_PROP:
			p += 12 + align4(be32(p + 4));
			break;
		case FDT_NOP:
			p += 4;
			break;
		default:		/* FDT_END, or garbage */
			return 0;
		}
	}
	return 0;
}

/* the node at an absolute path ("/chosen"); a component may leave out the unit address */
static int match_path(const struct walk *w, const char *path)
{
	for (int i = 1; i <= w->depth; i++) {
		const char *name = node_name(w->node[i]);

		if (*path++ != '/')
			return 0;
		while (*name && *name == *path && *path != '/')
			name++, path++;
		if ((*path && *path != '/') || (*name && *name != '@'))
			return 0;
	}
	return w->depth == 0 ? streq(path, "/") : !*path;
}

/* does node's compatible stringlist contain compat? */
static int is_compatible(const u8 *node, const char *compat)
{
	u32 len = 0;
	const char *s = (const char *)get_prop(node, "compatible", &len);
	const char *end = s + len;

	for (; s && s < end; s += strlen(s) + 1)
		if (streq(s, compat))
			return 1;
	return 0;
}

static int match_compatible(const struct walk *w, const char *compat)
{
	return is_compatible(w->node[w->depth], compat);
}

/* ---- system registers ---- */

#define read_sysreg(r) ({ u64 __v = 0; asm volatile("mrs %0, " #r : "+r"(__v) : : "memory"); __v; })
#define write_sysreg(r, v) asm volatile("msr " #r ", %0" : : "r"((u64)(v)) : "memory")
#define isb() asm volatile("isb" : : : "memory")

/* ---- the checks ---- */

/* /chosen bootargs: returns the string (for the exit choice), or 0 */
static const char *show_bootargs(const u8 *chosen)
{
	u32 len = 0;
	const char *args = chosen ? (const char *)get_prop(chosen, "bootargs", &len) : 0;

	if (!args || !len || args[len - 1])	/* must be a NUL-terminated string */
		args = 0;
	puts("bootargs: ");
	puts(args ? args : "(none)");
	puts("\n");
	return args;
}

/* /chosen linux,initrd-start/-end, and the start of the initrd's contents */
static void show_initrd(const u8 *chosen)
{
	u32 slen = 0, elen = 0;
	const u8 *ps = chosen ? get_prop(chosen, "linux,initrd-start", &slen) : 0;
	const u8 *pe = chosen ? get_prop(chosen, "linux,initrd-end", &elen) : 0;

	if (!ps || !pe || (slen != 4 && slen != 8) || (elen != 4 && elen != 8)) {
		puts("initrd: (none)\n");
		return;
	}
	u64 start = be_cells(ps, slen), end = be_cells(pe, elen);
	const volatile u8 *data = (const volatile u8 *)start;

	puts("initrd: ");
	puthex(start);
	puts(" ");
	puthex(end);
	puts("\ninitrd-data: ");
	for (u64 i = 0; i < 64 && start + i < end; i++) {
		u8 c = data[i];

		if (c == '\n')
			break;
		putch(c >= 0x20 && c < 0x7f ? (char)c : '.');
	}
	puts("\n");
}

/* the debug features: DebugVer, breakpoints and watchpoints */
static void show_debug(u64 dfr0)
{
	puts("debug: debugver=");
	putdec(dfr0 & 0xf);
	puts(" brps=");
	putdec(((dfr0 >> 12) & 0xf) + 1);
	puts(" wrps=");
	putdec(((dfr0 >> 20) & 0xf) + 1);
	puts("\n");
}

static void busy_loop(void)
{
	u64 n = 100000;

	asm volatile("1: subs %0, %0, #1\n\tb.ne 1b" : "+r"(n));
}

/* the PMU: is it there, does the cycle counter count, and is it in the device tree */
static void show_pmu(u64 dfr0)
{
	u32 pmuver = (dfr0 >> 8) & 0xf;

	if (pmuver == 0 || pmuver == 0xf) {
		puts("pmu: absent (pmuver=");
		putdec(pmuver);
		puts(")\n");
	} else {
		trap_count = 0;
		u64 pmcr = read_sysreg(pmcr_el0);

		if (!trap_count) {
			puts("pmu: pmuver=");
			putdec(pmuver);
			puts(" pmcr=");
			puthex(pmcr);
			puts(" counters=");
			putdec((pmcr >> 11) & 0x1f);
			puts("\n");
			/* E | C (reset the cycle counter) | LC (64-bit cycle counter) */
			write_sysreg(pmcr_el0, pmcr | 1 | 1 << 2 | 1 << 6);
			write_sysreg(pmcntenset_el0, 1UL << 31);
			write_sysreg(pmccfiltr_el0, 0);	/* count at EL1 and EL0 */
			isb();
			u64 c0 = read_sysreg(pmccntr_el0);
			busy_loop();
			u64 c1 = read_sysreg(pmccntr_el0);

			if (!trap_count) {
				puts("pmu: cycles=");
				putdec(c1 - c0);
				puts("\n");
			}
		}
		if (trap_count) {
			puts("pmu: trapped ESR=");
			puthex(trap_esr);
			puts("\n");
		}
	}

	struct walk w;
	const u8 *node = fdt_find(match_compatible, "arm,armv8-pmuv3", &w);
	u32 len = 0;
	const u8 *irq = node ? get_prop(node, "interrupts", &len) : 0;

	if (irq && len >= 12) {
		puts("pmu-node: interrupts=");
		putdec(be32(irq));
		puts(" ");
		putdec(be32(irq + 4));
		puts(" ");
		putdec(be32(irq + 8));
		puts("\n");
	} else {
		puts("pmu-node: (none)\n");
	}
}

/* rdvl x0, #1: the SVE vector length in bytes (assembled for SVE here only) */
static u64 rdvl(void)
{
	u64 vl = 0;

	asm volatile(".arch_extension sve\n\trdvl %0, #1\n\t.arch_extension nosve"
		     : "+r"(vl) : : "memory");
	return vl;
}

/* SVE: the vector length, or whether rdvl traps when the ID register says there's no SVE */
static void show_sve(u64 pfr0)
{
	u64 sve = (pfr0 >> 32) & 0xf;

	/* CPACR_EL1.ZEN and .FPEN = 0b11: SVE and FP/SIMD don't trap at EL1/EL0 */
	write_sysreg(cpacr_el1, read_sysreg(cpacr_el1) | 3UL << 16 | 3UL << 20);
	isb();
	trap_count = 0;
	if (sve) {
		write_sysreg(S3_0_C1_C2_0, 0x1ff);	/* ZCR_EL1.LEN: the largest supported */
		isb();
	}
	u64 vl = rdvl();

	if (sve && !trap_count) {
		puts("sve: vl=");
		putdec(vl);
		puts(" bytes\n");
	} else if (sve) {
		puts("sve: trapped ESR=");
		puthex(trap_esr);
		puts("\n");
	} else if (trap_count) {
		puts("sve: absent; rdvl trapped (ec=");
		puthex(trap_esr >> 26 & 0x3f);
		puts(")\n");
	} else {
		puts("sve: absent in id_aa64pfr0 but rdvl ran (vl=");
		putdec(vl);
		puts(")\n");
	}
}

/* the GIC ITS: its node (under the GIC), and its IIDR and TYPER registers */
static void show_its(void)
{
	struct walk w;
	const u8 *node = fdt_find(match_compatible, "arm,gic-v3-its", &w);
	u32 len = 0;
	const u8 *reg = node ? get_prop(node, "reg", &len) : 0;

	if (!node) {
		puts("its: (none)\n");
		return;
	}
	if (!reg || len < 16) {
		puts("its: bad reg\n");
		return;
	}
	u64 addr = be_cells(reg, 8), size = be_cells(reg + 8, 8);

	puts("its: node at ");
	puthex(addr);
	puts(" size ");
	puthex(size);
	puts("\n");

	trap_count = 0;
	u32 iidr = *(volatile u32 *)(addr + 0x4);	/* GITS_IIDR */
	u64 typer = *(volatile u64 *)(addr + 0x8);	/* GITS_TYPER */
	if (trap_count) {
		puts("its: read trapped ESR=");
		puthex(trap_esr);
		puts("\n");
	} else {
		puts("its: iidr=");
		puthex(iidr);
		puts(" typer=");
		puthex(typer);
		puts("\n");
	}

	const u8 *parent = w.depth > 0 ? w.node[w.depth - 1] : 0;

	puts("its: parent=");
	puts(parent ? node_name(parent) : "(none)");
	puts("\n");
	if (!parent || !is_compatible(parent, "arm,gic-v3"))
		puts("its: parent is not arm,gic-v3\n");
}

/* ---- exit, as bootargs asks ---- */

enum { EXIT_DEFAULT, EXIT_DEBUG, EXIT_RESET2, EXIT_OFF2 };

/* does the word w (wlen bytes) start with prefix?  *rest = what follows */
static int word_prefix(const char *w, u32 wlen, const char *prefix, const char **rest)
{
	u32 n = strlen(prefix);

	for (u32 i = 0; i < n; i++)
		if (i >= wlen || w[i] != prefix[i])
			return 0;
	*rest = w + n;
	return 1;
}

/* a decimal 0..255 filling s[0..len) */
static int parse_u8(const char *s, u32 len, u32 *n)
{
	*n = 0;
	if (!len || len > 3)
		return 0;
	for (u32 i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return 0;
		*n = *n * 10 + (u32)(s[i] - '0');
	}
	return *n <= 255;
}

/* the first space-separated word of args that is exit=off2, exit=debug:N or exit=reset2:N */
static int exit_choice(const char *args, u32 *n)
{
	while (args && *args) {
		while (*args == ' ')
			args++;
		const char *w = args, *rest;

		while (*args && *args != ' ')
			args++;
		u32 wlen = (u32)(args - w);

		if (wlen == 9 && word_prefix(w, wlen, "exit=off2", &rest))
			return EXIT_OFF2;
		if (word_prefix(w, wlen, "exit=debug:", &rest) &&
		    parse_u8(rest, wlen - (u32)(rest - w), n))
			return EXIT_DEBUG;
		if (word_prefix(w, wlen, "exit=reset2:", &rest) &&
		    parse_u8(rest, wlen - (u32)(rest - w), n))
			return EXIT_RESET2;
	}
	return EXIT_DEFAULT;
}

static void __attribute__((noreturn)) do_exit(const char *args)
{
	u32 n = 0;
	u64 ret;

	switch (exit_choice(args, &n)) {
	case EXIT_DEBUG:
		puts("platform: exit via debug-exit ");
		putdec(n);
		puts("\n");
		debug_exit(n);
	case EXIT_RESET2:
		puts("platform: exit via SYSTEM_RESET2 ");
		putdec(n);
		puts("\n");
		ret = hvc_call(PSCI_SYSTEM_RESET2_64, RESET2_VENDOR_PY, n);
		puts("platform: SYSTEM_RESET2 returned ");
		puthex(ret);
		puts("\n");
		debug_exit(0xEF);
	case EXIT_OFF2:
		puts("platform: exit via SYSTEM_OFF2\n");
		ret = hvc_call(PSCI_SYSTEM_OFF2_64, 1, 0);	/* HIBERNATE_OFF */
		puts("platform: SYSTEM_OFF2 returned ");
		puthex(ret);
		puts("\n");
		debug_exit(0xEF);
	default:
		puts("platform: done\n");
		hvc_call(PSCI_SYSTEM_OFF, 0, 0);
		for (;;)
			asm volatile("wfi");
	}
}

void __attribute__((noreturn)) main(u64 dtb)
{
	const u8 *fdt = (const u8 *)dtb;

	puts("platform: dtb at ");
	puthex(dtb);
	puts("\n");
	if (!fdt || be32(fdt) != FDT_MAGIC) {
		puts("platform: bad dtb magic\n");
		debug_exit(0xEE);
	}
	/* header: totalsize @4, off_dt_struct @8, off_dt_strings @12, version @20, size_dt_struct @36 */
	fdt_struct = fdt + be32(fdt + 8);
	fdt_strings = (const char *)fdt + be32(fdt + 12);
	fdt_struct_end = be32(fdt + 20) >= 17 ? fdt_struct + be32(fdt + 36) : fdt + be32(fdt + 4);

	struct walk w;
	const u8 *chosen = fdt_find(match_path, "/chosen", &w);
	const char *args = show_bootargs(chosen);

	show_initrd(chosen);

	u64 pfr0 = read_sysreg(id_aa64pfr0_el1), dfr0 = read_sysreg(id_aa64dfr0_el1);

	puts("id_aa64pfr0: ");
	puthex_w(pfr0, 16);
	puts("\nid_aa64dfr0: ");
	puthex_w(dfr0, 16);
	puts("\n");
	show_debug(dfr0);
	show_pmu(dfr0);
	show_sve(pfr0);
	show_its();
	do_exit(args);
}
