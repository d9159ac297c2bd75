"""Train the learned patch ranking (``NeuroFlow(ranker=...)``, :mod:`neuroflow.reference.patch_ranker`)
on a user's own footage: ``neuroflow distill-gate`` (:mod:`neuroflow.commands.distill_gate`).

The data is what a deployed engine sees. Each clip runs as one stream through a ``NeuroFlow``
engine with the user's settings and the deterministic gate (no ranker). On every partial frame
the gate's raw surprise map and the frames since the last keyframe give each patch's features
(:func:`~neuroflow.reference.patch_ranker.ranker_features`), and the target is how far the
engine's held output of that patch (its last frame's ``last_hidden_state``) is from the dense
model's output on this frame: ``10 sqrt(1 - cos)``. That is the error the frame leaves behind
if it does not compute the patch, the quantity the oracle of ``bench/bench_fidelity.py`` ranks
by. (The square root keeps the large errors that decide the top of the ranking from drowning in
the many near-zero ones.) Then :func:`fit_ranker` fits the MLP by full-batch Adam.

Only the order of the scores is used, so the fit's R^2 is a diagnostic; what decides is the
fidelity at equal compute, which ``bench/bench_learned_gate.py`` measures on real weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.engine import KEYFRAME, PARTIAL, NeuroFlow
from ..reference.patch_ranker import RANKER_FEATURES, PatchRanker, ranker_features

TARGET_SCALE = 10.0
"""The target is ``TARGET_SCALE * sqrt(1 - cos)`` (a scale near 1 for typical errors)."""


@dataclass
class RankerData:
    """Training samples: ``features [M, F]`` float32, ``target [M]`` float32, and how many partial
    frames (``frames``) of how many clips (``clips``) they come from."""

    features: torch.Tensor
    target: torch.Tensor
    frames: int
    clips: int


def output_error(dense: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """``TARGET_SCALE * sqrt(1 - cos)`` per token: ``[..., D]`` x2 -> ``[...]`` float32."""
    cos = F.cosine_similarity(dense.float(), held.float(), dim=-1)
    return TARGET_SCALE * (1.0 - cos).clamp_min(0.0).sqrt()


@torch.inference_mode()
def collect_ranker_data(engine: NeuroFlow, clips: Iterable[torch.Tensor]) -> RankerData:
    """Run every clip ``[T, C, H, W]`` (model dtype and device) through ``engine`` as a fresh stream
    and gather the samples of its partial frames (see the module docstring). The engine must have
    no ranker and no ``motion_norm`` (the features are of the raw surprise), and decide on the
    layer-0 embedding (no ``probe_layers``)."""
    st = engine.gate_settings
    if st.ranker is not None:
        raise ValueError("collect the ranker's data with the deterministic gate (an engine without a ranker)")
    if st.motion_norm:
        raise ValueError("the ranker's features are of the raw surprise: train without motion_norm")
    if engine.probe_layers:
        raise ValueError("the ranker orders patches by their layer-0 surprise: train without probe_layers")
    a = engine.adapter
    thr = st.threshold
    feats, targets = [], []
    frames = clips_seen = 0
    for c, clip in enumerate(clips):
        if clip.dim() != 4 or clip.shape[0] < 2:
            raise ValueError(f"clip {c} must be [T >= 2, C, H, W], got {tuple(clip.shape)}")
        sid = ("distill-gate", c)
        grid = (clip.shape[2] // a.patch_size, clip.shape[3] // a.patch_size)
        held, since = None, 0
        for t in range(clip.shape[0]):
            x = clip[t:t + 1]
            out = engine(x, stream_ids=[sid])
            kind = int(out.frame_kind[0])
            if held is not None and kind == PARTIAL:
                dense = a.model(pixel_values=x).last_hidden_state[:, a.num_prefix:]
                since_t = torch.tensor([since], dtype=torch.int32, device=x.device)
                feats.append(ranker_features(out.surprise.float(), grid, thr, since_t)[0])
                targets.append(output_error(dense, held)[0])
                frames += 1
            since = 0 if kind == KEYFRAME else since + 1
            held = out.last_hidden_state[:, a.num_prefix:]
        engine.reset([sid])
        clips_seen += 1
    if not feats:
        raise ValueError("no partial frame in the clips: nothing to learn from (longer clips, or a gate that "
                         "computes part of a frame)")
    return RankerData(torch.cat(feats).cpu(), torch.cat(targets).cpu(), frames, clips_seen)


def fit_ranker(features: torch.Tensor, target: torch.Tensor, hidden: int = 16, steps: int = 1500, lr: float = 0.01,
               seed: int = 0, meta: dict | None = None) -> PatchRanker:
    """Fit a :class:`PatchRanker` (``F -> hidden -> 1``, ReLU) to ``target [M]`` from ``features
    [M, F]`` by full-batch Adam on the mean squared error of the standardised features, float32,
    on the features' device, seeded (``seed``): the same data gives the same ranker."""
    f = len(RANKER_FEATURES)
    if features.dim() != 2 or features.shape[1] != f or target.shape != features.shape[:1]:
        raise ValueError(f"fit_ranker needs features [M, {f}] and target [M], "
                         f"got {tuple(features.shape)} and {tuple(target.shape)}")
    if features.shape[0] < 2 or not (torch.isfinite(features).all() and torch.isfinite(target).all()):
        raise ValueError("fit_ranker needs at least 2 samples, all finite")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1 or steps < 1:
        raise ValueError(f"fit_ranker needs hidden >= 1 and steps >= 1, got {hidden!r}, {steps!r}")
    # Out of any inference mode the caller is in: the fit needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        x, y = features.float().clone(), target.float().clone()
        mean = x.mean(0)
        std = x.std(0).nan_to_num(0.0).clamp_min(1e-6)  # a constant feature (e.g. since without policy)
        xs = (x - mean) / std
        gen = torch.Generator().manual_seed(seed)
        w1 = (torch.randn(f, hidden, generator=gen) / math.sqrt(f)).to(x.device).requires_grad_()
        b1 = torch.zeros(hidden, device=x.device, requires_grad=True)
        w2 = (torch.randn(hidden, generator=gen) / math.sqrt(hidden)).to(x.device).requires_grad_()
        b2 = y.mean().detach().clone().requires_grad_()
        opt = torch.optim.Adam([w1, b1, w2, b2], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = (torch.relu(xs @ w1 + b1) @ w2 + b2 - y).square().mean()
            loss.backward()
            opt.step()
        params = [t.detach().clone() for t in (w1, b1, w2, b2)]
    return PatchRanker(*params, mean.detach().clone(), std.detach().clone(), meta=meta)


def r_squared(ranker: PatchRanker, features: torch.Tensor, target: torch.Tensor) -> float:
    """The share of the target's variance the ranker's scores explain (1 - MSE / variance)."""
    with torch.inference_mode():
        pred = ranker.score(features.to(ranker.device).float())
        y = target.to(pred.device).float()
        return float(1.0 - (pred - y).square().mean() / y.var(unbiased=False).clamp_min(1e-12))
