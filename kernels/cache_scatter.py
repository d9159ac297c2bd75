"""Triton kernel of the cache scatter: packed encoder rows back into per-stream caches
(launcher: ``neuroflow/ops/cache_scatter.py``; reference: ``neuroflow/reference/cache_scatter.py``)."""

import triton
import triton.language as tl

# Default launch configuration for the GPU: BLOCK_T tokens x BLOCK_D channels per step.
CACHE_SCATTER_CONFIG = {"BLOCK_T": 16, "BLOCK_D": 128, "num_warps": 4, "num_stages": 1}


@triton.jit
def cache_scatter_kernel(
    src_ptr, cache_ptr, slot_ptr, cu_ptr, index_ptr,
    B, T_TOK, D, src_stride,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """cache[slot[b], index[t]] = src[t] for every packed token t < cu[B] of frame b.

    src_ptr: [T_cap, D] (row stride src_stride), any float dtype. cache_ptr: [S, T_TOK, D]
    contiguous. slot_ptr: [B] int64. cu_ptr: [B + 1] int32. index_ptr: [T_cap] int32 token
    positions. Rows of src past cu[B] are ignored.
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
    dst = cache_ptr + (slot * T_TOK + pos)[:, None] * D
    src = src_ptr + offs_t[:, None].to(tl.int64) * src_stride
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = t_mask[:, None] & (offs_d < D)[None, :]
        v = tl.load(src + offs_d[None, :], mask=m)
        tl.store(dst + offs_d[None, :], v.to(cache_ptr.dtype.element_ty), mask=m)
