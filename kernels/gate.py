"""Triton kernels of the fused EMA gate (launcher: ``neuroflow/ops/gate.py``; reference:
``neuroflow/reference/gate.py``).

The paper's gate takes three launches and no host synchronisation:

1. :func:`gate_embed_kernel`, one program per (block of BLOCK_P patches, frame): patch embedding
   as a ``[BLOCK_P, C*p*p] x [C*p*p, D]`` tensor-core product read straight from the frame,
   + bias + position embedding (not under ``signal="patch"``, whose surprise is on the patch
   embedding alone), then, per D tile, the cosine terms against the stream's EMA and
   the in-place EMA update; finally the surprise, the block's count of patches over the
   threshold, and the block's ``KF`` most surprising patches (candidates for the floor rule).
2. :func:`gate_pack_kernel`, same grid: from the block counts it derives every frame's active
   count (threshold rule, or the floor when too few pass: the floor's patches are the top of the
   candidates), the frame's offset in the packed batch (``cu_seqlens``), and each active patch's
   place; writes the active mask, the token index and the prefix tokens.
3. :func:`gate_rows_kernel`, one program per (BLOCK_P packed rows, frame): recomputes the
   embeddings of the active patches only, read through the token index, into their packed rows.

With any gate option (``neuroflow.reference.gate_settings``) :func:`gate_select_kernel` runs between 1 and
2, one program per frame: the decision needs the whole frame (mean surprise for motion norm, the
count for a scene cut, a top-k for budgets and floors, the staleness ages), so the embed kernel
leaves it out and the pack kernel places what the select kernel chose. The rows kernel also
writes the reference where it changes outside the EMA update (last-computed embeddings, scene
cuts).

Why recompute instead of keeping the ``[B, N, D]`` embedding: writing it would move as many bytes
as reading the pixels again (``D`` outputs vs ``C*p*p`` inputs per patch, equal for p=16, D=768)
and must be done for every patch, while the recomputation touches only the active patches, a
small fraction of the frame at the sparsities the gate is for.
"""

import triton
import triton.language as tl

# Default launch configuration for the GPU: (BLOCK_P, BLOCK_D, BLOCK_K, num_warps, num_stages).
# BLOCK_P = 64 rows lets sm_90 use wgmma. A program re-reads its pixels once per BLOCK_D tile of D
# and the whole [D, K] weight once per BLOCK_P patches, so the embedding's L2 traffic per patch is
# 2*D*K*(1/BLOCK_D + 1/BLOCK_P) bytes (fp16): 128-wide D tiles halve that of 32-wide ones (at
# D = K = 768, about 7x the HBM bytes a patch needs with 32-wide tiles, 3.6x with 128-wide ones).
# 64 x 128 is the largest tile that compiles without spills on sm_80 and sm_90 under Triton 3.6
# and 3.9 (about 210-230 registers; 128 x 128, or 64 x 128 on 4 warps, spill). Chosen by this
# count, not yet timed: ``bench/bench_gate.py --tiles all`` (a step of ``bench/gpu_suite.py``)
# times every tile of ``GATE_TILES``.
GATE_CONFIG = {"BLOCK_P": 64, "BLOCK_D": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2}

# fp32 frames (Hugging Face's default dtype) take the embedding's tl.dot in IEEE fp32, as the
# reference computes it: no tensor cores, every product on the FMA units, operands in registers.
# GATE_CONFIG's tile then needs 255 registers and spills hundreds of bytes inside the K loop
# (sm_80 and sm_90, Triton 3.9); 64 x 32 tiles still spill a slot inside the loop on sm_90 under
# Triton 3.6. 32 x 32 tiles over 32-wide K steps, one stage: on 4 warps the rows kernel still
# spilled a slot inside its loop on sm_80 under Triton 3.6 when it also stores references
# (reference="computed", the measured preset) at D 1152; on 8 warps every case compiles clean
# under both (at most 96 registers). Not timed on a GPU.
GATE_CONFIG_FP32 = {"BLOCK_P": 32, "BLOCK_D": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 1}

