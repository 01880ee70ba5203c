/* pkvm-fault-order: first touches of two neighbouring 16 KiB pages in an order that Linux 7.2's pKVM cannot map
 * for a protected guest on a host with pages larger than 4 KiB.  x1 = RAM base; A = x1 + 0x300000 (64 KiB-aligned).
 *   1. store to A + 0x4000 (the page after A's on a 16 KiB-page host), print "pkvm-fault-order: next page mapped"
 *   2. store to A + 0x1000: 4 KiB-aligned, but inside A's 16 KiB page, whose next page is now mapped
 *   3. print "pkvm-fault-order: both pages mapped", exit 0
 * Step 2's stage-2 fault reaches pkvm_mem_abort with the fault IPA as HPFAR_EL2 gives it (4 KiB granular): on a
 * 16 KiB-page host pkvm_pgtable_stage2_map looks for mappings in [IPA, IPA + PAGE_SIZE), meets the next page's and
 * answers -EAGAIN, and the guest retries the store forever (no exit reaches the VMM).  With 4 KiB pages, or on a
 * normal VM (user_mem_abort aligns the IPA down), or touching A at offset 0, it runs to the end. */
	.section .text.entry, "ax"
	.globl _start
_start:
	ldr	x0, =STACK_TOP
	mov	sp, x0
	add	x20, x1, #0x300000		/* A */
	ldr	x21, =0x5041474520415f42	/* a value to store */
	str	x21, [x20, #0x4000]
	adr	x0, m_next
	bl	puts
	str	x21, [x20, #0x1000]
	adr	x0, m_both
	bl	puts
	ldr	x0, [x20, #0x4000]
	ldr	x1, [x20, #0x1000]
	cmp	x0, x21
	ccmp	x1, x21, #0, eq
	cset	w0, ne			/* 1 if either value was lost */
	b	guest_exit

	.include "lib.S"
	.ltorg
	.section .rodata
m_next:	.asciz "pkvm-fault-order: next page mapped\n"
m_both:	.asciz "pkvm-fault-order: both pages mapped\n"
