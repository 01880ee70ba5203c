/* mmio-pending: two quadword MMIO reads from PENDING (0xd0010000, where the host puts a device),
 * for resuming a run that stopped while the first read was pending.  The values go to the test
 * device's scratch at 0x100 and 0x108 and are printed as "mmio-pending: 0x... 0x..."; then HLT. */
	.set PENDING, 0xd0010000
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi
	jnz	idle
	movl	$PENDING, %r12d
	movl	$TESTDEV, %edi
	movq	(%r12), %r8
	movq	%r8, 0x100(%rdi)
	movq	(%r12), %r9
	movq	%r9, 0x108(%rdi)
	lea	m_pend(%rip), %rbx
	call	puts
	mov	%r8, %rax
	call	puthex_sp
	mov	%r9, %rax
	call	puthex_nl
idle:	hlt
	jmp	idle

	.include "lib.S"

	.section .rodata
m_pend:	.asciz	"mmio-pending: "
