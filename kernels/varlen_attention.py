"""Forward-only, non-causal varlen attention (FlashAttention-2 style online softmax) in Triton.

Device code and default launch configurations only; the launcher, the PyTorch reference and the
dispatch live in ``neuroflow/varlen.py``.

Layout: tokens of all segments are packed along the first axis, ``[T, H, Dh]`` with a contiguous
last axis. Program ``(m, b, h)`` computes ``BLOCK_M`` query rows of segment ``b``, head ``h``, and
streams that segment's keys/values through shared memory ``BLOCK_N`` rows at a time.
"""

import triton
import triton.language as tl

# Default launch configurations, keyed by (max_seqlen_q bucket, padded head dim). Bucket ``n``
# holds max_seqlen_q <= n, ``None`` everything longer. The query tile follows the longest query
# segment so that gate-sized segments (4-64 active tokens per stream) do not pay for a 128-row
# tile that is mostly masked. Tiles of >= 64 rows keep sm_90's wgmma (64-row warpgroup tiles) in
# play; 16- and 32-row tiles run mma.sync (HMMA) on both architectures. Chosen from the Triton
# fused-attention tutorial's tiles and then by compiling for sm_80 and sm_90 without a GPU
# (``python -m neuroflow.compile_check``): the largest tiles that stay at or under ~190 registers
# on both without spills. 128x64 tiles with 4 warps reach the 255-register cap on sm_80 (d64),
# and a 128-wide head with BLOCK_N=64 spills there, hence 8 warps and BLOCK_N=32 for those. Not
# yet timed on a GPU: tune these first when one is available.
SEQLEN_BUCKETS = (16, 32, 64, None)
DEFAULT_CONFIGS = {
    # short segments: one small query tile per (segment, head), early exit past the segment
    (16, 16): dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    (16, 32): dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    (16, 64): dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    (16, 128): dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    (32, 16): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    (32, 32): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    (32, 64): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    (32, 128): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    (64, 16): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    (64, 32): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    (64, 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    (64, 128): dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
    # long segments
    (None, 16): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    (None, 32): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    (None, 64): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    (None, 128): dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
}


@triton.jit
def varlen_attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    CuSeqlensQ,
    CuSeqlensK,
    KvStart,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Non-causal attention of each segment's queries over that segment's keys.

    Grid: ``(cdiv(max_seqlen_q, BLOCK_M), B, H)``.

    Args:
        Q: ``[Tq, H, HEAD_DIM]`` fp16, bf16 or fp32, strides ``(stride_qt, stride_qh, 1)``.
        K: ``[Tk_rows, H, HEAD_DIM]`` same dtype as Q, strides ``(stride_kt, stride_kh, 1)``.
        V: ``[Tk_rows, H, HEAD_DIM]`` same dtype as Q, strides ``(stride_vt, stride_vh, 1)``.
        Out: ``[Tq, H, HEAD_DIM]`` same dtype as Q, strides ``(stride_ot, stride_oh, 1)``; rows
            ``CuSeqlensQ[0] .. CuSeqlensQ[B] - 1`` are written, nothing else.
        CuSeqlensQ: ``[B + 1]`` int32; the query rows of segment b are
            ``CuSeqlensQ[b] .. CuSeqlensQ[b + 1] - 1``.
        CuSeqlensK: ``[B + 1]`` int32; segment b has ``CuSeqlensK[b + 1] - CuSeqlensK[b]`` keys.
        KvStart: ``[B]`` int32, the first K/V row of segment b; read only when HAS_KV_START,
            otherwise segment b's keys start at row ``CuSeqlensK[b]``.
        qk_scale: fp32, the softmax scale times log2(e) (the softmax runs in base 2).
        HEAD_DIM: the true head dim; HEAD_DIM_PAD: the next power of two >= max(HEAD_DIM, 16).
        ALIGN: 16 bytes in elements (8 for fp16/bf16, 4 for fp32) when the launcher has checked
            that every base pointer is 16-byte aligned and every stride a multiple of ALIGN, else
            1. Triton only specialises strides divisible by 16 elements, so without this hint a
            head dim of 72 (stride_qh = 72) would compile to scalar loads and spill.
        DOT_PRECISION: ``"ieee"`` for fp32 inputs (no TF32 rounding), ``"tf32"`` otherwise (it
            does not apply to fp16/bf16 operands).

    A segment without keys writes zeros (its softmax has no support; zeros rather than NaN so
    that an empty cache slot cannot poison later layers).
    """
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    head = tl.program_id(2)

    q_begin = tl.load(CuSeqlensQ + seg)
    q_len = tl.load(CuSeqlensQ + seg + 1) - q_begin
    # The grid is sized by the longest segment; shorter segments' extra tiles leave at once.
    if pid_m * BLOCK_M >= q_len:
        return
    k_first = tl.load(CuSeqlensK + seg)
    k_len = tl.load(CuSeqlensK + seg + 1) - k_first
    if HAS_KV_START:
        k_first = tl.load(KvStart + seg)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_valid = offs_m < q_len
    if HEAD_DIM == HEAD_DIM_PAD:
        q_mask = m_valid[:, None]
    else:
        q_mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]

    # Segment bases in int64: a packed cache ([S * T, H, Dh]) can pass 2**31 elements. Offsets
    # inside a tile stay int32.
    q_base = Q + q_begin.to(tl.int64) * stride_qt + head * stride_qh
    o_base = Out + q_begin.to(tl.int64) * stride_ot + head * stride_oh
    k_base = K + k_first.to(tl.int64) * stride_kt + head * stride_kh
    v_base = V + k_first.to(tl.int64) * stride_vt + head * stride_vh
    q_rows = offs_m * stride_qt
    o_rows = offs_m * stride_ot
    k_rows = offs_n * stride_kt
    v_rows = offs_n * stride_vt
    if ALIGN > 1:
        q_base = tl.multiple_of(q_base, 16)
        o_base = tl.multiple_of(o_base, 16)
        k_base = tl.multiple_of(k_base, 16)
        v_base = tl.multiple_of(v_base, 16)
        q_rows = tl.multiple_of(q_rows, [ALIGN])
        o_rows = tl.multiple_of(o_rows, [ALIGN])
        k_rows = tl.multiple_of(k_rows, [ALIGN])
        v_rows = tl.multiple_of(v_rows, [ALIGN])
    # K is read transposed ([HEAD_DIM_PAD, BLOCK_N]) so that q @ k needs no in-register transpose.
    k_ptrs = k_base + k_rows[None, :] + offs_d[:, None]
    v_ptrs = v_base + v_rows[:, None] + offs_d[None, :]

    # Padded head-dim columns load as 0: they add nothing to q.k and give 0 in the padded output.
    q = tl.load(q_base + q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    for start_n in range(0, k_len, BLOCK_N):
        n_valid = (start_n + offs_n) < k_len
        if HEAD_DIM == HEAD_DIM_PAD:
            k_mask = n_valid[None, :]
            v_mask = n_valid[:, None]
        else:
            k_mask = n_valid[None, :] & (offs_d < HEAD_DIM)[:, None]
            v_mask = n_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        # Every block holds at least one real key (start_n < k_len), so m_new is finite from the
        # first block on, and exp2(-inf - m_new) = 0 covers both the tail and the initial m_i.
        qk = tl.where(n_valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        # p goes to V's dtype so the second product also runs on fp16/bf16 tensor cores; the
        # accumulator stays fp32.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt

    # l_i == 0 only for a segment without keys (acc is 0 there): write zeros instead of 0/0.
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_i[:, None]
    tl.store(o_base + o_rows[:, None] + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=q_mask)
