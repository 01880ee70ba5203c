/* mmio: the test device at 0x0a000000 with access sizes 1, 2, 4 and 8 (same checks as x86's mmio).
 * Prints "mmio: ok" or "mmio: FAIL errors=0x..."; exit status = number of errors. */
	.section .text.entry, "ax"
	.globl _start
_start:
	ldr	x0, =STACK_TOP
	mov	sp, x0
	mov	x19, #TESTDEV
	mov	x20, #0				/* errors */
	ldr	x21, =0x5453544d4d565950	/* "PYVMMTST" */
	ldrb	w0, [x19]
	cmp	w0, #0x50
	cinc	x20, x20, ne
	ldrh	w0, [x19]
	mov	w1, #0x5950
	cmp	w0, w1
	cinc	x20, x20, ne
	ldr	w0, [x19]
	ldr	w1, =0x4d565950
	cmp	w0, w1
	cinc	x20, x20, ne
	ldr	x0, [x19]
	cmp	x0, x21
	cinc	x20, x20, ne
	mov	w1, #0x11
	strb	w1, [x19, #0x100]
	ldrb	w0, [x19, #0x100]
	cmp	w0, w1
	cinc	x20, x20, ne
	mov	w1, #0x2233
	strh	w1, [x19, #0x110]
	ldrh	w0, [x19, #0x110]
	cmp	w0, w1
	cinc	x20, x20, ne
	ldr	w1, =0x44556677
	str	w1, [x19, #0x120]
	ldr	w0, [x19, #0x120]
	cmp	w0, w1
	cinc	x20, x20, ne
	ldr	x1, =0x8899aabbccddeeff
	str	x1, [x19, #0x130]
	ldr	x0, [x19, #0x130]
	cmp	x0, x1
	cinc	x20, x20, ne
	cbnz	x20, fail
	adr	x0, m_ok
	bl	puts
	mov	w0, #0
	b	guest_exit
fail:	adr	x0, m_fail
	bl	puts
	mov	x0, x20
	bl	puthex
	mov	w0, #'\n'
	bl	putc
	mov	w0, w20
	b	guest_exit

	.include "lib.S"
	.ltorg
	.section .rodata
m_ok:	.asciz "mmio: ok\n"
m_fail:	.asciz "mmio: FAIL errors="
