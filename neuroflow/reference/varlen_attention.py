"""Varlen (packed, per-segment) attention in plain PyTorch: the argument contract both paths check,
and the reference ``kernels/varlen_attention.py`` is tested against (the launcher is
:func:`neuroflow.ops.varlen_attention.varlen_attention`).


Tokens of B segments are packed along the first axis: ``q`` is ``[Tq, H, Dh]`` and segment ``b``
owns query rows ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1``. Its queries attend (non-causal) to
its own ``L_k(b) = cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` keys and values, which are rows
``kv_start[b] .. kv_start[b] + L_k(b) - 1`` of ``k`` and ``v`` (``kv_start`` defaults to
``cu_seqlens_k[:-1]``, i.e. keys packed like the queries). With ``kv_start[b] = slot[b] * T`` the
active queries of a stream attend to that stream's per-stream key/value cache ``[S * T, H, Dh]``
in place, without gathering it.

Conventions shared by both paths:

* A query whose segment has no keys gets an output of zeros (its softmax has no support).
* Query rows outside ``cu_seqlens_q[0] .. cu_seqlens_q[-1] - 1`` belong to no segment: the kernel
  does not write them (they keep whatever ``out`` held; unspecified without ``out``), the
  reference returns zeros there.
* ``max_seqlen_q`` must bound every query segment (it sizes the grid); ``max_seqlen_k`` every key
  segment (kept for flash-attn compatibility; the kernel loops to each segment's real length).

* 8-bit key/value caches: ``k``/``v`` may be int8 or float8_e4m3fn with ``k_scale``/``v_scale``
  ``[Tk_rows, H]`` (float32 or float16): key row r of head h is ``k[r, h].float() * k_scale[r, h]``
  (the caches :func:`neuroflow.ops.cache_scatter.cache_scatter` writes with a scale). The reference
  dequantises, then runs SDPA in q's dtype (float64 for a float64 q).

On CUDA the launcher never reads device tensors on the host (no synchronisation): the contents of
``cu_seqlens_*``/``kv_start`` are trusted there, as in flash-attn, and ``max_seqlen_*`` are only
upper bounds. On the CPU (the reference, or the Triton interpreter) reading them is free, so they
are checked and violations raise ``ValueError``; set ``NEUROFLOW_DEBUG_CHECKS=1`` to check them on
CUDA too (one host sync per call).
"""

from __future__ import annotations

import math
import operator
import os

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# argument checks shared by both paths
# --------------------------------------------------------------------------------------------

DEBUG_ENV = "NEUROFLOW_DEBUG_CHECKS"
"""Set to ``1`` to check offset values on CUDA too (a host sync per call)."""

KV_8BIT_DTYPES = (torch.int8, torch.float8_e4m3fn)
"""Dtypes of 8-bit key/value caches (with per-row, per-head scales)."""

SCALE_DTYPES = (torch.float32, torch.float16)


def debug_checks() -> bool:
    """Whether ``NEUROFLOW_DEBUG_CHECKS=1``: host-side value checks of device offsets on CUDA."""
    return os.environ.get(DEBUG_ENV, "") == "1"


def _as_int(name: str, value) -> int:
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a host int, got {type(value).__name__}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a host int, got {type(value).__name__}") from None
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


