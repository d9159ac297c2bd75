"""The reference code's class names, as thin wrappers over :class:`neuroflow.NeuroFlow`.

``NeuroFlowSiglipVisionArchA/B/C(vision_model, threshold=..., ema_decay=..., floor_tokens=4)`` with
``forward(pixel_values, reset_state=False) -> pooled [B, D]``, ``reset()`` and ``last_sparsity``
(mean over the batch). Each batch row is its own stream (row index). Unlike the reference code
they accept any batch size, keep the EMA in float32, and run the corrected architectures.
"""

from __future__ import annotations

import torch
from torch import nn

from .engine import NeuroFlow


class _ReferenceCompatible(nn.Module):
    arch = "C"

    def __init__(self, vision_model: nn.Module, threshold: float = 0.35, ema_decay: float = 0.01, floor_tokens: int = 4):
        super().__init__()
        # The reference code's classes keep its rule: the EMA of every frame, no staleness bound.
        self.engine = NeuroFlow(
            vision_model, arch=self.arch, threshold=threshold, ema_decay=ema_decay, floor_tokens=floor_tokens,
            preset="paper",
        )
        self.last_sparsity: float = 0.0

    def reset(self) -> None:
        self.engine.reset()

    def forward(self, pixel_values: torch.Tensor, reset_state: bool = False) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, D]`` pooled embeddings; ``reset_state`` restarts every stream first."""
        if reset_state:
            self.engine.reset()
        out = self.engine(pixel_values)
        self.last_sparsity = float(out.sparsity.mean())
        return out.pooler_output


class NeuroFlowSiglipVisionArchA(_ReferenceCompatible):
    """Architecture A (MLP gating with per-layer anchors). Reference default threshold 0.15."""

    arch = "A"

    def __init__(self, vision_model: nn.Module, threshold: float = 0.15, ema_decay: float = 0.01, floor_tokens: int = 4):
        super().__init__(vision_model, threshold, ema_decay, floor_tokens)


class NeuroFlowSiglipVisionArchB(_ReferenceCompatible):
    """Architecture B (elimination before the encoder; needs a distilled model for fidelity)."""

    arch = "B"


class NeuroFlowSiglipVisionArchC(_ReferenceCompatible):
    """Architecture C (dual memory: gate + cache of final-layer outputs)."""

    arch = "C"
