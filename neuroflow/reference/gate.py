"""The gate in plain PyTorch: the reference the gate kernels (``kernels/gate.py``, launched by
:func:`neuroflow.ops.gate.gate`) are tested against.

Two levels, two names:

* :func:`gate_decision_reference`: the decision alone, on given layer-0 embeddings ``[B, N, D]``
  (surprise, threshold, floor, EMA update, offsets);
* :func:`gate_reference`: the whole op with :func:`neuroflow.ops.gate.gate`'s contract (patch
  embedding, decision, in-place EMA update, packing of the computed tokens), as the unfused chain.

Per stream, per patch i, frame t (``../shared/method.md``):

* first frame after a reset: every patch is active and ``E_i := h_i``;
* later frames: ``s_i = 1 - cos(h_i, E_i)`` over all D channels, active iff ``s_i > threshold``;
  when fewer than ``floor_tokens`` pass, the ``floor_tokens`` most surprising patches are taken
  instead (ties: lower patch index first), then ``E_i := (1 - decay) E_i + decay h_i`` for every
  patch, active or not.

The EMA is float32 (float64 for a float64 model) whatever the model dtype: with decay 0.01 a
half-precision EMA rounds the update away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-8
"""Each norm in the cosine is clamped to at least this, so an all-zero embedding has surprise 1."""

FIRST_FRAME_SURPRISE = float("inf")
"""Surprise reported for first frames: there is no EMA to compare with, every patch is active."""


def ema_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for a float64 model."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


@dataclass
class GateDecision:
    """What the gate decides for a batch of B frames with N patches each.

    Attributes:
        ema: ``[B, N, D]`` float32, the EMA after this frame (a new tensor; the input is untouched).
        surprise: ``[B, N]`` float32, ``1 - cos(h, E)``; ``inf`` on first frames.
        active: ``[B, N]`` bool, which patches go through the encoder.
        cu_seqlens: ``[B + 1]`` int32, offsets of each frame's active patches in ``index``.
        index: ``[T]`` int64, patch index (within its frame) of each active patch; frames in batch
            order, patches ascending.
    """

    ema: torch.Tensor
    surprise: torch.Tensor
    active: torch.Tensor
    cu_seqlens: torch.Tensor
    index: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """``[B]`` int64, active patches per frame."""
        return self.active.sum(dim=1)

    def pack(self, tokens: torch.Tensor) -> torch.Tensor:
        """Gather the active rows of ``tokens`` ``[B, N, D]`` into ``[T, D]`` (stream-major, ascending)."""
        rows = torch.repeat_interleave(torch.arange(tokens.shape[0], device=tokens.device), self.counts)
        return tokens[rows, self.index]


def cosine_surprise(h: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:
    """``1 - cos(h, ema)`` along the last dim, in the EMA's precision. ``[..., D] -> [...]``."""
    h = h.to(ema.dtype)
    dot = (h * ema).sum(-1)
    norms = h.norm(dim=-1).clamp_min(COSINE_EPS) * ema.norm(dim=-1).clamp_min(COSINE_EPS)
    return 1.0 - dot / norms


