"""Fuzz every device's queue code with random and malformed descriptor chains, in-process.

Each iteration builds one chain in the fake guest memory (well formed, or broken in one of the ways
below), makes it available and notifies; then it checks that no exception escaped, that the device
either answered the chain (exactly one used entry, for that head, with a sane length, and at most one
logged fault; exactly one for a structurally broken chain) or, for a broken *queue*, set
DEVICE_NEEDS_RESET with a configuration interrupt (the fuzzer then resets and probes again), and that
every guest-memory access the device made was within RAM, at most 64 KiB, and that every write went
to a device-writable buffer of the chain or to the used ring.

``PYVMM_FUZZ_CHAINS`` (default 10^4 per device queue; 10^3 in the emulated arm64 lab) and ``PYVMM_FUZZ_SEED`` change the run.
"""

from __future__ import annotations

import os
import platform
import random
import struct
import time
from dataclasses import dataclass, field

import pytest

from pyvmm.devices.virtio import DeviceStatus, VirtioBlock, VirtioConsole, VirtioMmioTransport, VirtioRng
from pyvmm.devices.virtio.blk import VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from pyvmm.devices.virtio.console import RECEIVEQ, TRANSMITQ
from pyvmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pyvmm.devices.virtio.mmio import VIRTIO_MMIO_INT_CONFIG
from pyvmm.devices.virtio.queue import CHUNK, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from tests.test_virtio_driver import HOLE, SLOT_B, SLOT_C, Buf, Driver, FakeMemory, Interrupts

# The queue code is architecture-independent Python: the full run is the x86 host's; the emulated arm64
# lab (about 20x slower) runs a tenth of it, as a check that nothing differs there.
CHAINS = int(os.environ.get("PYVMM_FUZZ_CHAINS", "1000" if platform.machine() == "aarch64" else "10000"))
SEED = int(os.environ.get("PYVMM_FUZZ_SEED", "1207"))
QSIZE = 16
INDIRECT_AREA = (0x4000, 0x8000)  # indirect tables live here
DATA = (0x8000, SLOT_C[0] + SLOT_C[1])  # buffers live here (the hole included, as bad addresses)
RAM_END = SLOT_C[0] + SLOT_C[1]
DISK_SECTORS = 128
RAM_AREAS = [(DATA[0], SLOT_B[0]), (SLOT_B[0], SLOT_B[0] + SLOT_B[1]), (SLOT_C[0], RAM_END)]
INDIRECT_KINDS = ["nested_indirect", "indirect_next", "indirect_badlen", "indirect_table_oob"]

