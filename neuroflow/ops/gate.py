"""The gate as one fused op over a batch of frames: the launcher of ``kernels/gate.py``.

``gate(...)`` embeds the frames (patch convolution + position embedding), compares each patch with
its stream's EMA (of the embedding, or under ``signal="patch"`` of the patch embedding without the
position embedding), updates the EMA in place, applies the threshold and floor, and packs the computed
tokens of every frame (prefix tokens, then active patches in ascending order) into one ``[T, D]``
batch with ``cu_seqlens``: the input the packed encoder takes.

The Triton path takes three launches (four with any gate option) and no host synchronisation; the reference with the same
contract is :func:`neuroflow.reference.gate.gate_reference`. :mod:`neuroflow.ops.dispatch` picks one
and records it.
"""

from __future__ import annotations

import contextlib

import torch

from . import dispatch
from ..reference.gate_settings import GateSettings
from ..reference.gate import (
    AGE_MAX,
    FIRST_FRAME_SURPRISE,
    PackedFrames,
    as_settings,
    batch_budget_mask,
    check_age_pool,
    check_feature_args,
    check_gate_args,
    check_policy_pools,
    cosine_surprise,
    ema_dtype,
    gate_features_reference,
    gate_reference,
    reference_texture,
    scene_cut_count,
)
from ..reference.patch_ranker import ranker_scores
from ._launch import CompileCase, cdiv, next_pow2

__all__ = ["MAX_FLOOR", "GateSettings", "PackedFrames", "ema_dtype", "gate", "gate_features", "gate_features_reference",
           "gate_reference"]

OP = "gate"

MAX_FLOOR = 16
"""Largest ``min(floor_tokens, N)`` the two-launch kernel path handles (it keeps that many
candidates per block); with any gate option the select kernel takes any floor."""

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

POLICY_NEVER = 2**30
"""``keyframe_every`` handed to the select kernel when it is not set (no stream gets that old)."""
DRIFT_NEVER = 3.0e38
"""``keyframe_drift`` handed to the select kernel when it is not set."""


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocates every kernel output; tests swap it for one that poisons (NaN, sentinels) to prove
    the kernels write each element they return."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _unsupported(frames, weight, pos_embed, ema, st: GateSettings, n, force_active, age, policy=None) -> str | None:
    """Why the kernel cannot take this call, or None."""
    if force_active is not None:
        return "a forced active mask"
    if torch.is_grad_enabled() and (frames.requires_grad or weight.requires_grad or pos_embed.requires_grad):
        return "gradients are needed and the kernel is forward-only"
    if isinstance(st.threshold, torch.Tensor) or isinstance(st.ema_decay, torch.Tensor):
        return "per-frame thresholds or decays"
    if frames.dtype not in _TRITON_DTYPES or ema.dtype != torch.float32:
        return f"dtype {frames.dtype} with EMA {ema.dtype}"
    if st.is_default_rule and min(st.floor_tokens, n) > MAX_FLOOR:
        return f"floor of {min(st.floor_tokens, n)} tokens (the kernel keeps at most {MAX_FLOOR} candidates)"
    if age is not None and not age.is_contiguous():
        return "non-contiguous age pool"
    if not ema.is_contiguous():
        return "non-contiguous EMA pool"
    if policy is not None and not (policy[0].is_contiguous() and policy[1].is_contiguous()):
        return "non-contiguous policy counters"
    if not dispatch.gpu_launch(frames.device) and frames.dtype == torch.bfloat16:
        return "bfloat16 under the Triton interpreter (its bf16 arithmetic is broken)"
    return None


