"""Everything a distillation run is told: :class:`DistillConfig`, its checks, and :class:`DistillError`.

A run's *trajectory* (which weights it reaches) is fixed by the fields in :data:`TRAJECTORY_FIELDS`;
a resumed run must repeat them exactly. The other fields (where logs go, how often to evaluate or
checkpoint, the guard's floor, the device, ...) may change between invocations.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

LOSSES = ("raw", "normalized")
"""``raw``: the released script's ``MSE(e_s, e_t) + 0.5 * mean(1 - cos(e_s, e_t))`` on the pooled
embeddings as they are; ``normalized``: the paper's cosine + MSE on L2-normalised embeddings."""

LOSS_WEIGHTS = {"raw": (1.0, 0.5), "normalized": (1.0, 1.0)}
"""Default ``(mse_weight, cos_weight)`` per loss."""

SCHEDULES = ("constant", "cosine", "linear")
AMP_MODES = ("none", "bf16", "fp16")
DRIFT_ACTIONS = ("stop", "warn")


class DistillError(Exception):
    """Bad input or an unusable run state; the message is one line naming the file or option."""


def parse_train(spec: str) -> tuple[str, int]:
    """``"all"`` -> ``("all", 0)``, ``"head"`` -> ``("head", 0)``, ``"head+K"`` -> ``("head", K)``.

    Raises:
        DistillError: anything else.
    """
    if spec in ("all", "head"):
        return spec, 0
    m = re.fullmatch(r"head\+(\d+)", spec or "")
    if m and int(m.group(1)) >= 1:
        return "head", int(m.group(1))
    raise DistillError(f"train must be 'all', 'head' or 'head+K' (head and the last K >= 1 encoder layers), got {spec!r}")


