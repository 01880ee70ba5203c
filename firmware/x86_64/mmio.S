/* mmio: exercises the test device at 0xd0000000 with access sizes 1, 2, 4 and 8.
 *  - reads the ID register ("PYVMMTST") at each width and checks the value;
 *  - writes a value of each width into the scratch area and reads it back.
 * Prints "mmio: ok" or "mmio: FAIL errors=0x..."; exit status = number of errors. */
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi
	jnz	idle
	movl	$TESTDEV, %edi		/* zero-extends into %rdi */
	xor	%r10, %r10			/* errors */
	movabs	$0x5453544d4d565950, %r11	/* "PYVMMTST" little-endian */
	/* ID reads */
	movzbl	(%rdi), %eax
	cmp	$0x50, %eax
	je	1f
	inc	%r10
1:	movzwl	(%rdi), %eax
	cmp	$0x5950, %eax
	je	2f
	inc	%r10
2:	movl	(%rdi), %eax
	cmp	$0x4d565950, %eax
	je	3f
	inc	%r10
3:	movq	(%rdi), %rax
	cmp	%r11, %rax
	je	4f
	inc	%r10
	/* scratch: write then read back each width */
4:	movb	$0x11, 0x100(%rdi)
	movzbl	0x100(%rdi), %eax
	cmp	$0x11, %eax
	je	5f
	inc	%r10
5:	movw	$0x2233, 0x110(%rdi)
	movzwl	0x110(%rdi), %eax
	cmp	$0x2233, %eax
	je	6f
	inc	%r10
6:	movl	$0x44556677, 0x120(%rdi)
	movl	0x120(%rdi), %eax
	cmp	$0x44556677, %eax
	je	7f
	inc	%r10
7:	movabs	$0x8899aabbccddeeff, %rcx
	movq	%rcx, 0x130(%rdi)
	movq	0x130(%rdi), %rax
	cmp	%rcx, %rax
	je	8f
	inc	%r10
8:	test	%r10, %r10
	jnz	fail
	lea	m_ok(%rip), %rbx
	call	puts
	xor	%eax, %eax
	jmp	guest_exit
fail:	lea	m_fail(%rip), %rbx
	call	puts
	mov	%r10, %rax
	call	puthex
	mov	$'\n', %al
	call	putc
	mov	%r10, %rax
	jmp	guest_exit
idle:	hlt
	jmp	idle

	.include "lib.S"

	.section .rodata
m_ok:	.asciz "mmio: ok\n"
m_fail:	.asciz "mmio: FAIL errors="
