"""The gate's settings in one value: what the engine hands :func:`neuroflow.ops.gate.gate` and
:func:`neuroflow.reference.gate.gate_reference`.

The rules, per stream, per later frame (first frames are dense and set the reference; see
``neuroflow/reference/gate.py`` for the whole order):

* ``reference="ema"`` (the paper): the surprise compares a patch with the EMA of all its frames,
  and every patch updates the EMA every frame. ``"computed"``: it compares with the patch's
  layer-0 embedding as it was when the patch was last computed; the stored embedding changes only
  where the patch is computed this frame, and ``ema_decay`` is unused. Both keep their state in
  the stream's ``"ema"`` tensor (under ``"computed"`` it holds last-computed embeddings), so state
  layouts are the same.
* ``signal``: the vector the surprise is computed on. ``"embedding"`` (default): the layer-0
  embedding ``h_i = W x_i + b + PE_i``. ``"patch"``: the patch projection without the position
  embedding, ``p_i = W x_i + b``. ``PE_i`` is the same every frame, so it cancels in a
  difference of two embeddings of one patch but not in their cosine, which it dilutes (a patch
  whose content changed keeps part of its cosine to its old embedding through the shared
  ``PE_i``, the more so the larger ``PE_i``); ``"patch"`` compares content alone. The reference (EMA or last computed) is then
  kept of ``p``, not ``h``: the stream's ``"ema"`` state holds ``p`` (same layout, another
  meaning, so a stream's state is not portable between signals). The tokens the encoder gets
  are ``h`` under either signal.
* ``motion_norm``: the frame's mean surprise is subtracted before the decision (the paper's
  "global motion norm"); the surprise reported is the normalised one, the value that was
  compared with the threshold.
* ``max_staleness=K``: a patch not computed for K frames in a row is computed on the next one
  (a skipped patch's cached value is at most K frames old). Each stream keeps ``age[N]`` int32
  (frames since the patch was last computed). On a stream's first frame the ages are staggered,
  ``age_i = i mod (K + 1)``, so never-surprising patches come due ~N/(K+1) per frame, never all
  at once.
* ``budget``: at most this many patches per frame, an int >= 1 or a fraction of N (0 < f <= 1:
  ``max(1, floor(f * N + 0.5))``). With ``threshold=None`` the budget alone decides: exactly that
  many patches every later frame.
* ``scene_cut=f``: when more than a fraction f of the patches pass the threshold (raw surprise,
  before motion norm), the frame is a keyframe: every patch is active and the reference (and the
  ages) restart from this frame, as on a first frame. It is not reported as a first frame.

* The frame policy (``skip_below``, ``keyframe_every``, ``keyframe_drift``): each later frame of
  a stream is one of three kinds, decided on the device before the patch choice:

  - **keyframe** (kind 2): a first frame, a scene cut, ``keyframe_every=K`` (the K-th frame since
    the stream's last keyframe, counted from its first frame: frames 0, K, 2K, ... when no other
    trigger fires), or ``keyframe_drift=f`` (the sum, over the frames since the last keyframe
    this one included, of each frame's mean raw surprise divided by its reference's texture,
    :func:`neuroflow.reference.gate.reference_texture`, is above f: the motion in units of the
    image's own patch-to-patch change, which depends less on the resolution than the raw surprise). Dense, the reference and
    the ages restart as on a scene cut, the counters restart.
  - **skip** (kind 0), when not a keyframe and at most ``floor(skip_below * N)`` patches pass the
    threshold (raw surprise): no encoder work at all for the stream (not even its prefix tokens),
    its caches and reference stay as they are (under ``reference="ema"`` the EMA does not take
    the frame in), its ages grow by one; the outputs are the stream's last computed frame's,
    exactly. A skip overrides the floor and the staleness bound (``keyframe_every`` bounds
    staleness instead).
  - **partial** (kind 1): every other frame, decided by the rule below.

  Streams then keep ``policy_since`` ``[1]`` int32 (frames since the last keyframe) and
  ``policy_drift`` ``[1]`` float32 (that accumulated drift; the raw mean surprise without
  ``keyframe_drift``); with ``skip_below`` also
  ``last_seq`` ``[T, D]`` and ``last_pooled`` ``[D_out]`` (the outputs a skip returns). Every-k
  frame skipping is ``keyframe_every=k, skip_below=1.0`` (and no ``keyframe_drift``): dense on every k-th frame, the last
  keyframe's outputs in between.

* ``batch_budget=f`` (a fraction in (0, 1]): one call's non-keyframe frames (partial and skipped
  ones) together compute at most ``floor(M * f * N)`` patches, M the number of those frames:
  after each frame's own decision, the chosen patches of all of them are ranked together (stale
  first, older first, then surprise in units of the frame's reference texture descending, i.e.
  ``s_i / texture(R)`` with :func:`neuroflow.reference.gate.reference_texture` as for the drift, so
  that a textured static scene does not outrank a moving camera by its texture alone; under a
  ``ranker`` its scores as they are; then frame and patch index ascending) and the
  first ``floor(M * f * N)`` are kept; the others are treated as not chosen (their age grows, the
  reference keeps them). Keyframes (first frames included) are dense and count against nothing.
  So a static stream, choosing few patches or being skipped, leaves its share to a busy one. It
  caps everything, the floor included; with ``threshold=None`` the batch budget alone decides.

* ``ranker`` (a :class:`neuroflow.reference.patch_ranker.PatchRanker`): the learned ranking. A
  partial frame computes as many patches as it would without it (the ``k`` below, and the batch
  budget's total), but takes them in the ranker's order instead of the surprise's: stale patches
  first (older first), then the ranker's score descending, then index ascending. The candidates are
  then no longer a prefix of the ranking: a patch under the threshold can be taken in place of one
  over it. Frame kinds, the drift and the references follow the same rules as without it.

The decision of a later frame, in one rule: patches are ranked stale first (older first), then by
surprise (descending), then by index (ascending); candidates are the stale patches and those over
the threshold (all patches when there is no threshold), which is always a prefix of that ranking;
the frame computes the first ``k = min(budget, max(min(floor_tokens, N), candidates))`` of the
ranking. So stale patches count toward the budget first, the floor tops a short frame up with the
most surprising patches, and the budget caps everything, the floor included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .patch_ranker import RANKER_FEATURES, PatchRanker

REFERENCES = ("ema", "computed")
SIGNALS = ("embedding", "patch")
"""Values of ``GateSettings.signal``: what the surprise compares (see the module docstring)."""


@dataclass(frozen=True)
class GateSettings:
    """Validated gate settings (see the module docstring for their meaning).

    ``threshold`` and ``ema_decay`` may also be ``[B]`` tensors, one per frame (distillation); the
    reference path takes them, and :meth:`check` does not look inside tensors.
    """

    threshold: float | torch.Tensor | None = 0.35
    ema_decay: float | torch.Tensor = 0.01
    floor_tokens: int = 4
    reference: str = "ema"
    max_staleness: int | None = None
    budget: int | float | None = None
    motion_norm: bool = False
    scene_cut: float | None = None
    skip_below: float | None = None
    keyframe_every: int | None = None
    keyframe_drift: float | None = None
    batch_budget: float | None = None
    signal: str = "embedding"
    ranker: PatchRanker | None = None

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        thr = self.threshold
        if thr is None:
            if self.budget is None and self.batch_budget is None:
                raise ValueError("threshold=None needs a budget or a batch_budget (the budget alone then picks the patches)")
            if self.motion_norm:
                raise ValueError("motion_norm needs a threshold (with a budget alone it cannot change the choice)")
            if self.scene_cut is not None:
                raise ValueError("scene_cut needs a threshold (it counts the patches that pass it)")
        elif not isinstance(thr, torch.Tensor):
            check_threshold(thr)
        if not isinstance(self.ema_decay, torch.Tensor):
            check_ema_decay(self.ema_decay)
        check_floor_tokens(self.floor_tokens)
        check_reference(self.reference)
        check_max_staleness(self.max_staleness)
        check_budget(self.budget)
        if not isinstance(self.motion_norm, bool):
            raise ValueError(f"motion_norm must be True or False, got {self.motion_norm!r}")
        check_scene_cut(self.scene_cut)
        check_skip_below(self.skip_below)
        if self.skip_below is not None and self.skip_below < 1.0 and thr is None:
            raise ValueError("skip_below below 1.0 needs a threshold (it counts the patches that pass it)")
        check_keyframe_every(self.keyframe_every)
        check_keyframe_drift(self.keyframe_drift)
        check_batch_budget(self.batch_budget)
        check_signal(self.signal)
        if self.ranker is not None and not isinstance(self.ranker, PatchRanker):
            raise ValueError(f"ranker must be None or a PatchRanker (PatchRanker.load(path)), got {type(self.ranker).__name__}")
        if self.ranker is not None and isinstance(thr, torch.Tensor):
            raise ValueError("a ranker takes one threshold for the batch, not one per frame")

    @property
    def policy(self) -> bool:
        """Whether the frame policy is on (any of skip_below, keyframe_every, keyframe_drift)."""
        return self.skip_below is not None or self.keyframe_every is not None or self.keyframe_drift is not None

    @property
    def keyframe_triggers(self) -> bool:
        """Whether a later frame can be a data-dependent keyframe (dense): scene cut or policy."""
        return self.scene_cut is not None or self.keyframe_every is not None or self.keyframe_drift is not None

    def skip_count(self, n: int) -> int:
        """A frame with at most this many patches over the threshold is skipped (-1: never)."""
        return -1 if self.skip_below is None else math.floor(self.skip_below * n)

    def replace(self, **changes) -> GateSettings:
        """A copy with ``changes`` applied (validated)."""
        return replace(self, **changes)

    @property
    def is_default_rule(self) -> bool:
        """True when only threshold, decay and floor matter (the paper's gate, on either
        ``signal``: the signal changes what the surprise compares, not the decision rule)."""
        return (self.reference == "ema" and self.max_staleness is None and self.budget is None
                and not self.motion_norm and self.scene_cut is None and not self.policy
                and self.batch_budget is None and self.ranker is None)

    def budget_count(self, n: int) -> int | None:
        """The budget as a patch count for frames of ``n`` patches (None: no budget)."""
        return budget_count(self.budget, n)

    def as_dict(self) -> dict:
        """Plain values (tensors as lists) for logs and saved states."""
        out = {}
        for name in ("threshold", "ema_decay", "floor_tokens", "reference", "max_staleness", "budget",
                     "motion_norm", "scene_cut", "skip_below", "keyframe_every", "keyframe_drift", "batch_budget", "signal"):
            v = getattr(self, name)
            out[name] = v.tolist() if isinstance(v, torch.Tensor) else v
        out["ranker"] = None if self.ranker is None else f"PatchRanker({len(RANKER_FEATURES)} -> {self.ranker.hidden} -> 1)"
        return out


def budget_count(budget: int | float | None, n: int) -> int | None:
    """Patches per frame for a budget (int count or float fraction of ``n``), at most ``n``."""
    if budget is None:
        return None
    if isinstance(budget, float):
        return min(n, max(1, math.floor(budget * n + 0.5)))
    return min(n, budget)


def check_threshold(threshold) -> None:
    # Surprise 1 - cos lies in [0, 2]: below 0 every patch passes, at 2 or above none does.
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 2.0:
        raise ValueError(f"threshold must be a number in [-1, 2] (surprise is 1 - cos), got {threshold!r}")


def check_ema_decay(ema_decay) -> None:
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"ema_decay must be a number in [0, 1], got {ema_decay!r}")


def check_floor_tokens(floor_tokens) -> None:
    if isinstance(floor_tokens, bool) or not isinstance(floor_tokens, int) or floor_tokens < 0:
        raise ValueError(f"floor_tokens must be an int >= 0, got {floor_tokens!r}")


def check_reference(reference) -> None:
    if reference not in REFERENCES:
        raise ValueError(f"reference must be 'ema' or 'computed', got {reference!r}")


def check_signal(signal) -> None:
    if signal not in SIGNALS:
        raise ValueError(f"signal must be 'embedding' (layer-0 embedding, position embedding included) or 'patch' "
                         f"(patch projection without the position embedding), got {signal!r}")


def check_max_staleness(k) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"max_staleness must be None or an int >= 1 (frames), got {k!r}")


def check_budget(budget) -> None:
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be None, an int >= 1 (patches) or a float in (0, 1] (fraction), got {budget!r}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget as a count must be >= 1, got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget as a fraction must be in (0, 1], got {budget!r}")


def check_scene_cut(scene_cut) -> None:
    if scene_cut is None:
        return
    if isinstance(scene_cut, bool) or not isinstance(scene_cut, (int, float)) or not 0.0 < scene_cut <= 1.0:
        raise ValueError(f"scene_cut must be None or a fraction in (0, 1], got {scene_cut!r}")


def check_skip_below(skip_below) -> None:
    if skip_below is None:
        return
    if isinstance(skip_below, bool) or not isinstance(skip_below, (int, float)) or not 0.0 <= skip_below <= 1.0:
        raise ValueError(f"skip_below must be None or a fraction in [0, 1] (share of patches over the "
                         f"threshold at which a frame is skipped), got {skip_below!r}")


def check_keyframe_every(k) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"keyframe_every must be None or an int >= 1 (frames), got {k!r}")


def check_keyframe_drift(f) -> None:
    if f is None:
        return
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 0:
        raise ValueError(f"keyframe_drift must be None or a finite number >= 0 (accumulated mean surprise over texture), got {f!r}")


def check_batch_budget(f) -> None:
    if f is None:
        return
    if isinstance(f, bool) or not isinstance(f, float) or not 0.0 < f <= 1.0:
        raise ValueError(f"batch_budget must be None or a float fraction in (0, 1] of the call's dense patches, got {f!r}")
