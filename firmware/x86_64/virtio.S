/* virtio: the smallest driver of pyvmm's virtio-mmio devices (virtio 1.2 sections 3.1, 4.2.3, 2.7).
 * Slots (0xd1000000 + i*0x200): 0 = blk (id 2), 1 = rng (id 4), 2 = console (id 3).  No interrupts on
 * x86: every request is polled on the used ring's idx, with a bound.
 * Per device: magic/version/id, reset, ACKNOWLEDGE|DRIVER, features (VIRTIO_F_VERSION_1 only),
 * FEATURES_OK (checked), one queue of 8 (QueueReady must read 0, QueueNumMax >= 8), DRIVER_OK.
 * Then: console transmit "hello from virtio-console\n"; blk T_IN of sector 0 (status and the first 16
 * bytes printed in hex); rng 64 bytes (used length printed); the Status of every device checked.
 * Exit status: 0, or 0x10+slot bad probe, 0x20+slot no VERSION_1, 0x30+slot FEATURES_OK refused,
 * 0x40+slot queue unusable, 0x50 console timeout, 0x60 blk timeout, 0x61 blk status unexpected,
 * 0x70 rng timeout, 0x71 rng used length not 64, 0x80+slot device status not 0xf at the end.
 * Built twice: virtio, and virtio-bad (--defsym BAD=1: the blk data buffer lies outside RAM; the
 * status must then be IOERR, 1).  Plain stores are ordered on x86: no barriers are needed. */
	.set VIRTIO_BASE, 0xd1000000
	.set SLOT_SIZE, 0x200
	.set RINGS, 0x200000		/* slot i's queue: page RINGS + i*0x1000 */
	.set AVAIL, 0x100		/* offsets in that page: descriptors at 0, driver area, device area */
	.set USED, 0x200
	.set BUFS, 0x210000		/* blk header; data at +0x200; status at +0x400; rng buffer at +0x1000 */
	.set QSIZE, 8
	.set POLL_LIMIT, 1000000		/* ~3 instructions each: ~2.5 s on the emulating test host */
	.set BAD_ADDR, 0x70000000	/* no RAM here */
	.set DESC_F_NEXT, 1
	.set DESC_F_WRITE, 2
	/* virtio-mmio registers */
	.set MAGIC, 0x00
	.set VERSION, 0x04
	.set DEVICE_ID, 0x08
	.set DEV_FEATURES, 0x10
	.set DEV_FEATURES_SEL, 0x14
	.set DRV_FEATURES, 0x20
	.set DRV_FEATURES_SEL, 0x24
	.set QUEUE_SEL, 0x30
	.set QUEUE_NUM_MAX, 0x34
	.set QUEUE_NUM, 0x38
	.set QUEUE_READY, 0x44
	.set QUEUE_NOTIFY, 0x50
	.set STATUS, 0x70
	.set QUEUE_DESC, 0x80
	.set QUEUE_AVAIL, 0x90
	.set QUEUE_USED, 0xa0

	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi		/* RSI = vCPU index: only vCPU 0 drives */
	jnz	idle
	xor	%r15d, %r15d		/* slot */
init_next:
	call	slot_regs
	lea	devtab(%rip), %rax
	mov	(%rax,%r15,8), %esi	/* expected device id */
	call	dev_init
	test	%eax, %eax
	jnz	fail
	inc	%r15d
	cmp	$3, %r15d
	jb	init_next
	lea	m_ready(%rip), %rbx
	call	puts

	/* 2. console: one device-readable buffer on the transmit queue (1) */
	mov	$2, %r15d
	call	slot_regs
	lea	m_hvc(%rip), %rax
	mov	%rax, 0(%r13)		/* desc 0: addr, len, flags 0, next 0 */
	movl	$m_hvc_len, 8(%r13)
	movl	$0, 12(%r13)
	call	kick
	mov	$0x50, %eax
	jc	fail

	/* 3. blk: header (readable) -> 512 data bytes (writable) -> status byte (writable) */
	xor	%r15d, %r15d
	call	slot_regs
	mov	$BUFS, %ebx
	movq	$0, 0(%rbx)		/* type VIRTIO_BLK_T_IN, reserved */
	movq	$0, 8(%rbx)		/* sector 0 */
	movb	$0xff, 0x400(%rbx)	/* status: overwritten by the device */
	movq	%rbx, 0(%r13)
	movl	$16, 8(%r13)
	movw	$DESC_F_NEXT, 12(%r13)
	movw	$1, 14(%r13)
