"""The encoder on packed tokens: every stream's computed tokens in one ``[T, D]`` sequence.

Token-wise ops (layer norms, projections, MLP) run on the packed rows directly; attention runs
through the registered op ``torch.ops.neuroflow.varlen_attention`` (:mod:`neuroflow.ops.library`;
the Python launcher when a gradient is needed) with ``cu_seqlens``, so it only mixes tokens of
the same stream (the Triton kernel on CUDA, the per-segment reference on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from typing import Callable

from .families import LayerParts, mlp_block
from ..ops.library import attend


@dataclass
class Packed:
    """Where the packed tokens of B streams belong; everything the host needs is known without
    reading the device (see :mod:`neuroflow.engine.capacity`).

    Attributes:
        cu_seqlens: ``[B + 1]`` int32 (device), offsets of each stream's rows; the real row count
            ``T = cu_seqlens[-1]`` stays on the device.
        index: ``[C]`` int32 (device), position of each row in its stream's token grid (rows past
            ``T`` are padding: never scattered, never attended to).
        num_frames: B.
        tokens: T_tok, tokens per frame (prefix + patches).
        capacity: C, rows of the packed buffers (host int, >= T).
        max_seqlen: host upper bound on a segment's length.
    """

    cu_seqlens: torch.Tensor
    index: torch.Tensor
    num_frames: int
    tokens: int
    capacity: int
    max_seqlen: int

    @classmethod
    def exact(cls, cu_seqlens: torch.Tensor, index: torch.Tensor, lengths: list[int], tokens: int) -> "Packed":
        """Segments of known host ``lengths`` (capacity = their sum, bound = the longest)."""
        return cls(cu_seqlens, index, len(lengths), tokens, sum(lengths), max(lengths, default=0))

    @property
    def total(self) -> int:
        """Rows of the packed buffers (the capacity; the real count may be smaller)."""
        return self.capacity

    def frame_of(self) -> torch.Tensor:
        """``[C]`` int64 (device): the stream (batch row) of each packed row (padding rows past
        ``cu_seqlens[-1]`` get B - 1; mask them with :meth:`valid`)."""
        r = torch.arange(self.capacity, device=self.cu_seqlens.device)
        return torch.searchsorted(self.cu_seqlens[1:].to(torch.int64), r, right=True).clamp_max(self.num_frames - 1)

    def valid(self) -> torch.Tensor:
        """``[C]`` bool (device): rows that hold a token (before ``cu_seqlens[-1]``)."""
        return torch.arange(self.capacity, device=self.cu_seqlens.device) < self.cu_seqlens[-1]

    def first_rows(self) -> torch.Tensor:
        """``[B]`` int64 (device): the first row of each stream (its CLS token when it has one)."""
        return self.cu_seqlens[:-1].long()


def _heads(x: torch.Tensor, parts: LayerParts) -> torch.Tensor:
    return x.view(x.shape[0], parts.num_heads, -1)


def packed_layer(parts: LayerParts, x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """One encoder layer on ``x`` ``[T, D]``; attention within each stream's segment."""
    nx = parts.norm1(x)
    cu = packed.cu_seqlens
    o = attend(_heads(parts.q(nx), parts), _heads(parts.k(nx), parts), _heads(parts.v(nx), parts),
                         cu, cu, packed.max_seqlen, packed.max_seqlen, scale=parts.scale)
    x = x + parts.scale1(parts.o(o.reshape(x.shape[0], -1)))
    return mlp_block(parts, x)


def run_packed(layers: list[LayerParts], x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """``layers`` on packed tokens ``[T, D]`` -> ``[T, D]``."""
    for parts in layers:
        x = packed_layer(parts, x, packed)
    return x


def packed_layer_cached_kv(
    parts: LayerParts,
    x: torch.Tensor,
    packed: Packed,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    store_kv: Callable[[torch.Tensor, torch.Tensor], None],
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer whose queries are the packed tokens and whose keys/values are every token of
    their stream: fresh for the packed tokens (written into the caches first), cached for the rest.

    Args:
        x: ``[T, D]`` packed residual stream.
        rows: ``[B]`` int64, each stream's row in the caches.
        k_cache, v_cache: ``[R, T_tok, H * Dh]`` keys / values of this layer (any float dtype: the
            attention runs in it; or int8 / float8_e4m3fn with ``k_scale``/``v_scale``
            ``[R, T_tok, H]``: dequantised in the attention's loads, which run in x's dtype),
            read in place by the attention.
        store_kv: writes the fresh keys and values ``[T, H * Dh]`` into ``k_cache``/``v_cache`` at
            the packed tokens' positions (the caller owns the state, see
            :class:`neuroflow.engine.streams.StreamBatch`).
    """
    nx = parts.norm1(x)
    k, v = parts.k(nx), parts.v(nx)
    store_kv(k, v)
    t_tok = packed.tokens
    b = packed.num_frames
    cu_k = torch.arange(b + 1, dtype=torch.int32, device=x.device) * t_tok
    heads, head_dim = parts.num_heads, parts.head_dim
    scales = {}
    if k_scale is not None:
        scales = dict(k_scale=k_scale.view(-1, heads), v_scale=v_scale.view(-1, heads))
    q_dtype = x.dtype if k_scale is not None else k_cache.dtype
    o = attend(
        _heads(parts.q(nx), parts).to(q_dtype),
        k_cache.view(-1, heads, head_dim),
        v_cache.view(-1, heads, head_dim),
        packed.cu_seqlens, cu_k, packed.max_seqlen, t_tok, scale=parts.scale, kv_start=rows * t_tok, **scales,
    )
    x = x + parts.scale1(parts.o(o.to(x.dtype).reshape(x.shape[0], -1)))
    return mlp_block(parts, x)
