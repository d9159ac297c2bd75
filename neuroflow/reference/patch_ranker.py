"""The learned patch ranking (``NeuroFlow(ranker=...)``): a tiny per-patch predictor of how far
each patch's held output is from what a dense run would give now, used to choose *which* patches
a partial frame computes. How many it computes, and whether the frame is skipped, partial or a
keyframe, stay the deterministic gate's decision (the threshold, floor, budgets and frame policy
on the layer-0 surprise), so the compute of a ranker run follows the same rule as without one.

The predictor is an MLP ``F -> H -> 1`` (ReLU) on standardised per-patch features that the gate
has at decision time, on the device, with no state beyond what the engine keeps:

==================================  ============================================================
feature                             what it is, per patch i of a frame (``s``: raw layer-0 surprise)
==================================  ============================================================
``log surprise``                    ``log max(s_i, 1e-5)``
``log 3x3 max surprise``            the largest ``s`` in the 3x3 patch neighbourhood
``log 3x3 mean surprise``           the mean ``s`` there (edges: mean of the patches that exist)
``log 5x5 max surprise``            the largest ``s`` in the 5x5 neighbourhood
``log frame mean surprise``         the frame's mean ``s`` (the same for every patch)
``share over threshold``            the frame's share of patches with ``s > threshold``
``log(1 + since)``                  frames since the stream's last keyframe (0 without the frame policy)
``log surprise x log(1 + since)``   a change that has had longer to build up counts more
==================================  ============================================================

Its output ranks the patches; only the order matters. Training (:mod:`neuroflow.distill.gate_ranker`,
``neuroflow distill-gate``) fits it to ``10 sqrt(1 - cos(dense output, held output))`` on the
partial frames of a user's own footage run through the engine. The score is computed with device
torch ops (a few pools and two small matrix products), on both the reference and the kernel path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RANKER_FEATURES = ("log surprise", "log 3x3 max surprise", "log 3x3 mean surprise", "log 5x5 max surprise",
                   "log frame mean surprise", "share over threshold", "log(1 + since)",
                   "log surprise x log(1 + since)")
"""The predictor's inputs, in order (see the module docstring)."""

LOG_FLOOR = 1e-5
"""Surprises are clamped to at least this before the log (a patch that did not move has s = 0)."""

FORMAT = "neuroflow-patch-ranker/1"
"""The ``format`` entry of a saved ranker; a file with another one is refused."""


class RankerError(ValueError):
    """A ranker that cannot be used: a bad file, wrong shapes, non-finite weights."""