.ifdef BAD
	mov	$BAD_ADDR, %eax
	movq	%rax, 16(%r13)
.else
	lea	0x200(%rbx), %rax
	movq	%rax, 16(%r13)
.endif
	movl	$512, 24(%r13)
	movw	$DESC_F_NEXT | DESC_F_WRITE, 28(%r13)
	movw	$2, 30(%r13)
	lea	0x400(%rbx), %rax
	movq	%rax, 32(%r13)
	movl	$1, 40(%r13)
	movw	$DESC_F_WRITE, 44(%r13)
	movw	$0, 46(%r13)
	call	kick
	mov	$0x60, %eax
	jc	fail
	lea	m_blk(%rip), %rbx
	call	puts
	mov	$BUFS, %r14d
	movzbl	0x400(%r14), %eax
	mov	%eax, %r12d		/* keep the status for the check */
	call	puthex8
	lea	m_sector(%rip), %rbx
	call	puts
	xor	%r13d, %r13d
1:	movzbl	0x200(%r14,%r13), %eax
	call	puthex8
	inc	%r13d
	cmp	$16, %r13d
	jb	1b
	mov	$'\n', %al
	call	putc
.ifdef BAD
	cmp	$1, %r12d		/* VIRTIO_BLK_S_IOERR */
.else
	cmp	$0, %r12d		/* VIRTIO_BLK_S_OK */
.endif
	mov	$0x61, %eax
	jne	fail

	/* 4. rng: one 64-byte device-writable buffer */
	mov	$1, %r15d
	call	slot_regs
	mov	$BUFS + 0x1000, %eax
	movq	%rax, 0(%r13)
	movl	$64, 8(%r13)
	movw	$DESC_F_WRITE, 12(%r13)
	movw	$0, 14(%r13)
	call	kick
	mov	$0x70, %eax
	jc	fail
	lea	m_rng(%rip), %rbx
	call	puts
	mov	USED + 8(%r13), %eax	/* used.ring[0].len */
	mov	%eax, %r12d
	call	putdec
	mov	$'\n', %al
	call	putc
	cmp	$64, %r12d
	mov	$0x71, %eax
	jne	fail

	/* 5. every device still ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK (no DEVICE_NEEDS_RESET) */
	xor	%r15d, %r15d
2:	call	slot_regs
	mov	STATUS(%r12), %eax
	cmp	$0xf, %eax
	lea	0x80(%r15), %eax
	jne	fail
	inc	%r15d
	cmp	$3, %r15d
	jb	2b
	lea	m_ok(%rip), %rbx
	call	puts
	xor	%eax, %eax
	jmp	guest_exit

fail:	mov	%eax, %r12d
	lea	m_fail(%rip), %rbx
	call	puts
	mov	%r12, %rax
	call	puthex8
	mov	$'\n', %al
	call	putc
	mov	%r12d, %eax
	jmp	guest_exit

idle:	hlt
	jmp	idle

/* slot_regs: %r15 = slot -> %r12 = its window, %r13 = its ring page, %r14 = its queue index */
slot_regs:
	mov	%r15d, %r12d
	shl	$9, %r12d
	add	$VIRTIO_BASE, %r12d
	mov	%r15d, %r13d
	shl	$12, %r13d
	add	$RINGS, %r13d
	lea	devtab(%rip), %r14
	mov	4(%r14,%r15,8), %r14d
	ret

/* dev_init: %r12 window, %r13 ring page, %r14d queue, %r15d slot, %esi expected id -> %eax 0 or code */
dev_init:
	mov	$0x10, %eax
	cmpl	$0x74726976, MAGIC(%r12)	/* "virt" */
	jne	9f
	cmpl	$2, VERSION(%r12)
	jne	9f
	cmp	%esi, DEVICE_ID(%r12)
	jne	9f
	movl	$0, STATUS(%r12)		/* reset, and wait for it (2.4) */
	mov	$1000, %ecx
3:	cmpl	$0, STATUS(%r12)
	je	4f
	dec	%ecx
	jnz	3b
	jmp	9f
