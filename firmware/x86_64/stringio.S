/* stringio: string port I/O against the port test device (0x510, 16 ports).
 *   rep outsb  5 bytes  to port 0x510   rep insb  5 bytes  from port 0x518
 *   rep outsw  5 words  to port 0x512   rep insw  5 words  from port 0x51a
 *   rep outsl  5 dwords to port 0x514   rep insl  5 dwords from port 0x51c
 * The 35 bytes read are stored contiguously at INBUF (0x200000); the guest prints their
 * sum ("stringio: sum=0x...") and halts. */
	.set PORTDEV, 0x510
	.set INBUF, 0x200000
	.set COUNT, 5
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi
	jnz	idle
	cld
	lea	out8(%rip), %rsi
	mov	$PORTDEV, %dx
	mov	$COUNT, %ecx
	rep outsb
	lea	out16(%rip), %rsi
	mov	$PORTDEV + 2, %dx
	mov	$COUNT, %ecx
	rep outsw
	lea	out32(%rip), %rsi
	mov	$PORTDEV + 4, %dx
	mov	$COUNT, %ecx
	rep outsl
	mov	$INBUF, %edi
	mov	$PORTDEV + 8, %dx
	mov	$COUNT, %ecx
	rep insb
	mov	$PORTDEV + 10, %dx
	mov	$COUNT, %ecx
	rep insw
	mov	$PORTDEV + 12, %dx
	mov	$COUNT, %ecx
	rep insl
	/* sum of the bytes read: INBUF .. %rdi */
	mov	%rdi, %r8
	mov	$INBUF, %esi
	xor	%r9, %r9
1:	movzbl	(%rsi), %eax
	add	%rax, %r9
	inc	%rsi
	cmp	%r8, %rsi
	jb	1b
	lea	m_sum(%rip), %rbx
	call	puts
	mov	%r9, %rax
	call	puthex_nl
idle:	hlt
	jmp	idle

	.include "lib.S"

	.section .rodata
out8:	.byte	0xa1, 0xa2, 0xa3, 0xa4, 0xa5
out16:	.word	0xb001, 0xb102, 0xb203, 0xb304, 0xb405
out32:	.long	0xc0000001, 0xc1000102, 0xc2000203, 0xc3000304, 0xc4000405
m_sum:	.asciz	"stringio: sum="
