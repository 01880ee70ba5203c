"""The device tree pyvmm gives each arm64 guest, built with the ``fdt`` library (checked with dtc in tests)."""

from __future__ import annotations

import fdt

from ...record import Record
from . import layout

GIC_PHANDLE = 1
DMA_POOL_PHANDLE = 2
ITS_PHANDLE = 3
IRQ_TYPE_SPI, IRQ_TYPE_PPI = 0, 1
IRQ_EDGE_RISING = 1
IRQ_LEVEL_HIGH = 4
IRQ_PPI_ALL_CPUS_LEVEL_LOW = 0xF08


class DeviceTreeConfig(Record):
    __slots__ = ("ram_base", "ram_size", "mpidrs", "bootargs", "initrd", "virtio", "dma_pool", "pmu_ppi", "its")

    def __init__(self, ram_base: int, ram_size: int, mpidrs: list[int], bootargs: str = "",
                 initrd: tuple[int, int] | None = None, virtio: list[tuple[int, int, int]] | None = None,
                 dma_pool: tuple[int, int, int] | None = None, pmu_ppi: int | None = None,
                 its: tuple[int, int] | None = None):
        self.ram_base = ram_base
        self.ram_size = ram_size
        self.mpidrs = mpidrs
        self.bootargs = bootargs
        self.initrd = initrd  # (start, end)
        self.virtio = [] if virtio is None else virtio  # (base, size, SPI) per virtio-mmio device
        self.dma_pool = dma_pool  # (base, size, alignment): a restricted-dma-pool for every virtio device
        self.pmu_ppi = pmu_ppi  # the PMUv3's overflow interrupt (a PPI), when the vCPUs have a PMU
        self.its = its  # (base, size) of the GICv3 ITS, when the VM has one


def _cells64(value: int) -> list[int]:
    return [value >> 32, value & 0xFFFFFFFF]


def _node(name: str, *props) -> fdt.Node:
    node = fdt.Node(name)
    for p in props:
        node.append(p)
    return node


