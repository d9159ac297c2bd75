"""Architectures A, B and C: what runs after the gate, and what each stream remembers.

Every function takes the frames after the gate (:class:`GatedFrames`) and the state rows of their
streams, and returns the model outputs plus the new state rows; nothing is written in place, so
the engine commits state only once a whole call has succeeded.

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
from .models import VisionAdapter, attention_block, mlp_block


@dataclass
class GatedFrames:
    """A batch of B frames after the gate, in the model's token layout (prefix first).

    Attributes:
        tokens: ``[B, T, D]`` model dtype, encoder inputs of every token (T = P + N).
        computed: ``[B, T]`` bool, tokens computed this frame (prefix tokens and active patches).
        positions: B tensors ``[T_b]`` int64, ascending positions of the computed tokens.
    """

    tokens: torch.Tensor
    computed: torch.Tensor
    positions: list[torch.Tensor]

    @classmethod
    def build(cls, tokens: torch.Tensor, active: torch.Tensor, num_prefix: int) -> "GatedFrames":
        prefix = torch.ones(active.shape[0], num_prefix, dtype=torch.bool, device=active.device)
        computed = torch.cat([prefix, active], dim=1)
        positions = [row.nonzero().flatten() for row in computed]
        return cls(tokens=tokens, computed=computed, positions=positions)

    def rows(self, full: torch.Tensor) -> list[torch.Tensor]:
        """The computed tokens of ``full`` ``[B, T, D]``: B tensors ``[T_b, D]``."""
        return [full[b, pos] for b, pos in enumerate(self.positions)]

    def write(self, full: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        """A copy of ``full`` ``[B, T, D]`` with each stream's computed positions set from ``rows``."""
        out = full.clone()
        for b, (pos, row) in enumerate(zip(self.positions, rows)):
            out[b, pos] = row.to(out.dtype)
        return out


@dataclass
class ArchResult:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None
    state: dict[str, torch.Tensor]


def architecture_a(adapter: VisionAdapter, frames: GatedFrames, anchors: torch.Tensor) -> ArchResult:
    """Args: anchors ``[B, L, T, D]``: each token's layer outputs from its last active frame."""
    x = frames.tokens
    keep = frames.computed
    new_anchors = anchors.clone()
    for layer, parts in enumerate(adapter.layers):
        h = attention_block(parts, x)
        out = anchors[:, layer].clone()
        out[keep] = mlp_block(parts, h[keep]).to(out.dtype)
        new_anchors[:, layer] = out
        x = out
    seq, pooled = adapter.readout(x)
    return ArchResult(seq, pooled, {"anchors": new_anchors})


def architecture_b(adapter: VisionAdapter, frames: GatedFrames) -> ArchResult:
    """``last_hidden_state`` is the full grid with zeros at tokens that were not computed."""
    z_rows = run_layers(adapter.layers, frames.rows(frames.tokens))
    batch, tokens, dim = frames.tokens.shape
    longest = max(r.shape[0] for r in z_rows)
    z = frames.tokens.new_zeros(batch, longest, dim)
    pad = torch.ones(batch, longest, dtype=torch.bool, device=z.device)
    for b, r in enumerate(z_rows):
        z[b, : r.shape[0]] = r
        pad[b, : r.shape[0]] = False
    seq, pooled = adapter.readout(z, key_padding_mask=pad if pad.any() else None)
    full = frames.tokens.new_zeros(batch, tokens, seq.shape[-1])
    full = frames.write(full, [seq[b, : r.shape[0]] for b, r in enumerate(z_rows)])
    return ArchResult(full, pooled, {})


def architecture_c(
    adapter: VisionAdapter, frames: GatedFrames, cache: torch.Tensor, context: torch.Tensor | None = None
) -> ArchResult:
    """Args:
    cache: ``[B, T, D]`` final-layer outputs (before the final norm) from each token's last active frame.
    context: ``[B, T, D]`` inputs to the last layer, likewise; given only for the full-context
        last layer of CLS models, None otherwise.
    """
    rows = frames.rows(frames.tokens)
    state = {}
    if context is None:
        z_rows = run_layers(adapter.layers, rows)
    else:
        y_rows = run_layers(adapter.layers[:-1], rows)
        context = frames.write(context, y_rows)
        z_rows = run_layer_with_context(adapter.layers[-1], y_rows, context)
        state["context"] = context
    cache = frames.write(cache, z_rows)
    state["cache"] = cache
    seq, pooled = adapter.readout(cache)
    return ArchResult(seq, pooled, state)