4:	movl	$1, STATUS(%r12)		/* ACKNOWLEDGE */
	movl	$3, STATUS(%r12)		/* | DRIVER */
	movl	$0, DEV_FEATURES_SEL(%r12)
	mov	DEV_FEATURES(%r12), %ecx	/* bits 0-31: none wanted */
	movl	$1, DEV_FEATURES_SEL(%r12)
	mov	$0x20, %eax
	testl	$1, DEV_FEATURES(%r12)		/* bit 32: VIRTIO_F_VERSION_1 */
	jz	9f
	movl	$0, DRV_FEATURES_SEL(%r12)
	movl	$0, DRV_FEATURES(%r12)
	movl	$1, DRV_FEATURES_SEL(%r12)
	movl	$1, DRV_FEATURES(%r12)
	movl	$0xb, STATUS(%r12)		/* | FEATURES_OK */
	mov	$0x30, %eax
	testl	$8, STATUS(%r12)		/* did it stick? */
	jz	9f
	mov	%r14d, QUEUE_SEL(%r12)
	mov	$0x40, %eax
	cmpl	$0, QUEUE_READY(%r12)
	jne	9f
	cmpl	$QSIZE, QUEUE_NUM_MAX(%r12)
	jb	9f
	movl	$QSIZE, QUEUE_NUM(%r12)
	mov	%r13d, QUEUE_DESC(%r12)
	movl	$0, QUEUE_DESC + 4(%r12)
	lea	AVAIL(%r13), %ecx
	mov	%ecx, QUEUE_AVAIL(%r12)
	movl	$0, QUEUE_AVAIL + 4(%r12)
	lea	USED(%r13), %ecx
	mov	%ecx, QUEUE_USED(%r12)
	movl	$0, QUEUE_USED + 4(%r12)
	movl	$1, QUEUE_READY(%r12)
	cmpl	$1, QUEUE_READY(%r12)
	jne	9f
	movl	$0xf, STATUS(%r12)		/* | DRIVER_OK */
	xor	%eax, %eax
	ret
9:	add	%r15d, %eax
	ret

/* kick: publish descriptor 0 of %r13's queue (avail.ring[0] = 0, avail.idx = 1), notify queue %r14d
 * at %r12, poll used.idx until it moves.  CF set on timeout.  Clobbers %eax, %ecx. */
kick:
	movw	$0, AVAIL + 4(%r13)		/* avail.ring[0] = head 0 */
	movw	$1, AVAIL + 2(%r13)		/* avail.idx */
	mov	%r14d, QUEUE_NOTIFY(%r12)
	mov	$POLL_LIMIT, %ecx
5:	cmpw	$0, USED + 2(%r13)		/* used.idx */
	jne	6f
	dec	%ecx
	jnz	5b
	stc
	ret
6:	clc
	ret

/* puthex8: %al printed as two hex digits; clobbers %rax, %rcx, %dx */
puthex8:
	mov	%al, %cl
	shr	$4, %al
	call	hexdigit
	mov	%cl, %al
	and	$0xf, %al
hexdigit:
	and	$0xf, %al
	cmp	$10, %al
	jb	7f
	add	$('a' - 10 - '0'), %al
7:	add	$'0', %al
	jmp	putc

/* putdec: %eax printed in decimal; clobbers %rax, %rcx, %rdx */
putdec:
	mov	$10, %ecx
	xor	%edx, %edx
	div	%ecx
	test	%eax, %eax
	jz	8f
	push	%rdx
	call	putdec
	pop	%rdx
8:	lea	0x30(%rdx), %eax
	jmp	putc

	.include "lib.S"

	.section .rodata
	.balign 8
devtab:	.long 2, 0			/* slot 0: blk, queue 0 (requestq) */
	.long 4, 0			/* slot 1: rng, queue 0 (requestq) */
	.long 3, 1			/* slot 2: console, queue 1 (transmitq) */
m_hvc:	.ascii "hello from virtio-console\n"
	.set m_hvc_len, . - m_hvc
m_ready: .asciz "virtio: blk rng console ready\n"
m_blk:	.asciz "virtio: blk status "
m_sector: .asciz " sector0 "
m_rng:	.asciz "virtio: rng used len "
m_ok:	.asciz "virtio: ok\n"
m_fail:	.asciz "virtio: FAIL "
