"""The gate in plain PyTorch: the reference the gate kernels (``kernels/gate.py``, launched by
:func:`neuroflow.ops.gate.gate`) are tested against.

Two levels, two names:

* :func:`gate_decision_reference`: the decision alone, on given layer-0 embeddings ``[B, N, D]``
  (surprise, threshold, floor, EMA update, offsets);
* :func:`gate_reference`: the whole op with :func:`neuroflow.ops.gate.gate`'s contract (patch
  embedding, decision, in-place EMA update, packing of the computed tokens), as the unfused chain.

Per stream, per patch i, frame t (``../shared/method.md``):

* first frame after a reset: every patch is active and ``E_i := h_i``;
* later frames: ``s_i = 1 - cos(h_i, E_i)`` over all D channels, active iff ``s_i > threshold``;
  when fewer than ``floor_tokens`` pass, the ``floor_tokens`` most surprising patches are taken
  instead (ties: lower patch index first), then ``E_i := (1 - decay) E_i + decay h_i`` for every
  patch, active or not.

The EMA is float32 (float64 for a float64 model) whatever the model dtype: with decay 0.01 a
half-precision EMA rounds the update away.

The options of :class:`neuroflow.reference.gate_settings.GateSettings` (reference, max_staleness, budget,
motion_norm, scene_cut; their rules are in that module's docstring) change a later frame's
decision to, in this order:

1. raw surprise ``s_i = 1 - cos(h_i, R_i)`` against the stored reference R (EMA or last computed);
2. scene cut: if more than ``scene_cut * N`` patches have ``s_i > threshold``, the frame is a
   keyframe (every patch active, R := h, ages restart) and steps 3-5 do not apply;
3. motion norm: ``s_i -= mean_i s_i`` (the surprise reported);
4. candidates: ``s_i > threshold`` (every patch without a threshold) or stale (``age_i >= K``);
   ``k = min(budget, max(min(floor, N), #candidates))``; active = the first k patches ranked stale
   first (older first), then surprise descending (with a ``ranker``: its score descending,
   :mod:`neuroflow.reference.patch_ranker`), then index ascending;
5. R update: EMA of every patch (``"ema"``), or R_i := h_i where active (``"computed"``); ages:
   0 where active, +1 elsewhere.

The frame policy (``skip_below``, ``keyframe_every``, ``keyframe_drift``) runs between 1 and 2:
``drift' = drift + mean_i s_i / texture(R)`` (raw surprise; :func:`reference_texture`, 1 without
``keyframe_drift``); the frame is a keyframe when first, a scene cut,
``since + 1 >= keyframe_every`` or ``drift' > keyframe_drift``; else it is skipped when at most
``floor(skip_below * N)`` patches have ``s_i > threshold`` (no patch active, R unchanged, every
age + 1); else partial (steps 3-5). Counters after the frame: ``since := 0, drift := 0`` on a
keyframe, else ``since + 1`` and ``drift'``. ``frame_kind``: 0 skip, 1 partial, 2 keyframe.

With none of the options set, the code path is the paper's gate exactly as before.

``signal="patch"`` (``GateSettings.signal``) changes only what ``h`` is above: the patch
projection ``p = W x + b`` instead of ``p + PE``, and so what the reference R holds (p's EMA, or
p as last computed). :func:`gate_decision_reference` works on whichever it is given;
:func:`gate_reference` hands it the signal and packs ``p + PE`` either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gate_settings import GateSettings
from .patch_ranker import ranker_scores

COSINE_EPS = 1e-8
"""Each norm in the cosine is clamped to at least this, so an all-zero embedding has surprise 1."""

SKIP, PARTIAL, KEYFRAME = 0, 1, 2
"""The frame policy's ``frame_kind`` values (re-exported as ``neuroflow.engine.engine.SKIP`` etc.)."""

FIRST_FRAME_SURPRISE = float("inf")
"""Surprise reported for first frames: there is no EMA to compare with, every patch is active."""


def ema_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for a float64 model."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


