"""The child process of a confined scenario (``runner.observe_confined``): reads the pickled scenario on stdin,
opens /dev/kvm, confines itself (``Confinement``), runs the scenario and prints one JSON object on stdout:
``{"observation": ...}``, ``{"skipped": why}`` or ``{"error": what}``.

    python -m pyvmm.scenarios.child KVM_PATH < scenario.pickle
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import sys

from ..hostinfo import MemlockInfo
from ..kvm import Kvm
from ..kvm.errors import MissingFeature, PyvmmError
from .model import Confinement
from .runner import observe


def confine(confinement: Confinement) -> str:
    """RLIMIT_MEMLOCK down to ``memlock``; as root, become ``uid`` (which clears every capability).
    Returns what the process now is, for the observation's notes."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(confinement.uid, confinement.uid, confinement.uid)
        os.setresuid(confinement.uid, confinement.uid, confinement.uid)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (confinement.memlock, confinement.memlock))
    memlock = MemlockInfo.read()
    if memlock.cap_ipc_lock:
        raise MissingFeature("the confined process still has CAP_IPC_LOCK (it is not root and cannot drop it)")
    return (f"confined child process: uid {os.getuid()}, RLIMIT_MEMLOCK {memlock.rlimit_soft} bytes, "
            "no CAP_IPC_LOCK")


def main(argv: list[str]) -> dict:
    scenario = pickle.load(sys.stdin.buffer)
    try:
        with Kvm(argv[0]) as kvm:  # before confining: the new user need not be allowed to open /dev/kvm
            confined = confine(scenario.confinement)
            observation = observe(scenario, kvm)
            observation.notes.insert(0, confined)
            return {"observation": observation.to_dict()}
    except MissingFeature as err:
        return {"skipped": str(err)}
    except PyvmmError as err:
        return {"error": str(err)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