GATE_TILES = {
    "p64-d128": GATE_CONFIG,
    "p64-d64": {**GATE_CONFIG, "BLOCK_D": 64},
    "p64-d32": {**GATE_CONFIG, "BLOCK_D": 32},
    "p32-d32-fp32": GATE_CONFIG_FP32,
}
"""Named launch configurations that compile without spills, for the tile sweep of
``bench/bench_gate.py`` (the fp16/bf16 default first; ``p64-d32`` is the previous default;
``p32-d32-fp32`` is the fp32 default, the only one of them that compiles clean in fp32)."""

SELECT_BLOCK = 1024
"""Patches per step of :func:`gate_select_kernel`'s passes over a frame (one program per frame)."""


@triton.jit
def _embed_tile(
    px_frame, w_ptr, b_ptr, pe_ptr, p_off, offs_p, p_mask, offs_d, d_mask,
    sx_c, sx_h, sx_w, D, K,
    PATCH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ADD_PE: tl.constexpr = True,
):
    """Layer-0 embeddings of BLOCK_P patches x BLOCK_D channels, fp32, rounded through the model
    dtype exactly where the model rounds (after the convolution, after the position embedding).
    Without ADD_PE the patch embeddings alone (the convolution + bias, rounded): the gate's
    ``signal="patch"``; :func:`_add_pe` completes them.

    px_frame: the frame's first pixel; p_off: [BLOCK_P] int32 offset of each patch's top-left pixel.
    """
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # Column k of a patch is (channel, row, col) in the conv weight's [C, p, p] order.
        k_off = (offs_k // (PATCH * PATCH)) * sx_c + ((offs_k // PATCH) % PATCH) * sx_h + (offs_k % PATCH) * sx_w
        a = tl.load(px_frame + (p_off[:, None] + k_off[None, :]), mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + (offs_d[None, :] * K + offs_k[:, None]), mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    dt = w_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    x = acc.to(dt).to(tl.float32)
    if ADD_PE:
        x = _add_pe(x, pe_ptr, w_ptr, offs_p, p_mask, offs_d, d_mask, D)
    return x


@triton.jit
def _add_pe(x, pe_ptr, w_ptr, offs_p, p_mask, offs_d, d_mask, D):
    """Patch embeddings x (fp32, model-dtype values) + position embeddings, rounded through the
    model dtype (w_ptr's) as the model rounds the sum."""
    dt = w_ptr.dtype.element_ty
    pe = tl.load(pe_ptr + (offs_p[:, None] * D + offs_d[None, :]), mask=p_mask[:, None] & d_mask[None, :], other=0.0)
    return (x + pe.to(tl.float32)).to(dt).to(tl.float32)


@triton.jit
def gate_embed_kernel(
    px_ptr, w_ptr, b_ptr, pe_ptr, ema_ptr, slot_ptr, first_ptr,
    surprise_ptr, bcount_ptr, cand_val_ptr, cand_idx_ptr,
    sx_b, sx_c, sx_h, sx_w,
    N, D, K, GW, NB, threshold, decay,
    PATCH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    KF: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    DECIDE: tl.constexpr = True, WRITE_EMA: tl.constexpr = True, SIGNAL_PE: tl.constexpr = True,
):
    """Embed, compare with the EMA, update the EMA in place.

    The surprise and the EMA are of the gate's signal: the layer-0 embedding h (SIGNAL_PE), or
    the patch embedding without the position embedding (``signal="patch"``; the EMA pool then
    holds that). The packed tokens (:func:`gate_rows_kernel`) are h either way.

    With the gate options (DECIDE False) the decision is left to :func:`gate_select_kernel`:
    bcount and cand_* are not written; with ``reference="computed"`` (WRITE_EMA False) the stored
    reference is not touched here (the pack kernel writes the computed patches' embeddings).

    px_ptr: frames [B, C, H, W] (strides sx_*), model dtype. w_ptr: patch weight [D, K], K = C*p*p,
    model dtype. b_ptr: bias [D] (unused without HAS_BIAS). pe_ptr: position embeddings [N, D].
    ema_ptr: EMA pool [S, N, D] fp32, updated in place at row slot_ptr[frame] (int64 [B]).
    first_ptr: [B] int8, 1 for a stream's first frame (EMA := h, every patch passes).
    surprise_ptr: out [B, N] fp32 (inf on first frames). bcount_ptr: out [B, NB] int32, patches
    over the threshold per block. cand_val_ptr / cand_idx_ptr: out [B, NB, KF] fp32 / int32, the
    block's KF most surprising patches (ties: lower index), -inf / N where the block has fewer.
    """
    pid = tl.program_id(0)
    frame = tl.program_id(1).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < N
    p_off = (offs_p // GW) * PATCH * sx_h + (offs_p % GW) * PATCH * sx_w
    px_frame = px_ptr + frame * sx_b
    slot = tl.load(slot_ptr + frame)
    first = tl.load(first_ptr + frame) != 0
    ema_slot = ema_ptr + slot * N * D

    dot = tl.zeros((BLOCK_P,), dtype=tl.float32)
    hh = tl.zeros((BLOCK_P,), dtype=tl.float32)
    ee = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = _embed_tile(px_frame, w_ptr, b_ptr, pe_ptr, p_off, offs_p, p_mask, offs_d, d_mask,
                        sx_c, sx_h, sx_w, D, K, PATCH, BLOCK_P, BLOCK_D, BLOCK_K, HAS_BIAS, IEEE, SIGNAL_PE)
        m2 = p_mask[:, None] & d_mask[None, :]
        e_off = offs_p[:, None] * D + offs_d[None, :]
        e = tl.load(ema_slot + e_off, mask=m2, other=0.0)
        dot += tl.sum(h * e, axis=1)
        hh += tl.sum(h * h, axis=1)
        ee += tl.sum(e * e, axis=1)
        if WRITE_EMA:
            new_e = tl.where(first, h, (1.0 - decay) * e + decay * h)
            tl.store(ema_slot + e_off, new_e, mask=m2)

    # Same clamp as neuroflow.gate.COSINE_EPS: each norm at least 1e-8.
    den = tl.maximum(tl.sqrt(hh), 1e-8) * tl.maximum(tl.sqrt(ee), 1e-8)
    s = 1.0 - dot / den
    s = tl.where(first, float("inf"), s)
    tl.store(surprise_ptr + frame * N + offs_p, s, mask=p_mask)
    if DECIDE:
        passed = tl.where(first, p_mask, p_mask & (s > threshold))
        tl.store(bcount_ptr + frame * NB + pid, tl.sum(passed.to(tl.int32), axis=0))

        # The block's KF best (surprise desc, index asc): the frame's floor_tokens <= KF best patches
        # are always among the union of these lists.
        work = tl.where(p_mask, s, float("-inf"))
        cand = cand_val_ptr + (frame * NB + pid) * KF
        cidx = cand_idx_ptr + (frame * NB + pid) * KF
        for j in tl.static_range(KF):
            best = tl.max(work, axis=0)
            at = tl.min(tl.where((work == best) & p_mask, offs_p, N), axis=0)
            tl.store(cand + j, best)
            tl.store(cidx + j, at)
            work = tl.where(offs_p == at, float("-inf"), work)


@triton.jit
def _priority_key(s, age, K, STALE: tl.constexpr):
    """The gate's ranking as one int64 per patch, larger = earlier: stale patches first (older
    first), then surprise descending. Surprise maps to an order-preserving 32-bit code (IEEE
    bits, negatives flipped; -0 taken as +0); stale keys are ``2^32 * (age + 1) + code``, above
    every non-stale key. Equal keys are broken by patch index by the caller."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    code = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    if STALE:
        code = tl.where(age >= K, (age.to(tl.int64) + 1) * 4294967296 + code, code)
    return code


@triton.jit
def _candidates(s, m, age, threshold, K, HAS_THR: tl.constexpr, STALE: tl.constexpr):
    """The patches the rule must consider: over the threshold (every patch without one), or
    stale (``age >= K``); ``m`` masks the chunk's valid lanes."""
    if HAS_THR:
        c = s > threshold
    else:
        c = m
    if STALE:
        c = c | (age >= K)
    return c


@triton.jit
def _chunk_keys(s_row, age_row, n0, offs, N, K, STALE: tl.constexpr):
    """In-frame mask and :func:`_priority_key` of the patches ``n0 + offs`` of one frame (surprise
    row s_row, age row age_row, read only with STALE)."""
    m = n0 + offs < N
    s = tl.load(s_row + n0 + offs, mask=m, other=0.0)
    age = tl.zeros_like(offs)
    if STALE:
        age = tl.load(age_row + n0 + offs, mask=m, other=0)
    return m, _priority_key(s, age, K, STALE)


@triton.jit
def gate_select_kernel(
    surprise_ptr, age_ptr, slot_ptr, first_ptr,
    active_ptr, bcount_ptr, fcount_ptr, cut_ptr,
    since_ptr, drift_ptr, texture_ptr, kind_ptr,
    N, NB, threshold, floor_k, budget_k, cut_count, K, age_max,
    skip_count, every_k, drift_bound, rank_ptr,
    HAS_THR: tl.constexpr, MOTION: tl.constexpr, STALE: tl.constexpr, BUDGET: tl.constexpr,
    SCENE_CUT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
    POLICY: tl.constexpr = False, RANKED: tl.constexpr = False,
):
    """The gate options' decision for one frame (program = frame), after :func:`gate_embed_kernel`.

    surprise_ptr: [B, N] fp32 raw surprise (inf on first frames), rewritten with the normalised
    one under MOTION. age_ptr: age pool [S, N] int32 (STALE), row slot_ptr[frame], rewritten with
    the new ages. first_ptr: [B] int8.
    Outputs: active_ptr [B, N] int8; bcount_ptr [B, NB] int32 active patches per BLOCK_P block
    (for the pack kernel's placement); fcount_ptr [B] int32 active patches of the frame; cut_ptr
    [B] int8, 1 on a scene cut (a keyframe that is not a first frame; with POLICY any keyframe
    that is not a first frame).

    POLICY (the frame policy, ``neuroflow/reference/gate_settings.py``): since_ptr [S] int32 and drift_ptr
    [S] float32 counters at row slot_ptr[frame], rewritten; texture_ptr [B] float32, the unit of
    the frame's drift (``reference_texture`` of its reference, or 1); kind_ptr out [B] int8 (0 skip,
    1 partial, 2 keyframe). A keyframe when since + 1 >= every_k or drift + mean raw surprise /
    texture > drift_bound; else a skip when at most skip_count patches pass the threshold (raw).

    RANKED (a learned ranking, ``neuroflow/reference/patch_ranker.py``): rank_ptr [B, N] fp32
    scores order the patches in place of the surprise; k is still counted on the surprise.

    Rule: k = min(budget_k, max(floor_k, candidates)) with candidates = stale or over the
    threshold (every patch without one); active = the k first in the ranking of
    :func:`_priority_key` (ties: lower index). Candidates are a prefix of that ranking (not under
    RANKED), so when k equals their count the mask is theirs; otherwise the k-th key is found by
    bisection over the frame's key range (about 31 passes, 36 with stale patches) and ties at it
    are taken in index order. No host synchronisation anywhere.
    """
    frame = tl.program_id(0).to(tl.int64)
    first_v = tl.load(first_ptr + frame)
    first = first_v != 0
    s_row = surprise_ptr + frame * N
    r_row = rank_ptr + frame * N if RANKED else s_row  # the row the ranking keys are read from
    slot = tl.load(slot_ptr + frame)
    age_row = age_ptr + slot * N
    offs = tl.arange(0, BLOCK_S)

    # Pass 1: the frame's mean surprise and the raw count over the threshold (scene cut).
    mean = 0.0
    raw_pass = 0
    raw_total = 0.0
    if MOTION or SCENE_CUT or POLICY:
        total = tl.zeros((BLOCK_S,), dtype=tl.float32)
        over = tl.zeros((BLOCK_S,), dtype=tl.int32)
        for n0 in range(0, N, BLOCK_S):
            m = n0 + offs < N
            s = tl.load(s_row + n0 + offs, mask=m, other=0.0)
            total += s
            over += (m & (s > threshold)).to(tl.int32)
        raw_total = tl.sum(total, axis=0)
        mean = tl.where(first, 0.0, raw_total / N)  # first frames: inf, unused
        raw_pass = tl.sum(over, axis=0)
    cut = first_v < 0  # False
    if SCENE_CUT:
        cut = (raw_pass >= cut_count) & (first_v == 0)
    keyframe = first | cut
    skip = first_v < 0  # False
    if POLICY:
        since = tl.load(since_ptr + slot)
        acc = tl.load(drift_ptr + slot) + raw_total / N / tl.load(texture_ptr + frame)
        keyframe = keyframe | (since + 1 >= every_k) | (acc > drift_bound)
        skip = (~keyframe) & (raw_pass <= skip_count)
        tl.store(since_ptr + slot, tl.where(keyframe, 0, since + 1))
        tl.store(drift_ptr + slot, tl.where(keyframe, 0.0, acc))
        tl.store(kind_ptr + frame, tl.where(keyframe, 2, tl.where(skip, 0, 1)).to(tl.int8))
        cut = keyframe & (first_v == 0)

    # Pass 2: normalised surprise, candidates, the key range.
    cand_v = tl.zeros((BLOCK_S,), dtype=tl.int32)
    lo_v = tl.full((BLOCK_S,), 9223372036854775807, dtype=tl.int64)
    hi_v = tl.full((BLOCK_S,), -1, dtype=tl.int64)
    for n0 in range(0, N, BLOCK_S):
        m = n0 + offs < N
        s = tl.load(s_row + n0 + offs, mask=m, other=0.0)
        if MOTION:
            s = tl.where(first, s, s - mean)
            tl.store(s_row + n0 + offs, s, mask=m)
        age = tl.zeros((BLOCK_S,), dtype=tl.int32)
        if STALE:
            age = tl.load(age_row + n0 + offs, mask=m, other=0)
        c = _candidates(s, m, age, threshold, K, HAS_THR, STALE)
        cand_v += (m & c).to(tl.int32)
        if RANKED:
            key = _priority_key(tl.load(r_row + n0 + offs, mask=m, other=0.0), age, K, STALE)
        else:
            key = _priority_key(s, age, K, STALE)
        lo_v = tl.minimum(lo_v, tl.where(m, key, 9223372036854775807))
        hi_v = tl.maximum(hi_v, tl.where(m, key, -1))
    cand = tl.sum(cand_v, axis=0)
    k = tl.maximum(cand, floor_k)
    if BUDGET:
        k = tl.minimum(k, budget_k)
    k = tl.where(keyframe, N, tl.where(skip, 0, k))

    # The k-th largest key v (count(key >= v) >= k > count(key > v)), when the candidates are not
    # the answer: bisection, invariant count(key >= lo) >= k and count(key >= hi) < k.
    lo = tl.min(lo_v, axis=0)
    hi = tl.max(hi_v, axis=0) + 1
    use_cand = keyframe
    if not RANKED:
        use_cand = use_cand | (k == cand)
    if use_cand | (k == 0):
        hi = lo + 1
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        cnt_v = tl.zeros((BLOCK_S,), dtype=tl.int32)
        for n0 in range(0, N, BLOCK_S):
            m, key = _chunk_keys(r_row, age_row, n0, offs, N, K, STALE)
            cnt_v += (m & (key >= mid)).to(tl.int32)
        if tl.sum(cnt_v, axis=0) >= k:
            lo = mid
        else:
            hi = mid
    v = lo

    # Pass 3, per pack block: the mask, block counts, ties at v in index order, new ages.
    gt_v = tl.zeros((BLOCK_S,), dtype=tl.int32)
    if not use_cand:
        for n0 in range(0, N, BLOCK_S):
            m, key = _chunk_keys(r_row, age_row, n0, offs, N, K, STALE)
            gt_v += (m & (key > v)).to(tl.int32)
    need = k - tl.sum(gt_v, axis=0)  # patches taken among the ties at v
    offs_p = tl.arange(0, BLOCK_P)
    ties = 0
    for b in range(0, NB):
        p = b * BLOCK_P + offs_p
        m = p < N
        age = tl.zeros((BLOCK_P,), dtype=tl.int32)
        if STALE:
            age = tl.load(age_row + p, mask=m, other=0)
        if RANKED:
            # No candidate mask: use_cand is the keyframe alone here, which takes every patch
            # (fewer live registers: no surprise row in this loop).
            c = m
            key = _priority_key(tl.load(r_row + p, mask=m, other=0.0), age, K, STALE)
        else:
            s = tl.load(s_row + p, mask=m, other=0.0)
            c = _candidates(s, m, age, threshold, K, HAS_THR, STALE)
            key = _priority_key(s, age, K, STALE)
        eq = m & (key == v)
        rank = ties + tl.cumsum(eq.to(tl.int32), axis=0) - 1
        ties += tl.sum(eq.to(tl.int32), axis=0)
        picked = m & ((key > v) | (eq & (rank < need)))
        act = tl.where(keyframe, m, tl.where(use_cand, m & c, picked) & (~skip))
        tl.store(active_ptr + frame * N + p, act.to(tl.int8), mask=m)
        tl.store(bcount_ptr + frame * NB + b, tl.sum(act.to(tl.int32), axis=0))
        if STALE:
            start = (p % (K + 1)).to(tl.int32)
            grown = tl.minimum(age + 1, age_max)
            tl.store(age_row + p, tl.where(keyframe, start, tl.where(act, 0, grown)), mask=m)
    tl.store(fcount_ptr + frame, k)
    tl.store(cut_ptr + frame, cut.to(tl.int8))


@triton.jit
def gate_pack_kernel(
    prefix_ptr, first_ptr, surprise_ptr, bcount_ptr, cand_val_ptr, cand_idx_ptr, fcount_ptr,
    active_ptr, cu_ptr, index_ptr, packed_ptr,
    B, N, D, NB, threshold, floor_k,
    NUM_PREFIX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_NB: tl.constexpr, BLOCK_C: tl.constexpr, KF: tl.constexpr, SELECTED: tl.constexpr,
    kind_ptr, POLICY: tl.constexpr = False,
):
    """Decide and place the active patches of one block, and pack the frame's prefix tokens.

    Inputs as in :func:`gate_embed_kernel` (its outputs surprise/bcount/cand_*), plus
    prefix_ptr: [NUM_PREFIX, D] model dtype (CLS and register tokens, position embedding
    included), floor_k = min(floor_tokens, N) <= KF.
    Outputs: active_ptr [B, N] int8; cu_ptr [B + 1] int32 (segment = NUM_PREFIX prefix tokens, then
    the active patches in ascending order); index_ptr [B*(NUM_PREFIX+N)] int32, token position
    within the frame (prefix j -> j, patch n -> NUM_PREFIX + n); packed_ptr [B*(NUM_PREFIX+N), D]
    model dtype. Rows past cu[B] are not written.

    SELECTED (the gate options): :func:`gate_select_kernel` has decided; active_ptr is its mask
    (read, not written), bcount_ptr its per-block active counts, fcount_ptr [B] int32 the frames'
    counts. The active patches' embeddings are written by :func:`gate_rows_kernel` afterwards.
    POLICY (with SELECTED): kind_ptr [B] int8 frame kinds; a skipped frame (kind 0) has an empty
    segment, its prefix tokens are not packed either.
    """
    pid = tl.program_id(0)
    frame = tl.program_id(1)
    offs_nb = tl.arange(0, BLOCK_NB)

    # Offset of this frame: every earlier frame's segment length. A frame's active count follows
    # from its passed count alone: passed if at least floor_k passed, else floor_k.
    seg_start = 0
    row_counts = tl.load(bcount_ptr + frame * NB + offs_nb, mask=offs_nb < NB, other=0)
    runs = pid >= 0  # True; a skipped frame (POLICY) packs nothing
    if SELECTED:
        for f in range(0, frame):
            if POLICY:
                seg_start += tl.where(tl.load(kind_ptr + f) != 0, NUM_PREFIX + tl.load(fcount_ptr + f), 0)
            else:
                seg_start += NUM_PREFIX + tl.load(fcount_ptr + f)
        count = tl.load(fcount_ptr + frame)
        passed = count
        if POLICY:
            runs = tl.load(kind_ptr + frame) != 0
    else:
        for f in range(0, frame):
            passed_f = tl.sum(tl.load(bcount_ptr + f * NB + offs_nb, mask=offs_nb < NB, other=0), axis=0)
            seg_start += NUM_PREFIX + tl.maximum(passed_f, floor_k)
        passed = tl.sum(row_counts, axis=0)
        count = tl.maximum(passed, floor_k)
    end = seg_start + NUM_PREFIX + count
    write_prefix = pid == 0
    if POLICY:
        end = tl.where(runs, end, seg_start)
        write_prefix = write_prefix & runs
    if pid == 0:
        tl.store(cu_ptr + frame + 1, end)
        if frame == 0:
            tl.store(cu_ptr, 0)
    if write_prefix:
        for j in range(0, NUM_PREFIX):
            tl.store(index_ptr + seg_start + j, j)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                v = tl.load(prefix_ptr + j * D + offs_d, mask=offs_d < D)
                tl.store(packed_ptr + (seg_start + j).to(tl.int64) * D + offs_d, v, mask=offs_d < D)

    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < N
    s = tl.load(surprise_ptr + frame * N + offs_p, mask=p_mask, other=float("-inf"))
    first = tl.load(first_ptr + frame) != 0
    if SELECTED:
        active = p_mask & (tl.load(active_ptr + frame * N + offs_p, mask=p_mask, other=0) != 0)
        before = tl.sum(tl.where(offs_nb < pid, row_counts, 0), axis=0)
        pos = before + tl.cumsum(active.to(tl.int32), axis=0) - 1
    elif passed >= floor_k:
        active = tl.where(first, p_mask, p_mask & (s > threshold))
        before = tl.sum(tl.where(offs_nb < pid, row_counts, 0), axis=0)
        pos = before + tl.cumsum(active.to(tl.int32), axis=0) - 1
    else:
        # Floor: the frame's floor_k best among all blocks' candidates, picked in order.
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < NB * KF
        cv = tl.load(cand_val_ptr + frame * NB * KF + offs_c, mask=c_mask, other=float("-inf"))
        ci = tl.load(cand_idx_ptr + frame * NB * KF + offs_c, mask=c_mask, other=N)
        hit = tl.zeros((BLOCK_P,), dtype=tl.int32)
        pos = tl.zeros((BLOCK_P,), dtype=tl.int32)
        for j in tl.static_range(KF):
            best = tl.max(cv, axis=0)
            at = tl.min(tl.where(cv == best, ci, N), axis=0)
            chosen = (j < floor_k).to(tl.int32)
            hit += tl.where(offs_p == at, chosen, 0)
            # Selected patches are placed in index order: each one before this patch shifts it.
            pos += tl.where(at < offs_p, chosen, 0)
            cv = tl.where(ci == at, float("-inf"), cv)
            ci = tl.where(ci == at, N, ci)
        active = p_mask & (hit > 0)

    if not SELECTED:
        tl.store(active_ptr + frame * N + offs_p, active.to(tl.int8), mask=p_mask)
    dest = seg_start + NUM_PREFIX + pos
    tl.store(index_ptr + dest, NUM_PREFIX + offs_p, mask=active)


@triton.jit
def gate_rows_kernel(
    px_ptr, w_ptr, b_ptr, pe_ptr, cu_ptr, index_ptr, packed_ptr, ema_ptr, slot_ptr, cut_ptr,
    sx_b, sx_c, sx_h, sx_w,
    N, D, K, GW,
    PATCH: tl.constexpr, NUM_PREFIX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    STORE_REF: tl.constexpr, REF_ON_CUT_ONLY: tl.constexpr, SIGNAL_PE: tl.constexpr = True,
):
    """Embed the active patches only: program (j, frame) takes packed rows
    ``cu[frame] + NUM_PREFIX + j*BLOCK_P ...`` of the frame (its j-th BLOCK_P active patches, in
    the order :func:`gate_pack_kernel` placed them) and recomputes their layer-0 embeddings from
    the pixels; programs past the frame's active count return at once. So the recomputation costs
    the active patches, not every block that holds one (at 5% activity nearly every 64-patch
    block holds one).

    cu_ptr [B + 1] int32 and index_ptr (token position, patch n -> NUM_PREFIX + n) from the pack
    kernel; packed_ptr [B*(NUM_PREFIX+N), D] model dtype. STORE_REF: also write the embeddings
    (fp32) into the reference pool ema_ptr [S, N, D] at row slot_ptr[frame] (every computed patch
    under ``reference="computed"``; with REF_ON_CUT_ONLY only on scene-cut frames, cut_ptr [B] int8);
    without SIGNAL_PE (``signal="patch"``) the reference gets the patch embeddings before the
    position embedding is added, the packed rows the embeddings with it.
    """
    pid = tl.program_id(0)
    frame = tl.program_id(1)
    start = tl.load(cu_ptr + frame) + NUM_PREFIX
    end = tl.load(cu_ptr + frame + 1)
    if start + pid * BLOCK_P < end:
        rows = start + pid * BLOCK_P + tl.arange(0, BLOCK_P)
        valid = rows < end
        patch = tl.load(index_ptr + rows, mask=valid, other=NUM_PREFIX) - NUM_PREFIX
        p_off = (patch // GW) * PATCH * sx_h + (patch % GW) * PATCH * sx_w
        px_frame = px_ptr + frame.to(tl.int64) * sx_b
        out_rows = packed_ptr + rows[:, None].to(tl.int64) * D
        ref_valid = valid
        if REF_ON_CUT_ONLY:
            # The frame's flag as a vector: the interpreter refuses a scalar bool inside a store mask.
            ref_valid = valid & ((patch * 0 + tl.load(cut_ptr + frame)) != 0)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            x = _embed_tile(px_frame, w_ptr, b_ptr, pe_ptr, p_off, patch, valid, offs_d, d_mask,
                            sx_c, sx_h, sx_w, D, K, PATCH, BLOCK_P, BLOCK_D, BLOCK_K, HAS_BIAS, IEEE, SIGNAL_PE)
            h = x  # the gate's signal x; the packed token h = x + PE
            if not SIGNAL_PE:
                h = _add_pe(x, pe_ptr, w_ptr, patch, valid, offs_d, d_mask, D)
            tl.store(out_rows + offs_d[None, :], h.to(packed_ptr.dtype.element_ty), mask=valid[:, None] & d_mask[None, :])
            if STORE_REF:
                ref_rows = ema_ptr + tl.load(slot_ptr + frame) * N * D + patch[:, None].to(tl.int64) * D
                tl.store(ref_rows + offs_d[None, :], x, mask=ref_valid[:, None] & d_mask[None, :])
