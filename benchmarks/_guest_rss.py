"""Run ``pyvmm ARGS...`` as ``python3 -m pyvmm ARGS...`` does, in this process, and report how much of the guest's
RAM is resident at the end of the run: when the VM closes, before its memory is unmapped, one line on stderr

    bench-guest-rss: rss-kb=N size-kb=N slots=N vmas=N

rss-kb: the sum of the ``Rss:`` lines of /proc/self/smaps for the mappings that hold the VM's memslots (each VMA
overlapping a slot's host range, [hva, hva + size)), that is the guest pages touched (by the guest, and by pyvmm
loading images into it) and still mapped; size-kb: the slots' total size.  The process's peak RSS (wait4's
ru_maxrss) less rss-kb is then pyvmm's own memory: benchmarks/linux_boot.py compares it with issue 12's 25 MB.

    python3 benchmarks/_guest_rss.py run IMAGE ...       (in the checkout's root, as linux_boot.py spawns it)

Deliberately small (os and sys besides what ``-m pyvmm`` imports), so that it adds next to nothing to the RSS it
measures.  Not a benchmark itself (``scripts/dev bench`` runs the files without a leading underscore).
"""

import os
import sys

LINE = "bench-guest-rss:"


def mapping_rss_kb(ranges: list[tuple[int, int]], smaps: str = "/proc/self/smaps") -> tuple[int, int]:
    """(Rss in KiB, VMA count) of the mappings in SMAPS that overlap any of RANGES, (start, size) pairs."""
    rss = vmas = 0
    take = False
    with open(smaps) as f:
        for line in f:
            first = line.split(None, 1)[0] if line.strip() else ""
            if "-" in first and not first.endswith(":"):  # a VMA's header: start-end perms offset dev inode path
                lo, hi = (int(x, 16) for x in first.split("-"))
                take = any(lo < start + size and start < hi for start, size in ranges)
                vmas += take
            elif take and first == "Rss:":
                rss += int(line.split()[1])
    return rss, vmas


def install() -> None:
    """Wrap pyvmm.vm.Vm.close: its first call on a VM with memory reports that memory's resident size first."""
    from pyvmm.vm import Vm

    close = Vm.close

    def reporting_close(self) -> None:
        memory = getattr(self, "memory", None)
        regions = [(r.hva, r.size) for r in (memory.regions if memory is not None else []) if r.hva]
        if regions and not getattr(self, "_bench_rss_reported", False):
            self._bench_rss_reported = True
            try:
                rss, vmas = mapping_rss_kb(regions)
                text = (f"{LINE} rss-kb={rss} size-kb={sum(s for _, s in regions) >> 10} slots={len(regions)} "
                        f"vmas={vmas}\n")
            except OSError as err:
                text = f"{LINE} error={str(err.strerror or err).replace(' ', '_')}\n"
            os.write(2, text.encode())
        close(self)

    Vm.close = reporting_close


def parse(stderr: str) -> dict[str, str] | None:
    """The report line's fields from a run's stderr, or None without one."""
    for line in stderr.splitlines():
        if line.startswith(LINE):
            return dict(field.split("=", 1) for field in line[len(LINE):].split())
    return None


if __name__ == "__main__":
    # -m pyvmm with the checkout as cwd finds pyvmm there: so does this (sys.path[0] is benchmarks/ otherwise)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    install()
    import runpy

    sys.argv[0] = "pyvmm"
    runpy.run_module("pyvmm", run_name="__main__", alter_sys=True)