def build(cfg: DeviceTreeConfig) -> bytes:
    tree = fdt.FDT()
    tree.header.version = 17
    root = tree.root
    for p in (fdt.PropStrings("compatible", "linux,dummy-virt"), fdt.PropWords("#address-cells", 2),
              fdt.PropWords("#size-cells", 2), fdt.PropWords("interrupt-parent", GIC_PHANDLE),
              fdt.PropStrings("model", "pyvmm")):
        root.append(p)

    root.append(_node(f"memory@{cfg.ram_base:x}", fdt.PropStrings("device_type", "memory"),
                      fdt.PropWords("reg", *_cells64(cfg.ram_base), *_cells64(cfg.ram_size))))

    cpus = _node("cpus", fdt.PropWords("#address-cells", 1), fdt.PropWords("#size-cells", 0))
    for mpidr in cfg.mpidrs:
        cpus.append(_node(f"cpu@{mpidr:x}", fdt.PropStrings("device_type", "cpu"),
                          fdt.PropStrings("compatible", "arm,arm-v8"), fdt.PropStrings("enable-method", "psci"),
                          fdt.PropWords("reg", mpidr)))
    root.append(cpus)

    root.append(_node("psci", fdt.PropStrings("compatible", "arm,psci-1.0", "arm,psci-0.2"),
                      fdt.PropStrings("method", "hvc")))

    redist_size = layout.GIC_REDIST_SIZE * len(cfg.mpidrs)
    intc = _node(f"intc@{layout.GIC_DIST:x}", fdt.PropStrings("compatible", "arm,gic-v3"),
                 fdt.PropWords("#interrupt-cells", 3), fdt.Property("interrupt-controller"),
                 fdt.PropWords("#address-cells", 2), fdt.PropWords("#size-cells", 2), fdt.Property("ranges"),
                 fdt.PropWords("reg", *_cells64(layout.GIC_DIST), *_cells64(layout.GIC_DIST_SIZE),
                               *_cells64(layout.GIC_REDIST), *_cells64(redist_size)),
                 fdt.PropWords("phandle", GIC_PHANDLE))
    if cfg.its:  # Documentation/devicetree/bindings/interrupt-controller/arm,gic-v3.yaml: an ITS is the GIC's child
        base, size = cfg.its
        intc.append(_node(f"msi-controller@{base:x}", fdt.PropStrings("compatible", "arm,gic-v3-its"),
                          fdt.Property("msi-controller"), fdt.PropWords("#msi-cells", 1),
                          fdt.PropWords("reg", *_cells64(base), *_cells64(size)),
                          fdt.PropWords("phandle", ITS_PHANDLE)))
    root.append(intc)

    timer_irqs = []
    for ppi in layout.TIMER_PPIS:
        timer_irqs += [IRQ_TYPE_PPI, ppi, IRQ_PPI_ALL_CPUS_LEVEL_LOW]
    root.append(_node("timer", fdt.PropStrings("compatible", "arm,armv8-timer"),
                      fdt.PropWords("interrupts", *timer_irqs), fdt.Property("always-on")))

    if cfg.pmu_ppi is not None:
        root.append(_node("pmu", fdt.PropStrings("compatible", "arm,armv8-pmuv3"),
                          fdt.PropWords("interrupts", IRQ_TYPE_PPI, cfg.pmu_ppi, IRQ_LEVEL_HIGH)))

    uart = f"serial@{layout.UART:x}"
    root.append(_node(uart, fdt.PropStrings("compatible", "ns16550a"),
                      fdt.PropWords("reg", *_cells64(layout.UART), *_cells64(layout.UART_SIZE)),
                      fdt.PropWords("clock-frequency", layout.UART_CLOCK),
                      fdt.PropWords("interrupts", IRQ_TYPE_SPI, layout.UART_SPI, IRQ_LEVEL_HIGH)))

    if cfg.dma_pool:
        # A restricted DMA pool (Documentation/devicetree/bindings/reserved-memory/shared-dma-pool.yaml): inside
        # /memory and mapped (swiotlb refuses no-map, reusable, linux,cma-default and linux,dma-default ones).
        # A pKVM guest shares it with MEM_SHARE at boot and bounces every virtio buffer through it.
        base, size, align = cfg.dma_pool
        root.append(_node("reserved-memory", fdt.PropWords("#address-cells", 2), fdt.PropWords("#size-cells", 2),
                          fdt.Property("ranges"),
                          _node(f"restricted-dma-pool@{base:x}", fdt.PropStrings("compatible", "restricted-dma-pool"),
                                fdt.PropWords("reg", *_cells64(base), *_cells64(size)),
                                # informational for a static reg (of_reserved_mem uses it to place dynamic
                                # ones); place_dma_pool aligns the base itself
                                fdt.PropWords("alignment", *_cells64(align)),
                                fdt.PropWords("phandle", DMA_POOL_PHANDLE))))

    for base, size, spi in cfg.virtio:  # edge-triggered: the irqfd injects an edge per interrupt
        node = _node(f"virtio_mmio@{base:x}", fdt.PropStrings("compatible", "virtio,mmio"),
                     fdt.PropWords("reg", *_cells64(base), *_cells64(size)),
                     fdt.PropWords("interrupts", IRQ_TYPE_SPI, spi, IRQ_EDGE_RISING),
                     fdt.Property("dma-coherent"))
        if cfg.dma_pool:
            node.append(fdt.PropWords("memory-region", DMA_POOL_PHANDLE))
        root.append(node)

    chosen = _node("chosen", fdt.PropStrings("stdout-path", f"/{uart}"))
    if cfg.bootargs:
        chosen.append(fdt.PropStrings("bootargs", cfg.bootargs))
    if cfg.initrd:
        chosen.append(fdt.PropWords("linux,initrd-start", *_cells64(cfg.initrd[0])))
        chosen.append(fdt.PropWords("linux,initrd-end", *_cells64(cfg.initrd[1])))
    root.append(chosen)
    return tree.to_dtb(version=17)
