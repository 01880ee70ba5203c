"""``python -m pyvmm``, and the ``pyvmm`` command's entry point: ``entry()``.

Importing pyvmm (the command line, the KVM bindings, ctypes, the devices) takes a while before
``pyvmm.cli.main()`` takes SIGINT, SIGTERM and SIGHUP over.  Meanwhile the handler here only notes the
first one (an exception raised in the middle of an import can be swallowed or turned into another by
the code being imported), and main() acts on it as its first step: one line on stderr (``pyvmm:
interrupted``, ``pyvmm: stopped by SIGTERM``), status 128 + the signal (130, 143, 129), no traceback.
Only a signal that comes while the Python interpreter itself starts, before this module's first line,
is Python's (the process is killed by it, or for SIGINT a KeyboardInterrupt traceback).

Once the status is known, the three are blocked until the process is gone: Python's finalization puts
their default actions back, and one arriving then would kill the process (status -signal) instead of
letting it exit with the status it has.
"""

import sys

_NAMES = {1: "SIGHUP", 2: "SIGINT", 15: "SIGTERM"}  # STOP_SIGNALS (Linux numbers: nothing to import for them)


def _early_stop(signum, frame) -> None:
    """Before main() has its own handlers: note the first signal for main() (``received``)."""
    if _early_stop.received is None:
        _early_stop.received = signum


_early_stop.received = None
_early_stop.pyvmm_entry = True  # cli.main() keeps its own handler when it ends instead of putting this one back


def _hold_signals() -> None:
    """The status is known: a signal from now on stays pending and dies with the process."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


def _stopped(signum: int) -> int:
    _hold_signals()
    line = "pyvmm: interrupted" if signum == 2 else f"pyvmm: stopped by {_NAMES.get(signum, signum)}"
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # no stderr any more (a hung-up terminal): the status says it
        pass
    return 128 + signum


def entry() -> int:
    """What ``pyvmm`` and ``python -m pyvmm`` run: ``pyvmm.cli.main()``, with the import guarded."""
    try:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored by who started us (nohup, `cmd &`): stays so
                signal.signal(sig, _early_stop)
        # a signal mask inherited blocked (exec keeps it) would hold these pending for ever: pyvmm wants them
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
        from .cli import main
    except KeyboardInterrupt:  # Python's own SIGINT handler, before ours was installed
        return _stopped(2)
    status = main()  # which acts on _early_stop.received first
    _hold_signals()
    return status


if __name__ == "__main__":
    sys.exit(entry())
