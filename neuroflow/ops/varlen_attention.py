"""Varlen (packed, per-segment) attention: the launcher of ``kernels/varlen_attention.py``.

The contract (layout, conventions on empty segments and rows outside every segment, 8-bit
key/value caches) and the reference are in :mod:`neuroflow.reference.varlen_attention`;
:mod:`neuroflow.ops.dispatch` picks the path and records it.

No host synchronisation on CUDA: ``max_seqlen_q``/``max_seqlen_k`` are host-side *upper bounds*
(e.g. capacity buckets, not exact maxima); the kernel bounds its work by the device-side
``cu_seqlens``. The launch is a short schedule of one launch per segment-length class
(:func:`launch_schedule`) whose grids are host-known capacities; each program finds its work
item (segment, query tile) from ``cu_seqlens_q`` on the device. With fewer (segment, head)
pairs than SMs and long key segments (the KV path for one or a few streams), each segment's keys
are split in several runs (flash-decoding) and the partial results combined with device ops
(:func:`_num_splits`). The offsets' *values* are
checked (:func:`neuroflow.reference.varlen_attention.check_varlen_offsets`, which reads them on
the host) only on the CPU (the reference or the Triton interpreter, where it is free) or when
``NEUROFLOW_DEBUG_CHECKS=1``; otherwise they are trusted, as in flash-attn.
"""

from __future__ import annotations

import torch

from . import dispatch
from ..reference.varlen_attention import (
    KV_8BIT_DTYPES,
    check_varlen_args,
    check_varlen_offsets,
    debug_checks,
    varlen_attention_reference,
)
from ._launch import CompileCase, cdiv, next_pow2

__all__ = [
    "head_dim_split",
    "launch_config",
    "launch_schedule",
    "padded_head_dim",
    "varlen_attention",
    "varlen_attention_reference",
]

OP = "varlen_attention"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535  # CUDA limit on gridDim.y (heads)
_MAX_GRID_X = 2**31 - 1
_INT32_LIMIT = 2**31
_NO_UPPER = 2**31 - 1  # seg_hi of the open-ended class

# Under the interpreter every program costs ~0.5 ms and every inner-loop step ~3-5 ms whatever the
# tile size, so tiles are as large as the data allows: one class, one query tile per segment up to
# 128 rows, 128 keys per step.
INTERPRETER_MAX_BLOCK_M = 128
INTERPRETER_BLOCK_N = 128

# Split over keys (flash-decoding): when the batch has fewer (segment, head) pairs than the GPU
# has SMs and key segments can be long (the KV path with one or a few streams: a few active
# queries attending to all T cached keys), the key blocks are split in up to MAX_SPLITS runs of at
# least SPLIT_MIN_KEYS keys, aiming at two programs per SM, and the partial results combined.
SPLIT_MIN_KEYS = 256
MAX_SPLITS = 16


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """The kernel's head-dim parts ``(DH0, DH1)``: DH0 the largest power of two <= head_dim
    (>= 16), DH1 0 or the power of two >= 16 covering the rest (72 -> (64, 16), 80 -> (64, 16),
    96 -> (64, 32), 100 -> (64, 64), 128 -> (128, 0))."""
    dh0 = max(MIN_HEAD_DIM, 1 << (max(1, head_dim).bit_length() - 1))
    rest = head_dim - dh0
    return dh0, (max(MIN_HEAD_DIM, next_pow2(rest)) if rest > 0 else 0)


def padded_head_dim(head_dim: int) -> int:
    """The kernel's head-dim tile width ``DH0 + DH1`` (72 and 80 -> 80, 64 -> 64)."""
    return sum(head_dim_split(head_dim))


def _width_key(head_dim: int) -> int:
    from ..kernels.varlen_attention import HEAD_DIM_TILES

    width = padded_head_dim(head_dim)
    return next(w for w in HEAD_DIM_TILES if w >= width)