pytestmark = pytest.mark.timeout(max(300, CHAINS // 20))

STRUCTURAL = ["loop", "next_oob", "nested_indirect", "indirect_next", "indirect_badlen", "indirect_table_oob",
              "len_wraps", "len_overflows", "readable_after_writable", "indirect_unnegotiated"]
FATAL = ["avail_jump", "head_oob"]
KINDS = ["valid"] * 8 + ["bad_addr"] * 3 + ["wrong_flags"] * 2 + ["random"] * 2 + STRUCTURAL + FATAL


@dataclass
class Built:
    kind: str
    head: int | None
    segs: list[Buf] = field(default_factory=list)  # the chain's buffers as the driver meant them


class Fuzz:
    def __init__(self, device: str, tmp_path, rng: random.Random):
        self.r = rng
        self.device = device
        self.mem = FakeMemory(record=True)
        self.irq = Interrupts()
        self.out: list[bytes] = []
        if device == "blk":
            image = tmp_path / "fuzz.img"
            image.write_bytes(bytes(DISK_SECTORS * 512))
            self.dev = VirtioBlock(str(image), queue_size=QSIZE, serial="fuzz")
        elif device == "rng":
            self.dev = VirtioRng(queue_size=QSIZE)
        else:
            self.dev = VirtioConsole(self.out.append, queue_size=QSIZE)
        self.queue = RECEIVEQ if device == "console-rx" else TRANSMITQ if device == "console-tx" else 0
        self.t = VirtioMmioTransport(self.dev, self.mem, self.irq)
        self.d = Driver(self.t, self.mem, queue_size=QSIZE)
        self.resets = 0
        self.probe()

    def probe(self) -> None:
        extra = self.r.choice([0, 1 << VIRTIO_F_INDIRECT_DESC, 1 << VIRTIO_F_EVENT_IDX,
                               1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX])
        self.d.want = 1 << VIRTIO_F_VERSION_1 | extra | (1 << 24) - 1  # and every device-specific bit offered
        self.d.probe()
        self.q = self.d.queues[self.queue]
        self.indirect_ok = bool(self.d.features >> VIRTIO_F_INDIRECT_DESC & 1)

    # --- building chains ----------------------------------------------------------
    def addr_in_ram(self, length: int) -> int:
        r = self.r
        if r.random() < 0.2 and length <= 0x2000:  # straddle the two adjacent slots
            return SLOT_B[0] - r.randrange(1, max(2, length))
        start, end = r.choice(RAM_AREAS)
        return r.randrange(start, max(start + 1, end - length))

    def bad_addr(self, length: int) -> int:
        r = self.r
        return r.choice([HOLE + r.randrange(0x10000 - 16), SLOT_B[0] + SLOT_B[1] - r.randrange(1, 16),
                         RAM_END + r.randrange(1 << 20), r.randrange(1 << 40, 1 << 63),
                         (1 << 64) - length - 1 - r.randrange(4096)])

    def length(self) -> int:
        r = self.r
        return r.choice([0, 1, r.randrange(1, 64), r.randrange(1, 2048), 512 * r.randrange(1, 5)])

    def segments(self) -> list[Buf]:
        """A well-formed chain for this device: readable buffers, then writable ones."""
        r = self.r
        if self.device == "blk":
            kind = r.choice([VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                             r.randrange(1 << 32)])
            sector = r.choice([r.randrange(DISK_SECTORS), DISK_SECTORS - r.randrange(3), (1 << 64) - 1,
                               r.randrange(1 << 64)])
            hdr = Buf(self.addr_in_ram(16), 16)
            self.mem.write(hdr.gpa, struct.pack("<IIQ", kind, 0, sector))
            data = [self.length() for _ in range(r.randrange(4))]
            write = kind in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID)
            status = r.choice([1, 1, 1, 7])  # the status byte is the last one of the last buffer
            return [hdr, *(Buf(self.addr_in_ram(n), n, write) for n in data),
                    Buf(self.addr_in_ram(status), status, True)]
        write = self.device in ("rng", "console-rx")
        return [Buf(self.addr_in_ram(n), n, write) for n in (self.length() for _ in range(r.randrange(1, 5)))]

    def lay_out(self, segs: list[Buf], indirect: bool) -> int:
        """Write the chain's descriptors (direct, or behind an indirect descriptor); returns the head."""
        r = self.r
        flags = [(VIRTQ_DESC_F_WRITE if b.write else 0) for b in segs]
        if not indirect:
            ids = r.sample(range(QSIZE), len(segs))
            for i, b in enumerate(segs):
                last = i == len(segs) - 1
                self.d.write_desc(self.q["desc"], ids[i], b.gpa, b.length,
                                  flags[i] | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else ids[i + 1])
            self.table, self.ids = self.q["desc"], ids
            return ids[0]
        prefix = r.randrange(len(segs)) if r.random() < 0.2 and not segs[0].write else 0
        prefix = min(prefix, sum(1 for b in segs if not b.write))
        ids = r.sample(range(QSIZE), prefix + 1)
        table = r.randrange(INDIRECT_AREA[0], INDIRECT_AREA[1] - 16 * len(segs), 16)
        inner = segs[prefix:]
        order = [0] + r.sample(range(1, len(inner)), len(inner) - 1)  # from entry 0, then any order
        for i, b in enumerate(inner):
            last = i == len(inner) - 1
            self.d.write_desc(table, order[i], b.gpa, b.length,
                              flags[prefix + i] | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else order[i + 1])
        for i in range(prefix):
            self.d.write_desc(self.q["desc"], ids[i], segs[i].gpa, segs[i].length, VIRTQ_DESC_F_NEXT, ids[i + 1])
        self.d.write_desc(self.q["desc"], ids[prefix], table, 16 * len(inner), VIRTQ_DESC_F_INDIRECT, 0)
        self.table, self.ids = table, order
        self.itable, self.ilen, self.idesc = table, len(inner), ids[prefix]
        return ids[0]

    def build(self, kind: str) -> Built:
        r = self.r
        segs = self.segments()
        indirect = self.indirect_ok and r.random() < 0.4
        if kind == "bad_addr":
            b = r.choice(segs)
            b.gpa = self.bad_addr(max(b.length, 1))
        elif kind == "wrong_flags":
            # rng, console rx: all readable; console tx: all writable; blk: either (no status, no header)
            write = self.device == "console-tx" or (self.device == "blk" and r.random() < 0.5)
            for b in segs:
                b.write = write
        elif kind in ("len_wraps", "len_overflows"):
            b = r.choice(segs)
            if kind == "len_wraps":
                b.gpa, b.length = (1 << 64) - r.randrange(1, 1 << 20), r.randrange(1 << 20, 1 << 32)
            else:  # two more 4 GiB buffers: the total no longer fits the used ring's 32-bit len
                segs = segs + [Buf(self.addr_in_ram(16), 0xFFFFFFFF, segs[-1].write) for _ in range(2)]
        elif kind == "readable_after_writable":
            segs = [Buf(self.addr_in_ram(8), 8, True), Buf(self.addr_in_ram(8), 8, False)] + segs[:2]
        elif kind in INDIRECT_KINDS or kind == "indirect_unnegotiated":
            indirect = True
            if not self.indirect_ok:  # any indirect descriptor is then the fault
                kind = "indirect_unnegotiated"
            elif kind == "indirect_unnegotiated":
                kind, indirect = "valid", False  # negotiated after all: an ordinary chain
        elif kind == "random":
            return self.build_random()
        if kind in FATAL:
            head = self.lay_out(segs, False)
            return Built(kind, head, segs)
        head = self.lay_out(segs, indirect)
        if kind in ("loop", "next_oob"):
            last = self.ids[-1]
            bad_next = r.choice(self.ids) if kind == "loop" else r.randrange(
                self.ilen if indirect else QSIZE, 1 << 16)
            raw = self.mem.read(self.table + 16 * last, 16)
            addr, length, flags, _ = struct.unpack("<QIHH", raw)
            self.d.write_desc(self.table, last, addr, length, flags | VIRTQ_DESC_F_NEXT, bad_next)
        elif kind == "nested_indirect":
            self.d.write_desc(self.itable, self.ids[r.randrange(self.ilen)], self.itable, 16 * self.ilen,
                              VIRTQ_DESC_F_INDIRECT, 0)
        elif kind == "indirect_next":
            self.d.write_desc(self.q["desc"], self.idesc, self.itable, 16 * self.ilen,
                              VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, r.randrange(QSIZE))
        elif kind == "indirect_badlen":
            self.d.write_desc(self.q["desc"], self.idesc, self.itable,
                              r.choice([0, 8, 16 * self.ilen + r.randrange(1, 16), 0xFFFFFFF8]), VIRTQ_DESC_F_INDIRECT, 0)
        elif kind == "indirect_table_oob":
            self.d.write_desc(self.q["desc"], self.idesc, self.bad_addr(16 * self.ilen), 16 * self.ilen,
                              VIRTQ_DESC_F_INDIRECT, 0)
        return Built(kind, head, segs)

    def build_random(self) -> Built:
        """Random descriptors everywhere (main table and every indirect table slot)."""
        r = self.r

        def desc() -> bytes:
            flags = r.randrange(8)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # every entry a next index (< QSIZE + 4) can reach stays inside the indirect area
                addr = r.choice([r.randrange(INDIRECT_AREA[0], INDIRECT_AREA[1] - 1024, 16), self.bad_addr(16)])
                length = r.choice([16 * r.randrange(1, 32), r.randrange(1 << 32)])
            else:
                length = r.choice([self.length(), r.randrange(1 << 32)])
                addr = self.addr_in_ram(min(length, 0x1000)) if r.random() < 0.7 else self.bad_addr(length)
            return struct.pack("<QIHH", addr, length, flags, r.randrange(QSIZE + 4))

        self.mem.write(self.q["desc"], b"".join(desc() for _ in range(QSIZE)))
        # keep the indirect area all made of known descriptors: refresh a part of it
        start = r.randrange(INDIRECT_AREA[0], INDIRECT_AREA[1] - 512, 16)
        self.mem.write(start, b"".join(desc() for _ in range(32)))
        return Built("random", r.randrange(QSIZE))

    # --- what the device may write -------------------------------------------------
    def writable_ranges(self, built: Built) -> list[tuple[int, int]]:
        used = (self.q["used"], 6 + 8 * QSIZE)
        if built.kind != "random":
            return [used] + [(b.gpa, b.length) for b in built.segs if b.write]
        ranges = [used]
        for table, count in ((self.q["desc"], QSIZE),
                             (INDIRECT_AREA[0], (INDIRECT_AREA[1] - INDIRECT_AREA[0]) // 16)):
            raw = self.mem.ram[table:table + 16 * count]
            for addr, length, flags, _ in struct.iter_unpack("<QIHH", raw):
                if flags & VIRTQ_DESC_F_WRITE and not flags & VIRTQ_DESC_F_INDIRECT:
                    ranges.append((addr, length))
        return ranges

    # --- one iteration --------------------------------------------------------------
    def kick(self) -> None:
        if self.device == "console-rx" and not self.dev.pending:
            self.dev.feed(os.urandom(self.r.randrange(1, 64)))  # feeding is what notifies rx
        else:
            self.d.kick(self.queue)

    def step(self, i: int, kind: str) -> str:
        built = self.build(kind)
        kind = built.kind
        if kind == "avail_jump":
            self.d.publish(self.queue, built.head, bump=self.r.randrange(QSIZE + 1, 1 << 16))
        elif kind == "head_oob":
            self.d.publish(self.queue, self.r.randrange(QSIZE, 1 << 16))
        else:
            self.d.publish(self.queue, built.head)
        if self.r.random() < 0.3:
            self.d.set_used_event(self.queue, self.r.randrange(1 << 16))
        faults = self.t.queues[self.queue].faults
        self.mem.accesses.clear()
        self.out.clear()
        irqs = len(self.irq.calls)
        self.kick()  # an exception here fails the test with the seed and iteration in the report
        where = f"seed {SEED} iteration {i} kind {kind}"
        self.check_accesses(built, where)
        status = self.d.status
        if kind in FATAL:
            assert status & DeviceStatus.DEVICE_NEEDS_RESET, where
            assert self.d.r32(0x60) & VIRTIO_MMIO_INT_CONFIG and self.irq.calls[irqs:] == [True], where
            return "reset"
        assert not status & DeviceStatus.DEVICE_NEEDS_RESET, where
        used = self.d.take_used(self.queue)
        assert len(used) == 1 and used[0][0] == built.head, (where, used)
        new_faults = self.t.queues[self.queue].faults - faults
        if kind in STRUCTURAL or kind == "wrong_flags":
            assert new_faults == 1, where
        elif kind == "valid":
            assert new_faults == 0, where
        else:
            assert new_faults <= 1, where
        if kind == "valid":
            self.check_valid(built, used[0][1], where)
        return kind

    def check_accesses(self, built: Built, where: str) -> None:
        writable = self.writable_ranges(built)
        for a in self.mem.accesses:
            assert a.length <= CHUNK, (where, a)
            if not a.ok:
                continue  # refused by the accessor: nothing was touched
            assert 0 <= a.gpa and a.gpa + a.length <= RAM_END, (where, a)
            if a.write:
                assert any(g <= a.gpa and a.gpa + a.length <= g + n for g, n in writable), (where, a)

    def check_valid(self, built: Built, used_len: int, where: str) -> None:
        writable = sum(b.length for b in built.segs if b.write)
        assert used_len <= writable, where
        if self.device == "rng":
            assert used_len == min(writable, CHUNK), where
        elif self.device == "console-tx":
            assert b"".join(self.out) == b"".join(self.mem.read(b.gpa, b.length) for b in built.segs), where
        elif self.device == "blk":
            status = built.segs[-1]
            assert self.mem.read(status.gpa + status.length - 1, 1)[0] in (0, 1, 2), where
            assert used_len >= 1, where

    def still_usable(self) -> None:
        """A plain good request works (the device did not get stuck)."""
        where = f"seed {SEED}: usability check"
        buf = Buf(0x9000, 64, self.device in ("rng", "console-rx"))
        segs = [buf]
        if self.device == "blk":
            self.mem.write(0x9100, struct.pack("<IIQ", VIRTIO_BLK_T_GET_ID, 0, 0))
            segs = [Buf(0x9100, 16), Buf(0x9000, 20, True), Buf(0x9200, 1, True)]
        head = self.lay_out(segs, False)
        self.d.publish(self.queue, head)
        self.out.clear()
        self.d.kick(self.queue)
        if self.device == "console-rx":
            self.dev.feed(b"ping")
        assert self.d.take_used(self.queue)[-1][0] == head, where
        if self.device == "blk":
            assert self.mem.read(0x9000, 4) == b"fuzz" and self.mem.read(0x9200, 1) == b"\0", where
        if self.device == "console-tx":
            assert b"".join(self.out) == self.mem.read(0x9000, 64), where


@pytest.mark.parametrize("device", ["blk", "rng", "console-tx", "console-rx"])
def test_fuzz_queue(device, tmp_path):
    rng = random.Random(f"{SEED}-{device}")
    fuzz = Fuzz(device, tmp_path, rng)
    seen: dict[str, int] = {}
    slowest = 0.0
    started = time.monotonic()
    for i in range(CHAINS):
        t0 = time.monotonic()
        kind = fuzz.step(i, rng.choice(KINDS))
        slowest = max(slowest, time.monotonic() - t0)
        seen[kind] = seen.get(kind, 0) + 1
        if kind == "reset" or rng.random() < 0.002:
            fuzz.probe()
        if i % 1000 == 999:
            fuzz.still_usable()
    fuzz.still_usable()
    elapsed = time.monotonic() - started
    print(f"\n{device}: {CHAINS} chains in {elapsed:.1f} s, slowest {slowest * 1000:.1f} ms, "
          f"{fuzz.t.queues[fuzz.queue].faults} faults logged/counted; kinds {sorted(seen.items())}")
    assert slowest < 2.0  # no chain comes near a hang
    assert seen.get("reset", 0) > 0 and seen.get("valid", 0) > CHAINS // 10


def test_fuzz_registers(tmp_path):
    """Random register and config accesses of any width and offset, then a clean probe still works."""
    rng = random.Random(f"{SEED}-registers")
    for device in ("blk", "rng", "console-tx"):
        fuzz = Fuzz(device, tmp_path, rng)
        for _ in range(CHAINS // 4):
            offset = rng.choice([rng.randrange(0, 0x100, 4), rng.randrange(0x200)])
            size = rng.choice([4, 4, 1, 2, 8])
            if rng.random() < 0.5:
                assert len(fuzz.t.read(offset, size)) == size
            else:
                value = rng.choice([0, 1, rng.randrange(1 << 32), 0xFFFFFFFF, rng.randrange(16)])
                if offset == 0x70 and rng.random() < 0.5:
                    value = rng.randrange(256)  # status bits
                fuzz.t.write(offset, value.to_bytes(8, "little")[:size])
        fuzz.probe()
        assert not fuzz.d.status & DeviceStatus.DEVICE_NEEDS_RESET
        fuzz.still_usable()
