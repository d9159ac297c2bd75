"""``neuroflow.kernels`` in a source checkout used without an install.

Installed (and editable) copies ship ``kernels/`` as ``neuroflow.kernels`` (``setup.py``'s
``package_dir``). A checkout on ``sys.path`` without an install (``PYTHONPATH=<repo>``, or
``python -m ...`` from the repo root, as on the lent GPU machine, where nothing is installed) has
``kernels/`` beside the package instead: this module, imported first by ``neuroflow/__init__.py``,
maps exactly ``neuroflow.kernels`` to it. Where the name resolves already it does nothing, and it
adds no top-level name.

``kernels/`` has no ``__init__.py`` (``kernels/README.md`` says why), so the mapped module is a
package with only a search path: ``neuroflow.kernels.gate`` and the others import from it.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_NAME = "neuroflow.kernels"
_SOURCE = Path(__file__).resolve().parent.parent / "kernels"

if _NAME not in sys.modules and (_SOURCE / "gate.py").is_file() and importlib.util.find_spec(_NAME) is None:
    _spec = importlib.machinery.ModuleSpec(_NAME, None, is_package=True)
    _spec.submodule_search_locations = [str(_SOURCE)]
    _module = importlib.util.module_from_spec(_spec)
    _module.__doc__ = "NeuroFlow's Triton device code (the checkout's kernels/ folder)."
    sys.modules[_NAME] = _module
    sys.modules["neuroflow"].kernels = _module  # as the import system binds a submodule to its parent
