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
    store_kv: Callable[[torch.Tensor, torch.Tensor, Packed], None],
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
        store_kv: ``store_kv(k, v, packed)`` writes the fresh keys and values ``[T, H * Dh]`` into
            ``k_cache``/``v_cache`` at the packed tokens' positions (the caller owns the state, see
            :class:`neuroflow.engine.streams.StreamBatch`).
    """
    nx = parts.norm1(x)
    return _attend_cached(parts, x, nx, parts.k(nx), parts.v(nx), packed, rows, k_cache, v_cache, store_kv,
                          k_scale, v_scale)


def packed_layer_cached_kv_gated(
    parts: LayerParts,
    x: torch.Tensor,
    packed: Packed,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    store_kv: Callable[[torch.Tensor, torch.Tensor, Packed], None],
    threshold: float,
    keep_frames: torch.Tensor,
    num_prefix: int,
    exact: bool,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Packed, torch.Tensor]:
    """:func:`packed_layer_cached_kv` behind a per-layer gate (``NeuroFlow(layer_threshold=...)``).

    Each packed token's fresh key is compared with its cached key, the one it had when this layer
    last computed it (:func:`key_surprise`). A patch whose key moved by at most ``threshold``
    (``1 - cos``) drops out here: its keys/values at this and deeper layers and its output stay
    as cached, and the layer runs (queries, value projection, attention, MLP) on the rest. Prefix
    tokens (CLS, registers) and every token of a frame in ``keep_frames`` ``[B]`` bool (first
    frames, keyframes: dense by rule) always continue.

    ``exact``: shrink the packed buffers to the kept rows (one device->host read of the count;
    free on the CPU); else keep the capacity, kept rows first (no host read; see
    :func:`compact`). Returns ``(x' [T', D], packed', entered [B] int64)``: the layer's output
    rows, where they belong, and how many tokens of each frame entered the layer (the dropped
    ones too: their key was computed).
    """
    nx = parts.norm1(x)
    k = parts.k(nx)
    frame, valid = packed.frame_of(), packed.valid()  # once per layer, for the comparison and the compaction
    keep = ((key_surprise(k, k_cache, rows, packed, frame, valid, k_scale) > threshold)
            | (packed.index < num_prefix) | keep_frames[frame])
    entered = packed.cu_seqlens.diff().to(torch.int64)
    packed, (x, nx, k) = compact(packed, keep & valid, frame, x, nx, k, exact=exact)
    x = _attend_cached(parts, x, nx, k, parts.v(nx), packed, rows, k_cache, v_cache, store_kv, k_scale, v_scale)
    return x, packed, entered


def key_surprise(k: torch.Tensor, k_cache: torch.Tensor, rows: torch.Tensor, packed: Packed, frame: torch.Tensor,
                 valid: torch.Tensor, k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - cos`` ``[C]`` float32 of each packed token's fresh key ``k`` ``[C, H * Dh]`` against
    its key in ``k_cache`` ``[R, T_tok, H * Dh]`` (stream ``b``'s keys at row ``rows[b]``;
    8-bit caches dequantised with ``k_scale`` ``[R, T_tok, H]``). ``frame``, ``valid``: the
    packing's :meth:`Packed.frame_of` and :meth:`Packed.valid`. A zero cached key (a position
    never computed) gives 1. Padding rows (their index is undefined) read position 0 and get a
    value that nothing reads."""
    r, pos = rows[frame].long(), torch.where(valid, packed.index.long(), 0)
    old = k_cache[r, pos].float()
    if k_scale is not None:
        heads = k_scale.shape[-1]
        old = (old.view(old.shape[0], heads, -1) * k_scale[r, pos].unsqueeze(-1)).view(old.shape[0], -1)
    return 1.0 - torch.nn.functional.cosine_similarity(k.float(), old, dim=-1, eps=1e-12)


def compact(packed: Packed, keep: torch.Tensor, frame: torch.Tensor, *tensors: torch.Tensor, exact: bool
            ) -> tuple[Packed, list[torch.Tensor]]:
    """Keep the packed rows where ``keep`` ``[C]`` bool is set (False on every padding row), in
    order, so each stream's rows stay one segment. ``frame``: :meth:`Packed.frame_of`.
    ``tensors``: ``[C, ...]`` rows to keep alike.

    ``exact``: the buffers shrink to the kept rows (at least one: a padding row when none is
    kept), which reads the count on the host. Else the capacity C stays, the kept rows first and
    zero padding rows after, with nothing read on the host (the sync-free path; the work on the
    padding rows is not saved).
    """
    lengths = torch.zeros(packed.num_frames, dtype=torch.int64, device=keep.device)
    lengths.index_add_(0, frame, keep.to(torch.int64))
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    if exact:
        picked = keep.nonzero().flatten()
        if picked.numel() == 0:
            picked = keep.new_zeros(1, dtype=torch.int64)
        out = [t.index_select(0, picked) for t in (packed.index, *tensors)]
        capacity = picked.numel()
    else:
        # Dropped rows all land on one dump row past the end (duplicate targets: any one wins).
        dest = torch.where(keep, keep.to(torch.int64).cumsum(0) - 1, packed.capacity)
        out = [t.new_zeros(packed.capacity + 1, *t.shape[1:]).index_copy_(0, dest, t)[:-1]
               for t in (packed.index, *tensors)]
        capacity = packed.capacity
    return Packed(cu, out[0], packed.num_frames, packed.tokens, capacity, packed.max_seqlen), out[1:]


def _attend_cached(parts: LayerParts, x: torch.Tensor, nx: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   packed: Packed, rows: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   store_kv: Callable[[torch.Tensor, torch.Tensor, Packed], None],
                   k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    """The rest of :func:`packed_layer_cached_kv` once ``nx = norm1(x)``, ``k`` and ``v`` exist."""
    store_kv(k, v, packed)
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
