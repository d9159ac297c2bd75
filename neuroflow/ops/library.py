"""The three device ops as ``torch.library`` custom ops, so ``torch.compile`` traces through them.

* ``torch.ops.neuroflow.gate(frames, weight, bias, pos_embed, prefix, ema!, slot, first, threshold,
  ema_decay, floor_tokens) -> (surprise, active, cu_seqlens, index, packed)``: mutates ``ema``;
  see :func:`neuroflow.ops.gate.gate` (the forced-mask and ``config`` options stay on the Python
  function).
* ``torch.ops.neuroflow.cache_scatter(cache!, slot, src, cu_seqlens, index) -> ()``: mutates
  ``cache``; see :func:`neuroflow.ops.cache_scatter.cache_scatter`.
* ``torch.ops.neuroflow.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, scale, kv_start) -> out``; see :func:`neuroflow.ops.varlen_attention.varlen_attention`.

Each real implementation is the launcher (which asks :mod:`neuroflow.dispatch` for the path, so
the kernel or the reference runs exactly as when the function is called directly); each fake
(meta) implementation gives the output shapes from the input shapes alone: the packed gate
outputs have the capacity ``B * (P + N)`` rows, never the data-dependent count. The ops are
forward-only (no autograd formula): :mod:`neuroflow.encoder` calls the varlen op while
``torch.compile`` traces without gradients, and the Python function otherwise (eager steps skip the
op's dispatch cost; distillation's gradient path keeps the reference's autograd).
"""

from __future__ import annotations

import torch

from .cache_scatter import cache_scatter
from .gate import gate
from .varlen_attention import varlen_attention

NAMESPACE = "neuroflow"


@torch.library.custom_op(f"{NAMESPACE}::gate", mutates_args=("ema",))
def gate_op(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    prefix: torch.Tensor,
    ema: torch.Tensor,
    slot: torch.Tensor,
    first: torch.Tensor,
    threshold: float,
    ema_decay: float,
    floor_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = gate(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay, floor_tokens)
    return out.surprise, out.active, out.cu_seqlens, out.index, out.packed


@gate_op.register_fake
def _gate_fake(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay, floor_tokens):
    b, _, h, w = frames.shape
    p = weight.shape[2]
    n = (h // p) * (w // p)
    d = weight.shape[0]
    cap = b * (prefix.shape[0] + n)
    return (
        frames.new_empty(b, n, dtype=torch.float32),
        frames.new_empty(b, n, dtype=torch.bool),
        frames.new_empty(b + 1, dtype=torch.int32),
        frames.new_empty(cap, dtype=torch.int32),
        frames.new_empty(cap, d),
    )


@torch.library.custom_op(f"{NAMESPACE}::cache_scatter", mutates_args=("cache",))
def cache_scatter_op(cache: torch.Tensor, slot: torch.Tensor, src: torch.Tensor, cu_seqlens: torch.Tensor,
                     index: torch.Tensor) -> None:
    cache_scatter(cache, slot, src, cu_seqlens, index)


@cache_scatter_op.register_fake
def _cache_scatter_fake(cache, slot, src, cu_seqlens, index) -> None:
    return None


@torch.library.custom_op(f"{NAMESPACE}::varlen_attention", mutates_args=())
def varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start)


@varlen_attention_op.register_fake
def _varlen_attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None,
                           kv_start=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def attend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, kv_start=None):
    """Varlen attention as the encoder calls it: through the registered op while ``torch.compile``
    traces (and no gradient is needed: the op is forward-only), else through the Python launcher
    directly (same path and result, without the op's per-call dispatch cost in eager steps; the
    reference keeps autograd for distillation)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if torch.compiler.is_compiling() and not needs_grad:
        return varlen_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start)
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start)
