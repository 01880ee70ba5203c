/* hello16: real-mode greeting (flat binary, CS based at the load address), then HLT. */
	.code16
	.text
	.globl _start
_start:
	mov	%cs, %ax
	mov	%ax, %ds
	mov	$msg, %si
1:	lodsb
	test	%al, %al
	jz	2f
	mov	$0x3f8, %dx
	outb	%al, %dx
	jmp	1b
2:	hlt
	jmp	2b
msg:	.asciz "Hello from a pyvmm guest (x86, real mode)\n"
