"""Forward-only, non-causal varlen attention (FlashAttention-2 style online softmax) in Triton.

Device code and default launch configurations only; the launcher is
``neuroflow/ops/varlen_attention.py``, the PyTorch reference ``neuroflow/reference/varlen_attention.py``.

Layout: tokens of all segments are packed along the first axis, ``[T, H, Dh]`` with a contiguous
last axis. One launch serves one *segment-length class* ``SEG_LO < L_q <= SEG_HI`` with a query
tile (``BLOCK_M``) sized for it: program ``(w, h)`` takes work item ``w`` of that class (the
``w``-th query tile of the class's segments, in segment order), found on the device from
``cu_seqlens_q`` (no host sync, no worklist in memory); programs past the class's tile count
exit at once. The head dim is split in a power-of-two head part (``DH0``) and an optional
power-of-two tail (``DH1``, >= 16 for tl.dot): 72 runs as 64 + 16 (8 columns masked), 80 as
64 + 16, 96 as 64 + 32, instead of one 128-wide tile.
"""

import triton
import triton.language as tl

# Segment-length classes: class i holds query segments of SEG_CLASSES[i-1] < L <= SEG_CLASSES[i]
# (None: everything longer). Each class gets its own launch and query tile, so a batch where one
# stream sends a dense 784-token first frame and 31 streams send 20 tokens runs the 20-token
# segments on 32-row tiles, not on the dense frame's 128-row tiles.
SEG_CLASSES = (16, 32, 64, None)

HEAD_DIM_TILES = (16, 32, 48, 64, 80, 96, 128)
"""Head-dim tile widths DH0 + DH1 of head dims 16..128 (72 and 80 -> 80)."""

