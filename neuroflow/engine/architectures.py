"""Architectures A, B, C and KV: what runs after the gate, and what each stream remembers.

One class per architecture. Each declares its per-stream state tensors (:meth:`state_specs`),
checks the settings it depends on (:meth:`check`), and runs its step on a batch (:meth:`step`):
the gate's packed tokens in, the model outputs out, every state write made through the batch's
:class:`neuroflow.engine.streams.StreamBatch` (so a failure can be rolled back). The engine only looks an
architecture up by name in :data:`ARCHITECTURES`.

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
  patch at every layer. With ``kv_layers`` only some layers keep caches (partial depth): those
  layers run as above, the others as C does (the computed tokens attend to each other only).
  ``kv_layers=0`` is C with the active-token readout, every layer is full KV.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from .capacity import Fitted
from ..models.encoder import Packed, packed_layer, packed_layer_cached_kv, packed_layer_cached_kv_gated, run_packed
from ..models.families import VisionAdapter, attention_block, mlp_block
from ..ops.gate import PackedFrames, ema_dtype
from ..reference.cache_scatter import QUANT_MAX
from ..reference.gate import KEYFRAME
from .profiling import stage
from .streams import Grid, Specs, StreamBatch


@dataclass
class ArchResult:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None
    entered: torch.Tensor | None = None
    """``[B]`` int64, with the per-layer gate (``layer_threshold``, where tokens drop out inside
    the encoder): the tokens entering each of layers ``probe_layers..L-1``, summed; else None
    (every computed token runs every layer)."""


class Architecture:
    """Base class: the state every architecture keeps (the gate's EMA) and the packing step.

    Args:
        adapter: the model, split into steps.
        cache_dtype: dtype of key/value caches (KV, C's context readout); default the model's.
        head_cache: cache SigLIP's pooling-head keys/values per token (C and KV).
        cls_readout: C on CLS-pooling models: ``"context"`` or ``"active"``.
        kv_layers: KV only (see :class:`ArchKV`); any other architecture rejects it.
        probe_layers: KV only (see :class:`ArchKV`); any other architecture rejects a nonzero one.
        layer_threshold: KV only (see :class:`ArchKV`); any other architecture rejects it.
    """

    name: ClassVar[str]
    needs_all_tokens: ClassVar[bool] = False
    """Whether the step needs every token's layer-0 embedding, not only the packed ones."""

    probe_layers: int = 0
    """Layers run densely on every token before the gate decides (:class:`ArchKV` only)."""

    def __init__(self, adapter: VisionAdapter, cache_dtype: torch.dtype | None = None, head_cache: bool = True,
                 cls_readout: str = "context", kv_layers=None, probe_layers: int = 0,
                 layer_threshold: float | None = None):
        if kv_layers is not None and not self.takes_kv_layers:
            raise ValueError(f"kv_layers is an option of architecture KV, not {self.name!r}")
        if layer_threshold is not None and not self.takes_kv_layers:
            raise ValueError(f"layer_threshold is an option of architecture KV, not {self.name!r} (the per-layer "
                             "gate compares each token's key with its cached key at that layer)")
        if probe_layers != 0 and not self.takes_kv_layers:
            raise ValueError(f"probe_layers is an option of architecture KV, not {self.name!r} "
                             "(its gate decides on layer-0 embeddings only)")
        self.adapter = adapter
        self.cache_dtype = cache_dtype
        self.head_cache = head_cache
        self.cls_readout = cls_readout

    takes_kv_layers: ClassVar[bool] = False

    @property
    def uses_kv_cache(self) -> bool:
        """Whether streams keep key/value caches (what ``cache_dtype`` sets)."""
        return False

    @property
    def _cache_dtype_config(self) -> str | None:
        """``cache_dtype`` as saved states record it: None where no cache uses it."""
        return str(self.cache_dtype) if self.cache_dtype is not None and self.uses_kv_cache else None

    # -- what a stream remembers -------------------------------------------------------------------
    track_age: bool = False
    """Whether streams keep the gate's ``age`` ``[N]`` int32 (set by the engine with ``max_staleness``)."""

    track_policy: bool = False
    """Whether streams keep the frame policy's counters ``policy_since`` ``[1]`` int32 and
    ``policy_drift`` ``[1]`` float32 (set by the engine with the frame policy)."""
    keep_outputs: bool = False
    """Whether streams keep their last computed outputs ``last_seq`` ``[T, D]`` and ``last_pooled``
    ``[D_out]`` (model dtype; what a skipped frame returns; set by the engine with ``skip_below``)."""

    def state_specs(self, grid: Grid) -> Specs:
        a = self.adapter
        n = grid[0] * grid[1]
        # "ema" is the gate's reference: the EMA, or last-computed embeddings (reference="computed").
        specs = {"ema": ((n, a.hidden_size), ema_dtype(a.dtype))}
        if self.track_age:
            specs["age"] = ((n,), torch.int32)
        if self.track_policy:
            specs["policy_since"] = ((1,), torch.int32)
            specs["policy_drift"] = ((1,), torch.float32)
        if self.keep_outputs:
            specs["last_seq"] = ((self._tokens(grid), a.hidden_size), a.dtype)
            width = pooled_width(a)
            if width is not None:
                specs["last_pooled"] = ((width,), a.dtype)
        return specs

    def _tokens(self, grid: Grid) -> int:
        return self.adapter.num_prefix + grid[0] * grid[1]

    @property
    def _kv_dtype(self) -> torch.dtype:
        return self.cache_dtype or self.adapter.dtype

    @property
    def _kv_width(self) -> int:
        return self.adapter.layers[-1].k.out_features

    @property
    def _kv_quantized(self) -> bool:
        """8-bit key/value caches (int8 / float8_e4m3fn), with per-token, per-head scales."""
        return self._kv_dtype in QUANT_MAX

    def _kv_scale_specs(self, names: tuple[str, str], shape: tuple[int, ...]) -> Specs:
        """Scale state ``[..., T_tok, H]`` float32 next to 8-bit key/value caches (else none)."""
        if not self._kv_quantized:
            return {}
        heads = self.adapter.layers[-1].num_heads
        return {name: ((*shape, heads), torch.float32) for name in names}

    def check(self, floor_tokens: int) -> None:
        """Raise ``ValueError`` if the settings cannot work with this architecture and model."""

    def config(self) -> dict:
        """What a saved stream state depends on besides the model (compared on load)."""
        return {"arch": self.name}

    # -- the step ----------------------------------------------------------------------------------
    def step(self, frames: torch.Tensor, gate: PackedFrames, batch: StreamBatch,
             fitted: Fitted | None = None) -> ArchResult:
        """Run the encoder and readout for one frame per stream. ``frames`` ``[B, C, H, W]``;
        ``fitted``: the gate's tokens packed at a host-known capacity (no host sync), else the
        exact count is read once."""
        raise NotImplementedError

    def encoder_inputs(self, gate: PackedFrames, fitted: Fitted | None = None) -> tuple[torch.Tensor, Packed]:
        """The encoder input ``[C, D]`` and where its rows belong.

        With ``fitted`` (the engine's sync-free packing, :func:`neuroflow.engine.capacity.fit_to_capacity`)
        nothing is read on the host. Without it (distillation, callers of :meth:`run`) the token
        count is read once: one device->host copy of the offsets. Behind a probe
        (``probe_layers``) the packed rows are layer-l hidden states, taken as they are.
        """
        enter = self.adapter.encoder_input if not self.probe_layers else (lambda x: x)
        if fitted is not None:
            return enter(fitted.tokens), fitted.packed
        cu = gate.cu_seqlens.tolist()
        lengths = [hi - lo for lo, hi in zip(cu, cu[1:])]
        # At least one row: when every frame is skipped (frame policy) one padding row keeps the
        # layers' shapes non-empty; rows past cu[-1] are never scattered nor attended to.
        rows = max(cu[-1], 1)
        packed = Packed(gate.cu_seqlens, gate.index[:rows], len(lengths),
                        self.adapter.num_prefix + gate.active.shape[1], rows, max(lengths, default=0))
        return enter(gate.packed[:rows]), packed

    def probe(self, frames: torch.Tensor) -> torch.Tensor:
        """The dense probe: ``frames`` ``[B, C, H, W]`` -> every token's input to layer
        ``probe_layers`` ``[B, T_tok, D]`` (model dtype), the first ``probe_layers`` layers run on
        every token of every frame (one packed segment per frame; no cache: they see the whole
        frame)."""
        a = self.adapter
        x = a.encoder_input(a.embed(frames))
        b, t_tok, d = x.shape
        cu = torch.arange(b + 1, dtype=torch.int32, device=x.device) * t_tok
        index = torch.arange(t_tok, dtype=torch.int32, device=x.device).repeat(b)
        packed = Packed(cu, index, b, t_tok, b * t_tok, t_tok)
        return run_packed(a.layers[: self.probe_layers], x.reshape(b * t_tok, d), packed).view(b, t_tok, d)

    def _readout_from_cache(self, z: torch.Tensor, packed: Packed, batch: StreamBatch) -> ArchResult:
        """Write the fresh final-layer outputs ``z`` ``[T, D]`` into the cache and read every token
        out. With the head cache (SigLIP: ``[S, T_tok, D]`` pools of the pooling head's keys and
        values) the head projects the fresh tokens only and the probe attends to the cached ones."""
        a = self.adapter
        with stage("readout"):
            batch.scatter("cache", z, packed.cu_seqlens, packed.index)
            cache = batch.rows("cache")
            if not self._uses_head_cache:
                seq, pooled = a.readout(cache)
                return ArchResult(seq, pooled)
            seq = a.final_norm(cache)
            k_fresh, v_fresh = a.head_kv(a.final_norm(z))
            batch.scatter("head_k", k_fresh, packed.cu_seqlens, packed.index)
            batch.scatter("head_v", v_fresh, packed.cu_seqlens, packed.index)
            return ArchResult(seq, a.map_head_cached(batch.tensor("head_k"), batch.tensor("head_v"), batch.slot))

    @property
    def _uses_head_cache(self) -> bool:
        return False

    def _cache_specs(self, grid: Grid) -> Specs:
        """The final-layer cache of C and KV, and the pooling head's keys/values when cached."""
        a, t = self.adapter, self._tokens(grid)
        specs = {"cache": ((t, a.hidden_size), a.dtype)}
        if self._uses_head_cache:
            specs["head_k"] = ((t, a.hidden_size), a.dtype)
            specs["head_v"] = ((t, a.hidden_size), a.dtype)
        return specs


class ArchA(Architecture):
    """MLP gating: attention over every token, the MLP only for the computed ones."""

    name = "A"
    needs_all_tokens = True

    def state_specs(self, grid: Grid) -> Specs:
        a = self.adapter
        return {**super().state_specs(grid), "anchors": ((len(a.layers), self._tokens(grid), a.hidden_size), a.dtype)}

    def step(self, frames: torch.Tensor, gate: PackedFrames, batch: StreamBatch, fitted: Fitted | None = None) -> ArchResult:
        a = self.adapter
        with stage("gate"):  # A needs every token's embedding, not only the packed ones
            x = a.encoder_input(a.embed(frames))
        anchors = batch.rows("anchors")  # [B, L, T, D]: each token's layer outputs, last active frame
        new_anchors = anchors.clone()
        b, t_tok, d = x.shape
        if fitted is None:
            prefix = torch.ones_like(gate.active[:, : a.num_prefix])
            if gate.frame_kind is not None:  # a skipped frame computes no token, its prefix neither
                prefix = prefix & (gate.frame_kind != 0).view(-1, 1)
            computed = torch.cat([prefix, gate.active], dim=1)
            rows = computed.flatten().nonzero().flatten()
            dest = rows
        else:
            # The packed rows name the computed tokens: (frame, position) -> flat row, no host read;
            # padding rows read row 0 and are written to a dump row.
            packed = fitted.packed
            flat = packed.frame_of() * t_tok + packed.index.long()
            valid = packed.valid()
            rows = torch.where(valid, flat, 0)
            dest = torch.where(valid, flat, b * t_tok)
        with stage("encoder"):
            for layer, parts in enumerate(a.layers):
                h = attention_block(parts, x).reshape(b * t_tok, d)
                out = torch.cat([anchors[:, layer].reshape(b * t_tok, d), anchors.new_zeros(1, d)])
                out.index_copy_(0, dest, mlp_block(parts, h[rows]).to(out.dtype))
                out = out[: b * t_tok].view(b, t_tok, d)
                new_anchors[:, layer] = out
                x = out
        with stage("readout"):
            seq, pooled = a.readout(x)
        batch.write_rows("anchors", new_anchors)
        return ArchResult(seq, pooled)


class ArchB(Architecture):
    """Elimination: the encoder and the readout see only the computed tokens;
    ``last_hidden_state`` holds zeros at tokens not computed."""

    name = "B"

    def check(self, floor_tokens: int) -> None:
        if self.adapter.num_prefix == 0 and floor_tokens < 1:
            raise ValueError("Architecture B on a model without CLS token needs floor_tokens >= 1 "
                             "(the pooling head needs at least one token)")

    def step(self, frames: torch.Tensor, gate: PackedFrames, batch: StreamBatch, fitted: Fitted | None = None) -> ArchResult:
        x, packed = self.encoder_inputs(gate, fitted)
        return self.run(x, packed)

    def run(self, x: torch.Tensor, packed: Packed) -> ArchResult:
        """The encoder and readout on packed inputs ``x`` ``[T, D]`` (also what distillation trains)."""
        a = self.adapter
        with stage("encoder"):
            z = run_packed(a.layers, x, packed)
        with stage("readout"):
            seq, pooled = a.readout_packed(z, packed.cu_seqlens, packed.max_seqlen)
            b, t_tok = packed.num_frames, packed.tokens
            # Padding rows (past cu_seqlens[-1]) go to a dump row, so nothing is read on the host.
            dest = torch.where(packed.valid(), packed.frame_of() * t_tok + packed.index.long(), b * t_tok)
            full = seq.new_zeros(b * t_tok + 1, seq.shape[-1])
            full.index_copy_(0, dest, seq)
        return ArchResult(full[: b * t_tok].view(b, t_tok, -1), pooled)


class ArchC(Architecture):
    """Dual memory: encoder on the computed tokens, readout on the per-stream cache."""

    name = "C"

    @property
    def _uses_head_cache(self) -> bool:
        return self.head_cache and self.adapter.has_map_head

    @property
    def uses_context_readout(self) -> bool:
        return self.adapter.pools_cls_token and self.cls_readout == "context"

    @property
    def uses_kv_cache(self) -> bool:
        return self.uses_context_readout

    def config(self) -> dict:
        return {**super().config(), "cls_readout": self.cls_readout if self.uses_context_readout else None,
                "cache_dtype": self._cache_dtype_config, "head_cache": self._uses_head_cache}

    def state_specs(self, grid: Grid) -> Specs:
        specs = {**super().state_specs(grid), **self._cache_specs(grid)}
        if self.uses_context_readout:
            t = self._tokens(grid)
            specs["last_k"] = ((t, self._kv_width), self._kv_dtype)
            specs["last_v"] = ((t, self._kv_width), self._kv_dtype)
            specs.update(self._kv_scale_specs(("last_k_scale", "last_v_scale"), (t,)))
        return specs

    def step(self, frames: torch.Tensor, gate: PackedFrames, batch: StreamBatch, fitted: Fitted | None = None) -> ArchResult:
        a = self.adapter
        x, packed = self.encoder_inputs(gate, fitted)
        with stage("encoder"):
            if not self.uses_context_readout:
                z = run_packed(a.layers, x, packed)
            else:
                y = run_packed(a.layers[:-1], x, packed)
                scales = _kv_scales(batch, "last_k_scale", "last_v_scale") if self._kv_quantized else {}
                z = packed_layer_cached_kv(a.layers[-1], y, packed, batch.slot, batch.tensor("last_k"),
                                           batch.tensor("last_v"), _kv_writer(batch, "last_k", "last_v",
                                                                              quantized=self._kv_quantized), **scales)
        return self._readout_from_cache(z, packed, batch)


class ArchKV(Architecture):
    """Cached context: at the cached layers the computed tokens attend to every token of their
    stream (keys/values ``[S, L_kv, T_tok, H * Dh]`` per stream, read in place by the varlen
    kernel); at the other layers (partial depth, ``kv_layers``) they attend to each other only.

    Args:
        kv_layers: the layers that keep key/value caches. None (default): every layer (every
            layer past the probe). An int K: the last K layers (0: none, i.e. C with the
            active-token readout). A sequence of distinct layer indices in ``[0, L)``, e.g.
            ``range(1, L, 2)`` for every other layer (stored in ascending order).
        probe_layers: l in ``[0, L)``: the first l layers run densely on every token of a frame
            that runs (:meth:`probe`), the gate decides on their output (the input to layer l),
            and only the computed tokens go through layers l..L-1. The probe layers keep no
            cache (``kv_layers`` may not name them). 0 (default): the gate decides on layer-0
            embeddings.
        layer_threshold: the per-layer gate (Eventful/STC style), None or a number in ``[0, 2)``:
            at every cached layer each computed patch's fresh key is compared with its cached
            key (the one it had when that layer last computed it); a patch whose key moved by at
            most this (``1 - cos``) drops out there, its keys/values at that and deeper layers
            and its output staying as cached. Prefix tokens and every token of a first frame or
            keyframe continue. None (default): no per-layer gate.
    """

    name = "KV"
    takes_kv_layers = True

    def __init__(self, adapter: VisionAdapter, kv_layers=None, probe_layers: int = 0,
                 layer_threshold: float | None = None, **options):
        super().__init__(adapter, **options)
        self.probe_layers = check_probe_layers(probe_layers, len(adapter.layers))
        self.layer_threshold = check_layer_threshold(layer_threshold)
        self.kv_layer_ids: tuple[int, ...] = resolve_kv_layers(kv_layers, len(adapter.layers), self.probe_layers)
        """Indices of the cached layers, ascending (every layer past the probe by default)."""

    @property
    def uses_kv_cache(self) -> bool:
        return bool(self.kv_layer_ids)

    @property
    def kv_layers(self) -> tuple[int, ...] | None:
        """The cached layers as given in normal form: None when every layer past the probe is cached."""
        return None if len(self.kv_layer_ids) == len(self.adapter.layers) - self.probe_layers else self.kv_layer_ids

    @property
    def _uses_head_cache(self) -> bool:
        return self.head_cache and self.adapter.has_map_head

    def config(self) -> dict:
        kv = self.kv_layers
        # probe_layers only when set: states saved without a probe keep loading as they did.
        return {**super().config(), "cache_dtype": self._cache_dtype_config,
                "head_cache": self._uses_head_cache, "kv_layers": list(kv) if kv is not None else None,
                **({"probe_layers": self.probe_layers} if self.probe_layers else {})}

    def state_specs(self, grid: Grid) -> Specs:
        specs = {**super().state_specs(grid), **self._cache_specs(grid)}
        if self.kv_layer_ids:  # no zero-sized pools when no layer is cached
            num_kv, t = len(self.kv_layer_ids), self._tokens(grid)
            specs["kv_k"] = ((num_kv, t, self._kv_width), self._kv_dtype)
            specs["kv_v"] = ((num_kv, t, self._kv_width), self._kv_dtype)
            specs.update(self._kv_scale_specs(("kv_k_scale", "kv_v_scale"), (num_kv, t)))
        return specs

    def step(self, frames: torch.Tensor, gate: PackedFrames, batch: StreamBatch, fitted: Fitted | None = None) -> ArchResult:
        a = self.adapter
        x, packed = self.encoder_inputs(gate, fitted)
        cached = {layer: j for j, layer in enumerate(self.kv_layer_ids)}  # layer -> its row in the caches
        if cached:
            keys, values = batch.tensor("kv_k"), batch.tensor("kv_v")
            s, num_kv, t_tok, width = keys.shape
            # Cached layer j of stream slot s lives at row s * L_kv + j of the flattened pools.
            k_rows, v_rows = keys.view(s * num_kv, t_tok, width), values.view(s * num_kv, t_tok, width)
            scales = {}
            if self._kv_quantized:
                scales = {key: t.view(s * num_kv, t_tok, -1)
                          for key, t in _kv_scales(batch, "kv_k_scale", "kv_v_scale").items()}
        gated = self.layer_threshold is not None
        if gated:
            # First frames and keyframes are dense by rule: no token of theirs drops out.
            keep_frames = batch.first if gate.frame_kind is None else batch.first | (gate.frame_kind == KEYFRAME)
            entered = torch.zeros(packed.num_frames, dtype=torch.int64, device=x.device)
        with stage("encoder"):
            for layer, parts in enumerate(a.layers[self.probe_layers :], start=self.probe_layers):
                j = cached.get(layer)
                if j is None:
                    if gated:
                        entered = entered + packed.cu_seqlens.diff()
                    x = packed_layer(parts, x, packed)
                    continue
                write = _kv_writer(batch, "kv_k", "kv_v", j, quantized=self._kv_quantized)
                if gated:
                    x, packed, count = packed_layer_cached_kv_gated(
                        parts, x, packed, batch.slot * num_kv + j, k_rows, v_rows, write, self.layer_threshold,
                        keep_frames, a.num_prefix, exact=fitted is None, **scales)
                    entered = entered + count
                else:
                    x = packed_layer_cached_kv(parts, x, packed, batch.slot * num_kv + j, k_rows, v_rows, write,
                                               **scales)
        result = self._readout_from_cache(x, packed, batch)
        if gated:
            result.entered = entered
        return result


def pooled_width(adapter: VisionAdapter) -> int | None:
    """``D_out`` of the model's ``pooler_output`` (None when it has no pooling)."""
    pooling = adapter.spec.pooling
    if pooling == "pooler":
        if adapter.pooler is None:
            return None
        dense = getattr(adapter.pooler, "dense", None)
        return dense.out_features if dense is not None else adapter.hidden_size
    if pooling == "map" and adapter.head is None:
        return None
    return adapter.hidden_size


def check_probe_layers(probe_layers, num_layers: int) -> int:
    """``probe_layers`` must be an int in ``[0, L)`` (at least the last layer runs gated)."""
    if isinstance(probe_layers, bool) or not isinstance(probe_layers, int) or not 0 <= probe_layers < num_layers:
        raise ValueError(f"probe_layers must be an int in [0, {num_layers}) (the model has {num_layers} layers; "
                         f"the gate decides on the input to that layer), got {probe_layers!r}")
    return probe_layers


def check_layer_threshold(layer_threshold) -> float | None:
    """``layer_threshold`` must be None or a number in ``[0, 2)`` (a key surprise ``1 - cos`` lies
    in ``[0, 2]``; from 2 on no patch would ever continue)."""
    if layer_threshold is None:
        return None
    if (isinstance(layer_threshold, bool) or not isinstance(layer_threshold, (int, float))
            or not 0.0 <= layer_threshold < 2.0):
        raise ValueError(f"layer_threshold must be None or a number in [0, 2) (a patch continues past a layer "
                         f"while its key moved by more than this, 1 - cos), got {layer_threshold!r}")
    return float(layer_threshold)


def resolve_kv_layers(kv_layers, num_layers: int, probe_layers: int = 0) -> tuple[int, ...]:
    """``kv_layers`` (None, an int K, or a sequence of layer indices) -> the cached layers'
    indices, ascending (None: every layer from ``probe_layers`` on). Raises ``ValueError`` for
    anything else, and for a probe layer (dense, it keeps no cache)."""
    if kv_layers is None:
        return tuple(range(probe_layers, num_layers))
    if isinstance(kv_layers, bool):
        raise ValueError(f"kv_layers must be None, an int or a sequence of layer indices, got {kv_layers!r}")
    if isinstance(kv_layers, int):
        if not 0 <= kv_layers <= num_layers - probe_layers:
            raise ValueError(f"kv_layers={kv_layers}: the number of last layers to cache must be in "
                             f"[0, {num_layers - probe_layers}] (the model has {num_layers} layers"
                             + (f", the first {probe_layers} of them the dense probe" if probe_layers else "") + ")")
        return tuple(range(num_layers - kv_layers, num_layers))
    try:
        ids = list(kv_layers)
    except TypeError:
        raise ValueError(f"kv_layers must be None, an int or a sequence of layer indices, got {kv_layers!r}") from None
    bad = [i for i in ids if isinstance(i, bool) or not hasattr(i, "__index__")]
    if bad:
        raise ValueError(f"kv_layers must hold int layer indices, got {bad[0]!r}")
    ids = [operator.index(i) for i in ids]
    out = [i for i in ids if not 0 <= i < num_layers]
    if out:
        raise ValueError(f"kv_layers index {out[0]} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"kv_layers lists layer {dup[0]} more than once")
    probed = [i for i in ids if i < probe_layers]
    if probed:
        raise ValueError(f"kv_layers lists layer {probed[0]}, one of the {probe_layers} dense probe layers "
                         "(probe_layers): they see every token and keep no cache")
    return tuple(sorted(ids))


def _kv_writer(batch: StreamBatch, k_name: str, v_name: str, layer: int | None = None, quantized: bool = False):
    """Writes a layer's fresh keys and values ``[T, H * Dh]`` into the batch's caches at the
    positions ``packed`` names (8-bit caches: quantised per token and head, the scales into
    ``<name>_scale``)."""
    def write(k: torch.Tensor, v: torch.Tensor, packed: Packed) -> None:
        batch.scatter(k_name, k, packed.cu_seqlens, packed.index, layer, scale=f"{k_name}_scale" if quantized else None)
        batch.scatter(v_name, v, packed.cu_seqlens, packed.index, layer, scale=f"{v_name}_scale" if quantized else None)
    return write


def _kv_scales(batch: StreamBatch, k_name: str, v_name: str) -> dict[str, torch.Tensor]:
    """The live scale pools of 8-bit key/value caches, as ``packed_layer_cached_kv``'s arguments."""
    return {"k_scale": batch.tensor(k_name), "v_scale": batch.tensor(v_name)}


ARCHITECTURES: dict[str, type[Architecture]] = {cls.name: cls for cls in (ArchA, ArchB, ArchC, ArchKV)}
"""Architecture name -> class."""


def make_architecture(name: str, adapter: VisionAdapter, **options) -> Architecture:
    """The architecture called ``name`` (``"A"``, ``"B"``, ``"C"`` or ``"KV"``) for ``adapter``."""
    if name not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name](adapter, **options)
