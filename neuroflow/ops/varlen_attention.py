"""Varlen (packed, per-segment) attention: the launcher of ``kernels/varlen_attention.py``.

The contract (layout, conventions on empty segments and rows outside every segment) and the
reference are in :mod:`neuroflow.reference.varlen_attention`; :mod:`neuroflow.dispatch` picks the
path and records it.

On CUDA the launcher never reads device tensors on the host (no synchronisation): the contents of
``cu_seqlens_*``/``kv_start`` are trusted there, as in flash-attn. On the CPU (the reference, or the
Triton interpreter) reading them is free, so they are checked and violations raise ``ValueError``.
"""

from __future__ import annotations

import torch

from .. import dispatch
from ..reference.varlen_attention import check_varlen_args, check_varlen_offsets, varlen_attention_reference
from ._launch import next_pow2

__all__ = ["launch_config", "padded_head_dim", "varlen_attention", "varlen_attention_reference"]

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
    return max(MIN_HEAD_DIM, next_pow2(head_dim))


def launch_config(max_seqlen_q: int, head_dim: int, interpreting: bool = False) -> dict:
    """The one config the launcher uses: ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``.

    On a GPU: the entry of ``neuroflow.kernels.varlen_attention.DEFAULT_CONFIGS`` for the smallest
    bucket holding ``max_seqlen_q`` and the padded head dim. Under the interpreter: large tiles
    (see :data:`INTERPRETER_BLOCK_N`); autotuning over several configs cannot run there.
    """
    if interpreting:
        block_m = min(INTERPRETER_MAX_BLOCK_M, max(16, next_pow2(max_seqlen_q)))
        return dict(BLOCK_M=block_m, BLOCK_N=INTERPRETER_BLOCK_N, num_warps=4, num_stages=1)
    from ..kernels.varlen_attention import DEFAULT_CONFIGS, SEQLEN_BUCKETS

    bucket = next(b for b in SEQLEN_BUCKETS if b is None or max_seqlen_q <= b)
    return dict(DEFAULT_CONFIGS[(bucket, padded_head_dim(head_dim))])


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------


def _kernel(device: torch.device):
    from ..kernels.varlen_attention import varlen_attention_fwd_kernel

    return dispatch.launchable(varlen_attention_fwd_kernel, device)


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
    if not dispatch.gpu_launch(q.device) and q.dtype == torch.bfloat16:
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
    num_segments, max_q, max_k, scale = check_varlen_args(
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

    interpreted = not dispatch.gpu_launch(q.device)
    if interpreted:
        # Free on the CPU, and the interpreter does not catch out-of-bounds accesses.
        check_varlen_offsets(q, k, cu_seqlens_q, cu_seqlens_k, kv_start, max_q, max_k)
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
    launch = _kernel(q.device)[grid]
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
    if q.device.type == "cuda":
        with torch.cuda.device(q.device):
            launch(*args, **meta)
    else:
        launch(*args, **meta)
    return out


# --------------------------------------------------------------------------------------------
# compile check
# --------------------------------------------------------------------------------------------


def compile_cases():
    """Launches of the default configs to compile for sm_80/sm_90 (``python -m neuroflow.compile_check``).

    Head dims 64 (tile 64) and 72 (tile 128 with masked columns: the so400m case, same tile as
    80 and 128). fp16: a query length in every sequence bucket of the config table; bf16 (same
    code apart from the element type): the shortest and the long bucket, to keep the check's run
    time down. Contiguous q/k/v (the launcher's aligned variant) reading a per-stream cache
    through ``kv_start`` (the KV path; the default path differs by one scalar load). Nothing runs:
    the launches are recorded.
    """
    from ..compile_check import CompileCase
    from ..kernels.varlen_attention import SEQLEN_BUCKETS

    def launcher(dtype, head_dim, max_q):
        def run():
            heads, streams, tokens = 2, 2, 256
            q = torch.empty(streams * max_q, heads, head_dim, dtype=dtype)
            kv = torch.empty(streams * tokens, heads, head_dim, dtype=dtype)
            cu_q = torch.arange(streams + 1, dtype=torch.int32) * max_q
            cu_k = torch.arange(streams + 1, dtype=torch.int32) * tokens
            varlen_attention(q, kv, kv, cu_q, cu_k, max_q, tokens, kv_start=cu_k[:-1].clone())
        return run

    cases = []
    for dtype in (torch.float16, torch.bfloat16):
        buckets = SEQLEN_BUCKETS if dtype == torch.float16 else (SEQLEN_BUCKETS[0], SEQLEN_BUCKETS[-1])
        for head_dim in (64, 72):
            for bucket in buckets:
                max_q = bucket or 256
                cfg = launch_config(max_q, head_dim)
                cases.append(CompileCase(
                    f"varlen_attention {str(dtype).removeprefix('torch.')} d{head_dim} q<={bucket or 'long'} "
                    f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}",
                    launcher(dtype, head_dim, max_q),
                    uses_dot=True,
                    # wgmma works on 64-row warpgroup tiles: 16- and 32-row query tiles compile to
                    # mma.sync (HMMA) on sm_90 too, so HGMMA is required only from BLOCK_M = 64 on.
                    tensor_cores=(80, 90) if cfg["BLOCK_M"] >= 64 else (80,),
                ))
    return cases