def launch_schedule(max_seqlen_q: int, head_dim: int, dtype: torch.dtype = torch.float16,
                    interpreting: bool = False, kv_dtype: torch.dtype | None = None) -> list[tuple[int, int | None, dict]]:
    """The launches of one call: ``(lo, hi, config)`` per segment-length class that a query
    segment of at most ``max_seqlen_q`` tokens can fall in (class: ``lo < length <= hi``,
    ``hi=None`` unbounded).

    On a GPU: the classes of ``neuroflow.kernels.varlen_attention.SEG_CLASSES`` with their
    entries of ``DEFAULT_CONFIGS`` (by head-dim tile and q's element size); with 8-bit
    ``kv_dtype`` at most two pipeline stages and, for fp32 queries, 64-row tiles and 128-row
    tiles with a head-dim tail (72, 80), 32 keys per step, 16 for one-warp tiles; tiles of 64 rows
    or more with a tail get one stage (the dequantisation's registers spill otherwise on sm_80
    with Triton 3.6's ptxas). Under the interpreter: one class with large tiles (see :data:`INTERPRETER_BLOCK_N`).
    """
    if interpreting:
        block_m = min(INTERPRETER_MAX_BLOCK_M, max(16, next_pow2(max_seqlen_q)))
        return [(0, None, dict(BLOCK_M=block_m, BLOCK_N=INTERPRETER_BLOCK_N, num_warps=4, num_stages=1))]
    from ..kernels.varlen_attention import DEFAULT_CONFIGS, SEG_CLASSES

    elem = 4 if dtype == torch.float32 else 2
    out, lo = [], 0
    for hi in SEG_CLASSES:
        if lo >= max(1, max_seqlen_q):
            break
        cfg = dict(DEFAULT_CONFIGS[(hi, _width_key(head_dim), elem)])
        if kv_dtype in KV_8BIT_DTYPES:
            tail = head_dim_split(head_dim)[1] > 0
            cfg["num_stages"] = 1 if tail and cfg["BLOCK_M"] >= 64 else min(cfg["num_stages"], 2)
            if elem == 4 or cfg["BLOCK_M"] == 64 or (tail and cfg["BLOCK_M"] == 128):
                cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 32)
            if cfg["num_warps"] == 1:  # one warp holding a whole split-head-dim tile
                cfg["BLOCK_N"] = 16
        out.append((lo, hi, cfg))
        lo = hi if hi is not None else lo
    return out


def launch_config(max_seqlen_q: int, head_dim: int, interpreting: bool = False,
                  dtype: torch.dtype = torch.float16) -> dict:
    """The config of the class that holds a query segment of ``max_seqlen_q`` tokens
    (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``); see :func:`launch_schedule`."""
    return launch_schedule(max_seqlen_q, head_dim, dtype, interpreting)[-1][2]


