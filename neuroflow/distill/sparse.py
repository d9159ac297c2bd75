"""The student's differentiable Architecture B forward over S clips run as S parallel streams
(both models are compared on :func:`neuroflow.models.pooling.pooled_output`).

Per frame t of the clips (the method's sparse manifold distillation):

    layer-0 embedding + gate (neuroflow.reference.gate.gate_reference, per-stream threshold and decay)
    -> Packed (cu_seqlens, token positions)  ->  ArchB.run (encoder + readout on the computed
    tokens only)  ->  pooled output [S, D_out]

The gate's choice of tokens is not differentiated (a comparison), and neither is the EMA: it is
state held in a plain float32 tensor owned by :class:`SparseClips` for one step, updated in place
under ``no_grad``. Gradients reach the packed tokens' embeddings (patch and position embeddings,
when they train), every encoder layer and the readout. Everything here runs PyTorch's reference
paths, which autograd differentiates; :mod:`neuroflow.ops.dispatch` routes calls that need gradients
to those paths on a GPU too (the Triton kernels are forward-only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.architectures import ArchB
from ..models.families import VisionAdapter
from ..models.pooling import pooled_output
from ..reference.gate import ema_dtype, gate_reference
from .config import DistillError


def check_distillable(adapter: VisionAdapter, floor_tokens: int, where: str) -> None:
    """Refuse models whose Architecture B output has nothing to compare.

    Raises:
        DistillError: a SigLIP model without pooling head (its pooled output is None and its
            first token is a patch that B may not compute), or a floor of 0 on a model without
            prefix token (a frame could reach the head with no token at all).
    """
    if adapter.spec.pooling == "map" and not adapter.has_map_head:
        raise DistillError(f"{where}: this SigLIP model has no pooling head (vision_use_head=False), so "
                           "Architecture B has no pooled embedding to distill")
    try:
        ArchB(adapter).check(floor_tokens)
    except ValueError as exc:
        raise DistillError(f"{where}: {exc}, got {floor_tokens}") from None


@dataclass
class SparseFrame:
    """The student's output on frame t of every clip.

    Attributes:
        pixels: ``[S, C, H, W]`` the frame as it ran, on the model's device (for the teacher).
        pooled: ``[S, D_out]``, differentiable.
        sparsity: ``[S]`` float32, ``1 - N_active / N`` (0 on the first frame).
        active: ``[S, N]`` bool, the patches the gate computed.
    """

    pixels: torch.Tensor
    pooled: torch.Tensor
    sparsity: torch.Tensor
    active: torch.Tensor


class SparseClips:
    """S clips as S parallel streams through the student's Architecture B, one frame at a time.

    Args:
        adapter: the student's :class:`VisionAdapter`.
        clips: ``[S, F, C, H, W]`` frames in the model's dtype, on any device: each frame moves to
            the model's device when it runs (a long clip at a high resolution need not fit there).
        threshold, decay: ``[S]`` float32 per-clip gate settings (moved to the model's device).
        floor_tokens: the gate's floor.

    Call :meth:`frame` for t = 0, 1, ..., F - 1 in order (the gate is sequential: frame t's
    decision reads the EMA frames 0..t-1 left). Frame 0 of every clip is dense. Each frame's graph
    is independent of the others', so a caller may backpropagate frame by frame.
    """

    def __init__(self, adapter: VisionAdapter, clips: torch.Tensor, threshold: torch.Tensor, decay: torch.Tensor,
                 floor_tokens: int):
        if clips.dim() != 5:
            raise ValueError(f"clips must be [S, F, C, H, W], got {tuple(clips.shape)}")
        s = clips.shape[0]
        if threshold.shape != (s,) or decay.shape != (s,):
            raise ValueError(f"threshold and decay need one value per clip ({s}), got {tuple(threshold.shape)} and {tuple(decay.shape)}")
        device = adapter.device
        self.adapter, self.clips = adapter, clips
        self.threshold, self.decay = threshold.to(device, torch.float32), decay.to(device, torch.float32)
        self.floor_tokens = floor_tokens
        self.grid = adapter.grid(clips.shape[-2], clips.shape[-1])
        n = self.grid[0] * self.grid[1]
        # The gate's state for this step; zeros, though frame 0 overwrites it before any read.
        self.ema = torch.zeros(s, n, adapter.hidden_size, dtype=ema_dtype(adapter.dtype), device=device)
        self.slot = torch.arange(s, device=device)
        self.arch = ArchB(adapter)
        self.next_t = 0

    @property
    def num_frames(self) -> int:
        return self.clips.shape[1]

    def frame(self, t: int) -> SparseFrame:
        """Gate frame ``t`` of every clip and run the computed tokens through encoder and head."""
        if t != self.next_t:
            raise ValueError(f"frames must be run in order: expected frame {self.next_t}, got {t}")
        a, conv = self.adapter, self.adapter.patch_conv
        s = self.clips.shape[0]
        pixels = self.clips[:, t].to(a.device, non_blocking=True)
        first = torch.full((s,), t == 0, dtype=torch.bool, device=a.device)
        # Position and prefix embeddings are rebuilt per frame so that each frame's graph stands
        # alone (backward per frame frees it; a shared node would need retain_graph).
        gate = gate_reference(
            pixels, conv.weight, conv.bias, a.position_embeddings(self.grid), a.prefix_tokens(self.grid),
            self.ema, self.slot, first, self.threshold, self.decay, self.floor_tokens,
        )
        self.next_t += 1
        result = self.arch.run(*self.arch.encoder_inputs(gate))
        counts = gate.active.sum(dim=1)
        sparsity = 1.0 - counts.float() / gate.active.shape[1]
        return SparseFrame(pixels, pooled_output(result), sparsity, gate.active)
