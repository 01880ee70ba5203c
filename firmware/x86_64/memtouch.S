/* memtouch: writes a pattern across RAM from 2 MiB to its end (RDI = RAM size), one
 * quadword every 64 bytes, reads it back, and reports over COM1:
 *   memtouch: start=0x... end=0x... checksum=0x... errors=0x...
 * checksum = sum of (addr ^ PATTERN) over the touched addresses (mod 2^64).
 * Exit status (debug-exit port): 0 when every value read back matched, 1 otherwise. */
	.set START, 0x200000
	.set STRIDE, 64
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi
	jnz	idle
	mov	%rdi, %r15		/* end */
	movabs	$0x5a17c0de9e3779b9, %r14	/* PATTERN */
	mov	$START, %r8
1:	cmp	%r15, %r8		/* write pass */
	jae	2f
	mov	%r8, %rax
	xor	%r14, %rax
	mov	%rax, (%r8)
	add	$STRIDE, %r8
	jmp	1b
2:	xor	%r9, %r9		/* checksum */
	xor	%r10, %r10		/* errors */
	mov	$START, %r8
3:	cmp	%r15, %r8		/* read pass */
	jae	5f
	mov	(%r8), %rax
	add	%rax, %r9
	mov	%r8, %rcx
	xor	%r14, %rcx
	cmp	%rcx, %rax
	je	4f
	inc	%r10
4:	add	$STRIDE, %r8
	jmp	3b
5:	lea	m_start(%rip), %rbx
	call	puts
	mov	$START, %rax
	call	puthex
	lea	m_end(%rip), %rbx
	call	puts
	mov	%r15, %rax
	call	puthex
	lea	m_sum(%rip), %rbx
	call	puts
	mov	%r9, %rax
	call	puthex
	lea	m_err(%rip), %rbx
	call	puts
	mov	%r10, %rax
	call	puthex
	mov	$'\n', %al
	call	putc
	xor	%eax, %eax
	test	%r10, %r10
	jz	6f
	mov	$1, %eax
6:	jmp	guest_exit
idle:	hlt
	jmp	idle

	.include "lib.S"

	.section .rodata
m_start: .asciz "memtouch: start="
m_end:	.asciz " end="
m_sum:	.asciz " checksum="
m_err:	.asciz " errors="
