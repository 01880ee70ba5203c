"""A vCPU fd (``KVM_CREATE_VCPU``) and its mapped ``struct kvm_run``."""

from __future__ import annotations

import ctypes
import mmap

from . import uapi, uapi_x86
from .device import AttrMixin
from .fd import OwnedFd
from .ioctl import ioctl


class VcpuFd(AttrMixin, OwnedFd):
    kind = "vCPU fd"

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int):
        super().__init__(fd)
        self.vcpu_id = vcpu_id
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run = uapi.kvm_run.from_buffer(self._map)

    @property
    def kvm_run(self) -> uapi.kvm_run:
        """Typed view of the shared ``struct kvm_run`` page."""
        return self._run

    def run_bytes(self, offset: int, length: int) -> memoryview:
        """Bytes of the kvm_run mapping (``io.data_offset`` points in here)."""
        return memoryview(self._map)[offset : offset + length]

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            self._run = None  # drop the exported buffer before unmapping
            try:
                self._map.close()
            except BufferError:  # someone still holds a kvm_run view: the mapping goes with the last one
                pass
            self._map = None
        super().close()

    # --- KVM_RUN ---------------------------------------------------------
    def run(self) -> None:
        """One KVM_RUN; raises KvmError (EINTR included: the caller decides what to retry)."""
        ioctl(self.fileno(), "KVM_RUN", uapi.KVM_RUN)

    def set_immediate_exit(self, value: bool) -> None:
        self._run.immediate_exit = 1 if value else 0

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