@dataclass
class GateDecision:
    """What the gate decides for a batch of B frames with N patches each.

    Attributes:
        ema: ``[B, N, D]`` float32, the EMA after this frame (a new tensor; the input is untouched).
        surprise: ``[B, N]`` float32, ``1 - cos(h, E)``; ``inf`` on first frames.
        active: ``[B, N]`` bool, which patches go through the encoder.
        cu_seqlens: ``[B + 1]`` int32, offsets of each frame's active patches in ``index``.
        index: ``[T]`` int64, patch index (within its frame) of each active patch; frames in batch
            order, patches ascending.
        age: ``[B, N]`` int32 ages after this frame (with ``max_staleness``), else None.
        keyframe: ``[B]`` bool, frames that restarted the reference (first frames, scene cuts).
        frame_kind: ``[B]`` int8, 0 skip, 1 partial, 2 keyframe.
        since, drift: ``[B]`` int32 / float32 policy counters after this frame (with the frame
            policy), else None.
    """

    ema: torch.Tensor
    surprise: torch.Tensor
    active: torch.Tensor
    cu_seqlens: torch.Tensor
    index: torch.Tensor
    age: torch.Tensor | None = None
    keyframe: torch.Tensor | None = None
    frame_kind: torch.Tensor | None = None
    since: torch.Tensor | None = None
    drift: torch.Tensor | None = None

    @property
    def counts(self) -> torch.Tensor:
        """``[B]`` int64, active patches per frame."""
        return self.active.sum(dim=1)

    def pack(self, tokens: torch.Tensor) -> torch.Tensor:
        """Gather the active rows of ``tokens`` ``[B, N, D]`` into ``[T, D]`` (stream-major, ascending)."""
        rows = torch.repeat_interleave(torch.arange(tokens.shape[0], device=tokens.device), self.counts)
        return tokens[rows, self.index]


