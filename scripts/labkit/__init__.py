"""The emulated arm64 pKVM lab behind scripts/lab, one module per concern: cache (paths, stamps, the lock),
debian (sid packages, modules), kernel (Debian's and the pKVM-guest kernel), initramfs (the cpio parts),
qemu (host tools, booting), cli (the command line)."""