def gate(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    prefix: torch.Tensor,
    ema: torch.Tensor,
    slot: torch.Tensor,
    first: torch.Tensor,
    threshold: GateSettings | float,
    ema_decay: float | None = None,
    floor_tokens: int | None = None,
    config: dict | None = None,
    force_active: torch.Tensor | None = None,
    age: torch.Tensor | None = None,
    policy: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PackedFrames:
    """Gate and pack a batch of frames, one per stream; updates ``ema`` in place.

    Args:
        frames: ``[B, C, H, W]`` model dtype (fp32, fp16 or bf16).
        weight: patch-embedding convolution weight ``[D, C, p, p]``; bias ``[D]`` or None.
        pos_embed: ``[N, D]`` position embeddings of the frame's patch grid, model dtype.
        prefix: ``[P, D]`` layer-0 embeddings of the prefix tokens (P = 0 for SigLIP).
        ema: ``[S, N, D]`` float32 EMA pool; row ``slot[b]`` belongs to frame b's stream. It holds
            the reference of the settings' signal: layer-0 embeddings, or under
            ``signal="patch"`` patch embeddings without the position embedding.
        slot: ``[B]`` int64. first: ``[B]`` bool, the stream's first frame (EMA := h).
        threshold: a :class:`GateSettings` (then ``ema_decay`` and ``floor_tokens`` stay None), or
            the paper's three settings ``threshold, ema_decay, floor_tokens`` as numbers.
        config: kernel launch settings (tests); default per device.
        force_active: optional ``[B, N]`` bool replacing the threshold/floor decision (first frames
            stay dense); the reference path runs it.
        age: ``[S, N]`` int32 age pool (frames since each patch was last computed), needed exactly
            when ``max_staleness`` is set; updated in place at the frames' slots like ``ema``.
        policy: ``(since [S, 1] int32, drift [S, 1] float32)`` frame-policy counters, needed
            exactly with the frame policy (``skip_below``/``keyframe_every``/``keyframe_drift``);
            updated in place like ``ema``. The result's ``frame_kind`` then tells skip (0, empty
            segment), partial (1) and keyframe (2).
    """
    n, d, p = check_gate_args(frames, weight, pos_embed, prefix, ema, slot, first)
    st = as_settings(threshold, ema_decay, floor_tokens)
    check_age_pool(st, age, ema)
    check_policy_pools(st, policy, ema)
    unsupported = _unsupported(frames, weight, pos_embed, ema, st, n, force_active, age, policy)
    if dispatch.choose(OP, frames.device, unsupported) == dispatch.REFERENCE:
        return gate_reference(frames, weight, bias, pos_embed, prefix, ema, slot, first, st,
                              force_active=force_active, age=age, policy=policy)
    with _on_device(frames.device):
        return _gate_triton(frames, weight, bias, pos_embed, prefix, ema, slot, first, st, age, n, d, p, config,
                            policy)


OP_FEATURES = "gate_features"


def gate_features(
    tokens: torch.Tensor,
    num_prefix: int,
    ema: torch.Tensor,
    slot: torch.Tensor,
    first: torch.Tensor,
    settings: GateSettings,
    force_active: torch.Tensor | None = None,
    age: torch.Tensor | None = None,
    policy: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
) -> PackedFrames:
    """The gate on given features instead of the layer-0 embedding (``NeuroFlow(probe_layers=l)``):
    decide on every patch's layer-l hidden state, pack the computed tokens' rows.

    Args:
        tokens: ``[B, P + N, D]`` every token's features (the input to layer l: prefix tokens,
            then the patches in row-major order), any float dtype; the packed rows are theirs.
        num_prefix: P.
        ema: ``[S, N, D]`` float32 reference pool: each patch's features when it was last computed
            (``settings.reference`` must be ``"computed"``), row ``slot[b]`` for frame b; the
            computed patches' rows are rewritten in place.
        slot: ``[B]`` int64. first: ``[B]`` bool, first frames (dense, reference := features).
        settings: the gate's :class:`GateSettings` (every option but ``reference="ema"``).
        force_active, age, policy: as for :func:`gate` (``force_active`` runs the reference path).
        config: kernel launch settings (tests); default per device.

    The kernel path: the cosine surprise against the pool as device-side torch ops, then the
    gate's select and pack kernels (:func:`gate_select_kernel`, :func:`gate_pack_kernel`) as in
    :func:`gate`, the packed rows gathered from ``tokens``; no host synchronisation. The reference
    is :func:`neuroflow.reference.gate.gate_features_reference`.
    """
    check_feature_args(tokens, num_prefix, ema, slot, first, settings)
    check_age_pool(settings, age, ema)
    check_policy_pools(settings, policy, ema)
    unsupported = _features_unsupported(tokens, ema, settings, force_active, age, policy)
    if dispatch.choose(OP_FEATURES, tokens.device, unsupported) == dispatch.REFERENCE:
        return gate_features_reference(tokens, num_prefix, ema, slot, first, settings, force_active=force_active,
                                       age=age, policy=policy)
    with _on_device(tokens.device):
        return _gate_features_triton(tokens, num_prefix, ema, slot, first, settings, age, policy, config)


def _features_unsupported(tokens, ema, st: GateSettings, force_active, age, policy) -> str | None:
    """Why the kernel path of :func:`gate_features` cannot take this call, or None."""
    if force_active is not None:
        return "a forced active mask"
    if torch.is_grad_enabled() and tokens.requires_grad:
        return "gradients are needed and the kernel is forward-only"
    if isinstance(st.threshold, torch.Tensor) or isinstance(st.ema_decay, torch.Tensor):
        return "per-frame thresholds or decays"
    if age is not None and not age.is_contiguous():
        return "non-contiguous age pool"
    if policy is not None and not (policy[0].is_contiguous() and policy[1].is_contiguous()):
        return "non-contiguous policy counters"
    return None


def _gate_features_triton(tokens, num_prefix: int, ema, slot, first, st: GateSettings, age, policy,
                          config) -> PackedFrames:
    """Surprise as torch ops, then the select and pack kernels; rows gathered from ``tokens``."""
    from ..kernels.gate import GATE_CONFIG, gate_pack_kernel

    b, t, d = tokens.shape
    n, dev = t - num_prefix, tokens.device
    cfg = dict(GATE_CONFIG)
    if not dispatch.gpu_launch(dev):
        cfg.update(BLOCK_P=min(256, next_pow2(n)))  # the interpreter: one pack block per frame
    cfg.update(config or {})
    nb = cdiv(n, cfg["BLOCK_P"])
    slot = slot.to(torch.int64)
    first_i8 = first.to(torch.int8)
    h = tokens[:, num_prefix:]
    old_ref = ema.index_select(0, slot)
    # The select kernel reads the raw surprise (inf on first frames) and normalises it itself.
    surprise = torch.where(first.view(-1, 1), FIRST_FRAME_SURPRISE, cosine_surprise(h, old_ref)).float().contiguous()
    bcount = _empty(b, nb, dtype=torch.int32, device=dev)
    texture = _drift_texture(old_ref, first) if _needs_texture(st) else None
    active, fcount, cut, kind = _select(surprise, bcount, age, slot, first, first_i8, st, policy, n, nb, cfg,
                                        texture)
    cap = b * t
    cu = _empty(b + 1, dtype=torch.int32, device=dev)
    index = _empty(cap, dtype=torch.int32, device=dev)
    # The pack kernel places the tokens (cu_seqlens, index); it copies no channel (D = 0): the rows
    # are the features, gathered below. Its candidate and prefix arguments are not read (SELECTED).
    dispatch.launchable(gate_pack_kernel, dev)[(nb, b)](
        tokens, first_i8, surprise, bcount, surprise, bcount, fcount,
        active, cu, index, tokens, b, n, 0, nb, 0.0, 0,
        NUM_PREFIX=num_prefix, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=16,
        BLOCK_NB=next_pow2(nb), BLOCK_C=next_pow2(nb), KF=1, SELECTED=True,
        kind_ptr=kind if st.policy else first_i8, POLICY=st.policy,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # Row r of frame f holds token index[r] of f; rows past cu[B] read row 0 (unused, as in gate()).
    r = torch.arange(cap, device=dev)
    frame = torch.searchsorted(cu[1:].to(torch.int64), r, right=True).clamp_max(b - 1)
    valid = r < cu[-1]
    # (The clamp changes no real row; it keeps the compile check's recorded, unrun launches in bounds.)
    packed = tokens.reshape(cap, d)[torch.where(valid, frame * t + index.to(torch.int64).clamp(0, t - 1), 0)]
    # reference="computed": the computed patches' features become their reference (keyframes: all).
    chosen = active.bool()
    ema.index_copy_(0, slot, torch.where(chosen.unsqueeze(-1), h.to(ema.dtype), old_ref))
    frame_kind = kind if st.policy else _kinds(first, cut if st.scene_cut is not None else None)
    return PackedFrames(surprise, chosen, cu, index, packed, num_prefix, frame_kind)


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, whatever the current device is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _gate_triton(frames, weight, bias, pos_embed, prefix, ema, slot, first, st: GateSettings, age,
                 n, d, p, config, policy=None) -> PackedFrames:
    """Three launches for the paper's gate (embed + decide per block, place, embed the active
    rows); four with any option (:func:`gate_select_kernel` once per frame after the embed).
    No host synchronisation either way."""
    from ..kernels.gate import GATE_CONFIG, GATE_CONFIG_FP32, gate_embed_kernel, gate_pack_kernel, gate_rows_kernel

    threshold, ema_decay, floor_tokens = st.threshold, st.ema_decay, st.floor_tokens
    options = not st.is_default_rule
    signal_pe = st.signal == "embedding"  # the surprise's vectors include the position embedding

    dev = frames.device
    # A D tile wider than the model's D would only be masked off (small test models).
    base = GATE_CONFIG_FP32 if frames.dtype == torch.float32 else GATE_CONFIG
    cfg = dict(base, BLOCK_D=min(base["BLOCK_D"], max(16, next_pow2(d))))
    if not dispatch.gpu_launch(dev):
        # The interpreter pays per program and per loop step, not per element: one tile per frame.
        cfg.update(BLOCK_P=min(256, next_pow2(n)), BLOCK_D=next_pow2(d), BLOCK_K=next_pow2(weight[0].numel()))
    cfg.update(config or {})
    b = frames.shape[0]
    k = weight[0].numel()
    num_prefix = prefix.shape[0]
    floor_k = min(floor_tokens, n)
    # Per-block floor candidates serve the two-launch decision only; the select kernel needs none.
    kf = 1 if options else next_pow2(max(1, floor_k))
    nb = cdiv(n, cfg["BLOCK_P"])
    w2 = weight.reshape(d, k).contiguous()
    pe = pos_embed.contiguous()
    has_bias = bias is not None
    bias_arg = bias if has_bias else w2
    ieee = frames.dtype == torch.float32
    first_i8 = first.to(torch.int8)
    slot = slot.to(torch.int64)

    thr = 0.0 if threshold is None else float(threshold)
    surprise = _empty(b, n, dtype=torch.float32, device=dev)
    bcount = _empty(b, nb, dtype=torch.int32, device=dev)
    cand_val = _empty(b, nb, kf, dtype=torch.float32, device=dev)
    cand_idx = _empty(b, nb, kf, dtype=torch.int32, device=dev)
    grid = (nb, b)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    embed = dispatch.launchable(gate_embed_kernel, dev)
    pack = dispatch.launchable(gate_pack_kernel, dev)
    sx = frames.stride()
    # A skipped frame must leave the EMA as it was, but the embed kernel updates it before the
    # decision: keep the frames' rows (a device copy, no sync) and put skipped frames' back below.
    saved = ema.index_select(0, slot) if st.skip_below is not None and st.reference == "ema" else None
    # The drift's (and the batch budget's) unit is read from the reference before the embed kernel's EMA update.
    texture = None
    if options and _needs_texture(st):
        texture = _drift_texture(saved if saved is not None else ema.index_select(0, slot), first)
    embed[grid](
        frames, w2, bias_arg, pe, ema, slot, first_i8, surprise, bcount, cand_val, cand_idx,
        sx[0], sx[1], sx[2], sx[3], n, d, k, frames.shape[3] // p, nb, thr, float(ema_decay),
        PATCH=p, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"], KF=kf,
        HAS_BIAS=has_bias, IEEE=ieee, DECIDE=not options, WRITE_EMA=st.reference == "ema", SIGNAL_PE=signal_pe,
        **launch,
    )
    cap = b * (num_prefix + n)
    active = _empty(b, n, dtype=torch.int8, device=dev)
    fcount = cut = kind = bcount
    if options:
        active, fcount, cut, kind = _select(surprise, bcount, age, slot, first, first_i8, st, policy, n, nb, cfg,
                                            texture, (frames.shape[2] // p, frames.shape[3] // p))
        if saved is not None:
            ema.index_copy_(0, slot, torch.where((kind == 0).view(-1, 1, 1), saved, ema.index_select(0, slot)))
    cu = _empty(b + 1, dtype=torch.int32, device=dev)
    index = _empty(cap, dtype=torch.int32, device=dev)
    packed = _empty(cap, d, dtype=frames.dtype, device=dev)
    pack[grid](
        prefix.to(frames.dtype).contiguous(), first_i8, surprise, bcount, cand_val, cand_idx, fcount,
        active, cu, index, packed, b, n, d, nb, thr, floor_k,
        NUM_PREFIX=num_prefix, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"],
        BLOCK_NB=next_pow2(nb), BLOCK_C=next_pow2(nb * kf), KF=kf, SELECTED=options,
        kind_ptr=kind if st.policy else first_i8, POLICY=st.policy, **launch,
    )
    rows = dispatch.launchable(gate_rows_kernel, dev)
    rows[grid](
        frames, w2, bias_arg, pe, cu, index, packed, ema, slot, cut,
        sx[0], sx[1], sx[2], sx[3], n, d, k, frames.shape[3] // p,
        PATCH=p, NUM_PREFIX=num_prefix, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"],
        HAS_BIAS=has_bias, IEEE=ieee, STORE_REF=st.reference == "computed" or st.keyframe_triggers,
        REF_ON_CUT_ONLY=st.reference == "ema" and st.keyframe_triggers, SIGNAL_PE=signal_pe, **launch,
    )
    frame_kind = kind if st.policy else _kinds(first, cut if st.scene_cut is not None else None)
    return PackedFrames(surprise, active.bool(), cu, index, packed, num_prefix, frame_kind)


def _needs_texture(st: GateSettings) -> bool:
    """Whether the decision needs the reference's texture: the unit of ``keyframe_drift`` and of the
    batch budget's cross-frame ranking of the surprise (not of a ranker's scores)."""
    return st.keyframe_drift is not None or (st.batch_budget is not None and st.ranker is None)


def _drift_texture(ref: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The texture unit per frame (``keyframe_drift``, the batch budget): ``reference_texture`` of
    the frames' reference rows ``ref`` ``[B, N, D]`` as device torch ops (no sync), 1.0 on first
    frames (their rows hold no reference yet). ``[B]`` float32."""
    return torch.where(first, 1.0, reference_texture(ref)).contiguous()


def _select(surprise, bcount, age, slot, first, first_i8, st: GateSettings, policy, n: int, nb: int, cfg: dict,
            texture: torch.Tensor | None = None, grid: tuple[int, int] | None = None):
    """The gate options' decision (:func:`gate_select_kernel`, then the batch budget) on the
    frames' surprise ``[B, N]`` float32 (rewritten under motion norm); updates the age and policy
    pools in place and writes ``bcount`` ``[B, NB]``. ``texture``: ``[B]`` float32, the unit of each
    frame's drift and of the batch budget's cross-frame ranking (:func:`_drift_texture`; None: 1).
    ``grid``: the patch grid, for a ranker's features. Returns ``(active [B, N] int8, fcount [B] int32, cut [B] int8, kind [B] int8)``
    (``kind`` is ``cut`` without the frame policy)."""
    from ..kernels.gate import SELECT_BLOCK, gate_select_kernel

    b, dev = surprise.shape[0], surprise.device
    thr = 0.0 if st.threshold is None else float(st.threshold)
    active = _empty(b, n, dtype=torch.int8, device=dev)
    fcount = _empty(b, dtype=torch.int32, device=dev)
    cut = _empty(b, dtype=torch.int8, device=dev)
    budget_k = st.budget_count(n)
    stale_k = st.max_staleness or 1
    select = dispatch.launchable(gate_select_kernel, dev)
    kind = _empty(b, dtype=torch.int8, device=dev) if st.policy else cut
    since, drift = policy if policy is not None else (bcount, surprise)
    unit = texture  # the batch budget's
    if st.keyframe_drift is None:
        texture = None  # without it the drift counter is the raw sum
    if texture is None:
        texture = torch.ones(b, dtype=torch.float32, device=dev) if st.policy else surprise
    old_age = age.index_select(0, slot) if st.batch_budget is not None and age is not None else None
    order_by = surprise
    if st.ranker is not None:
        # The learned ranking's scores, as device torch ops from the raw surprise (before the
        # select kernel rewrites it under motion norm) and the counters before this frame.
        since_before = policy[0].index_select(0, slot).view(-1) if policy is not None else None
        thr_f = None if st.threshold is None else float(st.threshold)
        order_by = ranker_scores(st.ranker, surprise, first, grid, thr_f, since_before)
    select[(b,)](
        surprise, age if age is not None else bcount, slot, first_i8, active, bcount, fcount, cut,
        since, drift, texture, kind,
        n, nb, thr, min(st.floor_tokens, n), budget_k or n,
        scene_cut_count(st.scene_cut, n) if st.scene_cut else n + 1, stale_k, AGE_MAX,
        st.skip_count(n), st.keyframe_every or POLICY_NEVER, float(st.keyframe_drift) if st.keyframe_drift is not None else DRIFT_NEVER,
        order_by, HAS_THR=st.threshold is not None, MOTION=st.motion_norm, STALE=st.max_staleness is not None,
        BUDGET=budget_k is not None, SCENE_CUT=st.scene_cut is not None,
        BLOCK_S=min(cfg.get("BLOCK_S", SELECT_BLOCK), next_pow2(n)), BLOCK_P=cfg["BLOCK_P"], POLICY=st.policy,
        RANKED=st.ranker is not None, num_warps=4,
    )
    if st.batch_budget is not None:
        _apply_batch_budget(st, order_by, active, bcount, fcount, age, old_age, slot, first, kind, cut, n, nb,
                            cfg["BLOCK_P"], unit if st.ranker is None else None)
    return active, fcount, cut, kind


def _apply_batch_budget(st: GateSettings, surprise, active, bcount, fcount, age, old_age, slot, first, kind, cut,
                        n: int, nb: int, block_p: int, unit: torch.Tensor | None = None) -> None:
    """The batch budget between the select and pack kernels, as torch ops on the device (no sync):
    the batch-wide ranking of :func:`batch_budget_mask` (on ``surprise``, or a ranker's scores)
    over the select kernel's masks, then the
    mask, the per-block and per-frame counts and the ages of the patches it cut rewritten."""
    keyframe = (kind == 2) if st.policy else _kinds(first, cut if st.scene_cut is not None else None) == 2
    chosen = active.bool()
    stale = old_age >= st.max_staleness if old_age is not None else None
    keep = batch_budget_mask(surprise, chosen, keyframe, st.batch_budget, stale, old_age, unit=unit)
    active.copy_(keep.to(torch.int8))
    padded = torch.nn.functional.pad(keep.to(torch.int32), (0, nb * block_p - n))
    bcount.copy_(padded.view(-1, nb, block_p).sum(dim=2).to(torch.int32))
    fcount.copy_(keep.sum(dim=1).to(torch.int32))
    if age is not None:
        # The select kernel set the ages of its chosen patches to 0; a patch the budget cut grew.
        lost = chosen & ~keep
        grown = (old_age + 1).clamp_max(AGE_MAX)
        age.index_copy_(0, slot, torch.where(lost, grown, age.index_select(0, slot)).to(torch.int32))


def _kinds(first: torch.Tensor, cut: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` int8 frame kinds without the frame policy: 2 on first frames and scene cuts, else 1."""
    key = first if cut is None else first | (cut != 0)
    return torch.where(key, 2, 1).to(torch.int8)


def _compile_ranker():
    """A fixed, untrained ranker for the compile cases (only its shapes matter there)."""
    from ..reference.patch_ranker import RANKER_FEATURES, PatchRanker

    f, h = len(RANKER_FEATURES), 4
    return PatchRanker(torch.ones(f, h), torch.zeros(h), torch.ones(h), torch.zeros(()), torch.zeros(f), torch.ones(f))


def compile_cases():
    """Launches of the gate's default GPU configuration to compile for sm_80/sm_90
    (``python -m neuroflow.tooling.compile_check``) at the largest frames the engine is for, so the pack
    kernel's per-frame block tables are full size: SigLIP-base geometry at 1792 px (16-px patches,
    D 768, floor 4) and so400m geometry at 1792 px (14-px patches, D 1152, floor 16), one CLS
    token, in each dtype the kernel accepts on a GPU (fp32 too: Hugging Face loads models in
    fp32 by default); plus the gate options' three-launch path (every option with
    ``reference="computed"``, and the EMA reference with a scene cut, which writes references
    only on cuts), and ``signal="patch"`` on both paths. The ``odd`` cases take grids one patch short of those sides (N = 127^2 and
    111^2: patch and row counts not divisible by 16), because the runtime specialises each integer
    argument on its divisibility and a launch with other values compiles another kernel. Nothing
    runs: the launches are recorded."""
    def launcher(dtype, patch, dim, settings, odd=False):
        def run():
            side = (1792 // patch - odd) * patch
            n = (side // patch) ** 2
            age = torch.zeros(3, n, dtype=torch.int32) if settings.max_staleness is not None else None
            policy = (torch.zeros(3, 1, dtype=torch.int32), torch.zeros(3, 1)) if settings.policy else None
            gate(torch.empty(2, 3, side, side, dtype=dtype), torch.empty(dim, 3, patch, patch, dtype=dtype),
                 torch.empty(dim, dtype=dtype), torch.empty(n, dim, dtype=dtype), torch.empty(1, dim, dtype=dtype),
                 torch.empty(3, n, dim), torch.tensor([0, 2]), torch.tensor([False, True]), settings, age=age,
                 policy=policy)
        return run

    paper = [(f"gate {str(dtype).removeprefix('torch.')} p{patch} d{dim} floor{floor}", dtype, patch, dim,
              GateSettings(threshold=0.35, ema_decay=0.01, floor_tokens=floor))
             for dtype in (torch.float16, torch.bfloat16, torch.float32)
             for patch, dim, floor in ((16, 768, 4), (14, 1152, 16))]
    paper.append(("gate float32 p14 d1152 floor16 odd", torch.float32, 14, 1152,
                  GateSettings(threshold=0.35, ema_decay=0.01, floor_tokens=16), True))
    options = [
        ("gate options computed+stale+budget+motion+cut fp16 p16 d768", torch.float16, 16, 768,
         GateSettings(threshold=0.1, floor_tokens=4, reference="computed", max_staleness=8, budget=0.1,
                      motion_norm=True, scene_cut=0.5)),
        ("gate options ema+budget-only+stale bf16 p14 d1152", torch.bfloat16, 14, 1152,
         GateSettings(threshold=None, floor_tokens=0, max_staleness=4, budget=512)),
        ("gate options ema+scene-cut fp16 p16 d768", torch.float16, 16, 768,
         GateSettings(threshold=0.1, floor_tokens=4, scene_cut=0.5)),
        ("gate options computed+stale+budget fp32 p16 d768 odd", torch.float32, 16, 768,
         GateSettings(threshold=0.1, floor_tokens=4, reference="computed", max_staleness=8, budget=0.1), True),
        # signal="patch": the surprise without PE; the rows kernel then holds both p and p + PE.
        ("gate patch-signal fp16 p16 d768 floor4", torch.float16, 16, 768,
         GateSettings(threshold=0.1, ema_decay=0.01, floor_tokens=4, signal="patch")),
        ("gate options patch-signal computed+stale bf16 p14 d1152", torch.bfloat16, 14, 1152,
         GateSettings(threshold=0.1, floor_tokens=4, reference="computed", max_staleness=4, signal="patch")),
        # The learned ranking (RANKED) with the measured preset's frame policy.
        ("gate options ranker+policy+drift fp16 p16 d768", torch.float16, 16, 768,
         GateSettings(threshold=0.1, floor_tokens=4, reference="computed", keyframe_every=8, keyframe_drift=0.6,
                      ranker=_compile_ranker())),
        ("gate options ranker+stale+batch-budget fp32 p14 d1152 odd", torch.float32, 14, 1152,
         GateSettings(threshold=0.2, floor_tokens=4, reference="computed", max_staleness=4, batch_budget=0.3,
                      ranker=_compile_ranker()), True),
    ]
    def features_launcher(dtype, patch, dim, settings):
        def run():  # the gate on probe features (probe_layers): select and pack kernels only
            n = (1792 // patch) ** 2
            age = torch.zeros(3, n, dtype=torch.int32) if settings.max_staleness is not None else None
            policy = (torch.zeros(3, 1, dtype=torch.int32), torch.zeros(3, 1)) if settings.policy else None
            gate_features(torch.empty(2, 1 + n, dim, dtype=dtype), 1, torch.empty(3, n, dim), torch.tensor([0, 2]),
                          torch.tensor([False, True]), settings, age=age, policy=policy)
        return run

    features = [
        ("gate features computed+stale fp16 p14 d384", torch.float16, 14, 384,
         GateSettings(threshold=0.05, floor_tokens=4, reference="computed", max_staleness=4)),
        ("gate features computed+policy+drift+batch-budget bf16 p16 d768", torch.bfloat16, 16, 768,
         GateSettings(threshold=0.05, floor_tokens=4, reference="computed", max_staleness=4, skip_below=0.1,
                      keyframe_every=8, keyframe_drift=0.5, batch_budget=0.5)),
    ]
    # fp32 takes its dot in IEEE fp32 (GATE_CONFIG_FP32): no tensor-core instructions to find.
    return ([CompileCase(name, launcher(dtype, patch, dim, st, *odd), uses_dot=True,
                         tensor_cores=() if dtype == torch.float32 else (80, 90),
                         no_dot=("gate_select_kernel", "gate_pack_kernel"))
             for name, dtype, patch, dim, st, *odd in paper + options]
            + [CompileCase(name, features_launcher(dtype, patch, dim, st)) for name, dtype, patch, dim, st in features])