def cosine_surprise(h: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:
    """``1 - cos(h, ema)`` along the last dim, in the EMA's precision. ``[..., D] -> [...]``."""
    h = h.to(ema.dtype)
    dot = (h * ema).sum(-1)
    norms = h.norm(dim=-1).clamp_min(COSINE_EPS) * ema.norm(dim=-1).clamp_min(COSINE_EPS)
    return 1.0 - dot / norms


TEXTURE_FLOOR = 0.01
""":func:`reference_texture` is at least this, so a featureless reference cannot turn a small
surprise into a large drift."""


def reference_texture(ref: torch.Tensor) -> torch.Tensor:
    """The unit ``keyframe_drift`` measures a frame's change in: how different neighbouring
    patches' references are. ``[B, N, D]`` any float dtype -> ``[B]`` float32: the mean over
    consecutive patches in row-major order (row ends pair with the next row's start) of
    ``1 - cos(R_i, R_{i+1})``, at least :data:`TEXTURE_FLOOR`; 1.0 for N = 1.

    Why: a frame's mean surprise depends on the resolution as much as on the motion (a larger
    frame of the same footage has smoother patches, so the same motion moves each one less), and
    so does this spread between neighbours; their ratio is the motion in units of the image's own
    patch-to-patch change. On DINOv2-S/14 real weights (``bench/bench_drift_units.py``) it moves
    less with the resolution than the raw surprise and tells a handheld camera from static ones
    better (``docs/gate.md``, "Why the drift is measured in texture units")."""
    if ref.shape[1] < 2:
        return torch.ones(ref.shape[0], dtype=torch.float32, device=ref.device)
    return cosine_surprise(ref[:, 1:], ref[:, :-1]).float().mean(dim=1).clamp_min(TEXTURE_FLOOR)


def select_active(surprise: torch.Tensor, threshold: float | torch.Tensor, floor_tokens: int) -> torch.Tensor:
    """Strict threshold with the top-surprise floor. ``[B, N]`` float -> ``[B, N]`` bool.

    ``threshold`` is one number or one per frame (``[B]`` tensor)."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(surprise.dtype).view(-1, 1)
    passed = surprise > threshold
    k = min(floor_tokens, surprise.shape[1])
    if k == 0:
        return passed
    # A stable descending sort ranks equal surprises by patch index, so the floor is deterministic.
    order = torch.sort(surprise, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(surprise.shape[1], device=surprise.device).expand_as(order))
    short = passed.sum(dim=1, keepdim=True) < k
    return torch.where(short, rank < k, passed)


def as_settings(threshold, ema_decay=None, floor_tokens=None) -> GateSettings:
    """The call's :class:`GateSettings`: given as one, or built from the paper's three settings
    (the positional form ``threshold, ema_decay, floor_tokens`` the op has always taken)."""
    if isinstance(threshold, GateSettings):
        if ema_decay is not None or floor_tokens is not None:
            raise TypeError("pass either a GateSettings or threshold, ema_decay, floor_tokens, not both")
        return threshold
    if ema_decay is None or floor_tokens is None:
        raise TypeError("threshold, ema_decay and floor_tokens are all needed (or one GateSettings)")
    return GateSettings(threshold=threshold, ema_decay=ema_decay, floor_tokens=floor_tokens)


def staggered_ages(n: int, max_staleness: int, device) -> torch.Tensor:
    """``[N]`` int32 ages a stream starts with (first frame, scene cut): ``i mod (K + 1)``, so the
    patches that never turn surprising come due at most ``ceil(N / (K + 1))`` per frame."""
    return (torch.arange(n, device=device) % (max_staleness + 1)).to(torch.int32)


def scene_cut_count(scene_cut: float, n: int) -> int:
    """Passing patches at which a frame is a scene cut: more than ``scene_cut * n``."""
    return math.floor(scene_cut * n) + 1


AGE_MAX = 2**28
"""Ages saturate here (a patch starved by a tiny budget must not overflow int32; the kernel's
ranking key packs ``age + 1`` above 32 bits of surprise into an int64)."""


def priority_rank(surprise: torch.Tensor, stale: torch.Tensor | None, age: torch.Tensor | None) -> torch.Tensor:
    """Each patch's place in the gate's ranking: stale patches first (older first), then surprise
    descending, then patch index ascending. ``[B, N]`` -> ``[B, N]`` int64 ranks (0 = first)."""
    b, n = surprise.shape
    order = torch.sort(surprise, dim=1, descending=True, stable=True).indices
    if stale is not None:
        # Stable sorts from the least significant key to the most significant one.
        key = torch.where(stale, age.to(torch.int64), -1).gather(1, order)
        order = order.gather(1, torch.sort(key, dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=surprise.device).expand(b, n))
    return rank


def batch_budget_mask(surprise: torch.Tensor, active: torch.Tensor, keyframe: torch.Tensor, fraction: float,
                      stale: torch.Tensor | None = None, age: torch.Tensor | None = None,
                      unit: torch.Tensor | None = None) -> torch.Tensor:
    """The batch budget (``GateSettings.batch_budget``) on the frames' chosen patches, without a
    host sync: ``surprise`` ``[B, N]`` float32 (as ranked, i.e. normalised under motion norm; a
    ranker's scores under ``ranker``), ``active`` ``[B, N]`` bool (each frame's own choice),
    ``keyframe`` ``[B]`` bool (dense, never cut), ``stale``/``age`` ``[B, N]`` (the ages before
    this frame) with ``max_staleness``, ``unit`` ``[B]`` float32 > 0 or None: each frame's scores
    are compared across frames as ``surprise / unit`` (the order inside a frame is unchanged).
    Returns the kept ``[B, N]`` bool: keyframes as they were, and of the other frames' chosen
    patches the first ``floor(M * fraction * N)`` of the batch-wide ranking (stale first, older
    first, then surprise / unit descending, then frame, then patch index ascending), M =
    non-keyframes."""
    b, n = surprise.shape
    cand = (active & ~keyframe.view(-1, 1)).flatten()
    # Float64 product in the order the host writes it, (fraction * N) * M, then floor.
    limit = torch.floor((~keyframe).sum().to(torch.float64) * (fraction * n)).to(torch.int64)
    score = surprise if unit is None else surprise / unit.to(surprise.dtype).view(-1, 1)
    # Stable sorts from the least significant key to the most significant one; flattening keeps
    # frame-major, patch-ascending order for the ties.
    order = torch.sort(score.flatten(), descending=True, stable=True).indices
    if stale is not None:
        key = torch.where(stale, age.to(torch.int64), -1).flatten()[order]
        order = order[torch.sort(key, descending=True, stable=True).indices]
    order = order[torch.sort(cand[order].to(torch.int8), descending=True, stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(b * n, device=surprise.device)
    keep = (cand & (rank < limit)).view(b, n)
    return torch.where(keyframe.view(-1, 1), active, keep)


def gate_decision_reference(
    h: torch.Tensor,
    ema: torch.Tensor,
    first: torch.Tensor,
    threshold,
    ema_decay=None,
    floor_tokens=None,
    force_active: torch.Tensor | None = None,
    age: torch.Tensor | None = None,
    since: torch.Tensor | None = None,
    drift: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> GateDecision:
    """Gate a batch of frames, one frame per stream.

    Args:
        h: ``[B, N, D]`` the gate's signal, any float dtype: layer-0 patch embeddings (patch
            embedding + position embedding), or the patch embeddings alone under
            ``signal="patch"`` (the rule is the same; the caller picks the vectors).
        ema: ``[B, N, D]`` float32 reference rows of the frames' streams (the EMA of the signal;
            its last-computed values under ``reference="computed"``), ignored where ``first``.
        first: ``[B]`` bool, True for a stream's first frame after a reset.
        threshold: a :class:`GateSettings` (then ``ema_decay`` and ``floor_tokens`` stay None), or
            the surprise threshold (strict ``>``): a number or a ``[B]`` tensor (one per frame,
            e.g. per-clip settings when training).
        ema_decay: EMA update weight of the new frame, in [0, 1]; a number or a ``[B]`` tensor.
        floor_tokens: minimum active patches per later frame.
        force_active: optional ``[B, N]`` bool used instead of the whole decision on later frames
            (baselines that choose patches another way; no scene cut, no staleness rule).
        age: ``[B, N]`` int32 frames since each patch was last computed; needed with
            ``max_staleness`` (ignored on first frames, where the staggered ages start).
        since, drift: ``[B]`` int32 frames since the last keyframe and ``[B]`` float32 accumulated
            mean surprise; needed with the frame policy (ignored on first frames).
        grid: the patch grid ``(gh, gw)``, ``gh * gw = N``; needed with a ``ranker`` (its
            features pool the surprise over patch neighbourhoods).
    """
    st = as_settings(threshold, ema_decay, floor_tokens)
    b, n = h.shape[:2]
    first_rows = first.view(-1, 1)
    hf = h.to(ema.dtype)
    raw = cosine_surprise(hf, ema)
    if st.is_default_rule:
        # The paper's gate, exactly as it always ran.
        surprise = torch.where(first_rows, FIRST_FRAME_SURPRISE, raw).float()
        chosen = select_active(surprise, st.threshold, st.floor_tokens) if force_active is None else force_active
        active = torch.where(first_rows, True, chosen)
        decay = st.ema_decay
        if isinstance(decay, torch.Tensor):
            decay = decay.to(ema.dtype).view(-1, 1, 1)
        new_ema = torch.where(first_rows.unsqueeze(-1), hf, (1.0 - decay) * ema + decay * hf)
        kind = torch.where(first, 2, 1).to(torch.int8)
        return _decision(new_ema, surprise, active, None, first, h.device, kind)

    thr = st.threshold
    if isinstance(thr, torch.Tensor):
        thr = thr.to(torch.float32).view(-1, 1)
    # Scene cut: too many patches pass on the raw surprise, before any normalisation.
    cut = torch.zeros_like(first)
    if st.scene_cut is not None:
        cut = ((raw.float() > thr).sum(dim=1) >= scene_cut_count(st.scene_cut, n)) & ~first
    key = first | cut
    skip = torch.zeros_like(first)
    new_since = new_drift = None
    # The reference's texture: the unit of the drift and of the batch budget's cross-frame ranking.
    texture = None
    if st.keyframe_drift is not None or (st.batch_budget is not None and st.ranker is None):
        texture = torch.where(first, 1.0, reference_texture(ema))
    if st.policy:
        if since is None or drift is None:
            raise ValueError("the frame policy needs the streams' counters (since=[B] int32, drift=[B] float32)")
        # The drift counts each frame's mean surprise in units of the reference's own texture.
        acc = drift.float() + raw.float().mean(dim=1) / (texture if st.keyframe_drift is not None else 1.0)
        if st.keyframe_every is not None:
            key = key | (since + 1 >= st.keyframe_every)
        if st.keyframe_drift is not None:
            key = key | (acc > st.keyframe_drift)
        if st.skip_below is not None:
            passing = (raw.float() > thr).sum(dim=1) if thr is not None else torch.zeros_like(since)
            skip = ~key & (passing <= st.skip_count(n))
        new_since = torch.where(key, 0, since + 1).to(torch.int32)
        new_drift = torch.where(key, 0.0, acc).to(torch.float32)
    key_rows = key.view(-1, 1)
    score = raw - raw.mean(dim=1, keepdim=True) if st.motion_norm else raw
    surprise = torch.where(first_rows, FIRST_FRAME_SURPRISE, score).float()

    k_stale = st.max_staleness
    if k_stale is not None and age is None:
        raise ValueError("max_staleness needs the streams' ages (age=[B, N] int32)")
    stale = age >= k_stale if k_stale is not None else None
    # What orders the patches: the surprise, or the learned ranking (the count k stays the surprise's).
    order_by = surprise
    if st.ranker is not None:
        if grid is None:
            raise ValueError("a ranker needs the frames' patch grid (grid=(gh, gw))")
        order_by = ranker_scores(st.ranker, raw, first, grid, None if thr is None else float(st.threshold), since)
    if force_active is not None:
        chosen = force_active
    else:
        cand = torch.ones_like(surprise, dtype=torch.bool) if thr is None else surprise > thr
        if stale is not None:
            cand = cand | stale
        k = cand.sum(dim=1).clamp_min(min(st.floor_tokens, n))
        budget = st.budget_count(n)
        if budget is not None:
            k = k.clamp_max(budget)
        chosen = priority_rank(order_by, stale, age) < k.view(-1, 1)
    active = key_rows | (chosen & ~skip.view(-1, 1))
    if st.batch_budget is not None and force_active is None:
        # Across frames the surprise counts in texture units (a ranker's scores are comparable as they are).
        active = batch_budget_mask(order_by, active, key, st.batch_budget, stale, age,
                                   unit=texture if st.ranker is None else None)

    if st.reference == "computed":
        new_ema = torch.where(active.unsqueeze(-1), hf, ema)
    else:
        decay = st.ema_decay
        if isinstance(decay, torch.Tensor):
            decay = decay.to(ema.dtype).view(-1, 1, 1)
        new_ema = torch.where(key_rows.unsqueeze(-1), hf, (1.0 - decay) * ema + decay * hf)
        # A skipped frame leaves the reference as it was (the EMA does not take it in).
        new_ema = torch.where(skip.view(-1, 1, 1), ema, new_ema)
    new_age = None
    if k_stale is not None:
        start = staggered_ages(n, k_stale, h.device).expand(b, n)
        new_age = torch.where(key_rows, start, torch.where(active, 0, (age + 1).clamp_max(AGE_MAX))).to(torch.int32)
    kind = torch.where(key, 2, torch.where(skip, 0, 1)).to(torch.int8)
    return _decision(new_ema, surprise, active, new_age, key, h.device, kind, new_since, new_drift)


def _decision(new_ema, surprise, active, new_age, keyframe, device, kind, since=None, drift=None) -> GateDecision:
    counts = active.sum(dim=1)
    cu_seqlens = torch.zeros(active.shape[0] + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(counts, 0)
    index = active.nonzero()[:, 1]
    return GateDecision(ema=new_ema, surprise=surprise, active=active, cu_seqlens=cu_seqlens, index=index,
                        age=new_age, keyframe=keyframe, frame_kind=kind, since=since, drift=drift)


@dataclass
class PackedFrames:
    """The gate's output for B frames of N patches, P prefix tokens per frame.

    Attributes:
        surprise: ``[B, N]`` float32, ``1 - cos(h, EMA)`` (``p`` for ``h`` under
            ``signal="patch"``; ``inf`` on first frames).
        active: ``[B, N]`` bool.
        cu_seqlens: ``[B + 1]`` int32; segment b = frame b's P prefix tokens then its active patches.
        index: ``[B * (P + N)]`` int32, position in the frame's token sequence of each packed
            token (prefix j -> j, patch n -> P + n); rows past ``cu_seqlens[-1]`` are unused.
        packed: ``[B * (P + N), D]`` model dtype, layer-0 embeddings of the packed tokens; rows past
            ``cu_seqlens[-1]`` are unused (not written).
        num_prefix: P.
        frame_kind: ``[B]`` int8, 0 skip, 1 partial, 2 keyframe (first frames, scene cuts, policy
            keyframes). A skipped frame's segment is empty (no prefix tokens either).
    """

    surprise: torch.Tensor
    active: torch.Tensor
    cu_seqlens: torch.Tensor
    index: torch.Tensor
    packed: torch.Tensor
    num_prefix: int
    frame_kind: torch.Tensor | None = None

    @property
    def max_seqlen(self) -> int:
        """Upper bound on a segment's length, known without a device sync."""
        return self.num_prefix + self.active.shape[1]


