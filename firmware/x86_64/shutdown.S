/* shutdown-*: one guest per way of ending, chosen at build time with --defsym PATH=n:
 *   1 hlt          -> KVM_EXIT_HLT on every vCPU
 *   2 triple fault -> ud2 with an empty IDT -> KVM_EXIT_SHUTDOWN
 *   3 exit port    -> status 0x42 written to the debug-exit port (0x501)
 *   4 reset        -> reset bit written to the reset control register (0xcf9) */
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi
	jnz	idle
	lea	msg(%rip), %rbx
	call	puts
	.if PATH == 1
	hlt
	.elseif PATH == 2
	ud2
	.elseif PATH == 3
	mov	$0x42, %eax
	jmp	guest_exit
	.elseif PATH == 4
	mov	$0x06, %al
	mov	$0xcf9, %dx
	outb	%al, %dx
	.endif
idle:	hlt
	jmp	idle

	.include "lib.S"

	.section .rodata
msg:
	.if PATH == 1
	.asciz "shutdown: hlt\n"
	.elseif PATH == 2
	.asciz "shutdown: triple fault\n"
	.elseif PATH == 3
	.asciz "shutdown: exit port\n"
	.else
	.asciz "shutdown: reset\n"
	.endif
