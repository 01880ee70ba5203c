"""pyvmm: a userspace VMM in Python that drives /dev/kvm directly.

The device models live in the repository's ``devices/`` folder and are installed as ``pyvmm.devices``
(pyproject's package-dir), so that site-packages holds ``pyvmm`` and nothing else.  Run from a checkout (the
tests, the lab), ``pyvmm/devices`` does not exist: ``pyvmm.devices`` is then loaded from the checkout's
``devices/``, and nothing else of the checkout's root becomes part of pyvmm."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _devices_from_checkout() -> None:
    here = __path__[0]
    if _os.path.isdir(_os.path.join(here, "devices")) or "pyvmm.devices" in _sys.modules:
        return  # installed: pyvmm/devices is a package of its own
    folder = _os.path.join(_os.path.dirname(_os.path.abspath(here)), "devices")
    init = _os.path.join(folder, "__init__.py")
    if not _os.path.isfile(init):
        return
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("pyvmm.devices", init, submodule_search_locations=[folder])
    module = module_from_spec(spec)
    _sys.modules["pyvmm.devices"] = module  # before exec, as the import system does
    spec.loader.exec_module(module)
    globals()["devices"] = module  # what the import system binds on the parent package


_devices_from_checkout()
