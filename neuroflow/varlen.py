"""Varlen (packed, per-segment) attention: the Triton launcher, the PyTorch reference, dispatch.

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

On CUDA the launcher never reads device tensors on the host (no synchronisation): the contents of
``cu_seqlens_*``/``kv_start`` are trusted there, as in flash-attn. On the CPU (the reference, or the
Triton interpreter) reading them is free, so they are checked and violations raise ``ValueError``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from . import dispatch

OP = "varlen_attention"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535  # CUDA limit on gridDim.y and gridDim.z (segments, heads)
_INT32_LIMIT = 2**31

# Under the interpreter every program costs ~0.5 ms and every inner-loop step ~3-5 ms whatever the
# tile size, so tiles are as large as the data allows: one query tile per segment up to 128 rows,
# 128 keys per step.
INTERPRETER_MAX_BLOCK_M = 128
INTERPRETER_BLOCK_N = 128


def padded_head_dim(head_dim: int) -> int:
    """The kernel's head-dim tile: the next power of two >= max(head_dim, 16) (72 and 80 -> 128)."""
    return max(MIN_HEAD_DIM, 1 << (int(head_dim) - 1).bit_length())


def launch_config(max_seqlen_q: int, head_dim: int, interpreting: bool = False) -> dict:
    """The one config the launcher uses: ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``.

    On a GPU: the entry of ``neuroflow.kernels.varlen_attention.DEFAULT_CONFIGS`` for the smallest
    bucket holding ``max_seqlen_q`` and the padded head dim. Under the interpreter: large tiles
    (see :data:`INTERPRETER_BLOCK_N`); autotuning over several configs cannot run there.
    """
    if interpreting:
        block_m = min(INTERPRETER_MAX_BLOCK_M, max(16, 1 << (max(int(max_seqlen_q), 1) - 1).bit_length()))
        return dict(BLOCK_M=block_m, BLOCK_N=INTERPRETER_BLOCK_N, num_warps=4, num_stages=1)
    from .kernels.varlen_attention import DEFAULT_CONFIGS, SEQLEN_BUCKETS

    bucket = next(b for b in SEQLEN_BUCKETS if b is None or max_seqlen_q <= b)
    return dict(DEFAULT_CONFIGS[(bucket, padded_head_dim(head_dim))])


# --------------------------------------------------------------------------------------------
# argument checks shared by both paths
# --------------------------------------------------------------------------------------------


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


def _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start, out):
    """Shape/dtype/device checks that need no device data. Returns (B, max_q, max_k, scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
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


def _check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, kv_start, max_q, max_k):
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact PyTorch varlen attention: SDPA on each segment's slices. Same contract as
    :func:`varlen_attention`; runs in the promoted dtype of q, k, v and returns q's dtype
    (float64 inputs give the high-precision reference the tests compare against).

    Returns:
        ``[Tq, H, Dh]`` in q's dtype (``out`` when given). Rows of a segment without keys are
        zeros, and so are rows that belong to no segment.
    """
    _, max_q, max_k, scale = _check_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start, out
    )
    cu_q, starts, len_k = _check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, kv_start, max_q, max_k)
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


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------


def _kernel(interpreted: bool):
    from .kernels.varlen_attention import varlen_attention_fwd_kernel

    return dispatch.launchable(varlen_attention_fwd_kernel, torch.device("cpu" if interpreted else "cuda"))


