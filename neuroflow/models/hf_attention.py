"""``attn_implementation="neuroflow_varlen"``: packed multi-sequence attention inside Hugging Face models.

Importing ``neuroflow`` registers one name in both of transformers' registries (the attention
function and the mask builder; a name missing from the mask registry would silently drop masks).
With it, a ViT, CLIP, DINOv2 or SigLIP model runs a *packed* batch: several images' tokens
concatenated into one ``[1, T, D]`` sequence, where attention mixes only tokens of the same image.

Segment boundaries reach the attention in one of two ways:

* as transformers' packing kwargs (``cu_seq_lens_q``/``cu_seq_lens_k``, ``max_length_q``/
  ``max_length_k``) passed to the model or encoder call: CLIP and ViT forward them, and DINOv2
  where its layers take ``**kwargs`` (transformers 5.24 yes, 5.17 no);
* inside ``with neuroflow.packed_segments(cu_seqlens, max_seqlen):`` for models whose attention
  modules or layers drop those kwargs (SigLIP, SigLIP 2, DINOv2 on transformers 5.17). The
  context works for every family.

Without either, each batch row is one sequence (ordinary batched attention). Attention runs
through :func:`neuroflow.ops.varlen_attention.varlen_attention` (the Triton kernel on CUDA, the reference on the
CPU, as :mod:`neuroflow.ops.dispatch` decides).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from ..ops.varlen_attention import varlen_attention

ATTENTION_NAME = "neuroflow_varlen"


@dataclass(frozen=True)
class _Segments:
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


_segments: contextvars.ContextVar[_Segments | None] = contextvars.ContextVar("neuroflow_segments", default=None)


@contextlib.contextmanager
def packed_segments(cu_seqlens: torch.Tensor, max_seqlen: int,
                    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None):
    """Within this block, ``neuroflow_varlen`` attention treats its ``[1, T, ...]`` input as
    segments ``cu_seqlens`` (int32 ``[S + 1]``, on the model's device); ``max_seqlen`` is a host
    upper bound on a segment's length. Keys may have their own segments (``cu_seqlens_k``)."""
    token = _segments.set(_Segments(cu_seqlens, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k,
                                    int(max_seqlen), int(max_seqlen if max_seqlen_k is None else max_seqlen_k)))
    try:
        yield
    finally:
        _segments.reset(token)


def neuroflow_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: q/k/v ``[B, H, T, Dh]`` -> (``[B, T, H, Dh]``, None)."""
    if attention_mask is not None:
        raise ValueError(
            f"{ATTENTION_NAME} takes sequence boundaries (cu_seqlens), not an attention mask; "
            "pack the sequences instead of padding them"
        )
    if dropout and module.training:
        raise ValueError(f"{ATTENTION_NAME} is forward-only and has no attention dropout")
    b, h, tq, dh = query.shape
    tk = key.shape[2]
    seg = _segments.get()
    if kwargs.get("cu_seq_lens_q") is not None:
        cu_q = kwargs["cu_seq_lens_q"].to(torch.int32)
        cu_k = kwargs.get("cu_seq_lens_k", cu_q).to(torch.int32)
        max_q = int(kwargs.get("max_length_q") or tq)
        max_k = int(kwargs.get("max_length_k") or tk)
    elif seg is not None:
        cu_q, cu_k, max_q, max_k = seg.cu_seqlens_q, seg.cu_seqlens_k, seg.max_seqlen_q, seg.max_seqlen_k
    else:
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=query.device) * tq
        cu_k = torch.arange(b + 1, dtype=torch.int32, device=query.device) * tk
        max_q, max_k = tq, tk
    q = query.transpose(1, 2).reshape(b * tq, h, dh)
    k = key.transpose(1, 2).reshape(b * tk, h, dh)
    v = value.transpose(1, 2).reshape(b * tk, h, dh)
    out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling)
    return out.view(b, tq, h, dh), None


def _no_mask(*args, **kwargs):
    """Mask builder for the registry: boundaries travel as cu_seqlens, so no dense mask is built."""
    return None


def register() -> str:
    """Register :data:`ATTENTION_NAME` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, neuroflow_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME
