/* hello: prints a greeting over the UART, then PSCI SYSTEM_OFF. */
	.section .text.entry, "ax"
	.globl _start
_start:
	ldr	x0, =STACK_TOP
	mov	sp, x0
	adr	x0, msg
	bl	puts
	b	system_off

	.include "lib.S"
	.ltorg
	.section .rodata
msg:	.asciz "Hello from a pyvmm guest (arm64)\n"
