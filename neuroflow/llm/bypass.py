"""Similarity-gated attention bypass for Hugging Face causal LMs (the paper's language-model ablation).

At every single-token decode step the attention output of gate layer G (last position, ``[B, D]``)
is compared with the previous step's by cosine similarity; a sequence whose similarity is at least
``threshold`` *bypasses* the attention of each cache layer C (C > G): the layer returns that
sequence's cached attention output (the last one it computed, after ``o_proj``) instead of
computing attention. Prefill (more than one new token) always computes and seeds the gate and the
cached outputs. Everything else in the model (norms, MLPs, other layers) runs unchanged.

Two modes, for the cache layers' key/value cache on a bypassed step:

- ``"kv-consistent"`` (the paper's stated design): layer C still projects its keys and values,
  applies the rotary embedding and appends them to the cache, then stops before attention and
  ``o_proj``. Every layer's cache keeps the same length and layer C's keys/values are exactly the
  ones dense decoding would write for the same tokens. The query projection is computed too (it
  shares the attention module's code path up to the cache write; for Phi-3 it is one fused
  ``qkv_proj`` anyway), so the saving is attention plus ``o_proj``.
- ``"skip-all"`` (the released code's behaviour): layer C does nothing on a bypassed step, so its
  key/value cache has a *hole*: the bypassed positions are missing from layer C's cache for the rest
  of the sequence, and later tokens at layer C never attend to them. At batch size 1 the hole is
  physical (layer C's cache is shorter than the others'). In a batch where some sequences bypass and
  others compute, the keys/values are written for the whole batch (one tensor) and the bypassed
  sequences' new positions are masked out of layer C's attention for those sequences, which is the
  same hole per sequence. Layer C's attention mask is re-indexed to the columns its cache holds.

Attaching wraps the ``forward`` of the attention modules of layers G and C *on the model instance*
(``module.forward = wrapper``); no class is patched. :meth:`BypassHandle.detach` restores exactly what
was there before (normally: removes the instance attribute, so the class's bound method is back).

Batches: the gate decides per sequence. When every sequence bypasses, layer C's work is skipped (its
key/value projection still runs in kv-consistent mode); when none does, it computes as usual; when
only some do, layer C computes attention for the whole batch and ``torch.where`` keeps the cached
output for the bypassing rows, so nothing is saved on such a step. The skip is a host-side branch:
each gated step reads the decision count back to the host (one device synchronisation per step).

Works with the transformers 5 decoder layout (``model.get_decoder().layers[i].self_attn``, attention
called with ``hidden_states``, ``position_embeddings``, ``attention_mask`` and ``cache`` or
``past_key_values``, writing its cache with ``cache.update(k, v, layer_idx, ...)``): Llama, Phi-3,
Mistral, Qwen2 and the like. Tested on Llama and Phi-3 with ``DynamicCache``.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

MODES = ("kv-consistent", "skip-all")
"""Bypass modes; see the module docstring."""

_NORM_EPS = 1e-8
"""Each norm in the gate's cosine is clamped to at least this (the project's convention), so a zero
attention output has similarity 0 to anything."""

_ATTACHED_ATTR = "_neuroflow_llm_bypass"
"""Attribute set on a model while a bypass is attached, to refuse a second one."""

_MISSING = object()


# ----------------------------------------------------------------------------------------------
# Model layout and validation


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order.

    Raises:
        TypeError: the model does not have the standard decoder layout
            (``model.get_decoder().layers[i].self_attn`` with ``layer_idx == i``).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"{type(model).__name__} is not a supported causal LM: expected decoder layers at "
            "model.get_decoder().layers (Llama, Phi-3, Mistral, Qwen2 layout)"
        )
    modules = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", None) != i:
            raise TypeError(
                f"{type(model).__name__}: decoder layer {i} has no self_attn with layer_idx == {i}; "
                "the bypass needs one attention module per layer writing its own cache slot"
            )
        modules.append(attn)
    return modules


def validate_bypass_parameters(
    num_layers: int, gate_layer: int, cache_layers: tuple[int, ...], threshold: float, mode: str
) -> None:
    """Reject bad settings before anything is attached.

    ``threshold`` must lie in the cosine's range [-1, 1], or be ``math.inf``: the gate then never
    opens (a dense-equivalent control that still measures the gate's similarities and overhead).

    Raises:
        ValueError: a value out of range, with a message naming the parameter.
        TypeError: a layer index that is not an int, or a threshold that is not a number.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value in [("gate_layer", gate_layer), *(("cache_layer", c) for c in cache_layers)]:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if not 0 <= value < num_layers:
            raise ValueError(f"{name} {value} is out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    if not cache_layers:
        raise ValueError("at least one cache layer is required")
    if len(set(cache_layers)) != len(cache_layers):
        raise ValueError(f"cache layers must be distinct, got {list(cache_layers)}")
    for c in cache_layers:
        if c == gate_layer:
            raise ValueError(f"cache layer {c} equals the gate layer: C must differ from G")
        if c < gate_layer:
            raise ValueError(
                f"cache layer {c} comes before gate layer {gate_layer}: the gate decides during the same "
                "forward pass, so every cache layer must come after it (C > G)"
            )
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number, got {threshold!r}")
    if not (-1.0 <= threshold <= 1.0 or threshold == math.inf):
        raise ValueError(
            f"threshold {threshold!r} is outside [-1, 1] (the cosine's range); use math.inf to never bypass"
        )


def cache_lengths(cache) -> list[int]:
    """Number of cached positions of each layer of a transformers cache (``[layer] -> int``).

    In kv-consistent mode all are equal; in skip-all mode the cache layers are shorter by the
    number of decode steps on which the whole batch bypassed.
    """
    return [cache.get_seq_length(i) for i in range(len(cache.layers))]


def gate_similarity(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per row, in float32, clamped to [-1, 1].

    Args:
        current, previous: ``[B, D]`` attention outputs (any float dtype).

    Returns:
        ``[B]`` float32. Each norm is clamped to at least 1e-8, so a zero row gives 0.
    """
    a = current.float()
    b = previous.float()
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1).clamp_min(_NORM_EPS) * b.norm(dim=-1).clamp_min(_NORM_EPS)
    return (dot / norms).clamp_(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass
class BypassStats:
    """What the gate saw and decided, accumulated over gated decode steps since the last reset.

    A *gated step* is a forward pass with exactly one new token per sequence on a seeded sequence
    (prefill and the first forward of a new cache are never gated).
    """

    gated_steps: int = 0
    """Forward passes on which the gate decided."""
    decisions: int = 0
    """Sequence-steps decided (``gated_steps`` x batch size)."""
    bypassed: int = 0
    """Sequence-steps on which the cache layers reused their cached output."""
    all_bypass_steps: int = 0
    """Steps on which every sequence of the batch bypassed: the only steps where layer C's work is skipped."""
    mixed_steps: int = 0
    """Steps on which some but not all sequences bypassed (layer C computed for the whole batch)."""
    similarity_log: list[torch.Tensor] = field(default_factory=list)
    """Per gated step, the ``[B]`` float32 similarities (kept on the model's device until read)."""
    decision_log: list[torch.Tensor] = field(default_factory=list)
    """Per gated step, the ``[B]`` bool decisions (True = bypass)."""

    @property
    def bypass_rate(self) -> float | None:
        """``bypassed / decisions``; None before any gated step."""
        return self.bypassed / self.decisions if self.decisions else None

    def similarities(self) -> torch.Tensor:
        """All logged similarities as one 1-D float32 CPU tensor (empty if none)."""
        if not self.similarity_log:
            return torch.empty(0)
        return torch.cat([s.reshape(-1) for s in self.similarity_log]).cpu()

    def decisions_per_step(self) -> torch.Tensor:
        """``[gated_steps, B]`` bool CPU tensor of the decisions (requires a constant batch size)."""
        if not self.decision_log:
            return torch.empty(0, 0, dtype=torch.bool)
        return torch.stack(self.decision_log).cpu()

    def summary(self) -> dict:
        """JSON-ready counts (no per-step logs)."""
        return {
            "gated_steps": self.gated_steps,
            "decisions": self.decisions,
            "bypassed": self.bypassed,
            "bypass_rate": self.bypass_rate,
            "all_bypass_steps": self.all_bypass_steps,
            "mixed_steps": self.mixed_steps,
        }


# ----------------------------------------------------------------------------------------------
# Attention call plumbing


class _StopAfterKVWrite(Exception):
    """Raised by :class:`_KVWriteThenStop` right after the cache write, to skip attention and o_proj."""


class _KVWriteThenStop:
    """Stands in for the cache in one attention call: forwards ``update`` to the real cache (so the
    keys and values are projected, rotated and appended by the model's own code), then aborts the
    call before attention. Every other attribute is the real cache's."""

    def __init__(self, cache):
        self._cache = cache

    def update(self, *args, **kwargs):
        self._cache.update(*args, **kwargs)
        raise _StopAfterKVWrite

    def __getattr__(self, name):
        return getattr(self._cache, name)


_CACHE_KWARGS = ("cache", "past_key_values")
"""Names under which decoder layers pass the cache to attention (transformers 5.2x, older 5.x)."""


def _cache_key(kwargs: dict) -> str | None:
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            return key
    return None


class _Call:
    """One attention call's arguments, normalised to keywords so they can be inspected and edited."""

    __slots__ = ("kwargs",)

    def __init__(self, signature: inspect.Signature, args: tuple, kwargs: dict):
        if args:
            # Decoder layers pass keywords; positional calls (direct use) are bound once here.
            bound = signature.bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
            extra = kwargs.pop(next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), ""), {})
            kwargs.update(extra)
        self.kwargs = kwargs

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.kwargs["hidden_states"]

    @property
    def cache(self):
        key = _cache_key(self.kwargs)
        return None if key is None else self.kwargs[key]

    def with_cache(self, cache) -> dict:
        kwargs = dict(self.kwargs)
        kwargs[_cache_key(self.kwargs)] = cache
        return kwargs


# ----------------------------------------------------------------------------------------------
# The handle


class BypassHandle:
    """A bypass attached to one model. Create it with :func:`attach_bypass`.

    Attributes:
        gate_layer (int), cache_layers (tuple[int, ...]), threshold (float), mode (str): the settings.
        stats (BypassStats): accumulated since attach or the last :meth:`reset_stats`.

    Per-sequence state (the gate's previous output, each cache layer's cached output, skip-all's
    hole map) belongs to one cache object: a forward with a different cache, a different batch size
    or a cache whose length does not continue the tracked sequence starts over (prefill semantics).
    """

    def __init__(self, model: nn.Module, gate_layer: int, cache_layers: tuple[int, ...], threshold: float, mode: str):
        self.model = model
        self.gate_layer = gate_layer
        self.cache_layers = cache_layers
        self._threshold = float(threshold)
        self.mode = mode
        self.stats = BypassStats()
        self._attn = attention_modules(model)
        self._installed: dict[int, tuple[object, object]] = {}  # layer -> (saved instance attr, wrapper)
        self._reset_sequence(None, 0)

    @property
    def threshold(self) -> float:
        """Bypass when the gate's cosine is >= this; may be changed between forwards (validated)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        validate_bypass_parameters(len(self._attn), self.gate_layer, self.cache_layers, value, self.mode)
        self._threshold = float(value)

    # -- sequence state ------------------------------------------------------------------------

    def _reset_sequence(self, cache, batch: int, past: int = 0) -> None:
        self._cache_ref = weakref.ref(cache) if cache is not None else None
        self._batch = batch
        self._tokens = past  # positions seen so far (layer G's cache length)
        self._prev_gate: torch.Tensor | None = None  # [B, D] layer-G attention output of the last step
        self._decision: torch.Tensor | None = None  # [B] bool, this step's decision (None: not gated)
        self._n_bypass = 0
        self._cached_out: dict[int, torch.Tensor] = {}  # layer C -> [B, D] last computed attention output
        # skip-all hole map per cache layer: global position of each physical cache column [T_C] and
        # whether each sequence may attend to it [B, T_C]; None while layer C's cache has no hole.
        self._cols: dict[int, torch.Tensor | None] = {c: None for c in self.cache_layers}
        self._visible: dict[int, torch.Tensor | None] = {c: None for c in self.cache_layers}
        self._physical: dict[int, int] = {c: past for c in self.cache_layers}  # layer C's cache length

    def reset_state(self) -> None:
        """Forget the current sequence: the next forward is treated as a prefill."""
        self._reset_sequence(None, 0)

    def reset_stats(self) -> None:
        """Start a fresh :class:`BypassStats`."""
        self.stats = BypassStats()

    def missing_positions(self, layer: int) -> int:
        """Skip-all: positions missing from ``layer``'s cache for the current sequence (the physical
        hole, i.e. steps on which the whole batch bypassed). Always 0 in kv-consistent mode."""
        if layer not in self.cache_layers:
            raise ValueError(f"layer {layer} is not a cache layer ({list(self.cache_layers)})")
        return self._tokens - self._physical[layer]

    def masked_positions(self, layer: int) -> torch.Tensor:
        """Skip-all: ``[B]`` number of positions each sequence cannot see at ``layer`` although they
        are physically in its cache (bypassed on a step where other sequences computed)."""
        if layer not in self.cache_layers:
            raise ValueError(f"layer {layer} is not a cache layer ({list(self.cache_layers)})")
        visible = self._visible[layer]
        if visible is None:
            return torch.zeros(self._batch, dtype=torch.long)
        return (~visible).sum(-1).cpu()

    # -- gate layer ----------------------------------------------------------------------------

    def _gate_forward(self, original, call: _Call):
        hidden = call.hidden_states
        batch, q_len = hidden.shape[0], hidden.shape[1]
        cache = call.cache
        if cache is None:
            # No cache, no decode state: a plain full forward.
            self.reset_state()
            return original(**call.kwargs)
        past = cache.get_seq_length(self.gate_layer)
        current = self._cache_ref() if self._cache_ref is not None else None
        if current is not cache or batch != self._batch or past != self._tokens:
            self._start_sequence(cache, batch, past)

        out = original(**call.kwargs)
        attn_out = out[0][:, -1, :]  # [B, D]: the last position's attention output
        if q_len > 1:
            attn_out = attn_out.clone()  # a view would keep the whole prefill output alive
        self._decision = None
        self._n_bypass = 0
        if q_len == 1 and self._prev_gate is not None:
            similarity = gate_similarity(attn_out, self._prev_gate)
            decision = similarity >= self._threshold
            # Host read of the count: the skip below is a Python branch, so it needs the value now.
            n_bypass = int(decision.sum())
            self._decision, self._n_bypass = decision, n_bypass
            s = self.stats
            s.gated_steps += 1
            s.decisions += batch
            s.bypassed += n_bypass
            s.all_bypass_steps += int(n_bypass == batch)
            s.mixed_steps += int(0 < n_bypass < batch)
            s.similarity_log.append(similarity.detach())
            s.decision_log.append(decision.detach())
        self._prev_gate = attn_out.detach()
        self._tokens = past + q_len
        return out

    def _start_sequence(self, cache, batch: int, past: int) -> None:
        if self.mode == "skip-all" and past:
            # A cache that was filled elsewhere (or edited: crop, reorder) has no hole map we can trust
            # unless its cache layers are as long as the gate layer's.
            short = [c for c in self.cache_layers if cache.get_seq_length(c) != past]
            if short:
                raise RuntimeError(
                    f"skip-all: the cache's layer(s) {short} differ in length from layer {self.gate_layer} "
                    "and their hole map is unknown (cache edited outside the bypass); start from an empty cache"
                )
        self._reset_sequence(cache, batch, past)

    # -- cache layer ---------------------------------------------------------------------------

    def _cache_forward(self, layer: int, original, call: _Call):
        hidden = call.hidden_states
        batch, q_len = hidden.shape[0], hidden.shape[1]
        cache = call.cache
        current = self._cache_ref() if self._cache_ref is not None else None
        gated = cache is not None and cache is current and q_len == 1 and self._decision is not None
        n_bypass = self._n_bypass if gated else 0

        if cache is None or cache is not current:
            # Not the sequence the gate is tracking (or no cache): plain dense call.
            return original(**call.kwargs)

        if n_bypass == batch:
            cached = self._cached_out[layer]
            if self.mode == "kv-consistent":
                try:
                    original(**call.with_cache(_KVWriteThenStop(cache)))
                except _StopAfterKVWrite:
                    pass
                else:
                    raise RuntimeError(
                        f"layer {layer}'s attention did not write its key/value cache through cache.update(); "
                        "kv-consistent mode cannot keep its cache aligned for this model"
                    )
                self._physical[layer] += q_len
            else:
                self._note_hole(layer, batch)
            return cached.unsqueeze(1), None

        kwargs = call.kwargs
        if self.mode == "skip-all":
            kwargs = self._skip_all_kwargs(layer, call, batch, q_len, self._decision if n_bypass else None)
        out = original(**kwargs)
        self._physical[layer] += q_len
        computed = out[0][:, -1, :]
        if n_bypass == 0:
            # A view would keep the whole prefill output alive.
            self._cached_out[layer] = (computed.clone() if q_len > 1 else computed).detach()
            return out
        keep_cached = self._decision[:, None]
        merged = torch.where(keep_cached, self._cached_out[layer], computed)
        self._cached_out[layer] = merged.detach()
        return merged.unsqueeze(1), None

    # -- skip-all hole map ---------------------------------------------------------------------

    def _ensure_hole_map(self, layer: int, batch: int, device: torch.device) -> None:
        if self._cols[layer] is None:
            n = self._physical[layer]
            self._cols[layer] = torch.arange(n, device=device)
            self._visible[layer] = torch.ones(batch, n, dtype=torch.bool, device=device)

    def _note_hole(self, layer: int, batch: int) -> None:
        """A whole-batch bypass in skip-all mode: nothing is written, the position is missing."""
        self._ensure_hole_map(layer, batch, self._prev_gate.device)

    def _skip_all_kwargs(self, layer: int, call: _Call, batch: int, q_len: int, bypassing: torch.Tensor | None) -> dict:
        """Arguments for a computing call at a cache layer in skip-all mode: records the new columns
        (hidden from the sequences that bypass this step) and, once the cache has a hole, replaces the
        attention mask by one indexed by the columns the layer's cache really holds."""
        hidden = call.hidden_states
        device = hidden.device
        if bypassing is not None:
            self._ensure_hole_map(layer, batch, device)
        if self._cols[layer] is None:
            return call.kwargs  # no hole: the model's own mask is right
        new_cols = torch.arange(self._tokens - q_len, self._tokens, device=device)
        new_visible = torch.ones(batch, q_len, dtype=torch.bool, device=device)
        if bypassing is not None:
            new_visible &= ~bypassing[:, None]
        cols = torch.cat([self._cols[layer], new_cols])
        visible = torch.cat([self._visible[layer], new_visible], dim=1)
        self._cols[layer], self._visible[layer] = cols, visible
        kwargs = dict(call.kwargs)
        kwargs["attention_mask"] = _reindexed_mask(
            kwargs.get("attention_mask"), cols, visible, q_len, self._tokens, hidden.dtype, layer
        )
        return kwargs

    # -- attach / detach -----------------------------------------------------------------------

    def _install(self) -> None:
        for layer in (self.gate_layer, *self.cache_layers):
            attn = self._attn[layer]
            saved = attn.__dict__.get("forward", _MISSING)
            original = attn.forward
            signature = inspect.signature(original)
            if layer == self.gate_layer:
                def wrapper(*args, _original=original, _sig=signature, **kwargs):
                    return self._gate_forward(_original, _Call(_sig, args, kwargs))
            else:
                def wrapper(*args, _original=original, _sig=signature, _layer=layer, **kwargs):
                    return self._cache_forward(_layer, _original, _Call(_sig, args, kwargs))
            wrapper.__wrapped__ = original
            attn.forward = wrapper
            self._installed[layer] = (saved, wrapper)

    @property
    def attached(self) -> bool:
        return bool(self._installed)

    def detach(self) -> None:
        """Restore every wrapped ``forward`` exactly as it was and forget all state. Idempotent.

        Raises:
            RuntimeError: a wrapped ``forward`` was replaced by someone else after attaching (restoring
                it would silently drop their wrapper).
        """
        if not self._installed:
            return
        for layer, (_, wrapper) in self._installed.items():
            if self._attn[layer].__dict__.get("forward") is not wrapper:
                raise RuntimeError(
                    f"the forward of layer {layer}'s attention was replaced after the bypass was attached; "
                    "detach that wrapper first"
                )
        for layer, (saved, _) in self._installed.items():
            attn = self._attn[layer]
            if saved is _MISSING:
                del attn.forward
            else:
                attn.forward = saved
        self._installed.clear()
        if getattr(self.model, _ATTACHED_ATTR, None) is self:
            delattr(self.model, _ATTACHED_ATTR)
        self.reset_state()

    def __enter__(self) -> BypassHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"BypassHandle(gate_layer={self.gate_layer}, cache_layers={list(self.cache_layers)}, "
            f"threshold={self.threshold}, mode={self.mode!r}, attached={self.attached})"
        )


