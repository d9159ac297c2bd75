"""Time spent per stage of a frame (gate, encoder, readout), for benchmarks.

Off by default and then free. Inside ``with StageTimer(device) as timer:`` every
``with stage("encoder"):`` block in the engine adds its wall time to ``timer.ms["encoder"]``,
synchronising the device at both ends so GPU work is charged to the stage that launched it (the
synchronisation itself costs time: compare totals only between runs that were both timed).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections import defaultdict

import torch

_active: contextvars.ContextVar["StageTimer | None"] = contextvars.ContextVar("neuroflow_stage_timer", default=None)


class StageTimer:
    """Accumulates milliseconds per stage name while active (a context manager)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.ms: dict[str, float] = defaultdict(float)
        self._token = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "StageTimer":
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.reset(self._token)


@contextlib.contextmanager
def stage(name: str):
    """Charge the enclosed work to stage ``name`` of the active :class:`StageTimer`, if any."""
    # Under torch.compile nothing is timed (a timer syncs on the host): the stage is transparent,
    # so the compiled step does not break its graph at every stage.
    timer = None if torch.compiler.is_compiling() else _active.get()
    if timer is None:
        yield
        return
    timer.sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        timer.sync()
        timer.ms[name] += 1e3 * (time.perf_counter() - start)
