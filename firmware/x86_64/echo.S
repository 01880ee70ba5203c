/* echo: prints "echo: ready", then copies what arrives on COM1 back, prefixed "got: ", until a newline;
 * exits with status 0x42 through the debug-exit port (polls LSR.DR: no interrupts needed). */
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	lea	ready(%rip), %rbx
	call	puts
	lea	got(%rip), %rbx
	call	puts
1:	mov	$COM1 + 5, %dx		/* LSR */
	inb	%dx, %al
	test	$0x01, %al		/* data ready */
	jz	1b
	mov	$COM1, %dx
	inb	%dx, %al
	call	putc
	cmp	$'\n', %al
	jne	1b
	mov	$0x42, %eax
	call	guest_exit

	.include "lib.S"

	.section .rodata
ready:	.asciz "echo: ready\n"
got:	.asciz "got: "