def _unsupported(q, k, v, out, num_segments, max_q) -> str | None:
    """Why the kernel cannot take this call, or None."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "gradients are needed and the kernel is forward-only"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    head_dim = q.shape[2]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "bfloat16 under the Triton interpreter (its bf16 arithmetic is broken)"
    if num_segments > _MAX_GRID_YZ or q.shape[1] > _MAX_GRID_YZ:
        return f"{num_segments} segments x {q.shape[1]} heads exceed the grid limit {_MAX_GRID_YZ}"
    # Tile offsets are int32 in the kernel (segment bases are int64).
    row_stride = max(q.stride(0), q.shape[1] * q.shape[2], out.stride(0) if out is not None else 0)
    head_stride = max(q.stride(1), k.stride(1), v.stride(1), q.shape[2], out.stride(1) if out is not None else 0)
    if (max_q + INTERPRETER_MAX_BLOCK_M) * row_stride >= _INT32_LIMIT or q.shape[1] * head_stride >= _INT32_LIMIT:
        return "tile offsets would overflow int32"
    return None


def _align(*tensors) -> int:
    """16 bytes in elements if every base pointer and (used) stride allows 16-byte vectors, else 1."""
    elem = tensors[0].element_size()
    vec = 16 // elem
    for t in tensors:
        if t.data_ptr() % 16:
            return 1
        for size, stride in zip(t.shape[:2], t.stride()[:2]):
            if size > 1 and stride % vec:
                return 1
    return vec


def varlen_attention(
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
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Non-causal attention of each packed segment's queries over its own keys (FlashAttention-2
    style, forward only; fp32 online softmax and accumulation).

    Args:
        q: ``[Tq, H, Dh]`` float16, bfloat16 or float32; any strides (a non-contiguous last
            dimension is copied).
        k, v: ``[Tk_rows, H, Dh]``, q's dtype.
        cu_seqlens_q, cu_seqlens_k: int32 (or int64) ``[B + 1]`` on q's device, non-decreasing.
        max_seqlen_q, max_seqlen_k: host ints bounding the query / key segment lengths.
        scale: softmax scale (default ``Dh ** -0.5``).
        kv_start: optional int32/int64 ``[B]``: first K/V row of each segment (default
            ``cu_seqlens_k[:-1]``).
        out: optional ``[Tq, H, Dh]`` tensor in q's dtype (last dimension contiguous) to write into.
        config: optional override of the launch config (``BLOCK_M``, ``BLOCK_N`` powers of two
            >= 16, optional ``num_warps``, ``num_stages``), for tests and tuning.

    Returns:
        ``[Tq, H, Dh]`` in q's dtype (``out`` when given). A segment with no keys gives zeros.

    Path: see :mod:`neuroflow.dispatch`; ``dispatch.last_path["varlen_attention"]`` records it.
    Head dims outside 16..128, mixed dtypes, other dtypes and bf16 under the interpreter take the
    reference (a recorded fallback; ``NEUROFLOW_STRICT=1`` raises instead).
    """
    num_segments, max_q, max_k, scale = _check_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start, out
    )
    # Only ask what the kernel supports when the kernel is wanted: the CPU reference path must
    # not import Triton.
    unsupported = _unsupported(q, k, v, out, num_segments, max_q) if dispatch.wants_triton(q.device) else None
    path = dispatch.choose(OP, q.device, unsupported=unsupported)
    if path == dispatch.REFERENCE:
        return varlen_attention_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, kv_start, out=out
        )

    interpreted = q.device.type == "cpu"
    if interpreted:
        # Free on the CPU, and the interpreter does not catch out-of-bounds accesses.
        _check_offsets(q, k, cu_seqlens_q, cu_seqlens_k, kv_start, max_q, max_k)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_heads, head_dim = q.shape[1], q.shape[2]
    if num_segments == 0 or max_q == 0 or q.shape[0] == 0 or num_heads == 0:
        return out

    cfg = launch_config(max_q, head_dim, interpreting=interpreted)
    if config is not None:
        for key in ("BLOCK_M", "BLOCK_N"):
            size = config[key]
            if size < 16 or size & (size - 1):
                raise ValueError(f"config {key} must be a power of two >= 16, got {size}")
        cfg.update(config)
    cu_q = cu_seqlens_q if cu_seqlens_q.dtype == torch.int32 else cu_seqlens_q.to(torch.int32)
    cu_k = cu_seqlens_k if cu_seqlens_k.dtype == torch.int32 else cu_seqlens_k.to(torch.int32)
    if kv_start is not None and kv_start.dtype != torch.int32:
        kv_start = kv_start.to(torch.int32)
    grid = (-(-max_q // cfg["BLOCK_M"]), num_segments, num_heads)
    kernel = _kernel(interpreted)
    launch = kernel[grid]
    args = (
        q, k, v, out, cu_q, cu_k, kv_start if kv_start is not None else cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * _LOG2E,
    )
    meta = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=padded_head_dim(head_dim),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        HAS_KV_START=kv_start is not None,
        ALIGN=_align(q, k, v, out),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 2),
    )
    if interpreted:
        launch(*args, **meta)
    else:
        with torch.cuda.device(q.device):
            launch(*args, **meta)
    return out


# --------------------------------------------------------------------------------------------
# compile check
# --------------------------------------------------------------------------------------------


def compile_cases():
    """The default configs to compile for sm_80/sm_90 (``python -m neuroflow.compile_check``).

    Head dims 64 (tile 64) and 72 (tile 128 with masked columns: the so400m case, same tile as
    80 and 128). fp16: every sequence bucket of the config table; bf16 (same code apart from the
    element type): the shortest and the long bucket, to keep the check's run time down. Cases use
    the aligned variant (``ALIGN=8``), which the launcher picks for contiguous and packed-qkv
    layouts whose head dim is a multiple of 8, and a ``kv_start`` (the cache path; the default
    path differs by one scalar load).
    """
    from .compile_check import CompileCase
    from .kernels.varlen_attention import DEFAULT_CONFIGS, SEQLEN_BUCKETS

    fn = _kernel(False)
    cases = []
    for dtype in ("fp16", "bf16"):
        signature = {name: f"*{dtype}" for name in ("Q", "K", "V", "Out")}
        signature.update({name: "*i32" for name in ("CuSeqlensQ", "CuSeqlensK", "KvStart")})
        for name in ("q", "k", "v", "o"):
            signature[f"stride_{name}t"] = "i32"
            signature[f"stride_{name}h"] = "i32"
        signature["qk_scale"] = "fp32"
        for name in ("HEAD_DIM", "HEAD_DIM_PAD", "BLOCK_M", "BLOCK_N", "HAS_KV_START", "ALIGN", "DOT_PRECISION"):
            signature[name] = "constexpr"
        for head_dim in (64, 72):
            pad = padded_head_dim(head_dim)
            for bucket in SEQLEN_BUCKETS if dtype == "fp16" else (SEQLEN_BUCKETS[0], SEQLEN_BUCKETS[-1]):
                cfg = DEFAULT_CONFIGS[(bucket, pad)]
                cases.append(
                    CompileCase(
                        name=(
                            f"varlen_attention_fwd {dtype} d{head_dim} q<={bucket or 'long'} "
                            f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
                        ),
                        fn=fn,
                        signature=signature,
                        constexprs=dict(
                            HEAD_DIM=head_dim,
                            HEAD_DIM_PAD=pad,
                            BLOCK_M=cfg["BLOCK_M"],
                            BLOCK_N=cfg["BLOCK_N"],
                            HAS_KV_START=True,
                            ALIGN=8,
                            DOT_PRECISION="tf32",
                        ),
                        num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"],
                        uses_dot=True,
                        # wgmma works on 64-row warpgroup tiles: 16- and 32-row query tiles
                        # compile to mma.sync (HMMA) on sm_90 too, so HGMMA is required only
                        # from BLOCK_M = 64 on.
                        tensor_cores=(80, 90) if cfg["BLOCK_M"] >= 64 else (80,),
                    )
                )
    return cases
