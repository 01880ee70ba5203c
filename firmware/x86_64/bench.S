/* bench: the guest of benchmarks/ (exits.py, teardown.py), run by pyvmm, by a bare Python loop and by the
 * C peer (benchmarks/cvmm.c) alike.  It reads its work from the bench register, BENCH (8 bytes, MMIO):
 *   bits 0-31  N: how many exits to make
 *   bit 32     exit by port I/O (outl to BENCH_PORT) instead of MMIO writes (movl to BENCH + 8)
 *   bit 33     instead: write one quadword to every 4 KiB page of RAM from 2 MiB to its end (RDI = RAM
 *              size), so that every page of the guest is backed (teardown)
 * then writes 0 to the debug-exit port.  So a run makes N + 2 exits: the read, the N writes, the exit.
 * Nobody serves BENCH under a plain `pyvmm run` (unclaimed reads return 0): the guest then does nothing.
 * No console output: nothing but the exits asked for. */
	.set BENCH, 0xd0800000		/* in the MMIO hole, away from the test device and virtio-mmio */
	.set BENCH_PORT, 0x520		/* after the port test device (0x510-0x51f) */
	.set PAGE, 4096
	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	test	%rsi, %rsi		/* RSI = vCPU index: only vCPU 0 works */
	jnz	idle
	mov	%rdi, %r15		/* RDI = RAM size */
	movl	$BENCH, %r9d		/* zero-extends into %r9 */
	movq	(%r9), %rcx		/* the bench register: one MMIO read exit */
	mov	%ecx, %eax		/* N */
	bt	$33, %rcx
	jc	touch
	test	%eax, %eax
	jz	done
	bt	$32, %rcx
	jc	pio
1:	movl	%eax, 8(%r9)		/* one MMIO write exit */
	dec	%eax
	jnz	1b
	jmp	done
pio:	mov	$BENCH_PORT, %dx
2:	outl	%eax, %dx		/* one port I/O exit */
	dec	%eax
	jnz	2b
	jmp	done
touch:	mov	$0x200000, %r8
3:	cmp	%r15, %r8
	jae	done
	mov	%r8, (%r8)
	add	$PAGE, %r8
	jmp	3b
done:	xor	%eax, %eax
	jmp	guest_exit
idle:	hlt
	jmp	idle

	.include "lib.S"
