/* virtio: the smallest driver of pyvmm's virtio-mmio devices (virtio 1.2 sections 3.1, 4.2.3, 2.7).
 * Slots (0x0b000000 + i*0x200, SPI 16+i): 0 = blk (id 2), 1 = rng (id 4), 2 = console (id 3).  The
 * interrupts exist (irqfd) but this guest runs with them masked and polls the used ring's idx, bounded.
 * Same steps, output and exit status as firmware/x86_64/virtio.S:
 * exit status 0, or 0x10+slot bad probe, 0x20+slot no VERSION_1, 0x30+slot FEATURES_OK refused,
 * 0x40+slot queue unusable, 0x50 console timeout, 0x60 blk timeout, 0x61 blk status unexpected,
 * 0x70 rng timeout, 0x71 rng used length not 64, 0x80+slot device status not 0xf at the end.
 * virtio-bad (--defsym BAD=1): the blk data buffer lies outside RAM; the status must be IOERR (1).
 * The MMU is off: every data access is Device-nGnRnE, so every access here is naturally aligned.
 * Barriers as Linux's virtio_ring: dmb ishst before publishing avail.idx, dsb before the notify
 * store, dmb ishld after seeing used.idx move. */
	.set VIRTIO_BASE, 0x0b000000
	.set RINGS, 0x80200000		/* slot i's queue: page RINGS + i*0x1000 */
	.set AVAIL, 0x100		/* offsets in that page: descriptors at 0, driver area, device area */
	.set USED, 0x200
	.set BUFS, 0x80210000		/* blk header; data at +0x200; status at +0x400; rng buffer at +0x1000 */
	.set QSIZE, 8
	.set POLL_LIMIT, 0x40000000	/* 4 instructions each: ~3 s in the TCG lab */
	.set BAD_ADDR, 0x40000000	/* no RAM (nor device) here */
	.set DESC_F_NEXT, 1
	.set DESC_F_WRITE, 2
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

/* Registers: x19 window, x20 ring page, w21 queue index, w22 slot, w23 expected id, x24 BUFS. */
	.section .text.entry, "ax"
	.globl _start
_start:
	ldr	x0, =STACK_TOP
	mov	sp, x0
	mov	w22, #0
