"""The forgetting guard's measurement: student and teacher on a fixed set of held-out clips.

At each evaluation, per resolution, over every frame after a clip's first (dense) one:

- ``sparse_fidelity``: cosine of the student under Architecture B (the engine itself,
  ``NeuroFlow(student, arch="B")``, at fixed gate settings) to the teacher's dense pooled output:
  what distillation improves;
- ``dense_fidelity``: cosine of the student run densely to the teacher: how far the model itself
  has drifted (forgetting); the guard's floor applies to it;
- ``sparsity``: share of patches the gate skipped.

Evaluation runs in float32 under ``torch.inference_mode()`` (on a GPU the engine takes its Triton
kernels) and draws no random numbers, so it never changes a run's trajectory. The clips are
decoded once and kept as uint8 frames; the teacher's outputs are computed once per resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..engine.engine import NeuroFlow
from ..models.families import VisionAdapter
from ..models.pooling import dense_forward, pooled_output
from ..models.preprocess import Preprocessor
from .losses import cosine


class Evaluator:
    """Args:
    clips: C clips, each a list of F RGB frames ``[H, W, 3]`` uint8.
    source: ``"held-out"`` or ``"train"``, written into every row.
    teacher: the frozen teacher's adapter.
    student: the student's vision model (weights are read at each :meth:`run`, not copied).
    preprocessor: resizes and normalises frames.
    streams: clips evaluated at once, as parallel streams.
    threshold, decay, floor_tokens: the gate settings of the evaluation.
    device: where the models live.
    """

    def __init__(self, clips: Sequence[list[np.ndarray]], source: str, teacher: VisionAdapter, student: nn.Module,
                 preprocessor: Preprocessor, streams: int, threshold: float, decay: float, floor_tokens: int,
                 device: torch.device):
        self.clips, self.source = list(clips), source
        self.teacher = teacher
        self.student = VisionAdapter(student)
        # Distillation trains under the paper's gate (EMA of every frame): evaluate under it too.
        self.engine = NeuroFlow(student, arch="B", threshold=threshold, ema_decay=decay, floor_tokens=floor_tokens,
                                check_finite=False, preset="paper")
        self.preprocessor, self.streams, self.device = preprocessor, streams, device
        self._teacher_out: dict[int, torch.Tensor] = {}

    @property
    def num_frames(self) -> int:
        return len(self.clips[0])

    def _batches(self, resolution: int):
        """``(first clip index, frames [s, F, C, r, r] float32 on the host)`` per batch of clips."""
        f = self.num_frames
        for i in range(0, len(self.clips), self.streams):
            group = self.clips[i : i + self.streams]
            x = self.preprocessor([frame for clip in group for frame in clip], size=resolution)
            yield i, x.view(len(group), f, *x.shape[1:])

    def _teacher(self, resolution: int) -> torch.Tensor:
        """``[C, F, D]`` the teacher's dense pooled outputs (computed on first use)."""
        if resolution not in self._teacher_out:
            rows = []
            with torch.inference_mode():
                for _, x in self._batches(resolution):
                    rows.append(torch.stack([dense_forward(self.teacher, x[:, t].to(self.device)).float()
                                             for t in range(x.shape[1])], dim=1))
            self._teacher_out[resolution] = torch.cat(rows)
        return self._teacher_out[resolution]

    def run(self, step: int, resolutions: Sequence[int]) -> list[dict]:
        """One row per resolution (see ``neuroflow.distill.logs.EVAL_COLUMNS``)."""
        rows = []
        for res in resolutions:
            target = self._teacher(res)
            sparse_cos, dense_cos, sparsity = [], [], []
            with torch.inference_mode():
                for i, x in self._batches(res):
                    self.engine.reset()
                    t_out = target[i : i + x.shape[0]]
                    for t in range(x.shape[1]):
                        frame = x[:, t].to(self.device)
                        out = self.engine(frame)
                        if t == 0:
                            continue  # dense in both paths: says nothing about sparsity
                        pooled = pooled_output(out)
                        dense = dense_forward(self.student, frame)
                        sparse_cos.append(cosine(pooled, t_out[:, t]))
                        dense_cos.append(cosine(dense, t_out[:, t]))
                        sparsity.append(out.sparsity.float())
            self.engine.reset()
            rows.append({
                "step": step,
                "resolution": res,
                "sparse_fidelity": float(torch.cat(sparse_cos).mean()),
                "dense_fidelity": float(torch.cat(dense_cos).mean()),
                "sparsity": float(torch.cat(sparsity).mean()),
                "clips": len(self.clips),
                "frames": sum(c.numel() for c in sparse_cos),
                "source": self.source,
            })
        return rows
