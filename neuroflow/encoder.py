"""The encoder on token subsets: every stream runs its own tokens through the model's layers.

Reference path: streams with equal token counts are stacked into one ``[b, T, D]`` batch, so the
layers see ordinary dense batches and no mask is involved; attention never mixes streams.
(The packed varlen path, where all streams share one sequence with ``cu_seqlens``, replaces
this grouping on the GPU.)
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .models import LayerParts, layer_forward


def _groups(lengths: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for row, n in enumerate(lengths):
        groups[n].append(row)
    return groups


def run_layers(layers: list[LayerParts], rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``layers`` on each row's own tokens.

    Args:
        rows: B tensors ``[T_b, D]``, one per stream (the tokens it computes this frame).
    Returns:
        B tensors ``[T_b, D]``, the rows after the last layer.
    """
    out: list[torch.Tensor | None] = [None] * len(rows)
    for _, members in _groups([r.shape[0] for r in rows]).items():
        x = torch.stack([rows[i] for i in members])
        for parts in layers:
            x = layer_forward(parts, x)
        for j, i in enumerate(members):
            out[i] = x[j]
    return out  # type: ignore[return-value]


def run_layer_with_context(parts: LayerParts, rows: list[torch.Tensor], context: torch.Tensor) -> list[torch.Tensor]:
    """One layer whose queries are each row's tokens and whose keys/values are its full context.

    Args:
        rows: B tensors ``[T_b, D]``: the residual stream of the tokens computed this frame.
        context: ``[B, T, D]``: the residual stream of every token of each stream (computed
            tokens already written in).
    Returns:
        B tensors ``[T_b, D]``.
    """
    out: list[torch.Tensor | None] = [None] * len(rows)
    for _, members in _groups([r.shape[0] for r in rows]).items():
        x = torch.stack([rows[i] for i in members])
        y = layer_forward(parts, x, context=context[members])
        for j, i in enumerate(members):
            out[i] = y[j]
    return out  # type: ignore[return-value]
