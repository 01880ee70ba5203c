"""The in-kernel GICv3 (KVM_DEV_TYPE_ARM_VGIC_V3): distributor and redistributors, then init; its ITS."""

from __future__ import annotations

from collections.abc import Callable

from ...kvm import uapi
from ...kvm import uapi_arm64 as a64
from ...kvm.device import DeviceFd
from ...kvm.vm import VmFd
from . import layout

KVM_ARM_IRQ_TYPE_SHIFT = 24
KVM_ARM_IRQ_TYPE_SPI = 1


def create_gicv3(vm_fd: VmFd, before_init: Callable[[], None] | None = None) -> DeviceFd:
    """Call after every vCPU is created and initialised, before the first KVM_RUN.  ``before_init`` runs once the
    GIC exists and before its CTRL_INIT (the vCPUs' PMU interrupt is set there)."""
    gic = vm_fd.create_device(uapi.KVM_DEV_TYPE_ARM_VGIC_V3)
    try:
        gic.set_device_attr(a64.KVM_DEV_ARM_VGIC_GRP_ADDR, a64.KVM_VGIC_V3_ADDR_TYPE_DIST, layout.GIC_DIST)
        gic.set_device_attr(a64.KVM_DEV_ARM_VGIC_GRP_ADDR, a64.KVM_VGIC_V3_ADDR_TYPE_REDIST, layout.GIC_REDIST)
        if before_init is not None:
            before_init()
        gic.set_device_attr(a64.KVM_DEV_ARM_VGIC_GRP_CTRL, a64.KVM_DEV_ARM_VGIC_CTRL_INIT)
    except BaseException:
        gic.close()
        raise
    return gic


def create_its(vm_fd: VmFd) -> DeviceFd:
    """The GICv3 ITS (KVM_DEV_TYPE_ARM_VGIC_ITS) at layout.GIC_ITS; after the GICv3 exists."""
    its = vm_fd.create_device(uapi.KVM_DEV_TYPE_ARM_VGIC_ITS)
    try:
        its.set_device_attr(a64.KVM_DEV_ARM_VGIC_GRP_ADDR, a64.KVM_VGIC_ITS_ADDR_TYPE, layout.GIC_ITS)
        its.set_device_attr(a64.KVM_DEV_ARM_VGIC_GRP_CTRL, a64.KVM_DEV_ARM_VGIC_CTRL_INIT)
    except BaseException:
        its.close()
        raise
    return its


def spi_irq_line(spi: int) -> int:
    """The KVM_IRQ_LINE ``irq`` field for shared peripheral interrupt ``spi`` (INTID 32 + spi)."""
    return (KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | (32 + spi)