def select_active(surprise: torch.Tensor, threshold: float | torch.Tensor, floor_tokens: int) -> torch.Tensor:
    """Strict threshold with the top-surprise floor. ``[B, N]`` float -> ``[B, N]`` bool.

    ``threshold`` is one number or one per frame (``[B]`` tensor)."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(surprise.dtype).view(-1, 1)
    passed = surprise > threshold
    k = min(floor_tokens, surprise.shape[1])
    if k == 0:
        return passed
    # A stable descending sort ranks equal surprises by patch index, so the floor is deterministic.
    order = torch.sort(surprise, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(surprise.shape[1], device=surprise.device).expand_as(order))
    short = passed.sum(dim=1, keepdim=True) < k
    return torch.where(short, rank < k, passed)


def gate_decision_reference(
    h: torch.Tensor,
    ema: torch.Tensor,
    first: torch.Tensor,
    threshold: float,
    ema_decay: float,
    floor_tokens: int,
    force_active: torch.Tensor | None = None,
) -> GateDecision:
    """Gate a batch of frames, one frame per stream.

    Args:
        h: ``[B, N, D]`` layer-0 patch embeddings (patch embedding + position embedding), any
            float dtype.
        ema: ``[B, N, D]`` float32 EMA rows of the frames' streams (ignored where ``first``).
        first: ``[B]`` bool, True for a stream's first frame after a reset.
        threshold: surprise threshold (strict ``>``); a number, or a ``[B]`` tensor (one per frame,
            e.g. per-clip settings when training).
        ema_decay: EMA update weight of the new frame, in [0, 1]; a number or a ``[B]`` tensor.
        floor_tokens: minimum active patches per later frame.
        force_active: optional ``[B, N]`` bool used instead of the threshold/floor decision on
            later frames (baselines that choose patches another way).
    """
    first_rows = first.view(-1, 1)
    hf = h.to(ema.dtype)
    surprise = torch.where(first_rows, FIRST_FRAME_SURPRISE, cosine_surprise(hf, ema)).float()
    chosen = select_active(surprise, threshold, floor_tokens) if force_active is None else force_active
    active = torch.where(first_rows, True, chosen)
    if isinstance(ema_decay, torch.Tensor):
        ema_decay = ema_decay.to(ema.dtype).view(-1, 1, 1)
    new_ema = torch.where(first_rows.unsqueeze(-1), hf, (1.0 - ema_decay) * ema + ema_decay * hf)
    counts = active.sum(dim=1)
    cu_seqlens = torch.zeros(h.shape[0] + 1, dtype=torch.int32, device=h.device)
    cu_seqlens[1:] = torch.cumsum(counts, 0)
    index = active.nonzero()[:, 1]
    return GateDecision(ema=new_ema, surprise=surprise, active=active, cu_seqlens=cu_seqlens, index=index)


@dataclass
class PackedFrames:
    """The gate's output for B frames of N patches, P prefix tokens per frame.

    Attributes:
        surprise: ``[B, N]`` float32, ``1 - cos(h, EMA)`` (``inf`` on first frames).
        active: ``[B, N]`` bool.
        cu_seqlens: ``[B + 1]`` int32; segment b = frame b's P prefix tokens then its active patches.
        index: ``[B * (P + N)]`` int32, position in the frame's token sequence of each packed
            token (prefix j -> j, patch n -> P + n); rows past ``cu_seqlens[-1]`` are unused.
        packed: ``[B * (P + N), D]`` model dtype, layer-0 embeddings of the packed tokens; rows past
            ``cu_seqlens[-1]`` are unused (not written).
        num_prefix: P.
    """

    surprise: torch.Tensor
    active: torch.Tensor
    cu_seqlens: torch.Tensor
    index: torch.Tensor
    packed: torch.Tensor
    num_prefix: int

    @property
    def max_seqlen(self) -> int:
        """Upper bound on a segment's length, known without a device sync."""
        return self.num_prefix + self.active.shape[1]


def check_gate_args(frames, weight, pos_embed, prefix, ema, slot, first) -> tuple[int, int, int]:
    b, c, h, w = frames.shape
    d, wc, p, p2 = weight.shape
    if wc != c or p != p2 or h % p or w % p:
        raise ValueError(f"frames {tuple(frames.shape)} do not fit a {p}x{p2} patch weight over {wc} channels")
    n = (h // p) * (w // p)
    if pos_embed.shape != (n, d) or prefix.shape[1:] != (d,):
        raise ValueError(f"position embeddings {tuple(pos_embed.shape)} / prefix {tuple(prefix.shape)} do not fit N={n}, D={d}")
    if ema.dim() != 3 or ema.shape[1:] != (n, d) or not ema.is_floating_point():
        raise ValueError(f"EMA pool must be [S, {n}, {d}] float, got {tuple(ema.shape)} {ema.dtype}")
    if slot.shape != (b,) or first.shape != (b,):
        raise ValueError("slot and first need one entry per frame")
    return n, d, p


def gate_reference(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay, floor_tokens,
                   force_active=None) -> PackedFrames:
    """Same contract as :func:`neuroflow.ops.gate.gate`, as the unfused PyTorch chain (conv, add,
    cosine, compare, sort, gather)."""
    n, d, p = check_gate_args(frames, weight, pos_embed, prefix, ema, slot, first)
    h = F.conv2d(frames, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed
    decided = gate_decision_reference(h, ema[slot], first, threshold, ema_decay, floor_tokens, force_active)
    with torch.no_grad():
        ema.index_copy_(0, slot, decided.ema.to(ema.dtype))
    b, num_prefix = frames.shape[0], prefix.shape[0]
    counts = decided.counts + num_prefix
    cu = torch.zeros(b + 1, dtype=torch.int32, device=frames.device)
    cu[1:] = torch.cumsum(counts, 0)
    tokens = torch.cat([prefix.to(h.dtype).expand(b, -1, -1), h], dim=1)  # [B, P + N, D]
    computed = torch.cat([torch.ones(b, num_prefix, dtype=torch.bool, device=h.device), decided.active], dim=1)
    rows, pos = computed.nonzero(as_tuple=True)
    cap = b * (num_prefix + n)
    packed = tokens.new_empty(cap, d)
    index = torch.empty(cap, dtype=torch.int32, device=h.device)
    packed[: rows.shape[0]] = tokens[rows, pos]
    index[: rows.shape[0]] = pos.to(torch.int32)
    return PackedFrames(decided.surprise, decided.active, cu, index, packed, num_prefix)