def _class_capacity(lo: int, hi: int | None, block_m: int, max_q: int, num_segments: int, q_rows: int) -> int:
    """Host-side bound on the query tiles of class ``lo < L <= hi``: at most
    ``min(B, q_rows // (lo + 1))`` segments, each of at most ``min(hi, max_q)`` tokens, and
    ``sum(ceil(L / M)) <= q_rows // M + segments``."""
    segments = min(num_segments, q_rows // (lo + 1))
    longest = max_q if hi is None else min(hi, max_q)
    return min(segments * cdiv(longest, block_m), q_rows // block_m + segments)


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------


def _kernel(device: torch.device):
    from ..kernels.varlen_attention import varlen_attention_fwd_kernel

    return dispatch.launchable(varlen_attention_fwd_kernel, device)


def _fp8_supported(device: torch.device) -> str | None:
    """Why float8 caches cannot take the kernel on ``device`` (the interpreter's fp8 loads work)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"float8 key/value caches need sm_89 or newer (this GPU is sm_{major}{minor})"
    return None


def _unsupported(q, k, v, out, k_scale, num_segments, max_q) -> str | None:
    """Why the kernel cannot take this call, or None."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "gradients are needed and the kernel is forward-only"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    if k_scale is not None:
        if k.dtype == torch.float8_e4m3fn:
            reason = _fp8_supported(q.device)
            if reason:
                return reason
        elif k.dtype != torch.int8:
            return f"8-bit key/value dtype {k.dtype} (supported: int8, float8_e4m3fn)"
    elif not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    head_dim = q.shape[2]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if not dispatch.gpu_launch(q.device) and q.dtype == torch.bfloat16:
        return "bfloat16 under the Triton interpreter (its bf16 arithmetic is broken)"
    if q.shape[1] > _MAX_GRID_Y:
        return f"{q.shape[1]} heads exceed the grid limit {_MAX_GRID_Y}"
    if q.shape[0] > _MAX_GRID_X:
        return f"{q.shape[0]} query rows exceed the grid limit {_MAX_GRID_X}"
    # Tile offsets are int32 in the kernel (segment bases are int64).
    row_stride = max(q.stride(0), q.shape[1] * q.shape[2], out.stride(0) if out is not None else 0)
    head_stride = max(q.stride(1), k.stride(1), v.stride(1), q.shape[2], out.stride(1) if out is not None else 0)
    if (max_q + INTERPRETER_MAX_BLOCK_M) * row_stride >= _INT32_LIMIT or q.shape[1] * head_stride >= _INT32_LIMIT:
        return "tile offsets would overflow int32"
    return None


def _align_bytes(*tensors) -> int:
    """The largest power of two <= 16 dividing every base address and (used) stride in bytes."""
    align = 16
    for t in tensors:
        values = [t.data_ptr()] + [stride * t.element_size() for size, stride in zip(t.shape[:2], t.stride()[:2])
                                   if size > 1]
        for value in values:
            while value % align:
                align //= 2
    return align


def _align(q, out) -> int:
    """16 bytes in elements of q when q's and out's base pointers are 16-byte aligned and their
    (used) strides multiples of 16 bytes and of that many elements (the kernel's ALIGN hint:
    row offsets of both are claimed multiples of it; out may be the fp32 split partials), else 1."""
    vec = 16 // q.element_size()
    if _align_bytes(q, out) != 16:
        return 1
    for t in (q, out):
        if any(size > 1 and stride % vec for size, stride in zip(t.shape[:2], t.stride()[:2])):
            return 1
    return vec


def _kv_align(k, v) -> tuple[int, int]:
    """``(KV_ALIGN, KV_ALIGN_BYTES)``: the alignment every K/V base pointer and stride has, in
    elements of k and in bytes (``(1, 1)`` below one element)."""
    align = _align_bytes(k, v)
    elems = align // k.element_size()
    return (elems, align) if elems > 1 else (1, 1)


def _schedule(config, max_q: int, head_dim: int, dtype: torch.dtype, interpreted: bool, kv_dtype: torch.dtype):
    """The launch schedule, with ``config`` (a dict for one class over every length, or a list of
    ``(lo, hi, dict)`` classes) overriding the default."""
    if config is None:
        return launch_schedule(max_q, head_dim, dtype, interpreting=interpreted, kv_dtype=kv_dtype)
    if isinstance(config, dict):
        base = launch_schedule(max_q, head_dim, dtype, interpreting=interpreted, kv_dtype=kv_dtype)[-1][2]
        schedule = [(0, None, {**base, **config})]
    else:
        schedule = [(int(lo), hi, dict(cfg)) for lo, hi, cfg in config]
        ranges = [(lo, _NO_UPPER if hi is None else hi) for lo, hi, _ in schedule]
        if not ranges or ranges[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])) \
                or ranges[-1][1] < max_q:
            raise ValueError(f"config classes must tile 0 < length <= max_seqlen_q without gaps, got {ranges}")
    for _, _, cfg in schedule:
        for key in ("BLOCK_M", "BLOCK_N"):
            size = cfg[key]
            if size < 16 or size & (size - 1):
                raise ValueError(f"config {key} must be a power of two >= 16, got {size}")
    return schedule


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config=None,
) -> torch.Tensor:
    """Non-causal attention of each packed segment's queries over its own keys (FlashAttention-2
    style, forward only; fp32 online softmax and accumulation).

    Args:
        q: ``[Tq, H, Dh]`` float16, bfloat16 or float32; any strides (a non-contiguous last
            dimension is copied). float32 runs on TF32 tensor cores on a GPU (10-bit mantissa
            operands, fp32 accumulation; see ``neuroflow.tooling.testing`` for the tolerance rule).
        k, v: ``[Tk_rows, H, Dh]``, q's dtype; or int8 / float8_e4m3fn (8-bit caches) together
            with ``k_scale``/``v_scale``.
        cu_seqlens_q, cu_seqlens_k: int32 (or int64) ``[B + 1]`` on q's device, non-decreasing.
        max_seqlen_q, max_seqlen_k: host ints, upper bounds of the query / key segment lengths
            (need not be exact: they size the launch capacities, never read device data).
        scale: softmax scale (default ``Dh ** -0.5``).
        kv_start: optional int32/int64 ``[B]``: first K/V row of each segment (default
            ``cu_seqlens_k[:-1]``).
        k_scale, v_scale: ``[Tk_rows, H]`` float32 or float16, the per-row, per-head scales of
            8-bit ``k``/``v``: key row r of head h is ``k[r, h].float() * k_scale[r, h]``
            (dequantised inside the kernel's loads).
        out: optional ``[Tq, H, Dh]`` tensor in q's dtype (last dimension contiguous) to write into.
        config: optional override of the launch schedule, for tests and tuning: a dict
            (``BLOCK_M``, ``BLOCK_N`` powers of two >= 16, optional ``num_warps``,
            ``num_stages``) used for every segment length, or a list of ``(lo, hi, dict)``
            length classes (see :func:`launch_schedule`).

    Returns:
        ``[Tq, H, Dh]`` in q's dtype (``out`` when given). A segment with no keys gives zeros.

    Path: see :mod:`neuroflow.ops.dispatch`; ``dispatch.last_path["varlen_attention"]`` records it.
    Head dims outside 16..128, mixed dtypes, other dtypes, bf16 under the interpreter and float8
    caches without an sm_89+ GPU take the reference (a recorded fallback; ``NEUROFLOW_STRICT=1``
    raises instead).
    """
    num_segments, max_q, max_k, scale = check_varlen_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start, out, k_scale, v_scale
    )
    # Only ask what the kernel supports when the kernel is wanted: the CPU reference path must
    # not import Triton.
    wants = dispatch.wants_triton(q.device)
    unsupported = _unsupported(q, k, v, out, k_scale, num_segments, max_q) if wants else None
    path = dispatch.choose(OP, q.device, unsupported=unsupported)
    if path == dispatch.REFERENCE:
        return varlen_attention_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, kv_start,
            k_scale=k_scale, v_scale=v_scale, out=out,
        )

    interpreted = not dispatch.gpu_launch(q.device)
    if interpreted or debug_checks():
        # Free on the CPU (and the interpreter does not catch out-of-bounds accesses); on CUDA a
        # host sync, hence only in debug mode.
        check_varlen_offsets(q, k, cu_seqlens_q, cu_seqlens_k, kv_start, max_q, max_k)
    schedule = _schedule(config, max_q, q.shape[2], q.dtype, interpreted, k.dtype)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_heads, head_dim = q.shape[1], q.shape[2]
    if num_segments == 0 or max_q == 0 or q.shape[0] == 0 or num_heads == 0:
        return out

    splits = _num_splits(q, num_segments, max_k, schedule)
    _launch(q, k, v, out, cu_seqlens_q, cu_seqlens_k, kv_start, k_scale, v_scale, scale, max_q, schedule, interpreted,
            splits)
    return out