def check_gate_args(frames, weight, pos_embed, prefix, ema, slot, first) -> tuple[int, int, int]:
    b, c, h, w = frames.shape
    d, wc, p, p2 = weight.shape
    if wc != c or p != p2 or h % p or w % p:
        raise ValueError(f"frames {tuple(frames.shape)} do not fit a {p}x{p2} patch weight over {wc} channels")
    n = (h // p) * (w // p)
    if pos_embed.shape != (n, d) or prefix.shape[1:] != (d,):
        raise ValueError(f"position embeddings {tuple(pos_embed.shape)} / prefix {tuple(prefix.shape)} do not fit N={n}, D={d}")
    if ema.dim() != 3 or ema.shape[1:] != (n, d) or not ema.is_floating_point():
        raise ValueError(f"EMA pool must be [S, {n}, {d}] float, got {tuple(ema.shape)} {ema.dtype}")
    if slot.shape != (b,) or first.shape != (b,):
        raise ValueError("slot and first need one entry per frame")
    return n, d, p


def gate_reference(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay=None,
                   floor_tokens=None, force_active=None, age=None, policy=None) -> PackedFrames:
    """Same contract as :func:`neuroflow.ops.gate.gate`, as the unfused PyTorch chain (conv, add,
    cosine, compare, sort, gather). The surprise and ``ema`` are of the settings' signal (``h`` or,
    under ``signal="patch"``, the patch embedding without PE); ``packed`` holds ``h`` either way.
    ``threshold`` is a :class:`GateSettings` or the first of the
    three positional settings; ``age`` is the ``[S, N]`` int32 age pool (with ``max_staleness``),
    updated in place at the frames' slots like ``ema``; ``policy`` the ``(since [S, 1] int32,
    drift [S, 1] float32)`` pools of the frame policy, updated likewise."""
    n, d, p = check_gate_args(frames, weight, pos_embed, prefix, ema, slot, first)
    st = as_settings(threshold, ema_decay, floor_tokens)
    check_age_pool(st, age, ema)
    check_policy_pools(st, policy, ema)
    patches = F.conv2d(frames, weight, bias, stride=p).flatten(2).transpose(1, 2)  # [B, N, D], no PE
    h = patches + pos_embed
    tokens = torch.cat([prefix.to(h.dtype).expand(frames.shape[0], -1, -1), h], dim=1)  # [B, P + N, D]
    return _decide_and_pack(tokens, prefix.shape[0], ema, slot, first, st, force_active, age, policy,
                            signal=patches if st.signal == "patch" else None,
                            grid=(frames.shape[2] // p, frames.shape[3] // p))


def gate_features_reference(tokens, num_prefix, ema, slot, first, settings, force_active=None, age=None,
                            policy=None) -> PackedFrames:
    """The gate on given features (``NeuroFlow(probe_layers=l)``): the contract of
    :func:`neuroflow.ops.gate.gate_features`, as plain PyTorch.

    ``tokens`` ``[B, P + N, D]`` (any float dtype) are every token's layer-l hidden states; the
    decision (:func:`gate_decision_reference`, ``reference="computed"`` only) compares the patch
    rows with the reference pool ``ema`` ``[S, N, D]`` float32 (each patch's layer-l state when it
    was last computed), which is updated in place like the age and policy pools; the computed
    tokens' rows of ``tokens`` are packed."""
    check_feature_args(tokens, num_prefix, ema, slot, first, settings)
    check_age_pool(settings, age, ema)
    check_policy_pools(settings, policy, ema)
    return _decide_and_pack(tokens, num_prefix, ema, slot, first, settings, force_active, age, policy)


def check_feature_args(tokens, num_prefix, ema, slot, first, st: GateSettings) -> None:
    """The arguments of the gate on features: shapes, and the one reference it implements."""
    if st.ranker is not None:
        raise ValueError("the gate on layer features (probe_layers) takes no ranker: its features are the layer-0 "
                         "surprise's")
    if st.reference != "computed":
        raise ValueError(f"the gate on layer features keeps last-computed references only (reference='computed'), "
                         f"got reference={st.reference!r}")
    if tokens.dim() != 3 or not tokens.is_floating_point() or not 0 <= num_prefix < tokens.shape[1]:
        raise ValueError(f"features must be [B, P + N, D] float with P = {num_prefix} prefix tokens, "
                         f"got {tokens.dtype} {tuple(tokens.shape)}")
    b, t, d = tokens.shape
    n = t - num_prefix
    if ema.dim() != 3 or ema.shape[1:] != (n, d) or not ema.is_floating_point():
        raise ValueError(f"reference pool must be [S, {n}, {d}] float, got {tuple(ema.shape)} {ema.dtype}")
    if slot.shape != (b,) or first.shape != (b,):
        raise ValueError("slot and first need one entry per frame")


def _decide_and_pack(tokens, num_prefix, ema, slot, first, st: GateSettings, force_active, age, policy,
                     signal=None, grid=None) -> PackedFrames:
    """Decide on the patch rows of ``tokens`` ``[B, P + N, D]`` (or on ``signal`` ``[B, N, D]``
    when given: ``signal="patch"``'s embedding without PE), write the pools, pack the computed
    tokens (prefix rows first, then the active patches ascending) of the frames that run."""
    b, t, d = tokens.shape
    n = t - num_prefix
    h = tokens[:, num_prefix:]
    decided = gate_decision_reference(h if signal is None else signal, ema[slot], first, st, force_active=force_active,
                                      age=None if age is None else age[slot],
                                      since=None if policy is None else policy[0][slot, 0],
                                      drift=None if policy is None else policy[1][slot, 0], grid=grid)
    with torch.no_grad():
        ema.index_copy_(0, slot, decided.ema.to(ema.dtype))
        if age is not None:
            age.index_copy_(0, slot, decided.age)
        if policy is not None:
            policy[0].index_copy_(0, slot, decided.since.view(-1, 1))
            policy[1].index_copy_(0, slot, decided.drift.view(-1, 1))
    run = decided.frame_kind != 0  # skipped frames pack nothing, not even their prefix tokens
    counts = decided.counts + num_prefix * run
    cu = torch.zeros(b + 1, dtype=torch.int32, device=tokens.device)
    cu[1:] = torch.cumsum(counts, 0)
    computed = torch.cat([run.view(-1, 1).expand(b, num_prefix), decided.active], dim=1)
    rows, pos = computed.nonzero(as_tuple=True)
    cap = b * (num_prefix + n)
    packed = tokens.new_empty(cap, d)
    index = torch.empty(cap, dtype=torch.int32, device=h.device)
    packed[: rows.shape[0]] = tokens[rows, pos]
    index[: rows.shape[0]] = pos.to(torch.int32)
    return PackedFrames(decided.surprise, decided.active, cu, index, packed, num_prefix, decided.frame_kind)


def check_age_pool(st: GateSettings, age, ema) -> None:
    """The age pool must come exactly when ``max_staleness`` is set: ``[S, N]`` int32 like ``ema``."""
    if st.max_staleness is None:
        if age is not None:
            raise ValueError("an age pool was given but max_staleness is not set")
        return
    if age is None:
        raise ValueError("max_staleness needs the streams' age pool (age=[S, N] int32)")
    if age.dtype != torch.int32 or age.shape != ema.shape[:2] or age.device != ema.device:
        raise ValueError(f"age pool must be int32 {tuple(ema.shape[:2])} on {ema.device}, "
                         f"got {age.dtype} {tuple(age.shape)} on {age.device}")


def check_policy_pools(st: GateSettings, policy, ema) -> None:
    """The policy pools must come exactly with the frame policy: ``(since [S, 1] int32, drift
    [S, 1] float32)`` on the EMA's device."""
    if not st.policy:
        if policy is not None:
            raise ValueError("policy counters were given but no frame policy is set")
        return
    if policy is None:
        raise ValueError("the frame policy needs the streams' counters (policy=(since [S, 1] int32, drift [S, 1] float32))")
    since, drift = policy
    s = ema.shape[0]
    if since.dtype != torch.int32 or since.shape != (s, 1) or drift.dtype != torch.float32 or drift.shape != (s, 1) \
            or since.device != ema.device or drift.device != ema.device:
        raise ValueError(f"policy counters must be int32 and float32 [{s}, 1] on {ema.device}, got "
                         f"{since.dtype} {tuple(since.shape)} and {drift.dtype} {tuple(drift.shape)}")
