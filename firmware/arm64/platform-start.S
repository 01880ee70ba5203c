/* platform-start: entry and exception vectors for the C guest "platform" (platform.c).
 * Entry from the VMM: EL1h, MMU off, x0 = DTB address.  Sets up a 16 KiB stack in .bss, installs
 * the vector table, zeroes .bss and calls main(dtb).
 * Exceptions: the "current EL with SPx, synchronous" entry calls exception_sync(esr, elr), which
 * records the trap, then skips the trapping instruction (ELR_EL1 += 4) and returns; so C code can
 * try an instruction and see whether it trapped.  Every other entry calls
 * exception_unexpected(n, esr, elr), which reports it and ends the VM. */
	.set STACK_SIZE, 16384

	.section .text.entry, "ax"
	.globl _start
_start:
	msr	daifset, #0xf
	mov	x19, x0			/* DTB address, kept across bss clearing */
	adrp	x1, stack_top
	add	x1, x1, :lo12:stack_top
	mov	sp, x1
	adrp	x1, vectors
	add	x1, x1, :lo12:vectors
	msr	vbar_el1, x1
	isb
	/* zero .bss: __bss_start is the first thing in this file's .bss (this object is linked
	 * first); __bss_end is a common symbol, and link.ld puts COMMON after every .bss* */
	adrp	x1, __bss_start
	add	x1, x1, :lo12:__bss_start
	adrp	x2, __bss_end
	add	x2, x2, :lo12:__bss_end
1:	cmp	x1, x2
	b.hs	2f
	str	xzr, [x1], #8
	b	1b
2:	mov	x0, x19
	bl	main
3:	wfi
	b	3b

	.text
/* Vector table: 16 entries of 0x80 bytes, 2 KiB aligned. */
	.macro	unexpected n
	.balign	0x80
	mov	x0, #\n
	b	unexpected_common
	.endm

	.balign	2048
	.globl	vectors
vectors:
	unexpected 0			/* current EL, SP0: sync, irq, fiq, serror */
	unexpected 1
	unexpected 2
	unexpected 3
	.balign	0x80			/* 4: current EL, SPx, synchronous */
	b	sync_spx
	unexpected 5			/* current EL, SPx: irq, fiq, serror */
	unexpected 6
	unexpected 7
	unexpected 8			/* lower EL, AArch64 */
	unexpected 9
	unexpected 10
	unexpected 11
	unexpected 12			/* lower EL, AArch32 */
	unexpected 13
	unexpected 14
	unexpected 15
	.balign	0x80

/* Synchronous exception at EL1: save x0-x30, call exception_sync(esr, elr), skip the instruction. */
sync_spx:
	sub	sp, sp, #256
	stp	x0, x1, [sp, #0]
	stp	x2, x3, [sp, #16]
	stp	x4, x5, [sp, #32]
	stp	x6, x7, [sp, #48]
	stp	x8, x9, [sp, #64]
	stp	x10, x11, [sp, #80]
	stp	x12, x13, [sp, #96]
	stp	x14, x15, [sp, #112]
	stp	x16, x17, [sp, #128]
	stp	x18, x19, [sp, #144]
	stp	x20, x21, [sp, #160]
	stp	x22, x23, [sp, #176]
	stp	x24, x25, [sp, #192]
	stp	x26, x27, [sp, #208]
	stp	x28, x29, [sp, #224]
	str	x30, [sp, #240]
	mrs	x0, esr_el1
	mrs	x1, elr_el1
	bl	exception_sync
	mrs	x0, elr_el1
	add	x0, x0, #4
	msr	elr_el1, x0
	ldp	x0, x1, [sp, #0]
	ldp	x2, x3, [sp, #16]
	ldp	x4, x5, [sp, #32]
	ldp	x6, x7, [sp, #48]
	ldp	x8, x9, [sp, #64]
	ldp	x10, x11, [sp, #80]
	ldp	x12, x13, [sp, #96]
	ldp	x14, x15, [sp, #112]
	ldp	x16, x17, [sp, #128]
	ldp	x18, x19, [sp, #144]
	ldp	x20, x21, [sp, #160]
	ldp	x22, x23, [sp, #176]
	ldp	x24, x25, [sp, #192]
	ldp	x26, x27, [sp, #208]
	ldp	x28, x29, [sp, #224]
	ldr	x30, [sp, #240]
	add	sp, sp, #256
	eret

/* Any other exception: exception_unexpected(n, esr, elr) prints it and exits with 0xEE. */
unexpected_common:
	mrs	x1, esr_el1
	mrs	x2, elr_el1
	bl	exception_unexpected
4:	wfi
	b	4b

	.bss
	.balign	16
	.globl	__bss_start
__bss_start:
stack:	.skip	STACK_SIZE
stack_top:
	.comm	__bss_end, 16, 16