# Default launch configurations, keyed by (class upper bound, head-dim tile, element bytes of q):
# head-dim tile = DH0 + DH1 (64 for d <= 64, 80 for d 72/80, 96, 128), element bytes 2 for
# fp16/bf16, 4 for fp32 (TF32 tensor cores: operands twice as wide in shared memory and
# registers). Tiles of >= 64 rows keep sm_90's wgmma (64-row warpgroup tiles) in play; 16- and
# 32-row tiles run mma.sync (HMMA) on both architectures. Chosen from the Triton fused-attention
# tutorial's tiles and then by compiling for sm_80 and sm_90 without a GPU
# (``python -m neuroflow.tooling.compile_check``): the largest tiles that compile without spills and
# within shared memory on both. Not yet timed on a GPU: tune these first when one is available.
def _config(upper: int | None, width: int, elem: int) -> dict:
    block_m = upper or 128
    # A head-dim tail (width not a power of two) adds a [BLOCK_M, 16]-output dot to the chain of
    # dots, and Triton then lays the whole chain's warps along M: with more warps than 16-row
    # slices of the tile, every warp would compute the same rows. Small tiles with a tail
    # therefore get one warp per 16 rows.
    has_tail = width & (width - 1) != 0
    # Wide heads (128) and fp32 operands halve the key tile on the larger query tiles: the
    # largest that compiles without spills on sm_80 (255-register cap). So do fp32's 128-row
    # tiles and the 48-wide tail tile at 64 rows: with strides not divisible by 16 (3 heads of
    # 32 or 40) their 64-key steps park 16-24 bytes on the stack on sm_80.
    narrow_n = ((width == 128 and block_m >= 64) or (elem == 4 and (width > 64 or block_m == 128))
                or (has_tail and width < 64 and block_m == 64))
    warps = 8 if block_m == 128 else (block_m // 16 if has_tail and block_m < 64 else 4)
    if has_tail and block_m < 64:
        # One or two warps hold the whole key/value tile: 32 keys per step (16 for fp32), one
        # stage (the int8 path's conversions and fp32 operands spill otherwise). fp32 operands
        # do not fit one warp's registers at all: the 16-row class runs 32-row tiles on 2 warps.
        if elem == 4 and block_m == 16:
            block_m, warps = 32, 2
        # ... except the 48-wide tile's 16-row class in fp32: its 16-key steps park a 16-byte
        # stack slot on sm_80 under Triton 3.6 (3 heads of 40); 32-key steps compile clean.
        narrow_fp32 = elem == 4 and not (width < 64 and upper == 16)
        return dict(BLOCK_M=block_m, BLOCK_N=16 if narrow_fp32 else 32, num_warps=warps, num_stages=1)
    return dict(BLOCK_M=block_m, BLOCK_N=32 if narrow_n else 64, num_warps=warps,
                num_stages=2 if block_m <= 32 or elem == 4 else 3)


def _configs() -> dict:
    return {(upper, width, elem): _config(upper, width, elem)
            for upper in SEG_CLASSES for width in HEAD_DIM_TILES for elem in (2, 4)}


DEFAULT_CONFIGS = _configs()

SCHED_BLOCK = 256
"""Segments read per step when a program looks up its work item."""


@triton.jit
def varlen_attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    CuSeqlensQ,
    CuSeqlensK,
    KvStart,
    KScale,
    VScale,
    Lse,
    num_segments,
    seg_lo,
    seg_hi,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_kst,
    stride_ksh,
    stride_vst,
    stride_vsh,
    stride_os,
    stride_ls,
    stride_lt,
    stride_lh,
    num_splits,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    DH0: tl.constexpr,
    DH1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    KV_SCALED: tl.constexpr,
    ALIGN: tl.constexpr,
    KV_ALIGN: tl.constexpr,
    KV_ALIGN_BYTES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SCHED: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Non-causal attention of each segment's queries over that segment's keys, for the query
    segments of one length class.

    Grid: ``(capacity, H)``, or ``(capacity, H, num_splits)`` with SPLIT_K: ``capacity`` bounds
    the class's query tiles (host-known, e.g. from ``q.shape[0]``); programs past the real count
    exit.

    SPLIT_K (flash-decoding, for few query tiles over long key segments): program ``(w, h, z)``
    takes the z-th of ``num_splits`` equal runs of the segment's key blocks and writes its
    normalised partial output into Out ``[num_splits, Tq, H, HEAD_DIM]`` fp32 (split stride
    ``stride_os``) and its base-2 log-sum-exp (in ``qk_scale`` units; -inf for no keys) into Lse
    ``[num_splits, Tq, H]`` fp32 (strides ``stride_ls, stride_lt, stride_lh``); the launcher
    combines the splits.

    Args:
        Q: ``[Tq, H, HEAD_DIM]`` fp16, bf16 or fp32, strides ``(stride_qt, stride_qh, 1)``.
        K: ``[Tk_rows, H, HEAD_DIM]`` Q's dtype, or int8 / float8 when KV_SCALED, strides
            ``(stride_kt, stride_kh, 1)``.
        V: ``[Tk_rows, H, HEAD_DIM]`` like K, strides ``(stride_vt, stride_vh, 1)``.
        Out: ``[Tq, H, HEAD_DIM]`` Q's dtype, strides ``(stride_ot, stride_oh, 1)``; the rows of
            this class's segments are written, nothing else.
        CuSeqlensQ: ``[B + 1]`` int32 (``num_segments`` = B); the query rows of segment b are
            ``CuSeqlensQ[b] .. CuSeqlensQ[b + 1] - 1``. The kernel takes the segments with
            ``seg_lo < length <= seg_hi``.
        CuSeqlensK: ``[B + 1]`` int32; segment b has ``CuSeqlensK[b + 1] - CuSeqlensK[b]`` keys.
        KvStart: ``[B]`` int32, the first K/V row of segment b; read only when HAS_KV_START,
            otherwise segment b's keys start at row ``CuSeqlensK[b]``.
        KScale, VScale: ``[Tk_rows, H]`` fp32 or fp16 (strides ``(stride_kst, stride_ksh)``,
            ``(stride_vst, stride_vsh)``), read only when KV_SCALED: key row r of head h is
            ``K[r, h] * KScale[r, h]``. The scales are folded in exactly: the key scale into the
            columns of q.k, the value scale into the rows of p, so both products still run on
            tensor cores with the 8-bit values converted to Q's dtype (exact for int8 and e4m3).
        qk_scale: fp32, the softmax scale times log2(e) (the softmax runs in base 2).
        HEAD_DIM: the true head dim; DH0: the largest power of two <= HEAD_DIM (>= 16); DH1: 0,
            or the power of two (>= 16) covering the HEAD_DIM - DH0 remaining columns.
        ALIGN: 16 bytes in elements of Q (8 for fp16/bf16, 4 for fp32) when the launcher has
            checked that the base pointers of Q and Out are 16-byte aligned and their strides
            multiples of 16 bytes, else 1. Triton only specialises strides divisible by 16
            elements, so without this hint a head dim of 72 would compile to scalar loads.
        KV_ALIGN, KV_ALIGN_BYTES: the same for K and V: every K/V base pointer and stride is a
            multiple of KV_ALIGN_BYTES bytes (a power of two <= 16; an int8 cache with head dim
            72 gives 8), i.e. of KV_ALIGN elements of K (1: no hint).
        DOT_PRECISION: ``"tf32"``: fp32 inputs run on TF32 tensor cores (10-bit mantissa
            operands, fp32 accumulation); it does not apply to fp16/bf16 operands.
        SCHED: segments read per step of the work-item lookup.

    A segment without keys writes zeros (its softmax has no support; zeros rather than NaN so
    that an empty cache slot cannot poison later layers).
    """
    w = tl.program_id(0)
    head = tl.program_id(1)

    # Work item w -> (segment, query tile): scan the class's per-segment tile counts in segment
    # order. seg = number of segments whose cumulative count is <= w; before = their tile sum.
    seg = 0
    before = 0
    total = 0
    for c in range(0, num_segments, SCHED):
        offs_b = c + tl.arange(0, SCHED)
        b_ok = offs_b < num_segments
        lens = tl.load(CuSeqlensQ + offs_b + 1, mask=b_ok, other=0) - tl.load(CuSeqlensQ + offs_b, mask=b_ok, other=0)
        tiles = tl.where((lens > seg_lo) & (lens <= seg_hi), (lens + BLOCK_M - 1) // BLOCK_M, 0)
        cum = total + tl.cumsum(tiles, 0)
        done = cum <= w
        seg += tl.sum(done.to(tl.int32), 0)
        before += tl.sum(tl.where(done, tiles, 0), 0)
        total += tl.sum(tiles, 0)
    if w >= total:
        return
    pid_m = w - before

    q_begin = tl.load(CuSeqlensQ + seg)
    q_len = tl.load(CuSeqlensQ + seg + 1) - q_begin
    k_first = tl.load(CuSeqlensK + seg)
    k_len = tl.load(CuSeqlensK + seg + 1) - k_first
    if HAS_KV_START:
        k_first = tl.load(KvStart + seg)
    if SPLIT_K:
        split = tl.program_id(2)
        per = tl.cdiv(tl.cdiv(k_len, BLOCK_N), num_splits) * BLOCK_N
        k_lo = tl.minimum(split * per, k_len)
        k_first += k_lo
        k_len = tl.minimum(k_len - k_lo, per)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, DH0)
    m_valid = offs_m < q_len

    # Segment bases in int64: a packed cache ([S * T, H, Dh]) can pass 2**31 elements. Offsets
    # inside a tile stay int32.
    q_base = Q + q_begin.to(tl.int64) * stride_qt + head * stride_qh
    o_base = Out + q_begin.to(tl.int64) * stride_ot + head * stride_oh
    if SPLIT_K:
        o_base += split.to(tl.int64) * stride_os
    k_base = K + k_first.to(tl.int64) * stride_kt + head * stride_kh
    v_base = V + k_first.to(tl.int64) * stride_vt + head * stride_vh
    q_rows = offs_m * stride_qt
    o_rows = offs_m * stride_ot
    k_rows = offs_n * stride_kt
    v_rows = offs_n * stride_vt
    if ALIGN > 1:
        q_base = tl.multiple_of(q_base, 16)
        o_base = tl.multiple_of(o_base, 16)
        q_rows = tl.multiple_of(q_rows, [ALIGN])
        o_rows = tl.multiple_of(o_rows, [ALIGN])
    if KV_ALIGN > 1:
        k_base = tl.multiple_of(k_base, KV_ALIGN_BYTES)
        v_base = tl.multiple_of(v_base, KV_ALIGN_BYTES)
        k_rows = tl.multiple_of(k_rows, [KV_ALIGN])
        v_rows = tl.multiple_of(v_rows, [KV_ALIGN])
    # K is read transposed ([DH, BLOCK_N]) so that q @ k needs no in-register transpose.
    k0_ptrs = k_base + k_rows[None, :] + offs_d0[:, None]
    v0_ptrs = v_base + v_rows[:, None] + offs_d0[None, :]
    q0 = tl.load(q_base + q_rows[:, None] + offs_d0[None, :], mask=m_valid[:, None], other=0.0)
    acc0 = tl.zeros([BLOCK_M, DH0], dtype=tl.float32)
    if DH1 > 0:
        # The tail's columns past HEAD_DIM load as 0: they add nothing to q.k and are not stored.
        offs_d1 = DH0 + tl.arange(0, DH1)
        d1_valid = offs_d1 < HEAD_DIM
        k1_ptrs = k_base + k_rows[None, :] + offs_d1[:, None]
        v1_ptrs = v_base + v_rows[:, None] + offs_d1[None, :]
        q1 = tl.load(q_base + q_rows[:, None] + offs_d1[None, :], mask=m_valid[:, None] & d1_valid[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, DH1], dtype=tl.float32)
    if KV_SCALED:
        ks_ptrs = KScale + (k_first.to(tl.int64) + offs_n) * stride_kst + head * stride_ksh
        vs_ptrs = VScale + (k_first.to(tl.int64) + offs_n) * stride_vst + head * stride_vsh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, k_len, BLOCK_N):
        n_valid = (start_n + offs_n) < k_len
        k0 = tl.load(k0_ptrs, mask=n_valid[None, :], other=0.0).to(q0.dtype)
        qk = tl.dot(q0, k0, input_precision=DOT_PRECISION)
        if DH1 > 0:
            k1 = tl.load(k1_ptrs, mask=n_valid[None, :] & d1_valid[:, None], other=0.0).to(q0.dtype)
            qk += tl.dot(q1, k1, input_precision=DOT_PRECISION)
        if KV_SCALED:
            k_scale = tl.load(ks_ptrs, mask=n_valid, other=0.0).to(tl.float32)
            qk = qk * (k_scale * qk_scale)[None, :]
        else:
            qk = qk * qk_scale
        # Every block holds at least one real key (start_n < k_len), so m_new is finite from the
        # first block on, and exp2(-inf - m_new) = 0 covers both the tail and the initial m_i.
        qk = tl.where(n_valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_SCALED:
            p = p * tl.load(vs_ptrs, mask=n_valid, other=0.0).to(tl.float32)[None, :]
        # p goes to Q's dtype so the second product also runs on tensor cores; the accumulator
        # stays fp32.
        p = p.to(q0.dtype)
        v0 = tl.load(v0_ptrs, mask=n_valid[:, None], other=0.0).to(q0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if DH1 > 0:
            v1 = tl.load(v1_ptrs, mask=n_valid[:, None] & d1_valid[None, :], other=0.0).to(q0.dtype)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
            k1_ptrs += BLOCK_N * stride_kt
            v1_ptrs += BLOCK_N * stride_vt
        m_i = m_new
        k0_ptrs += BLOCK_N * stride_kt
        v0_ptrs += BLOCK_N * stride_vt
        if KV_SCALED:
            ks_ptrs += BLOCK_N * stride_kst
            vs_ptrs += BLOCK_N * stride_vst

    # l_i == 0 only for a segment without keys (acc is 0 there): write zeros instead of 0/0.
    if SPLIT_K:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        lse_ptrs = Lse + split.to(tl.int64) * stride_ls + (q_begin.to(tl.int64) + offs_m) * stride_lt + head * stride_lh
        tl.store(lse_ptrs, lse, mask=m_valid)
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    out0 = o_base + o_rows[:, None] + offs_d0[None, :]
    tl.store(out0, (acc0 * inv_l[:, None]).to(Out.dtype.element_ty), mask=m_valid[:, None])
    if DH1 > 0:
        out1 = o_base + o_rows[:, None] + offs_d1[None, :]
        tl.store(out1, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty), mask=m_valid[:, None] & d1_valid[None, :])
