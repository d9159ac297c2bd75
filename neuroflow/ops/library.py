"""The three device ops as ``torch.library`` custom ops, so ``torch.compile`` traces through them.

* ``torch.ops.neuroflow.gate(frames, weight, bias, pos_embed, prefix, ema!, slot, first, threshold,
  ema_decay, floor_tokens, age!, since!, drift!, force_active=None, *, reference="ema",
  max_staleness=None, budget=None, motion_norm=False, scene_cut=None, skip_below=None,
  keyframe_every=None, keyframe_drift=None, batch_budget=None, signal="embedding") -> (surprise,
  active, cu_seqlens, index, packed, frame_kind)`` (``ranker``: positional after ``force_active``,
  None or a :class:`~neuroflow.reference.patch_ranker.PatchRanker` as one flat float32 tensor,
  :meth:`~neuroflow.reference.patch_ranker.PatchRanker.flat`): mutates ``ema``, ``age`` and the frame policy's counters
  ``since`` ``[S, 1]`` int32 / ``drift`` ``[S, 1]`` float32 (each a tensor or None: positional,
  for the same reason as the attention's scales, and required, see below); every
  :class:`~neuroflow.reference.gate_settings.GateSettings` option is an argument (``budget`` as a patch
  count: :func:`gate_op_settings` is the one place that turns a settings value, fractions
  included, into these arguments); ``force_active`` ``[B, N]`` bool is the forced mask of
  ``NeuroFlow(..., active=)`` (the gate's reference path runs it, a recorded fallback where the
  kernel was expected). See :func:`neuroflow.ops.gate.gate`; ``config`` (a launch schedule) and
  per-frame tensor thresholds stay on the Python function.
* ``torch.ops.neuroflow.cache_scatter(cache!, slot, src, cu_seqlens, index, scale!) -> ()``:
  mutates ``cache`` (and ``scale``, a tensor or None: the quantising form for int8 / float8
  caches); see
  :func:`neuroflow.ops.cache_scatter.cache_scatter`.
* ``torch.ops.neuroflow.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, scale=None, kv_start=None, k_scale=None, v_scale=None) -> out``; see
  :func:`neuroflow.ops.varlen_attention.varlen_attention` (8-bit caches with their scales
  included; the scales are positional-or-keyword here, keyword-only on the Python function,
  because a custom op may not take keyword-only tensors; ``out=`` and ``config=`` stay on the Python function: a custom op may not return an
  alias of an input, and a launch schedule is not a schema type).

Mutated arguments have no default (``age``, ``since``, ``drift``, ``scale``: pass None): torch 2.11's in-place
bookkeeping indexes mutated arguments by their schema position and fails with ``IndexError`` when a
trailing one is left out.

Each real implementation is the launcher (which asks :mod:`neuroflow.ops.dispatch` for the path, so
the kernel or the reference runs exactly as when the function is called directly); each fake
(meta) implementation gives the output shapes from the input shapes alone: the packed gate
outputs have the capacity ``B * (P + N)`` rows, never the data-dependent count.

The engine calls the gate and the stream-state cache writes through the ops, eagerly and under
``torch.compile`` alike (one code path): :func:`gate_frames` is its gate call,
:class:`neuroflow.engine.streams.StreamBatch` writes (and undoes) caches with :func:`cache_scatter_op`.
The ops are forward-only (no autograd formula), so :func:`launcher_only` (the one place that
decides it) sends a gate call that needs gradients (``differentiable=True``, or ``pixel_values``
that require grad) or has per-frame tensor thresholds to the Python launcher; cache writes never
carry gradients (the caches are state), so they always take the op. The op's eager cost: a call
through a mutating custom op pays torch's argument handling in Python (its version-bump kernel
rebuilds the schema's argument list for every argument: quadratic in their number), measured on
a shared 2-core CPU at about 0.9-1.3 ms per gate call (26 arguments) and 0.25 ms per cache
scatter over the direct launcher call (docs/contributing.md).
:mod:`neuroflow.models.encoder` calls the varlen op only while ``torch.compile`` traces without
gradients (:func:`attend`), and the Python function otherwise (it runs once per layer; eager steps
skip the op's dispatch cost; distillation's gradient path keeps the reference's autograd).
"""

from __future__ import annotations

import torch

from ..reference.gate_settings import GateSettings
from ..reference.patch_ranker import PatchRanker
from .cache_scatter import cache_scatter
from .gate import PackedFrames, gate
from .varlen_attention import varlen_attention

NAMESPACE = "neuroflow"


@torch.library.custom_op(f"{NAMESPACE}::gate", mutates_args=("ema", "age", "since", "drift"))
def gate_op(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    prefix: torch.Tensor,
    ema: torch.Tensor,
    slot: torch.Tensor,
    first: torch.Tensor,
    threshold: float | None,
    ema_decay: float,
    floor_tokens: int,
    age: torch.Tensor | None,
    since: torch.Tensor | None,
    drift: torch.Tensor | None,
    force_active: torch.Tensor | None = None,
    ranker: torch.Tensor | None = None,
    *,
    reference: str = "ema",
    max_staleness: int | None = None,
    budget: int | None = None,
    motion_norm: bool = False,
    scene_cut: float | None = None,
    skip_below: float | None = None,
    keyframe_every: int | None = None,
    keyframe_drift: float | None = None,
    batch_budget: float | None = None,
    signal: str = "embedding",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    st = GateSettings(threshold=threshold, ema_decay=ema_decay, floor_tokens=floor_tokens, reference=reference,
                      max_staleness=max_staleness, budget=budget, motion_norm=motion_norm, scene_cut=scene_cut,
                      skip_below=skip_below, keyframe_every=keyframe_every, keyframe_drift=keyframe_drift,
                      batch_budget=batch_budget, signal=signal,
                      ranker=None if ranker is None else PatchRanker.from_flat(ranker))
    if (since is None) != (drift is None):
        raise ValueError("the policy counters since and drift come together (both tensors or both None)")
    out = gate(frames, weight, bias, pos_embed, prefix, ema, slot, first, st, force_active=force_active, age=age,
               policy=None if since is None else (since, drift))
    return out.surprise, out.active, out.cu_seqlens, out.index, out.packed, out.frame_kind


@gate_op.register_fake
def _gate_fake(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay, floor_tokens,
               age, since, drift, force_active=None, ranker=None, **settings):
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
        frames.new_empty(b, dtype=torch.int8),
    )


