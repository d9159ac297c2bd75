"""Which implementation of an op runs: the Triton kernel or the PyTorch reference, never silently.

Rules, the same for every op:

* CUDA tensors -> Triton kernel.
* CPU tensors with ``TRITON_INTERPRET=1`` -> the same Triton kernel, run by Triton's interpreter
  (slow; lets the whole engine run through its kernels without a GPU, as the tests do).
* CPU tensors otherwise -> PyTorch reference (the designated CPU path, not a fallback).
* When the Triton path is expected but cannot run (Triton missing, a shape or setting the kernel
  does not support), the reference runs instead and that is a *fallback*: it is recorded with its
  reason, and with ``NEUROFLOW_STRICT=1`` it raises :class:`FallbackError` instead.

Every call records the path it took in :data:`last_path` (op -> ``"triton"`` or ``"reference"``)
and counts it in :data:`counts`, so tests and benchmarks can assert what ran. A fallback also
warns (:class:`FallbackWarning`) the first time each (op, reason) occurs, and is counted in
:data:`fallback_counts`; :data:`fallbacks` keeps the latest :data:`MAX_FALLBACK_RECORDS` of them,
so a long-running engine's records stay bounded.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

STRICT_ENV = "NEUROFLOW_STRICT"
TRITON = "triton"
REFERENCE = "reference"

last_path: dict[str, str] = {}
"""op name -> the path its most recent call took."""

counts: Counter = Counter()
"""(op name, path) -> number of calls."""

MAX_FALLBACK_RECORDS = 256


class _Latest(list):
    """A list that keeps only its latest ``maxlen`` items (compares equal to a plain list)."""

    def __init__(self, maxlen: int):
        super().__init__()
        self.maxlen = maxlen

    def append(self, item) -> None:
        super().append(item)
        if len(self) > self.maxlen:
            del self[: len(self) - self.maxlen]


fallbacks: list[tuple[str, str]] = _Latest(MAX_FALLBACK_RECORDS)
"""(op name, reason) of the latest fallbacks since the last :func:`clear` (at most
:data:`MAX_FALLBACK_RECORDS`)."""

fallback_counts: Counter = Counter()
"""(op name, reason) -> number of fallbacks since the last :func:`clear`."""

_warned: set[tuple[str, str]] = set()


class FallbackError(RuntimeError):
    """Raised in strict mode when an op would fall back from Triton to the reference."""


class FallbackWarning(RuntimeWarning):
    """An op ran its PyTorch reference where its Triton kernel was expected (once per op and reason)."""


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "0") not in ("", "0", "false", "False")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when Triton imports, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run kernels in this process, or None.

    ``triton.language`` defines its helpers (``tl.sum``, ``tl.max``, ...) with ``@triton.jit`` when
    it is first imported; imported without ``TRITON_INTERPRET=1`` they are compiled-only functions
    that the interpreter refuses to call, whatever the variable says later. Triton 3.6's
    interpreter also fails under numpy 2.4 or newer (it converts a 1-element array to ``int``,
    which numpy 2.4 refuses; Triton 3.7 squeezes first).
    """
    import numpy
    import triton
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    helper = getattr(standard, "sum", None)
    if helper is not None and not isinstance(helper, InterpretedFunction):
        return "triton was first imported without TRITON_INTERPRET=1, so its interpreter cannot run kernels"
    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter does not run under numpy {numpy.__version__} "
                "(Triton >= 3.7 or numpy < 2.4 does)")
    return None


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``3.6.0`` or ``2.4.0rc1``."""
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(re.match(r"\d*", minor).group() or 0)


@functools.lru_cache(maxsize=None)
def _wrapped(fn, interpreted: bool):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if interpreted:
        return fn if isinstance(fn, InterpretedFunction) else InterpretedFunction(fn.fn)
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the ``@triton.jit`` function, its grid, positional
    arguments and keyword arguments (constexprs and ``num_warps``/``num_stages``)."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)


_recorded: list[Launch] | None = None


@contextlib.contextmanager
def recording_launches():
    """Inside this block the launchers take their GPU path for CPU tensors (GPU launch configs,
    no interpreter) and every launch is recorded as a :class:`Launch` instead of run.

    ``neuroflow.tooling.compile_check`` compiles exactly those launches for sm_80/sm_90, so what it
    inspects is the binary the runtime would build from the launcher's own arguments (argument
    types, constexprs and the runtime's divisibility/alignment specialisation).
    """
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


def recording() -> bool:
    return _recorded is not None


def gpu_launch(device: torch.device) -> bool:
    """Whether a launch on ``device`` uses GPU launch configs: CUDA, or a recorded launch."""
    return device.type == "cuda" or recording()


class _Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            _recorded.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return record


def launchable(kernel, device: torch.device):
    """``kernel`` (a ``@triton.jit`` function) in the form that runs on ``device``.

    ``@triton.jit`` decides between a compiled and an interpreted function when the kernel's module
    is imported (``TRITON_INTERPRET`` at that moment), and a compiled one cannot be launched on CPU
    tensors. Re-wrapping the same Python function lets the choice follow the tensors' device, so
    the order in which modules were imported does not matter.
    """
    if recording():
        return _Recorder(_wrapped(kernel, False))
    return _wrapped(kernel, device.type == "cpu")


def wants_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` are meant to take the Triton path."""
    return device.type == "cuda" or recording() or (device.type == "cpu" and interpreting())


def choose(op: str, device: torch.device, unsupported: str | None = None) -> str:
    """Pick and record the path for one call of ``op``.

    Args:
        device: where the op's tensors live.
        unsupported: why the kernel cannot take this call (None when it can).
    Returns:
        :data:`TRITON` or :data:`REFERENCE`.
    """
    path = REFERENCE
    if wants_triton(device):
        reason = triton_import_error() or unsupported
        if reason is None and device.type == "cpu" and not recording():
            reason = interpreter_problem()
        if reason is None:
            path = TRITON
        else:
            if strict():
                raise FallbackError(f"{op}: the Triton path cannot run ({reason}) and {STRICT_ENV}=1 forbids a fallback")
            fallbacks.append((op, reason))
            fallback_counts[(op, reason)] += 1
            if (op, reason) not in _warned:
                _warned.add((op, reason))
                warnings.warn(f"{op}: running the PyTorch reference instead of the Triton kernel ({reason}); "
                              f"set {STRICT_ENV}=1 to make this an error", FallbackWarning, stacklevel=3)
    last_path[op] = path
    counts[(op, path)] += 1
    return path


def clear() -> None:
    """Forget recorded paths, counts and fallbacks."""
    last_path.clear()
    counts.clear()
    fallbacks.clear()
    fallback_counts.clear()
    _warned.clear()
