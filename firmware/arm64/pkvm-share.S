/* pkvm-share: the pKVM guest hypercalls, and what the host may read afterwards.
 *   FEATURES (0x86000000), HYP_MEMINFO (0xc6000002), MEM_SHARE (0xc6000003) of page A;
 *   page B is written but not shared.  A page is the granule HYP_MEMINFO answered (pKVM's PAGE_SIZE, the
 *   host's: 4 KiB, or 16 KiB on a 16K-page host), so B lies one granule after A and sharing A leaves B
 *   private; without a usable granule (a normal VM: NOT_SUPPORTED) B is 4 KiB after A.
 *   The guest hands both IPAs to the host in the test device's
 *   scratch area (0x100: A, 0x108: B) and writes 0x51 to the exit register: the host now reads A
 *   (shared) and is refused B (the guest's).  When resumed, the guest checks B still holds its value,
 *   unshares A (MEM_UNSHARE, 0xc6000004), prints a summary and exits with 0 (B intact) or 2 (B lost).
 * On a normal VM the MEM_* calls answer NOT_SUPPORTED (-1) and the host may read both pages. */
	.set FEATURES, 0x86000000
	.set MEMINFO, 0xc6000002
	.set MEM_SHARE, 0xc6000003
	.set MEM_UNSHARE, 0xc6000004
	.section .text.entry, "ax"
	.globl _start
_start:
	ldr	x0, =STACK_TOP
	mov	sp, x0
	mov	x28, x1			/* RAM base (the hypercalls clobber x0-x3) */
	ldr	x0, =FEATURES
	hvc	#0
	mov	x20, x0
	ldr	x0, =MEMINFO
	mov	x1, #0
	mov	x2, #0
	mov	x3, #0
	hvc	#0
	mov	x21, x0
	mov	x9, #0x1000		/* the granule: MEMINFO's answer if a power of two in [4 KiB, 64 KiB] */
	cmp	x21, x9
	b.lt	1f			/* also an error (negative) */
	cmp	x21, #0x10000
	b.hi	1f
	sub	x10, x21, #1
	tst	x21, x10
	csel	x9, x21, x9, eq
1:	add	x22, x28, #0x300000	/* page A (64 KiB-aligned: a granule's start) */
	add	x23, x22, x9		/* page B, the next granule */
	ldr	x25, =0x5348415245442d41	/* "A-DERAHS": A's value */
	ldr	x26, =0x505249564154452d	/* "-ETAVIRP": B's value */
	str	x25, [x22]
	str	x26, [x23]
	ldr	x0, =MEM_SHARE
	mov	x1, x22
	mov	x2, #0
	mov	x3, #0
	hvc	#0
	mov	x24, x0
	adr	x0, m_feat
	bl	puts
	mov	x0, x20
	bl	puthex
	adr	x0, m_info
	bl	puts
	mov	x0, x21
	bl	puthex
	adr	x0, m_share
	bl	puts
	mov	x0, x24
	bl	puthex
	mov	w0, #'\n'
	bl	putc
	mov	x9, #TESTDEV		/* hand the IPAs to the host, then stop */
	str	x22, [x9, #0x100]
	str	x23, [x9, #0x108]
	mov	x9, #DEBUG_EXIT
	mov	w0, #0x51
	str	w0, [x9]
	/* resumed by the host */
	ldr	x0, [x23]
	cmp	x0, x26
	cset	x27, ne			/* 1 when B lost its value */
	ldr	x0, =MEM_UNSHARE
	mov	x1, x22
	mov	x2, #0
	mov	x3, #0
	hvc	#0
	mov	x24, x0
	adr	x0, m_after
	bl	puts
	adr	x0, m_intact
	adr	x1, m_lost
	cmp	x27, #0
	csel	x0, x0, x1, eq
	bl	puts
	adr	x0, m_unshare
	bl	puts
	mov	x0, x24
	bl	puthex
	mov	w0, #'\n'
	bl	putc
	lsl	w0, w27, #1
	b	guest_exit

	.include "lib.S"
	.ltorg
	.section .rodata
m_feat:	.asciz "pkvm-share: features="
m_info:	.asciz " meminfo="
m_share: .asciz " share="
m_after: .asciz "pkvm-share: page B "
m_intact: .asciz "intact"
m_lost:	.asciz "LOST"
m_unshare: .asciz ", unshare="
