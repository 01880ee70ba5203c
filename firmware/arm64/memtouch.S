/* memtouch: writes a pattern across RAM from base+2 MiB to its end (x1 = RAM base, x2 = RAM size),
 * one doubleword every 64 bytes, reads it back and reports over the UART:
 *   memtouch: start=0x... end=0x... checksum=0x... errors=0x...
 * checksum = sum of (addr ^ PATTERN).  Exit status: 0 when every value matched, 1 otherwise. */
	.section .text.entry, "ax"
	.globl _start
_start:
	ldr	x0, =STACK_TOP
	mov	sp, x0
	add	x20, x1, #0x200000	/* start */
	add	x21, x1, x2		/* end */
	ldr	x22, =0x5a17c0de9e3779b9
	mov	x8, x20
1:	cmp	x8, x21
	b.hs	2f
	eor	x0, x8, x22
	str	x0, [x8], #64
	b	1b
2:	mov	x23, #0			/* checksum */
	mov	x24, #0			/* errors */
	mov	x8, x20
3:	cmp	x8, x21
	b.hs	4f
	ldr	x0, [x8]
	add	x23, x23, x0
	eor	x1, x8, x22
	cmp	x0, x1
	cinc	x24, x24, ne
	add	x8, x8, #64
	b	3b
4:	adr	x0, m_start
	bl	puts
	mov	x0, x20
	bl	puthex
	adr	x0, m_end
	bl	puts
	mov	x0, x21
	bl	puthex
	adr	x0, m_sum
	bl	puts
	mov	x0, x23
	bl	puthex
	adr	x0, m_err
	bl	puts
	mov	x0, x24
	bl	puthex
	mov	w0, #'\n'
	bl	putc
	cmp	x24, #0
	cset	w0, ne
	b	guest_exit

	.include "lib.S"
	.ltorg
	.section .rodata
m_start: .asciz "memtouch: start="
m_end:	.asciz " end="
m_sum:	.asciz " checksum="
m_err:	.asciz " errors="