@dataclass(frozen=True, eq=False)
class PatchRanker:
    """A trained ranker: ``w1 [F, H]``, ``b1 [H]``, ``w2 [H]``, ``b2 []`` and the feature
    standardisation ``mean [F]``, ``std [F]``, all float32 on one device (F =
    ``len(RANKER_FEATURES)``). ``meta`` records how it was trained (plain values, saved with it).
    Compared and hashed by identity (the engine's settings are hashable)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    meta: dict | None = None

    def __post_init__(self):
        self.check()

    @property
    def hidden(self) -> int:
        return self.w1.shape[1]

    @property
    def device(self) -> torch.device:
        return self.w1.device

    def check(self) -> None:
        """Raise :class:`RankerError` unless the shapes, dtypes and values make a ranker."""
        f = len(RANKER_FEATURES)
        tensors = dict(w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2, mean=self.mean, std=self.std)
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise RankerError(f"ranker {name} must be a float32 tensor, got "
                                  f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if self.w1.dim() != 2 or self.w1.shape[0] != f or self.w1.shape[1] < 1:
            raise RankerError(f"ranker w1 must be [{f}, H] ({f} features: {', '.join(RANKER_FEATURES)}), "
                              f"got {tuple(self.w1.shape)}")
        h = self.w1.shape[1]
        want = dict(b1=(h,), w2=(h,), b2=(), mean=(f,), std=(f,))
        for name, shape in want.items():
            if tuple(tensors[name].shape) != shape:
                raise RankerError(f"ranker {name} must be {list(shape)}, got {list(tensors[name].shape)}")
        if len({t.device for t in tensors.values()}) != 1:
            raise RankerError("ranker tensors must all be on one device")
        if not all(torch.isfinite(t).all() for t in tensors.values()) or not (self.std > 0).all():
            raise RankerError("ranker weights must be finite and its feature std > 0")

    def to(self, device: torch.device | str) -> PatchRanker:
        """A copy on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return PatchRanker(*(t.to(device) for t in (self.w1, self.b1, self.w2, self.b2, self.mean, self.std)),
                           meta=self.meta)

    def flat(self) -> torch.Tensor:
        """Every parameter in one 1-D float32 tensor (w1, b1, w2, b2, mean, std, in that order):
        the form the registered gate op takes (:mod:`neuroflow.ops.library`)."""
        return torch.cat([self.w1.flatten(), self.b1, self.w2, self.b2.view(1), self.mean, self.std])

    @classmethod
    def from_flat(cls, flat: torch.Tensor) -> PatchRanker:
        """The inverse of :meth:`flat`, without :meth:`check` (its finiteness test would read the
        device on every gate call; the engine checked the ranker once when it was given)."""
        f = len(RANKER_FEATURES)
        h, rest = divmod(flat.numel() - 1 - 2 * f, f + 2)
        if flat.dim() != 1 or rest or h < 1:
            raise RankerError(f"a flat ranker has F*H + 2H + 1 + 2F values (F = {f}), got {tuple(flat.shape)}")
        parts = torch.split(flat, [f * h, h, h, 1, f, f])
        ranker = object.__new__(cls)
        for name, t in zip(("w1", "b1", "w2", "b2", "mean", "std"), parts):
            object.__setattr__(ranker, name, t)
        object.__setattr__(ranker, "w1", parts[0].view(f, h))
        object.__setattr__(ranker, "b2", parts[3].view(()))
        object.__setattr__(ranker, "meta", None)
        return ranker

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., F]`` float32 features -> ``[...]`` float32 predicted error (larger: compute first)."""
        x = (features - self.mean) / self.std
        return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def save(self, path: str | Path) -> Path:
        """Write the ranker to ``path`` (a ``torch.save`` file of plain tensors and values)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, "features": list(RANKER_FEATURES),
                    **{k: getattr(self, k).detach().cpu() for k in ("w1", "b1", "w2", "b2", "mean", "std")},
                    "meta": self.meta or {}}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> PatchRanker:
        """Read a ranker written by :meth:`save`. Raises :class:`RankerError` naming the file when it
        is missing, corrupt, of another format or trained on other features."""
        path = Path(path)
        if not path.is_file():
            raise RankerError(f"ranker file {path} does not exist")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise RankerError(f"ranker file {path} cannot be read: not a file written by PatchRanker.save "
                              f"({type(e).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RankerError(f"{path} is not a NeuroFlow patch ranker (format {FORMAT!r})")
        if data.get("features") != list(RANKER_FEATURES):
            raise RankerError(f"{path} was trained on features {data.get('features')}, this version computes "
                              f"{list(RANKER_FEATURES)}: train it again with `neuroflow distill-gate`")
        try:
            ranker = cls(*(data[k] for k in ("w1", "b1", "w2", "b2", "mean", "std")), meta=data.get("meta") or None)
        except KeyError as e:
            raise RankerError(f"ranker file {path} lacks {e.args[0]!r}") from None
        except RankerError as e:
            raise RankerError(f"ranker file {path}: {e}") from None
        return ranker.to(device)


def ranker_features(raw: torch.Tensor, grid: tuple[int, int], threshold: float | None,
                    since: torch.Tensor | None = None) -> torch.Tensor:
    """The predictor's inputs (:data:`RANKER_FEATURES`). ``raw [B, N]`` float32 raw layer-0 surprise
    (finite: first frames' rows hold anything finite, they are dense anyway), ``grid`` the patch grid
    ``(gh, gw)`` with ``gh * gw = N``, ``threshold`` the gate's (None: no patch counts as over it),
    ``since [B]`` int32 frames since each stream's last keyframe before this frame (None: 0).
    Returns ``[B, N, F]`` float32."""
    b, n = raw.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"grid {grid} does not hold {n} patches")
    s = raw.float()
    log = lambda v: torch.log(v.clamp_min(LOG_FLOOR))  # noqa: E731
    m = s.view(b, 1, gh, gw)
    mx3 = F.max_pool2d(m, 3, 1, 1).flatten(1)
    av3 = F.avg_pool2d(m, 3, 1, 1, count_include_pad=False).flatten(1)
    mx5 = F.max_pool2d(m, 5, 1, 2).flatten(1)
    mean = s.mean(1, keepdim=True).expand_as(s)
    share = ((s > threshold).float().mean(1, keepdim=True) if threshold is not None
             else torch.zeros(b, 1, device=s.device)).expand_as(s)
    age = torch.zeros(b, 1, device=s.device) if since is None else torch.log1p(since.float().view(b, 1))
    age = age.expand_as(s)
    ls = log(s)
    return torch.stack([ls, log(mx3), log(av3), log(mx5), log(mean), share, age, ls * age], dim=-1)


def ranker_scores(ranker: PatchRanker, raw: torch.Tensor, first: torch.Tensor, grid: tuple[int, int],
                  threshold: float | None, since: torch.Tensor | None = None) -> torch.Tensor:
    """The ranking score of every patch, ``[B, N]`` float32 (larger: computed first); ``raw`` as
    for :func:`ranker_features` except that first frames' rows (``first [B]`` bool; inf there)
    are replaced before the features and scored 0 (a first frame is dense whatever its order)."""
    if ranker.device != raw.device:
        raise ValueError(f"the ranker is on {ranker.device}, the frames on {raw.device}: ranker.to(device)")
    first_rows = first.view(-1, 1)
    clean = torch.where(first_rows, 0.0, raw.float())
    scores = ranker.score(ranker_features(clean, grid, threshold, since))
    return torch.where(first_rows, 0.0, scores).contiguous()

