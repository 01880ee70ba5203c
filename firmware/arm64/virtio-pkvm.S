/* virtio-pkvm: the smallest virtio reproducer for a pKVM protected VM: its virtio works only when
 * the rings and buffers lie in memory it shared with the host.
 * Slots (0x0b000000 + i*0x200): 0 = blk (id 2, requestq 0), 1 = console (id 3, transmitq 1).
 * Entry: x0 DTB, x1 RAM base, x2 RAM size, x3 DMA pool base (0: none), x4 DMA pool size.
 * The region (3 pages): blk ring page, console ring page (descriptors +0, avail +0x100, used +0x200),
 * buffer page (blk header +0, data +0x200, status +0x400; console text +0x600).
 * virtio-pkvm: the region is the start of the pool; every granule of it is MEM_SHAREd (FEATURES,
 *   HYP_MEMINFO, MEM_SHARE as in pkvm-share.S) before the devices are given the queues.
 * virtio-pkvm-noshare (--defsym NOSHARE=1): a pKVM-unaware guest: the region is private RAM at
 *   x1 + 0x200000, and a canary page follows it.  CANARY fills every word of those 4 pages that
 *   neither side writes; the driver's descriptor tables and avail rings are snapshotted; all of it is
 *   checked at the end (a host access to a private page makes pKVM reclaim it).  Expected on pKVM:
 *   both devices go DEVICE_NEEDS_RESET, the pages are intact, exit 0xa0.
 * Features: VERSION_1 (bit 32) required, ACCESS_PLATFORM (bit 33) accepted when offered; each
 * device's offer in bits 32-63 is printed ("virtio-pkvm: blk features hi=0x00000003").
 * Exit status (debug-exit register):
 *   0     both devices served, blk status OK (noshare: only on a normal VM)
 *   0x10+slot bad probe, 0x20+slot no VERSION_1, 0x30+slot FEATURES_OK refused, 0x40+slot queue unusable
 *   0x50 console timeout, 0x52 console DEVICE_NEEDS_RESET
 *   0x60 blk timeout, 0x61 blk status not OK, 0x62 blk DEVICE_NEEDS_RESET
 *   0x80+slot device status not 0xf at the end
 *   0x90 no DMA pool (x3 = 0), 0x91 pool smaller than the region or not granule-aligned,
 *   0x92 FEATURES lacks HYP_MEMINFO|MEM_SHARE or is NOT_SUPPORTED (not a protected VM),
 *   0x93 HYP_MEMINFO granule unusable, 0x94 a MEM_SHARE returned nonzero
 *   0xa0 (noshare) both devices refused (NEEDS_RESET), private pages intact
 *   0xa1 (noshare) a private page CHANGED
 * 0x1x-0x4x and 0x9x exit at once; later failures are collected and the first is the status (0xa1
 * before all).  Polls are bounded (as virtio.S) and read the device status every 64K rounds.
 * MMU off: Device-nGnRnE, every access naturally aligned.  Barriers as virtio.S (Linux virtio_ring). */
	.set VIRTIO_BASE, 0x0b000000
	.set AVAIL, 0x100; .set USED, 0x200	/* in a ring page */
	.set BUFS, 0x2000; .set TXT, 0x600	/* the buffer page in the region; the console text in it */
	.set REGION_SIZE, 0x3000
	.set SHADOW, 0x4000			/* noshare: copies of each ring page's first 0x200 bytes */
	.set QSIZE, 8
	.set POLL_LIMIT, 0x40000000
	.set CANARY, 0x5a5a5a5a5a5a5a5a
	.set FEATURES, 0x86000000; .set MEMINFO, 0xc6000002; .set MEM_SHARE, 0xc6000003
	.set DESC_F_NEXT, 1; .set DESC_F_WRITE, 2
	.set MAGIC, 0x00; .set VERSION, 0x04; .set DEVICE_ID, 0x08
	.set DEV_FEATURES, 0x10; .set DEV_FEATURES_SEL, 0x14; .set DRV_FEATURES, 0x20; .set DRV_FEATURES_SEL, 0x24
	.set QUEUE_SEL, 0x30; .set QUEUE_NUM_MAX, 0x34; .set QUEUE_NUM, 0x38; .set QUEUE_READY, 0x44
	.set QUEUE_NOTIFY, 0x50; .set STATUS, 0x70; .set QUEUE_DESC, 0x80	/* AVAIL 0x90, USED 0xa0 */

	.macro say msg			/* puts(msg) */
	adr	x0, \msg
	bl	puts
	.endm
	.macro hex val, digits		/* puthexn(val, digits) */
	mov	x0, \val
	mov	w1, #\digits
	bl	puthexn
	.endm
	.macro wreg off, val		/* a virtio register write */
	mov	w1, #\val
	str	w1, [x19, #\off]
	.endm
	.macro hvc3 fn, arg		/* pKVM hypercall fn(arg, 0, 0) -> x0 */
	ldr	x0, =\fn
	mov	x1, \arg
	mov	x2, #0
	mov	x3, #0
	hvc	#0
	.endm

/* Registers: x19 window, x20 ring page, w21 queue, w22 slot, w23 expected id (init) then buffer
 * page, x24 region, w28 first failure (0 none), x29 mask of the slots that needed reset. */
	.section .text.entry, "ax"
	.globl _start
_start:
	ldr	x5, =STACK_TOP
	mov	sp, x5
	mov	w28, #0
	mov	x29, #0
.ifdef NOSHARE
	add	x24, x1, #0x200000
	mov	x7, #0
	bl	canary				/* zero the region, then CANARY around it */
.else
	/* 1. the pool: present, pKVM's share calls, the granule; zero the region, share each granule */
	mov	x24, x3
	mov	x26, x4
	adr	x0, m_nopool
	mov	w27, #0x90
	cbz	x24, early_exit
	ldr	x0, =FEATURES
	hvc	#0
	mov	w27, #0x92
	tbnz	x0, #63, fail_early		/* NOT_SUPPORTED (-1) */
	and	x1, x0, #0xc			/* bits HYP_MEMINFO (2), MEM_SHARE (3) */
	cmp	x1, #0xc
	b.ne	fail_early
	hvc3	MEMINFO, #0
	mov	x25, x0				/* the granule */
	mov	w27, #0x93
	cmp	x25, #0x1000
	b.lt	fail_early			/* also an error (negative) */
	sub	x1, x25, #1
	tst	x25, x1
	b.ne	fail_early			/* not a power of two */
	mov	w27, #0x91
	tst	x24, x1
	b.ne	fail_early			/* pool not granule-aligned */
	add	x2, x1, #REGION_SIZE
	bic	x2, x2, x1			/* the region, rounded up to the granule */
	cmp	x26, x2
	b.lo	fail_early
	mov	x0, x24
	mov	x1, #REGION_SIZE
	bl	zero
	mov	x20, x24			/* the next granule */
	mov	w22, #0				/* granules shared */
1:	hvc3	MEM_SHARE, x20
	mov	w27, #0x94
	cbnz	x0, share_failed
	add	w22, w22, #1
	add	x20, x20, x25
	sub	x1, x20, x24
	cmp	x1, #REGION_SIZE
	b.lo	1b
	say	m_shared
	add	w0, w22, #'0'			/* at most 3 */
	bl	putc
	say	m_granule
	hex	x25, 8
	say	m_paren
.endif

	/* 2. both devices: reset ... DRIVER_OK; print what they offer in bits 32-63 */
	mov	w22, #0
2:	bl	slot_regs
	ldr	w23, [x1]			/* the expected device id */
	bl	dev_init
	mov	w27, w0
	cbnz	w27, fail_early
	say	m_pre
	bl	slot_name
	bl	puts
	say	m_feat
	hex	x4, 8
	say	m_nl
	add	w22, w22, #1
	cmp	w22, #2
	b.lo	2b
	add	x23, x24, #BUFS

	/* 3. console: one device-readable buffer (the text, copied into the region) on the transmitq */
	mov	w22, #1
	bl	slot_regs
	adr	x1, m_hvc
	add	x2, x23, #TXT
	mov	w3, #m_hvc_len
3:	ldrb	w0, [x1], #1
	strb	w0, [x2], #1
	subs	w3, w3, #1
	b.ne	3b
	add	x0, x23, #TXT			/* a descriptor: addr, then len | flags << 32 | next << 48 */
	mov	x1, #m_hvc_len
	stp	x0, x1, [x20]
	bl	kick
	mov	w1, #0x50
	bl	settle

	/* 4. blk: header (readable) -> 512 data bytes (writable) -> status byte (writable) */
	mov	w22, #0
	bl	slot_regs
	stp	xzr, xzr, [x23]			/* type VIRTIO_BLK_T_IN, reserved, sector 0 */
	mov	w1, #0xff
	strb	w1, [x23, #0x400]		/* the status: the device overwrites it */
	ldr	x2, =16 | DESC_F_NEXT << 32 | 1 << 48
	stp	x23, x2, [x20]
	add	x1, x23, #0x200
	ldr	x2, =512 | (DESC_F_NEXT | DESC_F_WRITE) << 32 | 2 << 48
	stp	x1, x2, [x20, #16]
	add	x1, x23, #0x400
	ldr	x2, =1 | DESC_F_WRITE << 32
	stp	x1, x2, [x20, #32]
	bl	kick
	mov	w1, #0x60
	bl	settle
	cbnz	w0, 5f				/* nothing came back: no sector to show */
	say	m_blk
	ldrb	w27, [x23, #0x400]
	hex	x27, 2
	say	m_sector
	mov	x26, #0x200
4:	ldrb	w0, [x23, x26]
	hex	x0, 2
	add	x26, x26, #1
	cmp	x26, #0x210
	b.lo	4b
	say	m_nl
	cbz	w27, 5f				/* VIRTIO_BLK_S_OK */
	mov	w0, #0x61
	bl	note
5:
.ifdef NOSHARE
	/* 5n. the private pages: the canary and the driver's own writes, all still there? */
	mov	x7, #1
	bl	canary
	mov	x26, x0
	adr	x0, m_intact
	cbz	x26, 6f
	say	m_changed
	hex	x26, 16
	adr	x0, m_nl
	mov	w28, #0xa1
6:	bl	puts
	cbnz	x26, finish
	adr	x0, m_refused
	mov	w27, #0xa0
	cmp	x29, #3				/* both devices refused */
	b.eq	early_exit
.endif
	/* 5. every device still ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK */
	mov	w22, #0
7:	bl	slot_regs
	ldr	w1, [x19, #STATUS]
	add	w0, w22, #0x80
	cmp	w1, #0xf
	b.eq	8f
	bl	note
8:	add	w22, w22, #1
	cmp	w22, #2
	b.lo	7b
finish:	mov	w27, w28
	cbnz	w27, fail_early
	say	m_ok
	mov	w0, #0
	b	guest_exit

share_failed:
	say	m_sharefail
	hex	x20, 16
	say	m_nl
fail_early:					/* w27 = status */
	say	m_fail
	hex	x27, 2
	adr	x0, m_nl
early_exit:					/* x0 = the last message, w27 = status */
	bl	puts
	mov	w0, w27
	b	guest_exit

/* note: w0 = a failure code, kept in w28 if it is the first */
note:	cmp	w28, #0
	csel	w28, w0, w28, eq
	ret

/* settle: w0 = kick's result, w1 = the queue's timeout code (+2 for NEEDS_RESET): prints and notes
 * a failure, records a reset in x29.  Returns w0 unchanged; clobbers x0-x2, x9-x17, x25-x27. */
settle:
	mov	x26, x30
	mov	w27, w0
	cbz	w27, 10f
	mov	w16, w1
	say	m_pre
	bl	slot_name
	bl	puts
	adr	x0, m_timeout
	cmp	w27, #2
	b.ne	9f
	add	w16, w16, #2
	mov	x2, #1
	lsl	x2, x2, x22
	orr	x29, x29, x2
	adr	x0, m_reset
9:	bl	puts
	mov	w0, w16
	bl	note
10:	mov	w0, w27
	ret	x26

/* slot_regs: w22 = slot -> x19 window, x20 ring page, w21 queue, x1 its devtab entry.
 * slot_name: x0 = slot w22's name. */
slot_regs:
	mov	x19, #VIRTIO_BASE
	add	x19, x19, x22, lsl #9
	add	x20, x24, x22, lsl #12
	adr	x1, devtab
	add	x1, x1, x22, lsl #4
	ldr	w21, [x1, #4]
	ret
slot_name:
	adr	x0, devtab
	add	x0, x0, x22, lsl #4
	ldr	x0, [x0, #8]
	ret

/* dev_init: as virtio.S's; the features offered in bits 32-63 come back in w4, and the driver
 * accepts VERSION_1 and ACCESS_PLATFORM of them.  w0 = 0 or a code; clobbers x1-x4. */
dev_init:
	mov	w0, #0x10
	ldr	w1, [x19, #MAGIC]
	ldr	w2, =0x74726976			/* "virt" */
	cmp	w1, w2
	b.ne	19f
	ldr	w1, [x19, #VERSION]
	cmp	w1, #2
	b.ne	19f
	ldr	w1, [x19, #DEVICE_ID]
	cmp	w1, w23
	b.ne	19f
	str	wzr, [x19, #STATUS]		/* reset: pyvmm's completes at once (2.4) */
	ldr	w1, [x19, #STATUS]
	cbnz	w1, 19f
	wreg	STATUS, 1			/* ACKNOWLEDGE */
	wreg	STATUS, 3			/* | DRIVER */
	wreg	DEV_FEATURES_SEL, 1
	mov	w0, #0x20
	ldr	w4, [x19, #DEV_FEATURES]
	tbz	w4, #0, 19f			/* bit 32: VIRTIO_F_VERSION_1 */
	str	wzr, [x19, #DRV_FEATURES_SEL]
	str	wzr, [x19, #DRV_FEATURES]	/* bits 0-31: none wanted */
	wreg	DRV_FEATURES_SEL, 1
	and	w1, w4, #3			/* VERSION_1 | ACCESS_PLATFORM (bit 33) if offered */
	str	w1, [x19, #DRV_FEATURES]
	wreg	STATUS, 0xb			/* | FEATURES_OK */
	mov	w0, #0x30
	ldr	w1, [x19, #STATUS]
	tbz	w1, #3, 19f			/* did it stick? */
	str	w21, [x19, #QUEUE_SEL]
	mov	w0, #0x40
	ldr	w1, [x19, #QUEUE_READY]
	cbnz	w1, 19f
	ldr	w1, [x19, #QUEUE_NUM_MAX]
	cmp	w1, #QSIZE
	b.lo	19f
	wreg	QUEUE_NUM, QSIZE
	mov	x2, x20				/* desc, avail, used: ring page + 0, 0x100, 0x200 */
	add	x3, x19, #QUEUE_DESC		/*   into registers 0x80, 0x90, 0xa0 (low, high) */
18:	str	w2, [x3]
	lsr	x1, x2, #32
	str	w1, [x3, #4]
	add	x2, x2, #0x100
	add	x3, x3, #0x10
	sub	x1, x2, x20
	cmp	x1, #0x300
	b.lo	18b
	wreg	QUEUE_READY, 1
	ldr	w1, [x19, #QUEUE_READY]
	cmp	w1, #1
	b.ne	19f
	wreg	STATUS, 0xf			/* | DRIVER_OK */
	mov	w0, #0
	ret
19:	add	w0, w0, w22
	ret

/* kick: publish descriptor 0 (avail.ring[0] = 0, avail.idx = 1), notify, poll used.idx and, every
 * 64K rounds, the device status.  w0 = 0 used.idx moved, 1 timeout, 2 NEEDS_RESET.  Clobbers x0-x3. */
kick:
	strh	wzr, [x20, #AVAIL + 4]		/* avail.ring[0] = head 0 */
	dmb	ishst				/* descriptors and ring entry before the index */
	mov	w1, #1
	strh	w1, [x20, #AVAIL + 2]		/* avail.idx */
.ifdef NOSHARE
	add	x1, x24, #SHADOW		/* snapshot the driver's writes: checked at the end */
	add	x1, x1, x22, lsl #9
	mov	x2, #0
20:	ldr	x3, [x20, x2]
	str	x3, [x1, x2]
	add	x2, x2, #8
	cmp	x2, #0x200
	b.lo	20b
.endif
	dsb	sy				/* the index before the notification */
	str	w21, [x19, #QUEUE_NOTIFY]
	ldr	w2, =POLL_LIMIT
21:	ldrh	w1, [x20, #USED + 2]		/* used.idx */
	cbnz	w1, 23f
	tst	w2, #0xffff
	b.ne	22f
	mov	w0, #2
	ldr	w1, [x19, #STATUS]
	tbnz	w1, #6, 24f			/* DEVICE_NEEDS_RESET (0x40) */
22:	subs	w2, w2, #1
	b.ne	21b
	mov	w0, #1
	ret
23:	dmb	ishld				/* used.idx before the used element and the buffers */
	mov	w0, #0
24:	ret

/* zero: x0 = address, x1 = length (a multiple of 8).  Clobbers x0, x1. */
zero:	str	xzr, [x0], #8
	subs	x1, x1, #8
	b.ne	zero
	ret

/* puthexn: x0 printed as w1 hex digits.  Clobbers x0, x9, x10, x16, x17, x25. */
puthexn:
	mov	x25, x30
	mov	x17, x0
	lsl	w16, w1, #2
25:	sub	w16, w16, #4
	lsr	x0, x17, x16
	and	x0, x0, #0xf
	cmp	x0, #10
	add	x10, x0, #'0'
	add	x0, x0, #('a' - 10)
	csel	x0, x10, x0, lo
	bl	putc
	cbnz	w16, 25b
	ret	x25

.ifdef NOSHARE
/* canary: x7 = 0 (fill): zero the region, then CANARY into canary_tab's CANARY ranges.
 * x7 = 1 (check): every canary_tab range against CANARY or its snapshot.  x0 = 0, or the address
 * of the first word that changed.  Clobbers x0-x6, x8. */
canary:
	mov	x8, x30
	ldr	x5, =CANARY
	mov	x0, x24
	mov	x1, #REGION_SIZE
	cbnz	x7, 26f
	bl	zero
26:	adr	x6, canary_tab
27:	ldp	w0, w1, [x6], #8		/* offset, length */
	ldp	w2, w3, [x6], #8		/* the snapshot's offset (0: CANARY), padding */
	cbz	w1, 31f
	add	x0, x24, x0
	cbz	x7, 30f
28:	mov	x4, x5				/* check a word */
	cbz	w2, 29f
	ldr	x4, [x24, x2]
	add	x2, x2, #8
29:	ldr	x3, [x0], #8
	cmp	x3, x4
	b.ne	32f
	subs	w1, w1, #8
	b.ne	28b
	b	27b
30:	cbnz	w2, 27b				/* fill: the snapshotted ranges are the driver's */
	str	x5, [x0], #8
	subs	w1, w1, #8
	b.ne	30b
	b	27b
31:	mov	x0, #0
	ret	x8
32:	sub	x0, x0, #8
	ret	x8
.endif

	.include "lib.S"
	.ltorg
	.section .rodata
	.balign 8
devtab:	.long 2, 0			/* slot 0: blk, requestq */
	.quad n_blk
	.long 3, 1			/* slot 1: console, transmitq */
	.quad n_console
canary_tab:				/* offset in the region, length, snapshot offset (0: CANARY), 0 */
	.long 0x0300, 0x0d00, 0, 0	/* the blk ring page past the used ring */
	.long 0x1300, 0x0d00, 0, 0	/* the console ring page past the used ring */
	.long 0x2800, 0x0800, 0, 0	/* the buffer page past the console text */
	.long 0x3000, 0x1000, 0, 0	/* the canary page */
	.long 0x0000, 0x0200, SHADOW, 0	/* blk descriptors and avail ring, as snapshotted */
	.long 0x1000, 0x0200, SHADOW + 0x200, 0	/* the console's */
	.long 0, 0, 0, 0
n_blk:	.asciz "blk"
n_console: .asciz "console"
m_hvc:	.ascii "hello from a protected guest\n"
	.set m_hvc_len, . - m_hvc
m_pre:	.asciz "virtio-pkvm: "
m_feat:	.asciz " features hi=0x"
m_timeout: .asciz " timeout\n"
m_reset: .asciz " needs reset\n"
m_blk:	.asciz "virtio-pkvm: blk status "
m_sector: .asciz " sector0 "
m_ok:	.asciz "virtio-pkvm: ok\n"
m_fail:	.asciz "virtio-pkvm: FAIL "
m_nl:	.asciz "\n"
m_nopool: .asciz "virtio-pkvm: no DMA pool (x3 = 0)\n"
m_shared: .asciz "virtio-pkvm: shared "
m_granule: .asciz " pages (granule 0x"
m_paren: .asciz ")\n"
m_sharefail: .asciz "virtio-pkvm: MEM_SHARE failed at 0x"
m_intact: .asciz "virtio-pkvm: private pages intact\n"
m_changed: .asciz "virtio-pkvm: private page CHANGED at 0x"
m_refused: .asciz "virtio-pkvm: devices refused the private rings\n"
