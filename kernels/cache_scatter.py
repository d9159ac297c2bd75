"""Triton kernel of the cache scatter: packed encoder rows back into per-stream caches, optionally
quantised to 8 bits with per-row, per-group absmax scales (launcher: ``neuroflow/ops/cache_scatter.py``;
reference: ``neuroflow/reference/cache_scatter.py``)."""

import triton
import triton.language as tl

# Default launch configuration for the GPU: BLOCK_T tokens x BLOCK_D channels per step.
CACHE_SCATTER_CONFIG = {"BLOCK_T": 16, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}


@triton.jit
def cache_scatter_kernel(
    src_ptr, cache_ptr, slot_ptr, cu_ptr, index_ptr, scale_ptr,
    B, T_TOK, D, src_stride, GROUPS, GROUP_SIZE,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
    QUANT: tl.constexpr, QMAX: tl.constexpr, QINT: tl.constexpr,
):
    """cache[slot[b], index[t]] = src[t] for every packed token t < cu[B] of frame b.

    src_ptr: [T_cap, D] (row stride src_stride), any float dtype. cache_ptr: [S, T_TOK, D]
    contiguous. slot_ptr: [B] int64. cu_ptr: [B + 1] int32. index_ptr: [T_cap] int32 token
    positions. Rows of src past cu[B] are ignored.

    QUANT: the cache is 8-bit (int8 when QINT, else float8_e4m3fn) and scale_ptr
    ``[S, T_TOK, GROUPS]`` contiguous (fp32 or fp16) receives one scale per row and group of
    GROUP_SIZE channels (BLOCK_D >= GROUP_SIZE is one group per step): ``scale = absmax / QMAX``
    (QMAX 127 for int8, 448 for e4m3), the row stored as ``round(x / scale)`` (int8: half away
    from zero; e4m3: the cast's round to nearest even), a group of zeros as zeros with scale 0.
    """
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_b = tl.arange(0, BLOCK_B)
    ends = tl.load(cu_ptr + 1 + offs_b, mask=offs_b < B, other=2147483647)
    total = tl.load(cu_ptr + B)
    t_mask = offs_t < total
    # Frame of token t: how many segments end at or before it.
    frame = tl.sum((ends[None, :] <= offs_t[:, None]).to(tl.int32), axis=1)
    slot = tl.load(slot_ptr + frame, mask=t_mask, other=0)
    pos = tl.load(index_ptr + offs_t, mask=t_mask, other=0)
    row = slot * T_TOK + pos
    dst = cache_ptr + row[:, None] * D
    src = src_ptr + offs_t[:, None].to(tl.int64) * src_stride
    if QUANT:
        for g in range(0, GROUPS):
            offs_d = g * GROUP_SIZE + tl.arange(0, BLOCK_D)
            m = t_mask[:, None] & (tl.arange(0, BLOCK_D) < GROUP_SIZE)[None, :]
            x = tl.load(src + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
            absmax = tl.max(tl.abs(x), axis=1)
            scale = absmax / QMAX
            # Correctly rounded division (the reference's x / scale), 0 for an all-zero group.
            safe = tl.where(scale > 0.0, scale, 1.0)
            y = tl.math.div_rn(x, safe[:, None])
            if QINT:
                y = tl.where(y >= 0.0, tl.floor(y + 0.5), -tl.floor(0.5 - y))
                y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
                q = y.to(cache_ptr.dtype.element_ty)
            else:
                q = y.to(cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(dst + offs_d[None, :], q, mask=m)
            tl.store(scale_ptr + row * GROUPS + g, scale.to(scale_ptr.dtype.element_ty), mask=t_mask)
    else:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m = t_mask[:, None] & (offs_d < D)[None, :]
            v = tl.load(src + offs_d[None, :], mask=m)
            tl.store(dst + offs_d[None, :], v.to(cache_ptr.dtype.element_ty), mask=m)
