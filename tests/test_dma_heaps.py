"""The crosvm report's setup: guest RAM from a DMA-buf heap (system and CMA), on normal and protected VMs.

Debian's kernel has no DMA-buf heaps; the lab's dma-heaps kernel does (scripts/labkit/kernels/dma-heaps.config:
the system heap, the CMA heap over a 64 MiB ``cma=`` area, udmabuf).  Run with
``scripts/lab test --kernel dma-heaps tests/test_dma_heaps.py``; elsewhere these tests skip, naming what is missing.
"""

from __future__ import annotations

import errno
import os

import pytest

from pyvmm import hostinfo
from pyvmm.kvm.errors import MissingFeature
from pyvmm.memory.backing import DMA_HEAP_DIR
from pyvmm.outcome import ExitKind
from pyvmm.scenarios.host import cma_heap, dma_heaps
from tests.arm64 import memtouch, require_arm64_kvm, require_pkvm

RAM_BASE = 0x8000_0000
PATTERN_GPA = RAM_BASE + (2 << 20)  # memtouch writes gpa ^ 0x5A17C0DE9E3779B9 every 64 bytes from base + 2 MiB


def require_heap(which: str) -> str:
    """The heap's name (``system``, or the CMA heap as pyvmm's scenarios find it), or skip naming what is missing."""
    require_arm64_kvm()
    if not os.path.isdir(DMA_HEAP_DIR):
        pytest.skip(f"no {DMA_HEAP_DIR}: this kernel lacks CONFIG_DMABUF_HEAPS (the lab's dma-heaps kernel has it: "
                    "scripts/lab test --kernel dma-heaps tests/test_dma_heaps.py)")
    if which == "system":
        if "system" not in dma_heaps():
            pytest.skip(f"no system heap in {DMA_HEAP_DIR} (heaps: {', '.join(dma_heaps()) or 'none'}; "
                        "CONFIG_DMABUF_HEAPS_SYSTEM)")
        return "system"
    try:
        return cma_heap()
    except MissingFeature as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("which", ["system", "cma"])
@pytest.mark.timeout(300)
def test_heap_buffer_runs_a_normal_vm(which):
    """A normal VM's stage-2 faults on a PFN-mapped slot resolve (KVM follows the PFN; no pinning)."""
    heap = require_heap(which)
    vm, outcome = memtouch(False, f"dma-heap:{heap}")
    with vm:
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, vm.console.text()
        assert "errors=0x0000000000000000" in vm.console.text()
        assert vm.memory.read_u64(PATTERN_GPA) == PATTERN_GPA ^ 0x5A17C0DE9E3779B9  # through the heap's mapping
        region = vm.memory.regions[0]
        (vma,) = hostinfo.vmas_covering(hostinfo.read_smaps(), region.hva, region.size)
        assert {"io", "pf"} <= set(vma.vmflags), vma  # both heaps set VM_IO|VM_PFNMAP on their mmap
        assert vma.path.startswith("/dmabuf:") or vma.path == "anon_inode:dmabuf", vma.path


@pytest.mark.parametrize("which", ["system", "cma"])
@pytest.mark.timeout(300)
def test_heap_buffer_on_a_protected_vm_is_the_crosvm_report(which):
    """The report's setup: pkvm_mem_abort pins the faulting page with pin_user_pages; GUP's check_vma_flags
    refuses VM_IO|VM_PFNMAP, so KVM_RUN fails with EFAULT -- and pyvmm's report says which slot, why, and how to
    back the memory instead (a memfd, made a DMA-buf with udmabuf)."""
    heap = require_heap(which)
    require_pkvm()
    vm, outcome = memtouch(True, f"dma-heap:{heap}")
    with vm:
        assert outcome.kind is ExitKind.FAULT, (outcome, vm.console.text())
        r = outcome.report
        assert (r.call, r.errno) == ("KVM_RUN", errno.EFAULT)
        assert r.faulting_slot == 0
        slot = r.slots[0]
        assert slot.backing == f"dma-heap:{heap}" and {"io", "pf"} <= set(slot.vmflags)
        assert slot.nature["pfn_mapped"] is True
        causes = " ".join(r.likely_cause)
        assert "VM_PFNMAP/VM_IO" in causes and "pkvm_mem_abort" in causes and "check_vma_flags" in causes
        assert "udmabuf:memfd" in causes  # the way out the DMA-buf maintainers gave in the report's thread
        assert vm.console.text() == ""  # the guest never ran an instruction that touched its RAM


@pytest.mark.timeout(300)
def test_udmabuf_memfd_mapping_runs_where_the_heap_does_not():
    """On the same kernel, the thread's fix: a memfd made a DMA-buf (udmabuf), the slot mapping the memfd."""
    require_arm64_kvm()
    require_pkvm()
    if not os.path.exists("/dev/udmabuf"):
        pytest.skip("no /dev/udmabuf (CONFIG_UDMABUF)")
    vm, outcome = memtouch(True, "udmabuf:memfd")
    with vm:
        assert outcome.kind is ExitKind.GUEST_EXIT and outcome.status == 0, vm.console.text()
