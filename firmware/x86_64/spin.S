/* spin: vCPU 0 prints "spin: spinning"; then every vCPU loops on `jmp .` forever
 * (for timeout and stop tests: it never exits on its own). */
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi
	jnz	spin
	lea	msg(%rip), %rbx
	call	puts
spin:	jmp	spin

	.include "lib.S"

	.section .rodata
msg:	.asciz	"spin: spinning\n"