def _check_index_tensor(name: str, t, length: int | None, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")


def check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start, out,
                      k_scale=None, v_scale=None):
    """Shape/dtype/device checks that need no device data. Returns (B, max_q, max_k, scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    quantised = k.dtype in KV_8BIT_DTYPES or v.dtype in KV_8BIT_DTYPES
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point() and not (name != "q" and t.dtype in KV_8BIT_DTYPES):
            raise TypeError(f"{name} must be a floating-point tensor (k, v may be int8), got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"k/v heads and head dim {tuple(k.shape[1:])} differ from q's {tuple(q.shape[1:])}")
    if q.shape[2] == 0:
        raise ValueError("head_dim must be >= 1")
    if quantised or k_scale is not None or v_scale is not None:
        if k.dtype != v.dtype or k.dtype not in KV_8BIT_DTYPES:
            raise TypeError(f"k_scale/v_scale go with int8 or float8_e4m3fn k and v, got {k.dtype} and {v.dtype}")
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"8-bit k/v need {name} as a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in SCALE_DTYPES:
                raise TypeError(f"{name} must be float32 or float16, got {t.dtype}")
            if t.shape != k.shape[:2]:
                raise ValueError(f"{name} must be [Tk_rows, H] = {tuple(k.shape[:2])}, got {tuple(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    _check_index_tensor("cu_seqlens_q", cu_seqlens_q, None, q.device)
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q must have B + 1 >= 1 entries")
    _check_index_tensor("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape[0], q.device)
    num_segments = cu_seqlens_q.shape[0] - 1
    if kv_start is not None:
        _check_index_tensor("kv_start", kv_start, num_segments, q.device)
    max_q = _as_int("max_seqlen_q", max_seqlen_q)
    max_k = _as_int("max_seqlen_k", max_seqlen_k)
    if scale is None:
        scale = q.shape[2] ** -0.5
    else:
        if isinstance(scale, torch.Tensor) or isinstance(scale, bool):
            raise TypeError(f"scale must be a host float, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), "
                f"got ({tuple(out.shape)}, {out.dtype}, {out.device})"
            )
        if out.numel() and out.stride(-1) != 1:
            raise ValueError("out must have a contiguous last dimension")
    return num_segments, max_q, max_k, scale


def check_varlen_offsets(q, k, cu_seqlens_q, cu_seqlens_k, kv_start, max_q, max_k):
    """Host-side checks of the offsets' values; returns them as lists. Synchronises on CUDA."""
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    starts = kv_start.tolist() if kv_start is not None else cu_k[:-1]
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu[0] < 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{name} must be non-negative and non-decreasing, got {cu}")
    len_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    len_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if cu_q[-1] > q.shape[0]:
        raise ValueError(f"cu_seqlens_q ends at {cu_q[-1]} but q has {q.shape[0]} rows")
    if max(len_q, default=0) > max_q:
        raise ValueError(f"a query segment has {max(len_q)} tokens > max_seqlen_q={max_q}")
    if max(len_k, default=0) > max_k:
        raise ValueError(f"a key segment has {max(len_k)} tokens > max_seqlen_k={max_k}")
    for b, (start, n) in enumerate(zip(starts, len_k)):
        if n and (start < 0 or start + n > k.shape[0]):
            what = "kv_start" if kv_start is not None else "cu_seqlens_k"
            raise ValueError(f"segment {b}: keys {start}..{start + n - 1} ({what}) outside k's {k.shape[0]} rows")
    return cu_q, starts, len_k


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------


def dequantize_kv(x: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """8-bit ``[T, H, Dh]`` with scales ``[T, H]`` -> ``x * scale`` in ``dtype`` (computed in
    float64 for a float64 ``dtype``, else float32)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.to(compute) * x_scale.to(compute)[:, :, None]).to(dtype)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact PyTorch varlen attention: SDPA on each segment's slices. Same contract as
    :func:`varlen_attention`; runs in the promoted dtype of q, k, v and returns q's dtype
    (float64 inputs give the high-precision reference the tests compare against).

    Returns:
        ``[Tq, H, Dh]`` in q's dtype (``out`` when given). Rows of a segment without keys are
        zeros, and so are rows that belong to no segment.
    """
    _, max_q, max_k, scale = check_varlen_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start, out, k_scale, v_scale
    )
    cu_q, starts, len_k = check_varlen_offsets(q, k, cu_seqlens_q, cu_seqlens_k, kv_start, max_q, max_k)
    if k_scale is not None:
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    compute = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    result = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b, (start, n) in enumerate(zip(starts, len_k)):
        q0, q1 = cu_q[b], cu_q[b + 1]
        if q1 == q0 or n == 0:
            continue  # no queries, or no keys: zeros
        # [1, H, L, Dh]: with a batch dimension the CPU takes SDPA's fused kernel (3-D inputs
        # take the slower math path).
        qb = q[q0:q1].transpose(0, 1)[None].to(compute)
        kb = k[start : start + n].transpose(0, 1)[None].to(compute)
        vb = v[start : start + n].transpose(0, 1)[None].to(compute)
        ob = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        result[q0:q1] = ob[0].transpose(0, 1).to(q.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result
