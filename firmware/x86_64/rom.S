/* rom: reads, writes and reads back a READONLY memslot at ROM (0x200000), which the host adds
 * and fills before boot.
 *   r8  = quadword at ROM + 0x000
 *   r9  = quadword at ROM + 0x100 before the write
 *         ROM_WRITE (a quadword) is written to ROM + 0x100: KVM turns it into an MMIO exit
 *   r10 = quadword at ROM + 0x100 after the write (a ROM keeps its contents)
 * r8, r9, r10 go to the test device's scratch at 0x100, 0x108, 0x110, are printed as
 * "rom: 0x... 0x... 0x...", and the guest halts. */
	.set ROM, 0x200000
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi
	jnz	idle
	movl	$ROM, %r12d
	movl	$TESTDEV, %edi
	movq	(%r12), %r8
	movq	0x100(%r12), %r9
	movabs	$0xf1a5c0de00c0ffee, %rax	/* ROM_WRITE */
	movq	%rax, 0x100(%r12)
	movq	0x100(%r12), %r10
	movq	%r8, 0x100(%rdi)
	movq	%r9, 0x108(%rdi)
	movq	%r10, 0x110(%rdi)
	lea	m_rom(%rip), %rbx
	call	puts
	mov	%r8, %rax
	call	puthex_sp
	mov	%r9, %rax
	call	puthex_sp
	mov	%r10, %rax
	call	puthex_nl
idle:	hlt
	jmp	idle

	.include "lib.S"

	.section .rodata
m_rom:	.asciz	"rom: "
