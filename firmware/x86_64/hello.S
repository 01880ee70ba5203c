/* hello: vCPU 0 prints a greeting over COM1; every vCPU halts (KVM_EXIT_HLT). */
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi		/* RSI = vCPU index */
	jnz	1f
	lea	msg(%rip), %rbx
	call	puts
1:	hlt
	jmp	1b

	.include "lib.S"

	.section .rodata
msg:	.asciz "Hello from a pyvmm guest (x86_64, long mode)\n"