def _num_splits(q, num_segments: int, max_k: int, schedule) -> int:
    """Key splits for this call: a ``num_splits`` entry of the config, else (CUDA only) enough
    to give about two programs per SM when there are fewer (segment, head) pairs than SMs."""
    forced = [cfg["num_splits"] for _, _, cfg in schedule if "num_splits" in cfg]
    if forced:
        return max(1, int(max(forced)))
    if q.device.type != "cuda" or max_k < 2 * SPLIT_MIN_KEYS:
        return 1
    programs = max(1, num_segments * q.shape[1])
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, cdiv(2 * sms, programs), max_k // SPLIT_MIN_KEYS))


def _launch(q, k, v, out, cu_seqlens_q, cu_seqlens_k, kv_start, k_scale, v_scale, scale, max_q, schedule,
            interpreted, splits: int = 1) -> None:
    """One kernel launch per class of ``schedule`` (checked arguments, non-empty batch); with
    ``splits > 1`` into fp32 partials per key split, then combined into ``out`` (device ops only)."""
    from ..kernels.varlen_attention import SCHED_BLOCK

    num_segments = cu_seqlens_q.shape[0] - 1
    num_heads, head_dim = q.shape[1], q.shape[2]
    cu_q = cu_seqlens_q if cu_seqlens_q.dtype == torch.int32 else cu_seqlens_q.to(torch.int32)
    cu_k = cu_seqlens_k if cu_seqlens_k.dtype == torch.int32 else cu_seqlens_k.to(torch.int32)
    if kv_start is not None and kv_start.dtype != torch.int32:
        kv_start = kv_start.to(torch.int32)
    scaled = k_scale is not None
    ks = k_scale if scaled else cu_q  # placeholders: never read without KV_SCALED
    vs = v_scale if scaled else cu_q
    dh0, dh1 = head_dim_split(head_dim)
    kv_align = _kv_align(k, v)
    kernel = _kernel(q.device)
    split = splits > 1
    if split:
        # Rows of no segment must keep out's contents: their Lse stays NaN ("never written").
        target = torch.zeros(splits, *q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((splits, *q.shape[:2]), float("nan"), dtype=torch.float32, device=q.device)
    else:
        target, lse = out, cu_q
    launches = []
    for lo, hi, cfg in schedule:
        capacity = _class_capacity(lo, hi, cfg["BLOCK_M"], max_q, num_segments, q.shape[0])
        if capacity == 0:
            continue
        t_strides = target.stride()[-3:-1]
        args = (
            q, k, v, target, cu_q, cu_k, kv_start if kv_start is not None else cu_k, ks, vs, lse,
            num_segments, lo, _NO_UPPER if hi is None else hi,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *t_strides,
            ks.stride(0) if scaled else 0, ks.stride(1) if scaled else 0,
            vs.stride(0) if scaled else 0, vs.stride(1) if scaled else 0,
            target.stride(0) if split else 0, *(lse.stride() if split else (0, 0, 0)), splits,
            scale * _LOG2E,
        )
        meta = dict(
            HEAD_DIM=head_dim, DH0=dh0, DH1=dh1,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            HAS_KV_START=kv_start is not None, KV_SCALED=scaled,
            ALIGN=_align(q, target if not split else target[0]), KV_ALIGN=kv_align[0], KV_ALIGN_BYTES=kv_align[1],
            # fp32 runs on TF32 tensor cores; no effect on fp16/bf16 operands.
            DOT_PRECISION="tf32",
            SCHED=SCHED_BLOCK if not interpreted else max(16, min(SCHED_BLOCK, next_pow2(num_segments))),
            num_warps=cfg.get("num_warps", 4),
            num_stages=cfg.get("num_stages", 2),
            SPLIT_K=split,
        )
        grid = (min(capacity, _MAX_GRID_X), num_heads) + ((splits,) if split else ())
        launches.append((grid, args, meta))
    if q.device.type == "cuda":
        with torch.cuda.device(q.device):
            for grid, args, meta in launches:
                kernel[grid](*args, **meta)
            if split:
                _combine_splits(target, lse, out)
    else:
        for grid, args, meta in launches:
            kernel[grid](*args, **meta)
        if split:
            _combine_splits(target, lse, out)


def _combine_splits(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` rows of every segment from the key splits' normalised partials ``[S, Tq, H, Dh]``
    and base-2 log-sum-exps ``[S, Tq, H]`` (-inf: no keys in that split; NaN: row of no
    segment, left as it is). A segment without keys gets zeros."""
    written = ~torch.isnan(lse[0])
    top = lse.nan_to_num(nan=float("-inf")).amax(0)
    weight = torch.exp2(lse.nan_to_num(nan=float("-inf")) - torch.where(torch.isfinite(top), top, 0.0))
    total = weight.sum(0)
    combined = (weight[..., None] * partial).sum(0) / torch.where(total > 0, total, 1.0)[..., None]
    out.copy_(torch.where(written[..., None], combined.to(out.dtype), out))


# --------------------------------------------------------------------------------------------
# compile check
# --------------------------------------------------------------------------------------------


def compile_cases():
    """Launches of the default schedule to compile for sm_80/sm_90 (``python -m neuroflow.tooling.compile_check``).

    One case per (dtype, head dim, length class): the launcher's own launch of that class (its
    ``_launch`` with the one-class schedule the launcher builds). Head dims 64 (tile 64), 72 and
    80 (64 + 16 split: the so400m case and ViT-H). fp16 and fp32 (TF32): every class; bf16 (same
    code apart from the element type): the shortest and the long class; int8 key/value caches
    with fp16 queries: every class, with bf16 / fp32 queries the shortest and the long class.
    Every other head-dim tile rule (:data:`~neuroflow.kernels.varlen_attention.HEAD_DIM_TILES`:
    one head dim per tile width and per split form, 16 to 128) in fp16 every class, in fp32 and
    with int8 caches (split forms) the shortest and the long class, on *odd* launches: 3 heads, 197-token key segments
    and a query length one short of the class bound, so strides and lengths are not all
    divisible by 16 (the runtime specialises each integer on its divisibility, and such a
    launch compiles another kernel); 64/72/80 get the odd launch too, in fp16.
    Contiguous q/k/v (the launcher's aligned variant) reading a per-stream cache through
    ``kv_start`` (the KV path; the default path differs by one scalar load). The split-over-keys
    variant for the shortest class in fp16 d64, int8 d72 and fp32 d80. Nothing runs: the
    launches are recorded.
    """
    def launcher(dtype, kv_dtype, head_dim, lo, hi, cfg, splits=1, odd=False):
        def run():
            heads, streams, tokens = (3, 2, 197) if odd else (2, 2, 256)
            max_q = (hi - 1 if hi else tokens) if odd else (hi or 256)
            q = torch.empty(streams * max_q, heads, head_dim, dtype=dtype)
            kv = torch.empty(streams * tokens, heads, head_dim, dtype=kv_dtype)
            scales = torch.empty(streams * tokens, heads) if kv_dtype == torch.int8 else None
            cu_q = torch.arange(streams + 1, dtype=torch.int32) * max_q
            cu_k = torch.arange(streams + 1, dtype=torch.int32) * tokens
            out = torch.empty_like(q)
            _launch(q, kv, kv, out, cu_q, cu_k, cu_k[:-1].clone(), scales, scales, head_dim**-0.5, max_q,
                    [(lo, hi, cfg)], interpreted=False, splits=splits)
        return run

    every = tuple(range(4))
    plan = [
        (torch.float16, torch.float16, every),
        (torch.bfloat16, torch.bfloat16, (0, 3)),
        (torch.float32, torch.float32, every),
        (torch.float16, torch.int8, every),
        (torch.bfloat16, torch.int8, (0, 3)),
        (torch.float32, torch.int8, (0, 3)),
    ]
    # Head dims 16..128, one per tile width and split form: 16, 32, 64, 128 whole; 24 (16 + a
    # masked 8 -> tile 32), 40 and 48 (32 + a masked or a full 16 -> tile 48), 96 (64 + 32), 112
    # (64 + a masked 48 -> tile 128); 72 and 80 as above.
    other_dims = (16, 24, 32, 40, 48, 96, 112, 128)
    split_dims = tuple(d for d in other_dims if head_dim_split(d)[1])
    plan = [(dtype, kv, dims, classes, False) for dtype, kv, classes in plan for dims in ((64, 72, 80),)]
    plan += [
        (torch.float16, torch.float16, (64, 72, 80) + other_dims, every, True),
        (torch.float32, torch.float32, other_dims, (0, 3), True),
        (torch.float16, torch.int8, split_dims, (0, 3), True),
    ]
    cases = []
    for dtype, kv_dtype, head_dims, classes, odd in plan:
        for head_dim in head_dims:
            schedule = launch_schedule(256, head_dim, dtype, kv_dtype=kv_dtype)
            for i in classes:
                lo, hi, cfg = schedule[i]
                name = str(dtype).removeprefix("torch.")
                if kv_dtype != dtype:
                    name += f"/kv {str(kv_dtype).removeprefix('torch.')}"
                cases.append(CompileCase(
                    f"varlen_attention {name} d{head_dim} q<={hi or 'long'} "
                    f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
                    + (" odd" if odd else ""),
                    launcher(dtype, kv_dtype, head_dim, lo, hi, cfg, odd=odd),
                    uses_dot=True,
                    # wgmma works on 64-row warpgroup tiles: 16- and 32-row query tiles compile to
                    # mma.sync (HMMA) on sm_90 too, so HGMMA is required only from BLOCK_M = 64 on.
                    tensor_cores=(80, 90) if cfg["BLOCK_M"] >= 64 else (80,),
                ))
    # Split over keys (few short query segments over long key segments): the shortest class.
    for dtype, kv_dtype, head_dim in ((torch.float16, torch.float16, 64), (torch.float16, torch.int8, 72),
                                      (torch.float32, torch.float32, 80)):
        lo, hi, cfg = launch_schedule(256, head_dim, dtype, kv_dtype=kv_dtype)[0]
        name = str(dtype).removeprefix("torch.") + ("/kv int8" if kv_dtype == torch.int8 else "")
        cases.append(CompileCase(
            f"varlen_attention {name} d{head_dim} q<={hi} split-k M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} "
            f"w{cfg['num_warps']} s{cfg['num_stages']}",
            launcher(dtype, kv_dtype, head_dim, lo, hi, cfg, splits=4), uses_dot=True, tensor_cores=(80,),
        ))
    return cases
