"""How many streams fit in a memory budget: weights + a stated activation reserve + per-stream state.

    from neuroflow.engine.memory import streams_that_fit
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

import torch
from torch import nn

from .engine import GIB, MemoryFit, NeuroFlow  # noqa: F401  (GIB, MemoryFit: re-exported)


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
    if isinstance(model, NeuroFlow):
        if settings:
            raise ValueError(f"pass settings to the NeuroFlow itself, not with it: {sorted(settings)}")
        nf = model
    else:
        if not isinstance(model, nn.Module):
            model = _meta_model(model, dtype or torch.float32)
        nf = NeuroFlow(model, **settings)
    return nf.streams_that_fit(height, width, gib, reserve_gib=reserve_gib, count_weights=count_weights)


def _meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The vision model of ``config`` with shapes only (``meta`` device)."""
    from transformers import AutoModel, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"model must be a NeuroFlow, a vision model or its transformers config, got {type(config).__name__}")
    with torch.device("meta"):
        return AutoModel.from_config(config).to(dtype)
