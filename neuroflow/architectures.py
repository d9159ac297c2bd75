"""Architectures A, B and C: what runs after the gate, and what each stream remembers.

Each function takes the gate's packed tokens (:class:`Segments` tells which rows belong to which
stream and where they sit in its token grid) and the streams' state, and returns the model
outputs; state tensors are pool tensors updated in place at the batch's slots.

* **A** (MLP gating): attention over all tokens at every layer, the MLP only for computed tokens;
  an inactive token's output at layer l is its layer-l output from the last frame it was active
  (per-layer anchors, pre-LN order).
* **B** (elimination): the encoder and the readout see only the computed tokens.
* **C** (dual memory): the encoder sees only the computed tokens; a per-stream cache of final-layer
  outputs (before the final norm) is overwritten at their positions and the readout sees the
  whole cache. For models that pool a CLS token, the CLS token would otherwise see only the
  active patches, so by default the *last* layer runs with full context: each stream also caches
  every token's input to the last layer, and the last layer's queries (CLS, registers, active
  patches) attend to all of them (fresh for computed tokens, last-active for the rest). See
  ``README.md`` ("Architecture C for CLS models").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoder import run_layer_with_context, run_layers
from .fused_gate import cache_scatter
from .models import VisionAdapter, attention_block, mlp_block


@dataclass
class Segments:
    """Where the packed tokens of B streams belong.

    Attributes:
        cu_seqlens: ``[B + 1]`` int32 (device), offsets of each stream's rows.
        index: ``[T]`` int32 (device), position of each row in its stream's token grid.
        lengths: the B segment lengths on the host.
        tokens: T_tok, tokens per frame (prefix + patches).
    """

    cu_seqlens: torch.Tensor
    index: torch.Tensor
    lengths: list[int]
    tokens: int

    def split(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """``[T, D]`` -> B tensors ``[T_b, D]``."""
        return list(torch.split(packed, self.lengths))

    def positions(self) -> list[torch.Tensor]:
        return [p.long() for p in torch.split(self.index, self.lengths)]


@dataclass
class ArchResult:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None


def architecture_a(adapter: VisionAdapter, tokens: torch.Tensor, computed: torch.Tensor, anchors: torch.Tensor) -> tuple[ArchResult, torch.Tensor]:
    """Args:
    tokens: ``[B, T, D]`` encoder inputs of every token.
    computed: ``[B, T]`` bool, tokens computed this frame (prefix and active patches).
    anchors: ``[B, L, T, D]`` each token's layer outputs from its last active frame.
    Returns the outputs and the new anchors.
    """
    x = tokens
    new_anchors = anchors.clone()
    for layer, parts in enumerate(adapter.layers):
        h = attention_block(parts, x)
        out = anchors[:, layer].clone()
        out[computed] = mlp_block(parts, h[computed]).to(out.dtype)
        new_anchors[:, layer] = out
        x = out
    seq, pooled = adapter.readout(x)
    return ArchResult(seq, pooled), new_anchors


def architecture_b(adapter: VisionAdapter, packed: torch.Tensor, segments: Segments) -> ArchResult:
    """``last_hidden_state`` is the full grid with zeros at tokens that were not computed."""
    z_rows = run_layers(adapter.layers, segments.split(packed))
    batch, dim = len(z_rows), packed.shape[-1]
    longest = max(segments.lengths)
    z = packed.new_zeros(batch, longest, dim)
    pad = torch.ones(batch, longest, dtype=torch.bool, device=z.device)
    for b, r in enumerate(z_rows):
        z[b, : r.shape[0]] = r
        pad[b, : r.shape[0]] = False
    seq, pooled = adapter.readout(z, key_padding_mask=pad if pad.any() else None)
    full = seq.new_zeros(batch, segments.tokens, seq.shape[-1])
    for b, pos in enumerate(segments.positions()):
        full[b, pos] = seq[b, : pos.shape[0]]
    return ArchResult(full, pooled)


def architecture_c(
    adapter: VisionAdapter,
    packed: torch.Tensor,
    segments: Segments,
    slot: torch.Tensor,
    cache: torch.Tensor,
    context: torch.Tensor | None = None,
) -> ArchResult:
    """Args:
    slot: ``[B]`` int64, the streams' rows in the pools.
    cache: ``[S, T, D]`` pool of final-layer outputs (before the final norm), updated in place.
    context: ``[S, T, D]`` pool of inputs to the last layer, updated in place; given only for the
        full-context last layer of CLS models.
    """
    rows = segments.split(packed)
    if context is None:
        z_rows = run_layers(adapter.layers, rows)
    else:
        y_rows = run_layers(adapter.layers[:-1], rows)
        cache_scatter(context, slot, torch.cat(y_rows), segments.cu_seqlens, segments.index)
        z_rows = run_layer_with_context(adapter.layers[-1], y_rows, context[slot])
    cache_scatter(cache, slot, torch.cat(z_rows), segments.cu_seqlens, segments.index)
    seq, pooled = adapter.readout(cache[slot])
    return ArchResult(seq, pooled)