@dataclass
class DistillConfig:
    """Settings of one distillation run (see ``neuroflow distill --help`` for each option).

    Attributes:
        teacher: local checkpoint folder (``save_pretrained`` layout); the student starts as a copy.
        videos: training video files or folders (searched recursively for video files).
        out: output folder: checkpoints, logs, plot, the final student.
        val_videos: held-out videos or folders for the forgetting guard (empty: a fixed set of
            training clips is evaluated instead, and the log says so).
        clip_length: frames per clip (the gate resets per clip: its first frame is dense).
        frame_stride: keep every ``frame_stride``-th frame of the video inside a clip.
        max_clips_per_video: at most this many clips of one video per epoch (None: every
            non-overlapping clip it holds).
        resolutions: model input sides in pixels, multiples of the patch size; each step draws one
            (empty: the checkpoint's preprocessing size).
        threshold_range, decay_range: per clip, the gate's threshold and EMA decay are drawn
            uniformly from these closed ranges.
        floor_tokens: the gate's floor (at least this many patches computed per frame).
        train: ``"all"`` (every vision-tower parameter), ``"head"`` (final norm and pooling) or
            ``"head+K"`` (head and the last K encoder layers).
        loss: one of :data:`LOSSES`; ``mse_weight``/``cos_weight`` default per loss
            (:data:`LOSS_WEIGHTS`).
        lr, weight_decay, betas, eps: AdamW settings.
        warmup_steps, schedule: linear warm-up, then ``constant``, ``cosine`` or ``linear`` decay
            to zero at the last step.
        max_grad_norm: clip the gradient norm to this (None: no clipping).
        epochs, max_steps: the run ends after ``epochs`` passes over the clips or ``max_steps``
            optimiser steps, whichever comes first.
        streams: clips trained at once, as parallel streams (the batch size).
        seed: seeds the data order, the per-clip gate settings and the torch/numpy/python RNGs.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        amp: mixed precision for the training forward: ``none``, ``bf16`` or ``fp16`` (CUDA only,
            with a gradient scaler). Weights and optimiser state stay float32; evaluation runs
            in float32.
        eval_every: evaluate every this many steps (0: only before training and at the end).
        eval_clips: held-out clips per evaluation.
        eval_threshold, eval_decay: the gate settings the evaluation runs at.
        min_dense_fidelity: the guard's floor on the student's dense cosine to the teacher
            (None: no floor).
        on_drift: ``stop`` (end training; the student folder gets the weights of the last
            evaluation above the floor) or ``warn``.
        checkpoint_every: checkpoint every this many steps (0: only at the end); one is always
            written when an invocation ends.
        keep_checkpoints: how many of the newest checkpoints to keep.
        workers: clips decoded in the background while a step runs (0: decode in the step).
        resume: continue the run in ``out`` (True: its newest checkpoint; a path: that checkpoint).
        stop_after: end this invocation once the run has done this many steps in total
            (checkpoint written; continue later with ``resume``).
        quiet: no progress bar and no printed lines.
    """

    teacher: Path
    videos: list[Path]
    out: Path
    val_videos: list[Path] = field(default_factory=list)
    clip_length: int = 24
    frame_stride: int = 3
    max_clips_per_video: int | None = None
    resolutions: list[int] = field(default_factory=list)
    threshold_range: tuple[float, float] = (0.0001, 0.35)
    decay_range: tuple[float, float] = (0.001, 0.1)
    floor_tokens: int = 4
    train: str = "all"
    loss: str = "raw"
    mse_weight: float | None = None
    cos_weight: float | None = None
    lr: float = 5e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"
    max_grad_norm: float | None = 1.0
    epochs: int = 1
    max_steps: int | None = None
    streams: int = 4
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    eval_every: int = 100
    eval_clips: int = 8
    eval_threshold: float = 0.35
    eval_decay: float = 0.01
    min_dense_fidelity: float | None = 0.95
    on_drift: str = "stop"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    workers: int = 2
    resume: bool | Path = False
    stop_after: int | None = None
    quiet: bool = False

    def __post_init__(self):
        self.teacher = Path(self.teacher)
        self.out = Path(self.out)
        self.videos = [Path(p) for p in ([self.videos] if isinstance(self.videos, (str, Path)) else self.videos)]
        self.val_videos = [Path(p) for p in ([self.val_videos] if isinstance(self.val_videos, (str, Path)) else self.val_videos)]
        self.resolutions = [int(r) for r in self.resolutions]
        self.threshold_range = tuple(float(v) for v in self.threshold_range)
        self.decay_range = tuple(float(v) for v in self.decay_range)
        self.betas = tuple(float(v) for v in self.betas)
        if isinstance(self.resume, str):
            self.resume = Path(self.resume)

    @property
    def loss_weights(self) -> tuple[float, float]:
        """``(mse_weight, cos_weight)`` with the loss's defaults filled in."""
        mse, cos = LOSS_WEIGHTS.get(self.loss, (1.0, 1.0))
        return (mse if self.mse_weight is None else self.mse_weight,
                cos if self.cos_weight is None else self.cos_weight)

    def check(self) -> None:
        """Range checks that need no file or model.

        Raises:
            DistillError: naming the first bad setting.
        """
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise DistillError(message)

        def integer(name: str, low: int, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            need(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"{name} must be an int >= {low}, got {v!r}")

        def number_range(name: str, low: float, high: float) -> None:
            lo, hi = getattr(self, name)
            need(all(math.isfinite(v) for v in (lo, hi)) and low <= lo <= hi <= high,
                 f"{name} must be two numbers low <= high within [{low:g}, {high:g}], got {lo:g} {hi:g}")

        need(len(self.videos) > 0, "no training videos given")
        integer("clip_length", 2)
        integer("frame_stride", 1)
        integer("max_clips_per_video", 1, allow_none=True)
        for r in self.resolutions:
            need(r >= 1, f"resolutions must be >= 1 pixel, got {r}")
        number_range("threshold_range", -1.0, 2.0)
        number_range("decay_range", 0.0, 1.0)
        integer("floor_tokens", 0)
        parse_train(self.train)
        need(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        mse, cos = self.loss_weights
        need(mse >= 0 and cos >= 0 and mse + cos > 0, f"loss weights must be >= 0 and not both 0, got mse {mse:g}, cos {cos:g}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.eps > 0, f"eps must be > 0, got {self.eps!r}")
        integer("warmup_steps", 0)
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        integer("epochs", 1)
        integer("max_steps", 1, allow_none=True)
        integer("streams", 1)
        integer("seed", 0)
        need(self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        integer("eval_every", 0)
        integer("eval_clips", 1)
        need(-1.0 <= self.eval_threshold <= 2.0, f"eval_threshold must be in [-1, 2], got {self.eval_threshold!r}")
        need(0.0 <= self.eval_decay <= 1.0, f"eval_decay must be in [0, 1], got {self.eval_decay!r}")
        need(self.min_dense_fidelity is None or -1.0 <= self.min_dense_fidelity <= 1.0,
             f"min_dense_fidelity must be a cosine in [-1, 1], got {self.min_dense_fidelity!r}")
        need(self.on_drift in DRIFT_ACTIONS, f"on_drift must be one of {', '.join(DRIFT_ACTIONS)}, got {self.on_drift!r}")
        integer("checkpoint_every", 0)
        integer("keep_checkpoints", 1)
        integer("workers", 0)
        integer("stop_after", 1, allow_none=True)

    # -- persistence (checkpoints, summary.json) ------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-compatible: paths as strings, tuples as lists."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, (list, tuple)):
                d[k] = [str(x) if isinstance(x, Path) else x for x in v]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        """Inverse of :meth:`to_dict` (unknown keys are refused)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DistillError(f"unknown setting(s) in a saved configuration: {', '.join(unknown)}")
        return cls(**d)


TRAJECTORY_FIELDS = (
    "teacher", "videos", "clip_length", "frame_stride", "max_clips_per_video", "resolutions", "threshold_range",
    "decay_range", "floor_tokens", "train", "loss", "mse_weight", "cos_weight", "lr", "weight_decay", "betas", "eps",
    "warmup_steps", "schedule", "max_grad_norm", "epochs", "max_steps", "streams", "seed", "amp",
)
"""Settings that decide the weights a run reaches: a resumed run must repeat them."""


def trajectory_differences(saved: dict, current: DistillConfig) -> dict[str, tuple]:
    """``{field: (saved value, current value)}`` for the trajectory settings that differ.

    Paths are compared resolved, so a relative and an absolute spelling of one folder agree."""
    mine = current.to_dict()
    out = {}
    for name in TRAJECTORY_FIELDS:
        a, b = saved.get(name), mine.get(name)
        if name == "teacher":
            a, b = str(Path(a).resolve()) if a else a, str(Path(b).resolve())
        elif name == "videos":
            a = [str(Path(p).resolve()) for p in a or []]
            b = [str(Path(p).resolve()) for p in b]
        if a != b:
            out[name] = (a, b)
    return out