1:	bl	slot_regs
	adr	x0, devtab
	add	x0, x0, x22, lsl #3
	ldr	w23, [x0]
	bl	dev_init
	cbnz	w0, fail
	add	w22, w22, #1
	cmp	w22, #3
	b.lo	1b
	adr	x0, m_ready
	bl	puts

	/* 2. console: one device-readable buffer on the transmit queue (1) */
	mov	w22, #2
	bl	slot_regs
	adr	x0, m_hvc
	str	x0, [x20]			/* desc 0: addr, len, flags 0, next 0 */
	mov	w1, #m_hvc_len
	str	w1, [x20, #8]
	str	wzr, [x20, #12]
	bl	kick
	cbz	w0, 2f
	mov	w0, #0x50
	b	fail

	/* 3. blk: header (readable) -> 512 data bytes (writable) -> status byte (writable) */
2:	mov	w22, #0
	bl	slot_regs
	ldr	x24, =BUFS
	str	xzr, [x24]			/* type VIRTIO_BLK_T_IN, reserved */
	str	xzr, [x24, #8]			/* sector 0 */
	mov	w1, #0xff
	strb	w1, [x24, #0x400]		/* status: overwritten by the device */
	str	x24, [x20]
	mov	w1, #16
	str	w1, [x20, #8]
	mov	w1, #DESC_F_NEXT
	strh	w1, [x20, #12]
	mov	w1, #1
	strh	w1, [x20, #14]
.ifdef BAD
	mov	x1, #BAD_ADDR
.else
	add	x1, x24, #0x200
.endif
	str	x1, [x20, #16]
	mov	w1, #512
	str	w1, [x20, #24]
	mov	w1, #DESC_F_NEXT | DESC_F_WRITE
	strh	w1, [x20, #28]
	mov	w1, #2
	strh	w1, [x20, #30]
	add	x1, x24, #0x400
	str	x1, [x20, #32]
	mov	w1, #1
	str	w1, [x20, #40]
	mov	w1, #DESC_F_WRITE
	strh	w1, [x20, #44]
	strh	wzr, [x20, #46]
	bl	kick
	cbz	w0, 3f
	mov	w0, #0x60
	b	fail
3:	adr	x0, m_blk
	bl	puts
	ldrb	w27, [x24, #0x400]
	mov	w0, w27
	bl	puthex8
	adr	x0, m_sector
	bl	puts
	mov	x26, #0
4:	add	x1, x24, #0x200
	ldrb	w0, [x1, x26]
	bl	puthex8
	add	x26, x26, #1
	cmp	x26, #16
	b.lo	4b
	mov	w0, #'\n'
	bl	putc
.ifdef BAD
	cmp	w27, #1				/* VIRTIO_BLK_S_IOERR */
.else
	cmp	w27, #0				/* VIRTIO_BLK_S_OK */
.endif
	mov	w0, #0x61
	b.ne	fail

	/* 4. rng: one 64-byte device-writable buffer */
	mov	w22, #1
	bl	slot_regs
	add	x1, x24, #0x1000
	str	x1, [x20]
	mov	w1, #64
	str	w1, [x20, #8]
	mov	w1, #DESC_F_WRITE
	strh	w1, [x20, #12]
	strh	wzr, [x20, #14]
	bl	kick
	cbz	w0, 5f
	mov	w0, #0x70
	b	fail
5:	adr	x0, m_rng
	bl	puts
	ldr	w27, [x20, #USED + 8]		/* used.ring[0].len */
	mov	w0, w27
	bl	putdec
	mov	w0, #'\n'
	bl	putc
	cmp	w27, #64
	mov	w0, #0x71
	b.ne	fail

	/* 5. every device still ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK (no DEVICE_NEEDS_RESET) */
	mov	w22, #0
6:	bl	slot_regs
	ldr	w1, [x19, #STATUS]
	cmp	w1, #0xf
	add	w0, w22, #0x80
	b.ne	fail
	add	w22, w22, #1
	cmp	w22, #3
	b.lo	6b
	adr	x0, m_ok
	bl	puts
	mov	w0, #0
	b	guest_exit

fail:	mov	w27, w0
	adr	x0, m_fail
	bl	puts
	mov	w0, w27
	bl	puthex8
	mov	w0, #'\n'
	bl	putc
	mov	w0, w27
	b	guest_exit

/* slot_regs: w22 = slot -> x19 = its window, x20 = its ring page, w21 = its queue index */
slot_regs:
	mov	x19, #VIRTIO_BASE
	add	x19, x19, x22, lsl #9
	ldr	x20, =RINGS
	add	x20, x20, x22, lsl #12
	adr	x1, devtab
	add	x1, x1, x22, lsl #3
	ldr	w21, [x1, #4]
	ret

/* dev_init: x19 window, x20 ring page, w21 queue, w22 slot, w23 expected id -> w0 = 0 or code */
dev_init:
	mov	w0, #0x10
	ldr	w1, [x19, #MAGIC]
	ldr	w2, =0x74726976			/* "virt" */
	cmp	w1, w2
	b.ne	9f
	ldr	w1, [x19, #VERSION]
	cmp	w1, #2
	b.ne	9f
	ldr	w1, [x19, #DEVICE_ID]
	cmp	w1, w23
	b.ne	9f
	str	wzr, [x19, #STATUS]		/* reset, and wait for it (2.4) */
	mov	w3, #1000
7:	ldr	w1, [x19, #STATUS]
	cbz	w1, 8f
	subs	w3, w3, #1
	b.ne	7b
	b	9f
8:	mov	w1, #1
	str	w1, [x19, #STATUS]		/* ACKNOWLEDGE */
	mov	w1, #3
	str	w1, [x19, #STATUS]		/* | DRIVER */
	str	wzr, [x19, #DEV_FEATURES_SEL]
	ldr	w1, [x19, #DEV_FEATURES]	/* bits 0-31: none wanted */
	mov	w1, #1
	str	w1, [x19, #DEV_FEATURES_SEL]
	mov	w0, #0x20
	ldr	w1, [x19, #DEV_FEATURES]
	tbz	w1, #0, 9f			/* bit 32: VIRTIO_F_VERSION_1 */
	str	wzr, [x19, #DRV_FEATURES_SEL]
	str	wzr, [x19, #DRV_FEATURES]
	mov	w1, #1
	str	w1, [x19, #DRV_FEATURES_SEL]
	str	w1, [x19, #DRV_FEATURES]
	mov	w1, #0xb
	str	w1, [x19, #STATUS]		/* | FEATURES_OK */
	mov	w0, #0x30
	ldr	w1, [x19, #STATUS]
	tbz	w1, #3, 9f			/* did it stick? */
	str	w21, [x19, #QUEUE_SEL]
	mov	w0, #0x40
	ldr	w1, [x19, #QUEUE_READY]
	cbnz	w1, 9f
	ldr	w1, [x19, #QUEUE_NUM_MAX]
	cmp	w1, #QSIZE
	b.lo	9f
	mov	w1, #QSIZE
	str	w1, [x19, #QUEUE_NUM]
	str	w20, [x19, #QUEUE_DESC]
	lsr	x1, x20, #32
	str	w1, [x19, #QUEUE_DESC + 4]
	add	x2, x20, #AVAIL
	str	w2, [x19, #QUEUE_AVAIL]
	lsr	x1, x2, #32
	str	w1, [x19, #QUEUE_AVAIL + 4]
	add	x2, x20, #USED
	str	w2, [x19, #QUEUE_USED]
	lsr	x1, x2, #32
	str	w1, [x19, #QUEUE_USED + 4]
	mov	w1, #1
	str	w1, [x19, #QUEUE_READY]
	ldr	w1, [x19, #QUEUE_READY]
	cmp	w1, #1
	b.ne	9f
	mov	w1, #0xf
	str	w1, [x19, #STATUS]		/* | DRIVER_OK */
	mov	w0, #0
	ret
9:	add	w0, w0, w22
	ret

/* kick: publish descriptor 0 of x20's queue (avail.ring[0] = 0, avail.idx = 1), notify queue w21
 * at x19, poll used.idx until it moves.  w0 = 0, or 1 on timeout.  Clobbers x1, x2. */
kick:
	strh	wzr, [x20, #AVAIL + 4]		/* avail.ring[0] = head 0 */
	dmb	ishst				/* descriptors and ring entry before the index */
	mov	w1, #1
	strh	w1, [x20, #AVAIL + 2]		/* avail.idx */
	dsb	sy				/* the index before the notification */
	str	w21, [x19, #QUEUE_NOTIFY]
	ldr	w2, =POLL_LIMIT
10:	ldrh	w1, [x20, #USED + 2]		/* used.idx */
	cbnz	w1, 11f
	subs	w2, w2, #1
	b.ne	10b
	mov	w0, #1
	ret
11:	dmb	ishld				/* used.idx before the used element and the buffers */
	mov	w0, #0
	ret

/* puthex8: w0 printed as two hex digits; clobbers x0, x9, x10, x16, x17, x25 */
puthex8:
	mov	x25, x30
	and	w17, w0, #0xff
	lsr	w0, w17, #4
	bl	hexdigit
	and	w0, w17, #0xf
	bl	hexdigit
	ret	x25
hexdigit:
	cmp	w0, #10
	add	w16, w0, #'0'
	add	w0, w0, #('a' - 10)
	csel	w0, w16, w0, lo
	b	putc

/* putdec: w0 (< 100000) printed in decimal; clobbers x0, x9, x10, x16, x17, x25, x28 */
putdec:
	mov	x25, x30
	mov	w16, w0
	mov	w17, #10000
	mov	w28, #0				/* a digit printed yet */
12:	udiv	w0, w16, w17
	msub	w16, w0, w17, w16
	cbnz	w0, 13f
	cbnz	w28, 13f
	cmp	w17, #1
	b.ne	14f
13:	mov	w28, #1
	add	w0, w0, #'0'
	bl	putc
14:	mov	w0, #10
	udiv	w17, w17, w0
	cbnz	w17, 12b
	ret	x25

	.include "lib.S"
	.ltorg
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
