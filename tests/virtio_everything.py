"""The host side of one guest boot with every virtio device at once (tests/test_virtio_pkvm.py), run as its own
process: ``python -m tests.virtio_everything DIR KERNEL normal|protected``.

It moves itself into a network namespace of its own (the lab host's network is never touched), makes the TAP
with 10.0.2.1/24 and a TCP listener that hashes what the guest sends, boots KERNEL with DIR/initrd.cpio on two
vCPUs with: vda (DIR/a.img, read), vdb (DIR/b.img, written), virtio-rng, virtio-net, virtio-console.  When the
guest says "pyvmm-test: hvc0 shell" it types into hvc0 (``VirtioConsole.feed``) and powers the guest off from
that shell.  It prints the console, then facts as "host: KEY VALUE" lines (JSON values for the structured ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.getcwd())

from tests.linux_guest import CMDLINE, lines  # noqa: E402

SHELL_MARK = "pyvmm-test: hvc0 shell"
ANSWER = "pyvmm-test: shell says 42"


def listen(sock: socket.socket, expected: int, result: dict) -> None:
    conn, peer = sock.accept()
    h, n = hashlib.sha256(), 0
    while n < expected:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    conn.close()
    result.update(peer=peer[0], received=n, sha256=h.hexdigest())


def type_into_shell(vm, console, result: dict, finished: threading.Event) -> None:
    """Wait for the shell, ask it a sum, wait for the answer, then power off from it."""
    def wait_for(text: str) -> bool:
        while not finished.wait(0.2):
            if any(line.strip() == text for line in lines(vm.console.text())):
                return True
        return False

    if not wait_for(SHELL_MARK):
        return
    console.feed(b'echo "pyvmm-test: shell says $((6*7))"\n')
    result["shell"] = "answered" if wait_for(ANSWER) else "silent"
    console.feed(b"poweroff -f\n")


def main() -> int:
    directory, kernel, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    os.unshare(os.CLONE_NEWNET)
    from pyroute2 import IPRoute

    from pyvmm.vm import Vm

    result: dict = {}
    expected = os.path.getsize(os.path.join(directory, "a.img"))
    started = time.monotonic()
    with Vm(protected=kind == "protected") as vm:
        vm.add_memory(256 << 20)
        vm.create_vcpus(2)
        vm.add_virtio_blk(os.path.join(directory, "a.img"), readonly=True)
        vm.add_virtio_blk(os.path.join(directory, "b.img"))
        vm.add_virtio_rng()
        net = vm.add_virtio_net(tap="pyvmmnet0", mac="52:54:00:12:34:56")
        console = vm.add_virtio_console().device
        with IPRoute() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=net.device.ifname)[0], address="10.0.2.1", prefixlen=24)
        sock = socket.create_server(("10.0.2.1", 5000))
        threading.Thread(target=listen, args=(sock, expected, result), daemon=True).start()
        vm.boot(kernel, initrd=os.path.join(directory, "initrd.cpio"), cmdline=CMDLINE)
        finished = threading.Event()
        typist = threading.Thread(target=type_into_shell, args=(vm, console, result, finished), daemon=True)
        typist.start()
        try:
            outcome = vm.run(timeout=560)
        finally:
            finished.set()
            typist.join(5)
        text = vm.console.text()
        pool = vm.dma_pool
        forced = sorted(vm.memory.forced_pages)
    sys.stdout.write(text)
    print(f"host: outcome {outcome.kind.value} {outcome.detail}")
    print(f"host: seconds {time.monotonic() - started:.1f}")
    print(f"host: pool {json.dumps([pool.gpa, pool.size] if pool else None)}")
    print(f"host: exits {json.dumps(outcome.exits)}")
    print(f"host: device_memory {json.dumps(outcome.device_memory)}")
    print(f"host: device_faults {json.dumps([f.line for f in outcome.device_faults])}")
    print(f"host: forced_pages {json.dumps(forced)}")
    print(f"host: frames {net.device.tx_frames} {net.device.rx_frames} {net.device.rx_dropped}")
    for key, value in sorted(result.items()):
        print(f"host: {key} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
