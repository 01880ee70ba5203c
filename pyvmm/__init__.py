"""pyvmm: a userspace VMM in Python that drives /dev/kvm directly.

The device models live in the repository's ``devices/`` folder and are installed as ``pyvmm.devices``
(pyproject's package-dir), so that site-packages holds ``pyvmm`` and nothing else.  Run from a checkout (the
tests, the lab), ``pyvmm/devices`` does not exist: ``pyvmm.devices`` is then found in the checkout's root."""

import os as _os

__version__ = "0.1.0"

if not _os.path.isdir(_os.path.join(__path__[0], "devices")):
    _root = _os.path.dirname(_os.path.abspath(__path__[0]))
    if _os.path.isfile(_os.path.join(_root, "devices", "__init__.py")):
        __path__.append(_root)  # only pyvmm.devices is looked up there: every other name is found in pyvmm/ first
