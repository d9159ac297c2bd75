"""How many streams fit in a memory budget: weights + a stated activation reserve + per-stream state.

    from neuroflow.memory import streams_that_fit
    fit = streams_that_fit(model, 448, 448, gib=80, reserve_gib=8, arch="KV", kv_layers=3)
    fit.streams, fit.per_stream["total"], fit.summary()

What is counted, exactly:

* **weights**: the parameters and buffers of the vision model NeuroFlow runs (for a
  ``SiglipModel`` / ``CLIPModel`` only its vision tower; a text tower you keep loaded is yours to
  add to ``reserve_gib``), at their dtype. ``count_weights=False`` leaves them out.
* **reserve**: ``reserve_gib`` as stated by the caller, for everything that is not stream state:
  activations of the largest batch you run, the CUDA context, allocator slack. Nothing here
  estimates it (measure it: peak memory of one dense batch is an upper bound for a gated one).
* **state**: :meth:`neuroflow.NeuroFlow.state_bytes_per_stream` at ``height x width`` for these
  settings (architecture, ``kv_layers``, ``cache_dtype`` and, where available, 8-bit cache
  scales, ``head_cache``): derived from the architecture's state specs, so it is exactly what a
  stream pool allocates per slot.

``streams = floor((budget - weights - reserve) / state per stream)``. A pool holds *slots*, not
streams: it grows to ``max(needed, 2 x capacity, 4)`` slots, so streams admitted a few per call can
leave up to about twice as many slots allocated as streams held (and, while it grows, the old and
the new pool exist together). Admitting the streams in one call allocates exactly
``max(streams, 4)`` slots. Budgets are in GiB (``2**30`` bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

GIB = 2**30


@dataclass(frozen=True)
class MemoryFit:
    """The answer of :func:`streams_that_fit` (all sizes in bytes).

    Attributes:
        streams: streams whose state fits beside the weights and the reserve (0 when none does).
        per_stream: state per stream by tensor name, plus ``"total"``.
        weight_bytes: the vision model's parameters and buffers (0 with ``count_weights=False``).
        reserve_bytes: the stated activation reserve.
        budget_bytes: the whole budget.
        height, width: the frame size; tokens: tokens per frame (prefix + patches).
        settings: the architecture settings the state was computed for (as in a saved state's config).
    """

    streams: int
    per_stream: dict[str, int]
    weight_bytes: int
    reserve_bytes: int
    budget_bytes: int
    height: int
    width: int
    tokens: int
    settings: dict = field(default_factory=dict)

    @property
    def state_budget_bytes(self) -> int:
        """What is left for stream state (negative when weights and reserve alone exceed the budget)."""
        return self.budget_bytes - self.weight_bytes - self.reserve_bytes

    def state_bytes(self, streams: int) -> int:
        """State of ``streams`` streams (pool slots) at this size."""
        return streams * self.per_stream["total"]

    def summary(self) -> str:
        mib = 2**20
        return (f"{self.streams} streams at {self.height}x{self.width} ({self.tokens} tokens): "
                f"{self.per_stream['total'] / mib:,.1f} MiB state each, weights {self.weight_bytes / mib:,.1f} MiB, "
                f"reserve {self.reserve_bytes / mib:,.1f} MiB, budget {self.budget_bytes / GIB:g} GiB")


def streams_that_fit(model, height: int, width: int, gib: float, *, reserve_gib: float = 0.0,
                     count_weights: bool = True, dtype: torch.dtype | None = None, **settings) -> MemoryFit:
    """How many streams of ``model`` at ``height x width`` fit in ``gib`` GiB.

    Args:
        model: a :class:`neuroflow.NeuroFlow` (its own settings are used: pass no ``settings``),
            a supported Hugging Face vision model (``nn.Module``), or its ``PretrainedConfig``
            (built on the ``meta`` device: shapes only, nothing allocated).
        height, width: frame size in pixels (multiples of the patch size).
        gib: the memory budget in GiB.
        reserve_gib: memory set aside for activations, the CUDA context and allocator slack (stated
            by the caller; see the module docstring).
        count_weights: include the vision model's parameters and buffers.
        dtype: the dtype the model runs in when ``model`` is a config (default float32); ignored
            otherwise (a module is counted at its own dtype).
        settings: ``NeuroFlow`` keyword arguments (``arch``, ``kv_layers``, ``cache_dtype``,
            ``head_cache``, ``cls_readout``...), validated as ``NeuroFlow`` does.
    """
    from .engine import NeuroFlow

    if not (isinstance(gib, (int, float)) and not isinstance(gib, bool) and gib > 0):
        raise ValueError(f"gib must be a positive number, got {gib!r}")
    if not (isinstance(reserve_gib, (int, float)) and not isinstance(reserve_gib, bool) and reserve_gib >= 0):
        raise ValueError(f"reserve_gib must be a number >= 0, got {reserve_gib!r}")
    if isinstance(model, NeuroFlow):
        if settings:
            raise ValueError(f"pass settings to the NeuroFlow itself, not with it: {sorted(settings)}")
        nf = model
    else:
        if not isinstance(model, nn.Module):
            model = _meta_model(model, dtype or torch.float32)
        nf = NeuroFlow(model, **settings)
    a = nf.adapter
    if height <= 0 or width <= 0 or height % a.patch_size or width % a.patch_size:
        raise ValueError(f"height and width must be positive multiples of the patch size {a.patch_size}, "
                         f"got {height}x{width}")
    per_stream = nf.state_bytes_per_stream(height, width)
    weights = _module_bytes(a.model) if count_weights else 0
    budget, reserve = int(gib * GIB), int(reserve_gib * GIB)
    left = budget - weights - reserve
    grid = a.grid(height, width)
    return MemoryFit(
        streams=max(0, left // per_stream["total"]),
        per_stream=per_stream,
        weight_bytes=weights,
        reserve_bytes=reserve,
        budget_bytes=budget,
        height=height,
        width=width,
        tokens=a.num_prefix + grid[0] * grid[1],
        settings=nf.architecture.config(),
    )


def _module_bytes(module: nn.Module) -> int:
    """Parameters and buffers of ``module`` (each tensor once, even when shared)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The vision model of ``config`` with shapes only (``meta`` device)."""
    from transformers import AutoModel, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"model must be a NeuroFlow, a vision model or its transformers config, got {type(config).__name__}")
    with torch.device("meta"):
        return AutoModel.from_config(config).to(dtype)
