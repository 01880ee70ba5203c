/* spin: prints a line, then loops forever (for stop and timeout tests).  Secondaries stay powered off. */
	.section .text.entry, "ax"
	.globl _start
_start:
	ldr	x0, =STACK_TOP
	mov	sp, x0
	adr	x0, msg
	bl	puts
1:	b	1b

	.include "lib.S"
	.ltorg
	.section .rodata
msg:	.asciz "spin: spinning\n"
