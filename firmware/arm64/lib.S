/* Shared helpers for pyvmm's arm64 test guests.
 * Console: 16550 at 0x09000000 (byte registers).  Exit: debug-exit register at 0x09010000.
 * PSCI and the pKVM vendor hypercalls through HVC (SMCCC).  Helpers clobber x9-x15. */
	.set UART, 0x09000000
	.set DEBUG_EXIT, 0x09010000
	.set TESTDEV, 0x0a000000
	.set PSCI_CPU_OFF, 0x84000002
	.set PSCI_CPU_ON, 0xc4000003
	.set PSCI_SYSTEM_OFF, 0x84000008
	.set PSCI_SYSTEM_RESET, 0x84000009
	.set STACK_TOP, 0x80100000		/* 1 MiB above the load address; vCPU n uses STACK_TOP - n*4K */

	.text
/* putc: w0 = character */
putc:
	mov	x9, #UART
1:	ldrb	w10, [x9, #5]		/* LSR */
	tbz	w10, #5, 1b		/* THR empty */
	strb	w0, [x9]
	ret

/* puts: x0 = NUL-terminated string */
puts:
	mov	x11, x30
	mov	x12, x0
2:	ldrb	w0, [x12], #1
	cbz	w0, 3f
	bl	putc
	b	2b
3:	ret	x11

/* puthex: x0 = value, printed as 0x + 16 hex digits */
puthex:
	mov	x13, x30
	mov	x14, x0
	mov	w0, #'0'
	bl	putc
	mov	w0, #'x'
	bl	putc
	mov	x15, #60
4:	lsr	x0, x14, x15
	and	x0, x0, #0xf
	cmp	x0, #10
	add	x10, x0, #'0'
	add	x0, x0, #('a' - 10)
	csel	x0, x10, x0, lo
	bl	putc
	subs	x15, x15, #4
	b.ge	4b
	ret	x13

/* guest_exit: w0 = status, written to the debug-exit register; does not return */
guest_exit:
	mov	x9, #DEBUG_EXIT
	str	w0, [x9]
5:	wfi
	b	5b

/* psci: x0 = function id, x1-x3 = arguments; result in x0 */
psci:
	hvc	#0
	ret

system_off:
	ldr	x0, =PSCI_SYSTEM_OFF
	hvc	#0
6:	wfi
	b	6b