def gate_op_settings(settings: GateSettings, num_patches: int) -> dict:
    """``settings`` as the registered gate op's arguments from ``threshold`` on (a fractional
    budget becomes its patch count for frames of ``num_patches`` patches, exactly as the gate
    resolves it). Tensor thresholds / decays (distillation) have no schema form: ``ValueError``."""
    if isinstance(settings.threshold, torch.Tensor) or isinstance(settings.ema_decay, torch.Tensor):
        raise ValueError("the registered gate op takes scalar threshold and ema_decay; call neuroflow.ops.gate.gate "
                         "for per-frame tensors")
    return dict(threshold=settings.threshold, ema_decay=float(settings.ema_decay),
                floor_tokens=int(settings.floor_tokens), reference=settings.reference,
                max_staleness=settings.max_staleness, budget=settings.budget_count(num_patches),
                motion_norm=settings.motion_norm, scene_cut=settings.scene_cut, skip_below=settings.skip_below,
                keyframe_every=settings.keyframe_every, keyframe_drift=settings.keyframe_drift,
                batch_budget=settings.batch_budget, signal=settings.signal)


def launcher_only(settings: GateSettings, *inputs: torch.Tensor | None) -> str | None:
    """Why a gate call cannot go through the registered op, or None: the one place that decides it.

    * per-frame tensor thresholds or decays (distillation): no schema form;
    * gradients: the ops are forward-only (no autograd formula), and the gate's reference keeps
      autograd to the frames and the patch-embedding weights (``differentiable=True``, or
      ``pixel_values`` that require grad).

    Such calls go to the Python launcher :func:`neuroflow.ops.gate.gate`, which makes the same
    kernel / reference decision (:mod:`neuroflow.ops.dispatch` records it) as the op's implementation."""
    if isinstance(settings.threshold, torch.Tensor) or isinstance(settings.ema_decay, torch.Tensor):
        return "per-frame tensor thresholds or decays"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return "gradients are needed and the registered op is forward-only"
    return None


def gate_frames(frames, weight, bias, pos_embed, prefix, ema, slot, first, settings: GateSettings, *,
                force_active=None, age=None, policy=None) -> PackedFrames:
    """The gate as the engine calls it: :func:`neuroflow.ops.gate.gate`'s arguments and result
    (:class:`PackedFrames`), through ``torch.ops.neuroflow.gate`` eagerly and under
    ``torch.compile`` alike, unless :func:`launcher_only` names a reason (then the launcher runs)."""
    if launcher_only(settings, frames, weight, bias, pos_embed, prefix) is not None:
        return gate(frames, weight, bias, pos_embed, prefix, ema, slot, first, settings, force_active=force_active,
                    age=age, policy=policy)
    kw = gate_op_settings(settings, pos_embed.shape[0])
    since, drift = policy if policy is not None else (None, None)
    surprise, active, cu_seqlens, index, packed, frame_kind = gate_op(
        frames, weight, bias, pos_embed, prefix, ema, slot, first, kw.pop("threshold"), kw.pop("ema_decay"),
        kw.pop("floor_tokens"), age, since, drift, force_active,
        None if settings.ranker is None else settings.ranker.flat(), **kw)
    return PackedFrames(surprise, active, cu_seqlens, index, packed, prefix.shape[0], frame_kind)


@torch.library.custom_op(f"{NAMESPACE}::cache_scatter", mutates_args=("cache", "scale"))
def cache_scatter_op(cache: torch.Tensor, slot: torch.Tensor, src: torch.Tensor, cu_seqlens: torch.Tensor,
                     index: torch.Tensor, scale: torch.Tensor | None) -> None:
    cache_scatter(cache, slot, src, cu_seqlens, index, scale=scale)


@cache_scatter_op.register_fake
def _cache_scatter_fake(cache, slot, src, cu_seqlens, index, scale) -> None:
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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start,
                            k_scale=k_scale, v_scale=v_scale)


@varlen_attention_op.register_fake
def _varlen_attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None,
                           kv_start=None, k_scale=None, v_scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def attend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, kv_start=None, *,
           k_scale=None, v_scale=None):
    """Varlen attention as the encoder calls it: through the registered op while ``torch.compile``
    traces (and no gradient is needed: the op is forward-only), else through the Python launcher
    directly (same path and result, without the op's per-call dispatch cost in eager steps; the
    reference keeps autograd for distillation)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    fn = varlen_attention_op if torch.compiler.is_compiling() and not needs_grad else varlen_attention
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, kv_start,
              k_scale=k_scale, v_scale=v_scale)
