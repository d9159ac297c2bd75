"""The distillation loss on one frame of S clips, and the cosine the guard reports.

``raw`` (the released script): ``mse_w * MSE(e_s, e_t) + cos_w * mean(1 - cos(e_s, e_t))`` on the
pooled embeddings as they are (defaults 1 and 0.5). ``normalized`` (the paper): the same terms on
L2-normalised embeddings (defaults 1 and 1). MSE is the mean over streams and channels, the cosine
term the mean over streams; a clip's loss is the sum of its frames' losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, mse_weight: float, cos_weight: float) -> torch.Tensor:
    """Args:
        student: ``[S, D]`` pooled embeddings (any float dtype; the loss is computed in float32).
        teacher: ``[S, D]`` the dense teacher's, no gradient.
        kind: ``"raw"`` or ``"normalized"``.
    Returns:
        a float32 scalar.
    """
    s, t = student.float(), teacher.float()
    if kind == "normalized":
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    elif kind != "raw":
        raise ValueError(f"unknown loss {kind!r}")
    loss = s.new_zeros(())
    if mse_weight:
        loss = loss + mse_weight * F.mse_loss(s, t)
    if cos_weight:
        loss = loss + cos_weight * (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    return loss


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float32: ``[..., D], [..., D] -> [...]``."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)
