"""Architectures A, B, C and KV: what runs after the gate, and what each stream remembers.

B and C take the gate's packed tokens (:class:`neuroflow.encoder.Packed` tells which rows belong
to which stream and where they sit in its token grid), A the full token grid; all return the
model outputs, and state tensors are pool tensors updated in place at the batch's slots.

* **A** (MLP gating): attention over all tokens at every layer, the MLP only for computed tokens;
  an inactive token's output at layer l is its layer-l output from the last frame it was active
  (per-layer anchors, pre-LN order).
* **B** (elimination): the encoder and the readout see only the computed tokens.
* **C** (dual memory): the encoder sees only the computed tokens; a per-stream cache of final-layer
  outputs (before the final norm) is overwritten at their positions and the readout sees the
  whole cache. For models that pool a CLS token, the CLS token would otherwise see only the
  active patches, so by default the *last* layer runs with full context: each stream also caches
  every token's key and value at the last layer, and the last layer's queries (CLS, registers,
  active patches) attend to all of them (fresh for computed tokens, last-active for the rest). See
  ``README.md`` ("Architecture C for CLS models").
* **KV** (cached context): as C, but at *every* layer the computed tokens' queries attend to the
  keys and values of all tokens of their stream: fresh for computed tokens (written into a
  per-stream, per-layer cache), last-active for the others. Equivalent to running every layer on
  all tokens with inactive tokens frozen at their last-active inputs; the pooled token sees every
  patch at every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoder import Packed, packed_layer_cached_kv, run_packed
from .fused_gate import cache_scatter
from .models import VisionAdapter, attention_block, mlp_block
from .profiling import stage


@dataclass
class ArchResult:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None


def architecture_a(adapter: VisionAdapter, tokens: torch.Tensor, computed: torch.Tensor, anchors: torch.Tensor) -> tuple[ArchResult, torch.Tensor]:
    """Args:
    tokens: ``[B, T, D]`` encoder inputs of every token.
    computed: ``[B, T]`` bool, tokens computed this frame (prefix and active patches).
    anchors: ``[B, L, T, D]`` each token's layer outputs from its last active frame.
    Returns the outputs and the new anchors.
    """
    x = tokens
    new_anchors = anchors.clone()
    with stage("encoder"):
        for layer, parts in enumerate(adapter.layers):
            h = attention_block(parts, x)
            out = anchors[:, layer].clone()
            out[computed] = mlp_block(parts, h[computed]).to(out.dtype)
            new_anchors[:, layer] = out
            x = out
    with stage("readout"):
        seq, pooled = adapter.readout(x)
    return ArchResult(seq, pooled), new_anchors


def architecture_b(adapter: VisionAdapter, x: torch.Tensor, packed: Packed) -> ArchResult:
    """Args: x ``[T, D]`` packed encoder inputs. ``last_hidden_state`` is the full grid with zeros
    at tokens that were not computed."""
    with stage("encoder"):
        z = run_packed(adapter.layers, x, packed)
    with stage("readout"):
        seq, pooled = adapter.readout_packed(z, packed.cu_seqlens, packed.max_seqlen)
        full = seq.new_zeros(len(packed.lengths), packed.tokens, seq.shape[-1])
        full[packed.frame_of(), packed.index.long()] = seq
    return ArchResult(full, pooled)


def architecture_c(
    adapter: VisionAdapter,
    x: torch.Tensor,
    packed: Packed,
    slot: torch.Tensor,
    cache: torch.Tensor,
    last_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    head_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ArchResult:
    """Args:
    x: ``[T, D]`` packed encoder inputs.
    slot: ``[B]`` int64, the streams' rows in the pools.
    cache: ``[S, T_tok, D]`` pool of final-layer outputs (before the final norm), updated in place.
    last_kv: ``[S, T_tok, D]`` pools of the last layer's keys and values, updated in place; given
        only for the full-context last layer of CLS models.
    head_kv: ``[S, T_tok, D]`` pools of SigLIP's pooling-head keys and values (see
        :func:`_readout_from_cache`), or None.
    """
    with stage("encoder"):
        if last_kv is None:
            z = run_packed(adapter.layers, x, packed)
        else:
            y = run_packed(adapter.layers[:-1], x, packed)
            z = packed_layer_cached_kv(adapter.layers[-1], y, packed, slot, *last_kv)
    return _readout_from_cache(adapter, z, packed, slot, cache, head_kv)


def architecture_kv(
    adapter: VisionAdapter,
    x: torch.Tensor,
    packed: Packed,
    slot: torch.Tensor,
    cache: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    head_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ArchResult:
    """Cached context: at every layer the computed tokens attend to every token of their stream.

    Args:
        x: ``[T, D]`` packed encoder inputs.
        slot: ``[B]`` int64, the streams' rows in the pools.
        cache: ``[S, T_tok, D]`` pool of final-layer outputs, updated in place (read out as in C).
        keys, values: ``[S, L, T_tok, H * Dh]`` pools of every layer's keys and values, updated in
            place at the computed tokens and read in place by the attention.
        head_kv: as for :func:`architecture_c`.
    """
    num_layers = len(adapter.layers)
    s, _, t_tok, width = keys.shape
    k_rows, v_rows = keys.view(s * num_layers, t_tok, width), values.view(s * num_layers, t_tok, width)
    with stage("encoder"):
        for layer, parts in enumerate(adapter.layers):
            # Layer l of stream slot s lives at row s * L + l of the flattened pools.
            x = packed_layer_cached_kv(parts, x, packed, slot * num_layers + layer, k_rows, v_rows)
    return _readout_from_cache(adapter, x, packed, slot, cache, head_kv)


def _readout_from_cache(adapter, z, packed, slot, cache, head_kv) -> ArchResult:
    """Write the fresh final-layer outputs ``z`` ``[T, D]`` into the cache and read every token out.

    With ``head_kv`` (SigLIP: ``[S, T_tok, D]`` pools of the pooling head's keys and values), the
    head's key/value projections run for the fresh tokens only and the probe attends to the cached
    ones; without it the head projects all T_tok tokens of every stream each frame.
    """
    with stage("readout"):
        cache_scatter(cache, slot, z, packed.cu_seqlens, packed.index)
        if head_kv is None:
            seq, pooled = adapter.readout(cache[slot])
            return ArchResult(seq, pooled)
        seq = adapter.final_norm(cache[slot])
        k_fresh, v_fresh = adapter.head_kv(adapter.final_norm(z))
        cache_scatter(head_kv[0], slot, k_fresh, packed.cu_seqlens, packed.index)
        cache_scatter(head_kv[1], slot, v_fresh, packed.cu_seqlens, packed.index)
        return ArchResult(seq, adapter.map_head_cached(head_kv[0], head_kv[1], slot))
