/* psci-*: one guest per PSCI path, chosen at build time with --defsym PATH=n:
 *   1 SYSTEM_OFF    -> KVM_EXIT_SYSTEM_EVENT (shutdown)
 *   2 SYSTEM_RESET  -> KVM_EXIT_SYSTEM_EVENT (reset)
 *   3 CPU_ON        -> vCPU 0 starts vCPU 1 (MPIDR 1) with a context id; vCPU 1 reports it and
 *                      turns itself off; vCPU 0 waits for it, reports CPU_ON's result, SYSTEM_OFF. */
	.section .text.entry, "ax"
	.globl _start
_start:
	ldr	x0, =STACK_TOP
	mov	sp, x0
	adr	x0, msg
	bl	puts
	.if PATH == 1
	b	system_off
	.elseif PATH == 2
	ldr	x0, =PSCI_SYSTEM_RESET
	hvc	#0
	.elseif PATH == 3
	ldr	x0, =PSCI_CPU_ON
	mov	x1, #1			/* target MPIDR */
	adr	x2, secondary
	ldr	x3, =0xc0ffee		/* context id, arrives in the secondary's x0 */
	hvc	#0
	mov	x19, x0			/* PSCI return code */
	adr	x20, flag		/* wait for vCPU 1 to finish printing */
1:	ldar	x0, [x20]
	cbz	x0, 1b
	adr	x0, m_ret
	bl	puts
	mov	x0, x19
	bl	puthex
	mov	w0, #'\n'
	bl	putc
	adr	x0, m_seen
	bl	puts
	b	system_off
secondary:
	ldr	x1, =STACK_TOP - 0x1000
	mov	sp, x1
	mov	x19, x0
	adr	x0, m_up
	bl	puts
	mov	x0, x19
	bl	puthex
	mov	w0, #'\n'
	bl	putc
	adr	x20, flag
	mov	x0, #1
	stlr	x0, [x20]
	ldr	x0, =PSCI_CPU_OFF
	hvc	#0
	.endif
2:	wfi
	b	2b

	.include "lib.S"
	.ltorg
	.section .rodata
msg:
	.if PATH == 1
	.asciz "psci: system off\n"
	.elseif PATH == 2
	.asciz "psci: system reset\n"
	.else
	.asciz "psci: cpu on\n"
	.endif
m_ret:	.asciz "cpu0: CPU_ON returned "
m_up:	.asciz "cpu1: up, context "
m_seen:	.asciz "cpu0: cpu1 is up\n"
	.data
	.balign 8
flag:	.quad 0