def _reindexed_mask(
    mask, cols: torch.Tensor, visible: torch.Tensor, q_len: int, total: int, dtype: torch.dtype, layer: int
) -> torch.Tensor:
    """Layer C's attention mask over the columns its cache holds (skip-all with a hole).

    Args:
        mask: the model's mask over all ``total`` positions: None (attend to everything up to the
            query, causal), a bool tensor ``[b, h, q, total]`` (True = attend) or an additive float one.
        cols: ``[T_C]`` long, global position of each of layer C's cache columns.
        visible: ``[B, T_C]`` bool, False where a sequence bypassed that position.

    Returns:
        ``[B, h, q, T_C]``: bool if ``mask`` was bool, else additive in ``dtype`` (or ``mask``'s dtype).
    """
    seen = visible[:, None, None, :]
    if mask is None:
        query_pos = torch.arange(total - q_len, total, device=cols.device)
        keep = (cols[None, :] <= query_pos[:, None])[None, None] & seen
        return torch.zeros(keep.shape, dtype=dtype, device=cols.device).masked_fill_(~keep, torch.finfo(dtype).min)
    if not isinstance(mask, torch.Tensor):
        raise NotImplementedError(
            f"skip-all mode re-indexes layer {layer}'s attention mask once its cache has a hole, but this "
            f"attention implementation passes a {type(mask).__name__}; use attn_implementation='sdpa' or 'eager'"
        )
    if mask.shape[-1] != total:
        raise RuntimeError(f"layer {layer}: attention mask covers {mask.shape[-1]} positions, expected {total}")
    selected = mask.index_select(-1, cols)
    if selected.dtype == torch.bool:
        return selected & seen
    return selected.masked_fill(~seen, torch.finfo(selected.dtype).min)


