"""The pooled embedding every part of NeuroFlow compares and saves, and the dense model's.

"Pooled" means the model's own ``pooler_output`` ``[B, D_out]`` (SigLIP's MAP head, CLIP's
post-LN CLS, ViT's pooler, DINOv2's normed CLS); a model built without pooling (a ViT without
pooler) has ``pooler_output = None``, and then its first token of ``last_hidden_state`` (CLS) is
taken. One rule for the command line, distillation, evaluation and the benchmarks, so their
fidelity figures compare the same thing.
"""

from __future__ import annotations

import torch

from .families import VisionAdapter


def pooled_output(outputs) -> torch.Tensor:
    """``outputs.pooler_output`` ``[B, D_out]``, else ``outputs.last_hidden_state[:, 0]`` ``[B, D]``.

    Args:
        outputs: anything with ``pooler_output`` (may be None) and ``last_hidden_state``
            ``[B, T, D]``: a Hugging Face model output, a ``NeuroFlowOutput`` or an
            ``ArchResult``. The dtype is kept.
    """
    pooled = outputs.pooler_output
    return pooled if pooled is not None else outputs.last_hidden_state[:, 0]


def dense_outputs(adapter: VisionAdapter, pixel_values: torch.Tensor):
    """The unmodified vision model on full frames ``[B, C, H, W]`` (model dtype and device): its
    own output object. Position embeddings are interpolated for other resolutions than the native
    one, as NeuroFlow does (DINOv2 always interpolates and takes no such argument). Follows the
    ambient grad mode."""
    if adapter.spec.interpolates_by_flag:
        return adapter.model(pixel_values, interpolate_pos_encoding=True)
    return adapter.model(pixel_values)


def dense_forward(adapter: VisionAdapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """The dense model's pooled embedding ``[B, D_out]`` (:func:`pooled_output` of
    :func:`dense_outputs`), in the model's dtype."""
    return pooled_output(dense_outputs(adapter, pixel_values))
