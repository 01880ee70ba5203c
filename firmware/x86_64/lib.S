/* Shared helpers for pyvmm's 64-bit x86 test guests (AT&T syntax).
 * Console: 16550 on COM1 (0x3f8).  Exit: debug-exit port 0x501.
 * Only plain integer instructions: the test host emulates every guest instruction. */
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0x501
	.set TESTDEV, 0xd0000000

	.code64
	.text

/* putc: %al = character; clobbers %dx */
putc:
	push	%rax
	mov	$COM1 + 5, %dx		/* LSR */
1:	inb	%dx, %al
	test	$0x20, %al		/* THR empty */
	jz	1b
	pop	%rax
	mov	$COM1, %dx
	outb	%al, %dx
	ret

/* puts: %rbx = NUL-terminated string; clobbers %rax, %rbx, %dx */
puts:
	movb	(%rbx), %al
	test	%al, %al
	jz	2f
	call	putc
	inc	%rbx
	jmp	puts
2:	ret

/* puthex: %rax = value, printed as 0x + 16 hex digits; clobbers %rcx, %rdx */
puthex:
	push	%rax
	push	%rbx
	mov	%rax, %rbx
	mov	$'0', %al
	call	putc
	mov	$'x', %al
	call	putc
	mov	$16, %rcx
3:	rol	$4, %rbx
	mov	%rbx, %rax
	and	$0xf, %rax
	cmp	$10, %rax
	jb	4f
	add	$('a' - 10 - '0'), %rax
4:	add	$'0', %rax
	call	putc
	dec	%rcx
	jnz	3b
	pop	%rbx
	pop	%rax
	ret

/* puthex_sp, puthex_nl: puthex, then a space or a newline; clobber %al, %rcx, %rdx */
puthex_sp:
	call	puthex
	mov	$' ', %al
	jmp	putc
puthex_nl:
	call	puthex
	mov	$'\n', %al
	jmp	putc

/* guest_exit: %eax = status, written to the debug-exit port; does not return */
guest_exit:
	mov	$DEBUG_EXIT, %dx
	outl	%eax, %dx
5:	hlt
	jmp	5b
