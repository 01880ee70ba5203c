"""A vCPU fd (``KVM_CREATE_VCPU``) and its mapped ``struct kvm_run``."""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys

from . import exits, uapi, uapi_x86
from .device import AttrMixin
from .errors import KvmError
from .fd import OwnedFd
from .ioctl import _ioctl_ints, ioctl

# Python >= 3.13 can map without keeping its own dup of the vCPU fd (which would outlive close()).
_NO_DUP = {"trackfd": False} if sys.version_info >= (3, 13) else {}
KERNEL_SIGSET_BYTES = 8  # the kernel's sigset_t (_NSIG = 64) on x86_64 and arm64
_KVM_RUN = uapi.KVM_RUN


class VcpuFd(AttrMixin, OwnedFd):
    kind = "vCPU fd"

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int):
        """Takes ownership of ``fd``: if mapping ``kvm_run`` fails, the fd is closed here, once."""
        super().__init__(fd)
        self.vcpu_id = vcpu_id
        self._map = None
        self._view = None
        self._seen: dict = {}  # exits.decode()'s exits seen before (their data views are slices of _view)
        try:
            self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, **_NO_DUP)
            self._run = uapi.kvm_run.from_buffer(self._map)
            self._view = memoryview(self._map)
        except BaseException:
            self.close()
            raise

    @property
    def kvm_run(self) -> uapi.kvm_run:
        """Typed view of the shared ``struct kvm_run`` page (exits are decoded by ``run()``)."""
        return self._run

    def close(self) -> None:
        self._run = None  # drop the exported buffers before unmapping
        self._seen.clear()
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # an exit's data view is still alive: the mapping goes with the last one
                pass
            self._map = None
        super().close()

    # --- KVM_RUN ---------------------------------------------------------
    def run(self) -> exits.VcpuExit:
        """One KVM_RUN, decoded.  EINTR (a signal or ``immediate_exit``) is the ``Intr`` exit;
        any other failure raises KvmError, whose ``exit`` is the ``MemoryFault`` KVM described, if any."""
        if _ioctl_ints(self._fd, _KVM_RUN, 0) < 0:  # once per exit: ioctl()'s conversions left out (ioctl.py)
            return self._run_failed(ctypes.get_errno())
        return exits.decode(self._run, self._view, self._seen)

    def _run_failed(self, err: int) -> exits.VcpuExit:
        if err == errno.EINTR:
            return exits.INTR
        error = KvmError("KVM_RUN", err)
        error.exit = exits.memory_fault_after_error(self._run, err)
        raise error

    def set_immediate_exit(self, value: bool) -> None:
        run = self._run  # once: close() may clear it from another thread
        if run is not None:
            run.immediate_exit = 1 if value else 0

    def set_signal_mask(self, blocked: set[int]) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is inside KVM_RUN."""
        bits = 0
        for sig in blocked:
            bits |= 1 << (int(sig) - 1)
        mask = uapi.kvm_signal_mask_with(bits.to_bytes(KERNEL_SIGSET_BYTES, "little"))
        ioctl(self.fileno(), "KVM_SET_SIGNAL_MASK", uapi.KVM_SET_SIGNAL_MASK, mask)

    # --- x86 registers ---------------------------------------------------
    def get_regs(self) -> uapi_x86.kvm_regs:
        regs = uapi_x86.kvm_regs()
        ioctl(self.fileno(), "KVM_GET_REGS", uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi_x86.kvm_regs) -> None:
        ioctl(self.fileno(), "KVM_SET_REGS", uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi_x86.kvm_sregs:
        sregs = uapi_x86.kvm_sregs()
        ioctl(self.fileno(), "KVM_GET_SREGS", uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi_x86.kvm_sregs) -> None:
        ioctl(self.fileno(), "KVM_SET_SREGS", uapi.KVM_SET_SREGS, sregs)

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        ioctl(self.fileno(), "KVM_SET_CPUID2", uapi.KVM_SET_CPUID2, cpuid)

    # --- generic / arm64 registers ------------------------------------------
    def get_one_reg(self, reg_id: int) -> int:
        size = 1 << ((reg_id >> 52) & 0xF)
        holder = (ctypes.c_uint8 * size)()
        ioctl(self.fileno(), "KVM_GET_ONE_REG", uapi.KVM_GET_ONE_REG,
              uapi.kvm_one_reg(id=reg_id, addr=ctypes.addressof(holder)))
        return int.from_bytes(bytes(holder), "little")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        size = 1 << ((reg_id >> 52) & 0xF)
        holder = (ctypes.c_uint8 * size).from_buffer_copy(value.to_bytes(size, "little"))
        ioctl(self.fileno(), "KVM_SET_ONE_REG", uapi.KVM_SET_ONE_REG,
              uapi.kvm_one_reg(id=reg_id, addr=ctypes.addressof(holder)))

    def arm_vcpu_init(self, init: uapi.kvm_vcpu_init) -> None:
        ioctl(self.fileno(), "KVM_ARM_VCPU_INIT", uapi.KVM_ARM_VCPU_INIT, init)

    def arm_vcpu_finalize(self, feature: int) -> None:
        ioctl(self.fileno(), "KVM_ARM_VCPU_FINALIZE", uapi.KVM_ARM_VCPU_FINALIZE, ctypes.c_int(feature))

    # --- state -----------------------------------------------------------
    def get_mp_state(self) -> int:
        state = uapi.kvm_mp_state()
        ioctl(self.fileno(), "KVM_GET_MP_STATE", uapi.KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        ioctl(self.fileno(), "KVM_SET_MP_STATE", uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state(mp_state=mp_state))

    def set_guest_debug(self, control: int) -> None:
        ioctl(self.fileno(), "KVM_SET_GUEST_DEBUG", uapi.KVM_SET_GUEST_DEBUG, uapi.kvm_guest_debug(control=control))

    # --- fault reports ---------------------------------------------------------
    def get_vcpu_events(self) -> ctypes.Structure:
        """KVM_GET_VCPU_EVENTS: pending/injected exception, interrupt, NMI, SMI (the host arch's struct)."""
        events = uapi.HOST_ARCH.kvm_vcpu_events()
        ioctl(self.fileno(), "KVM_GET_VCPU_EVENTS", uapi.KVM_GET_VCPU_EVENTS, events)
        return events

    def translate(self, gva: int) -> uapi.kvm_translation:
        """KVM_TRANSLATE (x86): the guest-physical address of ``gva`` through the vCPU's current page
        tables (``valid`` is 0 when it is not mapped)."""
        tr = uapi.kvm_translation(linear_address=gva)
        ioctl(self.fileno(), "KVM_TRANSLATE", uapi.KVM_TRANSLATE, tr)
        return tr