def attach_bypass(
    model: nn.Module,
    gate_layer: int,
    cache_layers: int | tuple[int, ...] | list[int],
    threshold: float,
    mode: str = "kv-consistent",
) -> BypassHandle:
    """Attach the similarity-gated attention bypass to a Hugging Face causal LM.

    Args:
        model: e.g. ``LlamaForCausalLM`` or ``Phi3ForCausalLM`` (any model with
            ``model.get_decoder().layers[i].self_attn``), in eval mode.
        gate_layer: G, whose attention output is compared step to step.
        cache_layers: C (one int or several), each > G, whose attention is bypassed.
        threshold: bypass when cosine >= threshold; in [-1, 1], or ``math.inf`` for never.
        mode: ``"kv-consistent"`` (default) or ``"skip-all"``.

    Returns:
        A :class:`BypassHandle`; ``handle.detach()`` (or leaving a ``with`` block) removes it.

    Raises:
        ValueError, TypeError: bad parameters (nothing is attached).
        TypeError: unsupported model layout.
        RuntimeError: a bypass is already attached to this model.
    """
    cache_layers = (cache_layers,) if isinstance(cache_layers, int) and not isinstance(cache_layers, bool) else tuple(cache_layers)
    modules = attention_modules(model)
    validate_bypass_parameters(len(modules), gate_layer, cache_layers, threshold, mode)
    if getattr(model, _ATTACHED_ATTR, None) is not None:
        raise RuntimeError("a bypass is already attached to this model; detach it first")
    handle = BypassHandle(model, gate_layer, cache_layers, threshold, mode)
    handle._install()
    # object.__setattr__: nn.Module.__setattr__ would try to register a Module-typed value.
    object.__setattr__(model, _ATTACHED_ATTR, handle)
    return handle
