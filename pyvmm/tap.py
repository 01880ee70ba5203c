"""TAP devices for virtio-net: opened on /dev/net/tun, brought up with pyroute2.

``open_tap(name)`` attaches to the TAP ``name`` (created by an administrator with
``ip tuntap add NAME mode tap``, or created here and gone with its last fd), with the 12-byte
virtio-net header on every frame (IFF_VNET_HDR, TUNSETVNETHDRSZ), and sets the link up.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .kvm.errors import ConfigError, MissingFeature

TUN_DEVICE = "/dev/net/tun"
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
# include/uapi/linux/if_tun.h: _IOW('T', 202, int), _IOW('T', 216, int)
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
VNET_HDR_SIZE = 12


def open_tap(name: str | None = None) -> tuple[int, str]:
    """Returns (fd, interface name).  The fd is close-on-exec and non-blocking."""
    if name is not None and (not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name):
        raise ConfigError(f"bad TAP name {name!r} (at most {IFNAMSIZ - 1} characters, no '/' or spaces)")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MissingFeature(f"{TUN_DEVICE} does not exist (kernel option CONFIG_TUN)") from None
    except PermissionError:
        raise MissingFeature(f"{TUN_DEVICE}: permission denied (TAP devices need CAP_NET_ADMIN)") from None
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH", (name or "pyvmm%d").encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr.ljust(40, b"\0"))
        except OSError as err:
            why = {errno.EPERM: "permission denied (CAP_NET_ADMIN, or the TAP belongs to another user)",
                   errno.EBUSY: "it is in use by another process",
                   errno.EINVAL: "it exists but is not a TAP with these flags"}.get(err.errno, err.strerror)
            raise ConfigError(f"TAP {name or '(new)'}: TUNSETIFF failed: {why}") from None
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        ifname = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
        _link_up(ifname)
    except BaseException:
        os.close(fd)
        raise
    return fd, ifname


def _link_up(ifname: str) -> None:
    from . import logs

    logs.load()  # pyroute2 logs: -v's level and pyvmm's format must be in place before it makes its loggers
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            raise ConfigError(f"TAP {ifname}: no such interface after TUNSETIFF")
        ipr.link("set", index=index[0], state="up")


def random_mac() -> bytes:
    """A locally administered unicast MAC (52:54:00 is what QEMU uses; the rest random)."""
    return bytes([0x52, 0x54, 0x00]) + os.urandom(3)


__all__ = ["open_tap", "random_mac", "TUN_DEVICE"]
