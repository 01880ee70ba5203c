/* bench: the guest of benchmarks/ (exits.py, teardown.py), run by pyvmm, by a bare Python loop and by the
 * C peer (benchmarks/cvmm.c) alike.  It reads its work from the bench register, BENCH (8 bytes, MMIO):
 *   bits 0-31  N: how many exits to make (MMIO writes to BENCH + 8)
 *   bit 33     instead: write one doubleword to every 4 KiB page of RAM from 2 MiB above its base to its end
 *              (x1 = RAM base, x2 = RAM size), so that every page of the guest is backed (teardown)
 * (bit 32, port I/O, is x86's), then writes 0 to the debug-exit register.  So a run makes N + 2 exits: the
 * read, the N writes, the exit.  Nobody serves BENCH under a plain `pyvmm run` (unclaimed reads return 0): the
 * guest then does nothing.  No console output: nothing but the exits asked for. */
	.set BENCH, 0x0a800000		/* in the device region, away from the test device and virtio-mmio */
	.set PAGE, 4096
	.section .text.entry, "ax"
	.globl _start
_start:
	add	x22, x1, x2		/* RAM end */
	add	x21, x1, #0x200000	/* where the touching starts */
	mov	x19, #BENCH
	ldr	x3, [x19]		/* the bench register: one MMIO read exit */
	mov	w20, w3			/* N */
	tbnz	x3, #33, touch
	cbz	w20, done
1:	str	w20, [x19, #8]		/* one MMIO write exit */
	subs	w20, w20, #1
	b.ne	1b
	b	done
touch:
2:	cmp	x21, x22
	b.hs	done
	str	x21, [x21]
	add	x21, x21, #PAGE
	b	2b
done:	mov	w0, #0
	b	guest_exit

	.include "lib.S"
	.ltorg
