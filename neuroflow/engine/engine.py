"""``neuroflow.NeuroFlow``: many video streams through one Hugging Face vision model.

One call, top to bottom: check the frames -> open the streams' state (:class:`StreamBatch`) ->
gate (layer-0 embedding, EMA, threshold, packing) -> architecture (encoder on the gated tokens,
cache, readout) -> commit the state, or roll it back if anything failed.

The gate and the cache writes run as the registered ops ``torch.ops.neuroflow.gate`` /
``cache_scatter`` (:mod:`neuroflow.ops.library`) eagerly and under ``torch.compile`` alike; only a
call that needs gradients takes the gate's Python launcher (the ops are forward-only;
:func:`neuroflow.ops.library.launcher_only` decides). :meth:`NeuroFlow._step_body` is the
traceable step: ``torch.compile`` of it (tested on the CPU) breaks its graph only where the CPU
path reads the token count on the host (``Architecture.encoder_inputs``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..ops import dispatch
from .architectures import Architecture, make_architecture
from .capacity import CapacityPlanner, CapacityWarning, Fitted, HostCount, fit_to_capacity, static_patch_bound
from .graphs import StepGraphs
from .keyframes import KeyframeSchedule
from .presets import DEFAULT_PRESET, FROM_PRESET, PRESETS, Default, check_preset, given, resolve  # noqa: F401  (PRESETS, FROM_PRESET: re-exported)
from .profiling import _active as _active_timer
from ..reference.gate_settings import GateSettings
from ..reference.patch_ranker import PatchRanker
from ..models.families import VisionAdapter
from ..ops.gate import gate_features
from ..ops.library import gate_frames
from ..reference.cache_scatter import QUANT_MAX
from ..reference.gate import KEYFRAME, PARTIAL, SKIP  # noqa: F401  (values of NeuroFlowOutput.frame_kind; re-exported)
from .profiling import stage
from .state_file import StateFileError, load_state_file, model_fingerprint, save_state_file
from .streams import Grid, StreamBatch, StreamStore
from .validation import check_frames, check_stream_ids, warn_ineffective_settings

STATE_FORMAT = 1
GIB = 2**30
"""Bytes in a GiB: memory budgets (:meth:`NeuroFlow.streams_that_fit`) are in GiB."""


@dataclass(frozen=True)
class MemoryFit:
    """The answer of :meth:`NeuroFlow.streams_that_fit` and :func:`neuroflow.engine.memory.streams_that_fit`
    (all sizes in bytes).

    Attributes:
        streams: streams whose state fits beside the weights and the reserve (0 when none does).
        per_stream: state per stream by tensor name, plus ``"total"``.
        weight_bytes: the vision model's parameters and buffers (0 with ``count_weights=False``).
        reserve_bytes: the stated activation reserve.
        budget_bytes: the whole budget.
        height, width: the frame size; tokens: tokens per frame (prefix + patches).
        settings: the architecture settings the state was computed for (as in a saved state's config).
    """

    streams: int
    per_stream: dict[str, int]
    weight_bytes: int
    reserve_bytes: int
    budget_bytes: int
    height: int
    width: int
    tokens: int
    settings: dict = field(default_factory=dict)

    @property
    def state_budget_bytes(self) -> int:
        """What is left for stream state (negative when weights and reserve alone exceed the budget)."""
        return self.budget_bytes - self.weight_bytes - self.reserve_bytes

    def state_bytes(self, streams: int) -> int:
        """State of ``streams`` streams (pool slots) at this size."""
        return streams * self.per_stream["total"]

    def summary(self) -> str:
        mib = 2**20
        return (f"{self.streams} streams at {self.height}x{self.width} ({self.tokens} tokens): "
                f"{self.per_stream['total'] / mib:,.1f} MiB state each, weights {self.weight_bytes / mib:,.1f} MiB, "
                f"reserve {self.reserve_bytes / mib:,.1f} MiB, budget {self.budget_bytes / GIB:g} GiB")


@dataclass
class NeuroFlowOutput:
    """Outputs for a batch of B frames (one per stream), N patches, T = P + N tokens.

    Attributes:
        pooler_output: ``[B, D_out]``, same meaning as the model's ``pooler_output`` (None where
            the model has no pooling, e.g. a ViT built without its pooler).
        last_hidden_state: ``[B, T, D]``, same meaning as the model's. Architectures C and KV:
            rebuilt from the cache; A: inactive tokens hold their anchors; B: zeros at tokens not
            computed.
        active_mask: ``[B, N]`` bool, patches that went through the encoder this frame.
        sparsity: ``[B]`` float32, ``1 - N_active / N``.
        surprise: ``[B, N]`` float32, the gate's ``1 - cos(h, EMA)`` (``inf`` on first frames).
        first_frame: ``[B]`` bool, frames that started (or restarted) their stream densely.
        frame_kind: ``[B]`` int8, what the frame policy made of each frame: :data:`SKIP` (0: no
            encoder work, the stream's last computed outputs returned), :data:`PARTIAL` (1: the
            gate's choice of patches) or :data:`KEYFRAME` (2: dense; first frames, scene cuts,
            ``keyframe_every``, ``keyframe_drift``).
        token_layers: ``[B]`` int64, token-layers computed for each frame: (prefix tokens + active
            patches) times the encoder's L layers, 0 on a skip; a dense frame is ``T * L``. So
            compute = ``token_layers.sum() / (B * T * L)``. Architecture A also runs attention
            (not the MLP) over every token of every frame: its count is the tokens through the MLP.
            With ``probe_layers=l`` the dense probe counts too: ``T * l + (prefix tokens + active
            patches) * (L - l)``, ``T * l`` on a skip. With ``layer_threshold`` the tokens
            entering each layer, summed over the layers (patches drop out inside the encoder).
    """

    pooler_output: torch.Tensor | None
    last_hidden_state: torch.Tensor
    active_mask: torch.Tensor
    sparsity: torch.Tensor
    surprise: torch.Tensor
    first_frame: torch.Tensor
    frame_kind: torch.Tensor
    token_layers: torch.Tensor


class NeuroFlow(nn.Module):
    """EMA-gated sparse inference for a Hugging Face vision transformer over many video streams.

    Args:
        vision_model: ``SiglipVisionModel`` (SigLIP and SigLIP 2 FixRes), ``CLIPVisionModel``,
            ``ViTModel``, ``Dinov2Model`` or ``Dinov2WithRegistersModel``, or a ``SiglipModel`` /
            ``CLIPModel`` (its vision tower is used). Its weights are used as they are.
        preset: where the settings left out come from (:data:`PRESETS`): ``"measured"`` (default:
            the best point measured on real weights against frame skipping at equal compute:
            ``arch="KV"``, ``keyframe_every=8``, ``keyframe_drift=0.6``, ``reference="computed"``,
            ``threshold=0.1``, no staleness bound) or ``"paper"`` (the paper's configuration: ``arch="C"``,
            ``reference="ema"``, ``ema_decay=0.01``, ``threshold=0.35``, no staleness bound, no
            keyframes). Settings given explicitly override the preset's.
        arch: ``"A"``, ``"B"``, ``"C"`` or ``"KV"`` (cached context; see ``neuroflow.engine.architectures``).
        threshold: a patch is active when its surprise ``1 - cos`` is strictly above this; in
            [-1, 2] (below 0 every patch is active every frame); None only with a ``budget``.
        ema_decay: weight of the new frame in the per-patch EMA, in [0, 1]. Unused with
            ``reference="computed"`` (the measured preset's): given explicitly there, it warns.
        floor_tokens: at least this many patches are active on every later frame (the most
            surprising ones when too few pass the threshold).
        cls_readout: for CLS-pooling models under Architecture C: ``"context"`` (default; the last
            layer attends to every token's cached input) or ``"active"`` (encoder on active tokens
            only, as for SigLIP). It has no effect otherwise, and warns when given explicitly there.
        check_finite: reject frames with NaN or Inf. ``True``: on the CPU the check runs before
            anything else (the call raises and no state changes); on a GPU it is *deferred* so the
            call does not synchronise: a device flag is read at the start of the next call (or
            :meth:`sync_errors`), which then undoes the bad call's state writes (streams it
            admitted are forgotten) and raises ``ValueError``; the bad call's outputs are invalid.
            ``"deferred"`` forces the deferred check on any device, ``"eager"`` the eager one (one
            device sync per call), ``False`` skips it.
        cache_dtype: dtype of the key/value caches (KV, and C's context readout), e.g.
            ``torch.float16`` on a GPU; attention over them runs in that dtype. ``torch.int8`` (or
            ``torch.float8_e4m3fn``): 8-bit caches with per-token, per-head absmax scales
            (state ``kv_k_scale``/``kv_v_scale``), dequantised inside the attention, which runs in
            the model's dtype. Default: the model's dtype.
        head_cache: cache SigLIP's pooling-head keys and values per token (C and KV), so the head
            projects only fresh tokens.
        max_streams: keep at most this many streams; when a call would exceed it, the least
            recently seen streams are evicted (their next frame is dense; :attr:`last_evicted`
            and :attr:`evictions` report it). None: no limit.
        capacity: how many packed rows the encoder runs on (the kernel path; see
            ``neuroflow.engine.capacity``): ``"auto"`` (default: a power-of-two bucket from the previous
            call's need, no host sync; an overflow cuts the least surprising patches, is counted
            in :attr:`overflowed_frames` and warned about with ``CapacityWarning``), ``"exact"``
            (read the token count on the host: one sync per call), or an int (fixed rows for the
            frames that are not dense by rule: first frames and the keyframes ``keyframe_every``
            schedules get dense rows on top, known on the host). The CPU reference path always
            packs exactly (its reads are free). A ``budget`` bounds the bucket of the gated frames
            (no overflow then) unless keyframes are data-dependent: with ``scene_cut`` or
            ``keyframe_drift`` (the measured preset sets it), ``"auto"`` packs exactly (such a
            keyframe is dense, which no bucket can know in advance), and an int capacity cuts
            those keyframes like any overflow.
        cuda_graphs: capture the steady-state step in a CUDA graph per batch size, grid,
            capacity bucket and pool layout, and replay it (see ``neuroflow.engine.graphs``: first
            frames, scheduled keyframes, ``active=``, gradients and the first call of each key run
            eagerly; outputs are copies; every graph holds its own memory pool).
        differentiable: follow the ambient grad mode (for gradients through the engine). By
            default a call runs under ``torch.no_grad()`` unless ``pixel_values`` requires grad,
            so weights that require grad (as Hugging Face loads them) do not push the call off
            the kernel path.
        reference: what the surprise compares a patch with: ``"ema"`` (the paper preset: the
            EMA of every frame) or ``"computed"`` (the patch's layer-0 embedding when it was last
            computed; the measured preset; ``ema_decay`` is then unused and the ``"ema"`` state
            holds those embeddings).
        max_staleness: None, or K >= 1: a patch not computed for K frames in a row is computed on
            the next frame. Streams then keep an ``age`` state ``[N]`` int32, staggered on their
            first frame (``i mod (K + 1)``) so these refreshes spread over frames.
        budget: None, an int >= 1 (patches) or a float in (0, 1] (fraction of N): at most this
            many patches per later frame, the first in the gate's ranking (stale, then most
            surprising, then lowest index). With ``threshold=None`` exactly that many (and
            ``floor_tokens`` has no effect: given explicitly, it warns).
        motion_norm: subtract the frame's mean surprise before the decision (the reported
            surprise is then the normalised one).
        scene_cut: None or a fraction in (0, 1]: a frame where more than this fraction of the
            patches pass the threshold (raw surprise) is a keyframe: every patch active, the
            reference restarted (not reported as a first frame).
        skip_below: the frame policy's skip (None: off): a later frame that is not a keyframe and
            where at most ``floor(skip_below * N)`` patches pass the threshold (raw surprise) is
            skipped: no encoder work, caches and reference untouched, ages advance, the outputs
            are exactly the stream's last computed frame's. In [0, 1]; below 1 needs a threshold.
            Streams then keep ``last_seq`` ``[T, D]`` and ``last_pooled`` ``[D_out]``.
        keyframe_every: None or K >= 1: a keyframe (dense, reference, ages and counters restarted)
            at least every K frames, counted per stream from its first frame (the measured
            preset: 8). The host keeps the schedule (:mod:`neuroflow.engine.keyframes`), so the
            capacity reserves a scheduled keyframe's dense rows with no host sync; a call that
            holds a keyframe or a first frame is not replayed from a CUDA graph.
        keyframe_drift: None or f >= 0: a keyframe when the sum, over the frames since the last
            keyframe (this frame included), of each frame's mean raw surprise divided by its
            reference's texture (the mean ``1 - cos`` between neighbouring patches' references:
            motion in units of the image's own patch-to-patch change, which depends less on
            the resolution than the raw surprise) exceeds f (the measured preset: 0.6, so a
            moving camera refreshes before its K-th frame). Such a keyframe is data-dependent:
            on the kernel path ``capacity="auto"`` then reads the call's row count on the host
            (one sync per call).
            Every-k frame skipping is ``keyframe_every=k, skip_below=1.0, keyframe_drift=None``. See
            ``neuroflow.reference.gate_settings`` for the whole rule; ``frame_kind`` reports each decision.
        batch_budget: None or a float f in (0, 1]: one call's non-keyframe frames (M of them)
            compute at most ``floor(M * f * N)`` patches together, the first in one batch-wide
            ranking (stale first, then surprise in units of each frame's reference texture, as
            for ``keyframe_drift``), so a static stream leaves its share to a busy one; keyframes
            (first frames included) are dense and count against nothing.
        signal: what the surprise compares: ``"embedding"`` (default; the layer-0 embedding
            ``h = W x + b + PE``) or ``"patch"`` (the patch projection ``p = W x + b`` without the
            position embedding: a change of content alone, however large PE is). The ``"ema"``
            state then holds ``p`` (its EMA, or its last-computed value); the encoder's tokens
            are ``h`` either way. Switched only without streams; saved stream state records it.
        kv_layers: Architecture KV only (partial depth): the layers that keep key/value caches;
            the others run as in C (computed tokens attend to computed tokens only). None
            (default): every layer. An int K: the last K layers (0 is exactly C with
            ``cls_readout="active"``). A sequence of distinct indices in ``[0, L)``, e.g.
            ``range(1, L, 2)``. State per stream shrinks to ``[len(kv_layers), T, W]`` per cache.
        probe_layers: Architecture KV only: l in ``[0, L)``. The first l layers run densely on
            every token (prefix included) of every frame that runs, and the gate decides on each
            patch's layer-l hidden state (the input to layer l) against its layer-l state when
            last computed (needs ``reference="computed"``; ``"ema"`` is refused); the computed
            tokens continue through layers l..L-1 with key/value caches (the probe layers keep
            none: ``kv_layers`` counts from layer l). Threshold, floor, staleness, budgets, scene
            cut and the frame policy act on that surprise (its scale differs from layer 0's:
            sweep the threshold). A partial frame costs ``T * l + (P + active) * (L - l)``
            token-layers; a keyframe ``T * L``; a skipped frame ``T * l`` (the skip is decided on
            the probe's features, so the probe has run; nothing else runs). 0 (default): the gate
            decides on layer-0 embeddings, exactly as without the option. The kernel path runs
            the probe through the packed encoder and the gate's select and pack kernels on its
            features (no host sync; :func:`neuroflow.ops.gate.gate_features`).
        layer_threshold: Architecture KV only: the per-layer gate (Eventful/STC style), None
            (default: off) or a number in ``[0, 2)``. At every cached layer each computed patch's
            fresh key is compared with its cached key, the one it had when that layer last
            computed it; a patch whose key moved by at most this (``1 - cos``) drops out there:
            its keys/values at that and deeper layers and its output stay as cached. Prefix tokens
            and every token of a first frame or keyframe run every layer. ``token_layers`` then
            counts the tokens entering each layer (a dropped token counts its last layer in full:
            its key was computed). On the sync-free path (``capacity`` bucket, GPU) the packed
            buffers keep their size, so a drop saves the attention over those rows, not the
            row-wise work; ``capacity="exact"`` or the CPU shrink them (one host read per layer).
        ranker: the learned patch ranking (issue #20 part 4): a
            :class:`~neuroflow.reference.patch_ranker.PatchRanker` or the path of one saved by
            ``neuroflow distill-gate``. A partial frame computes as many patches as the gate
            decides without it, chosen in the ranker's order (its predicted output error, from
            the surprise map and the frames since the last keyframe) instead of the surprise's;
            frame kinds, references and budgets are unchanged. None (default): the deterministic
            gate. Not with ``probe_layers``. Measured on real weights in ``docs/gate.md``
            ("A learned ranking"): not better than the deterministic gate on every clip.

    Call with ``pixel_values [B, C, H, W]`` (model dtype and device; H and W multiples of the patch
    size) and ``stream_ids`` (B distinct hashable ids; default ``0..B-1``). A stream that is new,
    was reset, or arrives at another resolution than before (warning) starts with a dense frame.
    Calls run without autograd unless ``pixel_values`` requires grad or ``differentiable=True``.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        arch: str = FROM_PRESET,
        threshold: float | None = FROM_PRESET,
        ema_decay: float = FROM_PRESET,
        floor_tokens: int = FROM_PRESET,
        cls_readout: str = Default("context"),
        check_finite: bool = True,
        cache_dtype: torch.dtype | None = None,
        head_cache: bool = Default(True),
        max_streams: int | None = None,
        capacity: str | int = "auto",
        differentiable: bool = False,
        cuda_graphs: bool = False,
        reference: str = FROM_PRESET,
        max_staleness: int | None = FROM_PRESET,
        budget: int | float | None = None,
        motion_norm: bool = False,
        scene_cut: float | None = None,
        kv_layers: int | Sequence[int] | None = None,
        preset: str = DEFAULT_PRESET,
        skip_below: float | None = None,
        keyframe_every: int | None = FROM_PRESET,
        keyframe_drift: float | None = FROM_PRESET,
        batch_budget: float | None = None,
        probe_layers: int = 0,
        signal: str = "embedding",
        layer_threshold: float | None = None,
        ranker: PatchRanker | str | os.PathLike | None = None,
    ):
        super().__init__()
        if check_finite not in (True, False, "eager", "deferred"):
            raise ValueError(f"check_finite must be True, False, 'eager' or 'deferred', got {check_finite!r}")
        check_preset(preset)
        explicit = {name for name, v in dict(arch=arch, ema_decay=ema_decay, floor_tokens=floor_tokens,
                                             cls_readout=cls_readout, head_cache=head_cache).items() if given(v)}
        chosen = resolve(preset, arch=arch, threshold=threshold, ema_decay=ema_decay, floor_tokens=floor_tokens,
                         reference=reference, max_staleness=max_staleness, keyframe_every=keyframe_every,
                         keyframe_drift=keyframe_drift, cls_readout=cls_readout, head_cache=head_cache)
        arch, threshold, ema_decay = chosen["arch"], chosen["threshold"], chosen["ema_decay"]
        floor_tokens, reference, max_staleness = chosen["floor_tokens"], chosen["reference"], chosen["max_staleness"]
        cls_readout, head_cache, keyframe_every = chosen["cls_readout"], chosen["head_cache"], chosen["keyframe_every"]
        keyframe_drift = chosen["keyframe_drift"]
        self.preset = preset
        ranker = _ranker_on(ranker, None)
        settings = GateSettings(threshold=threshold, ema_decay=ema_decay, floor_tokens=floor_tokens,
                                reference=reference, max_staleness=max_staleness, budget=budget,
                                motion_norm=motion_norm, scene_cut=scene_cut, skip_below=skip_below,
                                keyframe_every=keyframe_every, keyframe_drift=keyframe_drift,
                                batch_budget=batch_budget, signal=signal, ranker=ranker)
        if cls_readout not in ("context", "active"):
            raise ValueError(f"cls_readout must be 'context' or 'active', got {cls_readout!r}")
        if cache_dtype is not None and not (isinstance(cache_dtype, torch.dtype)
                                            and (cache_dtype.is_floating_point or cache_dtype in QUANT_MAX)):
            raise ValueError(f"cache_dtype must be a floating torch.dtype, torch.int8 or torch.float8_e4m3fn, "
                             f"got {cache_dtype!r}")
        if max_streams is not None and (isinstance(max_streams, bool) or not isinstance(max_streams, int)
                                        or max_streams < 1):
            raise ValueError(f"max_streams must be an int >= 1 or None, got {max_streams!r}")
        self.adapter = VisionAdapter(vision_model)
        self.vision_model = self.adapter.model
        self.architecture: Architecture = make_architecture(
            arch, self.adapter, cache_dtype=cache_dtype, head_cache=bool(head_cache), cls_readout=cls_readout,
            probe_layers=probe_layers, **({} if kv_layers is None else {"kv_layers": kv_layers}),
            **({} if layer_threshold is None else {"layer_threshold": layer_threshold}))
        _check_probe_reference(self.architecture.probe_layers, settings)
        self.architecture.check(settings.floor_tokens)
        self.architecture.track_age = max_staleness is not None
        self.architecture.track_policy = settings.policy
        self.architecture.keep_outputs = settings.skip_below is not None
        self._gate = _normalised(settings.replace(ranker=_ranker_on(ranker, self.adapter.device)))
        warn_ineffective_settings(threshold=self._gate.threshold)
        g = self._gate
        warn_ineffective_settings(
            ema_decay=g.ema_decay if "ema_decay" in explicit else None, reference=g.reference,
            floor_tokens_given=g.floor_tokens if "floor_tokens" in explicit else None, threshold_none=g.threshold is None,
            cls_readout=cls_readout if "cls_readout" in explicit else None,
            cls_readout_used=self.architecture.name == "C" and self.adapter.pools_cls_token,
            head_cache=head_cache if "head_cache" in explicit else None,
            head_cache_used=self.architecture.name in ("C", "KV") and self.adapter.has_map_head,
            cache_dtype=cache_dtype, cache_dtype_used=self.architecture.uses_kv_cache,
            where=f"arch={self.architecture.name!r}, family={self.adapter.family!r}")
        self._warned_floor: set[tuple[int, Grid]] = set()  # (floor, grid) pairs already warned about
        self.check_finite = check_finite
        self.differentiable = bool(differentiable)
        self._planner = CapacityPlanner(capacity)
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs = StepGraphs()
        self._streams = StreamStore(self.architecture.state_specs, self.adapter.device, max_streams)
        self._pending: _Pending | None = None
        self._keyframes = KeyframeSchedule()
        self.overflowed_frames = 0
        """Frames whose active patches did not all fit their capacity bucket (see ``capacity``)."""

    # -- settings (validated on every change) ------------------------------------------------------
    @property
    def gate_settings(self) -> GateSettings:
        """The gate's settings as one frozen value (what the engine passes to the gate op)."""
        return self._gate

    def _set_gate(self, **changes) -> None:
        new = _normalised(self._gate.replace(**changes))
        _check_probe_reference(self.probe_layers, new)
        self._gate = new

    @property
    def ranker(self) -> PatchRanker | None:
        """The learned patch ranking, or None (the deterministic gate); settable (a
        :class:`PatchRanker`, a path, or None), on the engine's device."""
        return self._gate.ranker

    @ranker.setter
    def ranker(self, value: PatchRanker | str | os.PathLike | None) -> None:
        self._set_gate(ranker=_ranker_on(value, self.adapter.device))

    @property
    def threshold(self) -> float | None:
        return self._gate.threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._set_gate(threshold=value)
        warn_ineffective_settings(threshold=self._gate.threshold)

    @property
    def ema_decay(self) -> float:
        return self._gate.ema_decay

    @ema_decay.setter
    def ema_decay(self, value: float) -> None:
        self._set_gate(ema_decay=value)
        warn_ineffective_settings(ema_decay=self._gate.ema_decay, reference=self._gate.reference)

    @property
    def floor_tokens(self) -> int:
        return self._gate.floor_tokens

    @floor_tokens.setter
    def floor_tokens(self, value: int) -> None:
        GateSettings(floor_tokens=value)  # the type and range check, before the architecture's
        self.architecture.check(value)
        self._set_gate(floor_tokens=value)

    @property
    def reference(self) -> str:
        """``"ema"`` or ``"computed"``; switching keeps the stored state and reads it the new way."""
        return self._gate.reference

    @reference.setter
    def reference(self, value: str) -> None:
        self._set_gate(reference=value)

    @property
    def max_staleness(self) -> int | None:
        return self._gate.max_staleness

    @max_staleness.setter
    def max_staleness(self, value: int | None) -> None:
        # Turning staleness on or off adds or drops a state tensor: only without streams.
        new = self._gate.replace(max_staleness=value)
        if (value is None) != (self._gate.max_staleness is None) and len(self._streams):
            raise ValueError("max_staleness can switch between None and a number only without streams "
                             "(it adds or drops the 'age' state): call reset() first")
        self._gate = _normalised(new)
        self.architecture.track_age = value is not None

    @property
    def budget(self) -> int | float | None:
        return self._gate.budget

    @budget.setter
    def budget(self, value: int | float | None) -> None:
        self._set_gate(budget=value)

    @property
    def motion_norm(self) -> bool:
        return self._gate.motion_norm

    @motion_norm.setter
    def motion_norm(self, value: bool) -> None:
        self._set_gate(motion_norm=value)

    @property
    def scene_cut(self) -> float | None:
        return self._gate.scene_cut

    @scene_cut.setter
    def scene_cut(self, value: float | None) -> None:
        self._set_gate(scene_cut=value)

    def _set_policy(self, **changes) -> None:
        # The policy's state tensors come and go with it: switching it on or off (or skip_below,
        # which keeps the last outputs) only without streams.
        new = _normalised(self._gate.replace(**changes))
        if len(self._streams) and (new.policy != self._gate.policy
                                   or (new.skip_below is None) != (self._gate.skip_below is None)):
            raise ValueError("the frame policy (skip_below, keyframe_every, keyframe_drift) can be switched on or "
                             "off only without streams (it adds or drops state tensors): call reset() first")
        self._gate = new
        self.architecture.track_policy = new.policy
        self.architecture.keep_outputs = new.skip_below is not None
        self._keyframes.forget()

    @property
    def skip_below(self) -> float | None:
        return self._gate.skip_below

    @skip_below.setter
    def skip_below(self, value: float | None) -> None:
        self._set_policy(skip_below=value)

    @property
    def keyframe_every(self) -> int | None:
        return self._gate.keyframe_every

    @keyframe_every.setter
    def keyframe_every(self, value: int | None) -> None:
        self._set_policy(keyframe_every=value)

    @property
    def keyframe_drift(self) -> float | None:
        return self._gate.keyframe_drift

    @keyframe_drift.setter
    def keyframe_drift(self, value: float | None) -> None:
        self._set_policy(keyframe_drift=value)

    @property
    def signal(self) -> str:
        """``"embedding"`` or ``"patch"``: what the surprise compares (see ``signal`` above)."""
        return self._gate.signal

    @signal.setter
    def signal(self, value: str) -> None:
        # The stored reference is of the signal: h under one, p under the other.
        new = self._gate.replace(signal=value)
        if new.signal != self._gate.signal and len(self._streams):
            raise ValueError("signal can change only without streams (their stored reference is of the old signal): "
                             "call reset() first")
        _check_probe_reference(self.probe_layers, new)
        self._gate = _normalised(new)

    @property
    def batch_budget(self) -> float | None:
        return self._gate.batch_budget

    @batch_budget.setter
    def batch_budget(self, value: float | None) -> None:
        self._set_gate(batch_budget=value)

    @property
    def arch(self) -> str:
        """``"A"``, ``"B"``, ``"C"`` or ``"KV"``."""
        return self.architecture.name

    @property
    def cls_readout(self) -> str:
        return self.architecture.cls_readout

    @property
    def cache_dtype(self) -> torch.dtype | None:
        return self.architecture.cache_dtype

    @property
    def head_cache(self) -> bool:
        return self.architecture.head_cache

    @property
    def kv_layers(self) -> tuple[int, ...] | None:
        """Architecture KV: the cached layers, ascending (None: every layer). None for the others."""
        return getattr(self.architecture, "kv_layers", None)

    @property
    def probe_layers(self) -> int:
        """Layers run densely before the gate decides (Architecture KV; 0: the gate decides on
        layer-0 embeddings). Fixed for the engine's life: the references it keeps depend on it."""
        return self.architecture.probe_layers

    @property
    def layer_threshold(self) -> float | None:
        """The per-layer gate's threshold (Architecture KV; None: off). Fixed at construction."""
        return getattr(self.architecture, "layer_threshold", None)

    @property
    def max_streams(self) -> int | None:
        return self._streams.max_streams

    @property
    def last_evicted(self) -> list[Hashable]:
        """Streams evicted by the most recent call (``max_streams``), least recently seen first."""
        return list(self._streams.evicted)

    @property
    def evictions(self) -> int:
        """Streams evicted since this engine was made."""
        return self._streams.evictions

    # -- streams -----------------------------------------------------------------------------------
    @property
    def stream_ids(self) -> list[Hashable]:
        """Ids of the streams that currently hold state."""
        return self._streams.stream_ids

    def reset(self, stream_ids: Sequence[Hashable] | None = None) -> None:
        """Forget the given streams (all streams when None); their next frame is dense.

        Raises ``KeyError`` (and forgets nothing) if an id is not a known stream.
        """
        self.sync_errors()
        if stream_ids is None:
            self._streams.clear()
            self._keyframes.forget()
            return
        ids = check_stream_ids(stream_ids, len(stream_ids))
        unknown = [i for i in ids if i not in self._streams]
        if unknown:
            raise KeyError(f"unknown stream id(s): {', '.join(map(repr, unknown))}")
        self._streams.remove(ids)
        self._keyframes.forget(ids)

    def state_bytes_per_stream(self, height: int, width: int) -> dict[str, int]:
        """Bytes of state one stream holds at an ``height x width`` frame size, per state tensor
        (``ema``; ``anchors`` for A; ``cache`` for C and KV; ``kv_k``/``kv_v``, the cached layers
        only, for KV; ``last_k``/``last_v`` for C's context readout; ``head_k``/``head_v`` for
        SigLIP's head cache), plus ``"total"``. Derived from the architecture's state specs, so it
        is what a pool allocates per slot (see :mod:`neuroflow.engine.memory` for a whole budget)."""
        grid = self.adapter.grid(height, width)
        out = {
            name: int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
            for name, (shape, dtype) in self.architecture.state_specs(grid).items()
        }
        out["total"] = sum(out.values())
        return out

    def streams_that_fit(self, height: int, width: int, gib: float, reserve_gib: float = 0.0,
                         count_weights: bool = True) -> MemoryFit:
        """How many streams at ``height x width`` fit in ``gib`` GiB beside this engine's model weights
        and a stated ``reserve_gib`` for activations (see :mod:`neuroflow.engine.memory` for exactly what is
        counted, and :func:`neuroflow.engine.memory.streams_that_fit` for a model or config not yet wrapped)."""
        if not (isinstance(gib, (int, float)) and not isinstance(gib, bool) and gib > 0):
            raise ValueError(f"gib must be a positive number, got {gib!r}")
        if not (isinstance(reserve_gib, (int, float)) and not isinstance(reserve_gib, bool) and reserve_gib >= 0):
            raise ValueError(f"reserve_gib must be a number >= 0, got {reserve_gib!r}")
        a = self.adapter
        if height <= 0 or width <= 0 or height % a.patch_size or width % a.patch_size:
            raise ValueError(f"height and width must be positive multiples of the patch size {a.patch_size}, "
                             f"got {height}x{width}")
        per_stream = self.state_bytes_per_stream(height, width)
        weights = _module_bytes(a.model) if count_weights else 0
        budget, reserve = int(gib * GIB), int(reserve_gib * GIB)
        left = budget - weights - reserve
        grid = a.grid(height, width)
        return MemoryFit(
            streams=max(0, left // per_stream["total"]),
            per_stream=per_stream,
            weight_bytes=weights,
            reserve_bytes=reserve,
            budget_bytes=budget,
            height=height,
            width=width,
            tokens=a.num_prefix + grid[0] * grid[1],
            settings=self.architecture.config(),
        )

    def state_bytes(self) -> int:
        """Bytes of stream state this engine holds now (every pool at its capacity)."""
        return self._streams.state_bytes()

    # -- the frame path ----------------------------------------------------------------------------
    @property
    def capacity(self) -> str | int:
        return self._planner.mode

    def sync_errors(self) -> None:
        """Finish the previous call's deferred checks now (waits for that call's gate on a GPU):
        raises its deferred ``ValueError`` for NaN/Inf frames (after undoing its state writes),
        counts overflowed frames (``CapacityWarning``). The next call does this by itself."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.count.wait()
        need, cut, *bad = pending.count.values()
        if pending.plan_key is not None:
            self._planner.observe(pending.plan_key, need, pending.rest)
        if cut:
            self.overflowed_frames += cut
            warnings.warn(
                f"{cut} frame(s) needed more packed rows than their capacity bucket "
                f"({pending.capacity} rows): their least surprising active patches were not computed"
                + ("; the bucket grows for the next calls" if self._planner.mode == "auto" else
                   f" (fixed capacity={self._planner.mode})"),
                CapacityWarning, stacklevel=3)
        if pending.batch is not None:
            rows = [b for b, flag in enumerate(bad) if flag]
            if rows:
                pending.batch.undo_commit()
                self._keyframes.forget(pending.batch.ids)
                ids = [pending.batch.ids[b] for b in rows]
                raise ValueError(
                    f"pixel_values of the previous call contained NaN or Inf in batch row(s) {rows} "
                    f"(stream(s) {', '.join(map(repr, ids))}; deferred check_finite): that call's state "
                    "writes were undone and its outputs are invalid; this call did not run")
            pending.batch.release()

    def forward(
        self,
        pixel_values: torch.Tensor,
        stream_ids: Sequence[Hashable] | None = None,
        active: torch.Tensor | None = None,
    ) -> NeuroFlowOutput:
        """Args:
        pixel_values: ``[B, C, H, W]``, one frame per stream.
        stream_ids: B distinct hashable ids (default ``0..B-1``).
        active: optional ``[B, N]`` bool: compute exactly these patches instead of the gate's
            choice (first frames stay dense; the EMA still updates). For baselines that select
            patches another way (random dropping, pixel differences) and for training; it goes
            through the gate op like any call and runs the gate's reference path there.
        """
        self.sync_errors()
        deferred = self._deferred_finite(pixel_values)
        grid = check_frames(pixel_values, self.adapter, bool(self.check_finite) and not deferred)
        ids = check_stream_ids(stream_ids, pixel_values.shape[0])
        if active is not None:
            n = grid[0] * grid[1]
            if active.shape != (pixel_values.shape[0], n) or active.dtype != torch.bool:
                raise ValueError(f"active must be a bool tensor [B, N] = [{pixel_values.shape[0]}, {n}], "
                                 f"got {active.dtype} {tuple(active.shape)}")
            active = active.to(pixel_values.device)
        floor = self._gate.floor_tokens
        if (floor, grid) not in self._warned_floor:
            self._warned_floor.add((floor, grid))
            warn_ineffective_settings(floor_tokens=floor, num_patches=grid[0] * grid[1])
        moved = [i for i in ids if i in self._streams and self._streams.grid_of(i) != grid]
        grad = self.differentiable or (torch.is_grad_enabled() and pixel_values.requires_grad)
        batch = self._streams.begin(ids, grid)
        try:
            # Which frames are dense by rule, known on the host (first frames, scheduled keyframes).
            dense = self._keyframes.plan(self._gate, batch) if active is None else None
            with torch.set_grad_enabled(torch.is_grad_enabled() and grad):
                bad = (~torch.isfinite(pixel_values).flatten(1).all(dim=1)) if deferred else None
                out, count, plan_key, capacity = self._step(pixel_values, grid, batch, active, bad, dense)
                if count is not None:
                    num_dense = sum(dense) if dense is not None else batch.first_count
                    self._pending = _Pending(count, plan_key, num_dense, capacity, batch if bad is not None else None)
        except BaseException:
            self._pending = None
            batch.rollback()
            raise
        batch.commit(keep_undo=deferred)
        if dense is not None:
            self._keyframes.commit(ids, dense, self._streams)
        else:
            self._keyframes.forget(ids)
        for i in moved:
            warnings.warn(
                f"stream {i!r} changed resolution (patch grid {grid[0]}x{grid[1]}); it was reset and "
                "this frame ran dense",
                stacklevel=2,
            )
        return out

    def _deferred_finite(self, pixel_values: torch.Tensor) -> bool:
        if self.check_finite == "deferred":
            return True
        return self.check_finite is True and isinstance(pixel_values, torch.Tensor) and pixel_values.device.type == "cuda"

    def _counts(self, fitted: Fitted | None, bad: torch.Tensor | None) -> torch.Tensor | None:
        """``[need, cut, bad rows...]`` int64 on the device: what the next call learns."""
        if fitted is None and bad is None:
            return None
        zero = torch.zeros(1, dtype=torch.int64, device=self.adapter.device)
        need, cut = (fitted.need.reshape(1), fitted.cut.reshape(1)) if fitted is not None else (zero, zero)
        return torch.cat([need, cut] + ([bad.to(torch.int64)] if bad is not None else []))

    def _packs_sync_free(self, device: torch.device, scheduled: bool) -> bool:
        """Sync-free packing runs where the gate runs its kernel (CUDA, or the interpreter);
        the CPU reference path reads its counts for free. With ``scene_cut`` or
        ``keyframe_drift`` and ``capacity="auto"`` the count is read exactly (one sync per call):
        a keyframe is dense by the rule, data-dependently, and a bucket learnt on sparse frames
        would cut it. ``keyframe_every`` alone keeps it sync-free: the host knows the scheduled
        keyframes (``scheduled``; :mod:`neuroflow.engine.keyframes`) and reserves dense rows."""
        if self._planner.mode == "auto" and self._gate.keyframe_triggers and not scheduled:
            return False
        return self._planner.mode != "exact" and dispatch.wants_triton(device)

    def _step(self, pixel_values: torch.Tensor, grid: Grid, batch: StreamBatch, active, bad,
              dense: list[bool] | None):
        """Returns ``(output, HostCount or None, planner key, capacity)``. ``dense``: per frame,
        dense by rule as the host knows it (first frames, scheduled keyframes), or None."""
        b, n = pixel_values.shape[0], grid[0] * grid[1]
        plan_key = capacity = None
        num_dense = sum(dense) if dense is not None else batch.first_count
        dense_rows = batch.first
        if self._packs_sync_free(pixel_values.device, dense is not None):
            plan_key = (b, grid)
            # A scheduled keyframe is reserved a dense frame's rows like a first frame: never cut.
            capacity = self._planner.capacity(plan_key, b, num_dense, self.adapter.num_prefix, n,
                                              self._gate.floor_tokens,
                                              static_patch_bound(self._gate, n, scheduled=dense is not None))
            if num_dense > batch.first_count:
                dense_rows = torch.tensor(dense, dtype=torch.bool, device=batch.first.device)
        if num_dense == 0 and self._graphable(pixel_values, batch, active, capacity):
            # GateSettings is frozen (hashable); the pool layout covers kv_layers, cache dtypes and
            # the age / scale tensors (their names and shapes).
            key = (b, grid, capacity, self._gate,
                   tuple((name, t.data_ptr(), tuple(t.shape), t.dtype) for name, t in batch._pool.tensors.items()))

            def step(pixels):
                out, fitted, _ = self._step_body(pixels, grid, batch, None, capacity, None)
                return (out.pooler_output, out.last_hidden_state, out.active_mask, out.sparsity, out.surprise,
                        out.frame_kind, out.token_layers, fitted.need, fitted.cut)

            replayed = self._graphs.run(key, pixel_values, batch, step)
            if replayed is not None:
                pooled, seq, computed, sparsity, surprise, kind, token_layers, need, cut = replayed
                out = NeuroFlowOutput(pooled, seq, computed, sparsity, surprise, batch.first, kind, token_layers)
                # After a replay the counts exist only once the whole step has run.
                counts = self._counts(_Counts(need, cut), bad)
                return out, HostCount(counts), plan_key, capacity
        out, _, count = self._step_body(pixel_values, grid, batch, active, capacity, bad, dense_rows)
        return out, count, plan_key, capacity

    def _graphable(self, pixel_values, batch, active, capacity) -> bool:
        return (self.cuda_graphs and pixel_values.device.type == "cuda" and capacity is not None
                and active is None and batch.first_count == 0 and not torch.is_grad_enabled()
                and _active_timer.get() is None)

    def _step_body(self, pixel_values: torch.Tensor, grid: Grid, batch: StreamBatch, active,
                   capacity: int | None, bad: torch.Tensor | None | bool, dense_rows: torch.Tensor | None = None
                   ) -> tuple[NeuroFlowOutput, Fitted | None, HostCount | None]:
        """The step itself (traceable by ``torch.compile``: gate, encoder, cache writes and readout
        through the registered ops; see the module docstring). ``bad``: the deferred finiteness
        flags, or None; the counts for the next call start their way to the host right after the
        gate (not under graph capture, where ``bad`` is None and the caller copies them after the
        replay). ``dense_rows``: ``[B]`` bool, the frames the capacity reserved dense rows for
        (never cut; default the first frames)."""
        a = self.adapter
        conv = a.patch_conv
        probe = self.architecture.probe_layers
        pools = dict(
            age=batch.update_in_place("age") if self._gate.max_staleness is not None else None,
            policy=(batch.update_in_place("policy_since"), batch.update_in_place("policy_drift"))
            if self._gate.policy else None,
        )
        if probe:
            with stage("encoder"):
                features = self.architecture.probe(pixel_values)
            with stage("gate"):
                gated = gate_features(features, a.num_prefix, batch.update_in_place("ema"), batch.slot, batch.first,
                                      self._gate, force_active=active, **pools)
        else:
            with stage("gate"):
                gated = gate_frames(
                    pixel_values, conv.weight, conv.bias, a.position_embeddings(grid), a.prefix_tokens(grid),
                    batch.update_in_place("ema"), batch.slot, batch.first, self._gate, force_active=active, **pools,
                )
        n = gated.active.shape[1]
        fitted: Fitted | None = None
        if capacity is not None:
            with stage("gate"):
                fitted = fit_to_capacity(gated, batch.first if dense_rows is None else dense_rows, capacity)
        capturing = pixel_values.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        counts = None if capturing else self._counts(fitted, bad)
        # Recorded before the encoder is queued: the next call waits for this call's gate only.
        count = HostCount(counts) if counts is not None else None
        result = self.architecture.step(pixel_values, gated, batch, fitted)
        computed = fitted.active if fitted is not None else gated.active
        kind = gated.frame_kind
        seq, pooled = result.last_hidden_state, result.pooler_output
        if self._gate.skip_below is not None:
            with stage("readout"):
                # A skipped frame returns its stream's last computed outputs, exactly; every frame
                # then leaves its outputs for the next skip (a skip writes back the same values).
                skip = (kind == SKIP).view(-1, 1, 1)
                seq = torch.where(skip, batch.rows("last_seq"), seq)
                batch.write_rows("last_seq", seq)
                if pooled is not None:
                    pooled = torch.where(skip[:, 0], batch.rows("last_pooled"), pooled)
                    batch.write_rows("last_pooled", pooled)
        ran = (kind != SKIP).to(torch.int64)
        # The probe runs on every token of every frame (a skip is decided on its output).
        gated_layers = (result.entered if result.entered is not None
                        else (computed.sum(dim=1) + a.num_prefix * ran) * (len(a.layers) - probe))
        token_layers = gated_layers + (a.num_prefix + n) * probe
        out = NeuroFlowOutput(
            pooler_output=pooled,
            last_hidden_state=seq,
            active_mask=computed,
            sparsity=1.0 - computed.sum(dim=1).float() / n,
            surprise=gated.surprise,
            first_frame=batch.first,
            frame_kind=kind,
            token_layers=token_layers,
        )
        return out, fitted, count

    # -- device moves and persistence --------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        if getattr(self, "_pending", None) is not None:
            self.sync_errors()
        if hasattr(self, "_graphs"):
            self._graphs.clear()  # they hold the old weights' and pools' addresses
        super()._apply(fn, recurse)
        self._streams.apply(fn, self.adapter.device)
        return self

    def _config(self) -> dict:
        a = self.adapter
        return {
            "family": a.family,
            "hidden_size": a.hidden_size,
            "num_layers": len(a.layers),
            "num_prefix": a.num_prefix,
            "patch_size": a.patch_size,
            **self.architecture.config(),
            **self._signal_config(),
        }

    def _signal_config(self) -> dict:
        # The "ema" state holds the signal's reference; the key only when it is not the default,
        # so states saved before the option existed stay loadable.
        return {} if self._gate.signal == "embedding" else {"signal": self._gate.signal}

    def stream_state_dict(self) -> dict:
        """Every stream's state as plain data (tensors on the CPU); see :meth:`load_stream_state_dict`.

        Gate settings are included for reference; loading does not change this engine's settings.
        """
        self.sync_errors()
        return {
            "format": STATE_FORMAT,
            "config": self._config(),
            "settings": self._gate.as_dict(),
            **self._streams.state(),
        }

    def load_stream_state_dict(self, state: dict) -> None:
        """Replace every stream's state with a :meth:`stream_state_dict` snapshot.

        The snapshot must come from an engine with the same architecture, model geometry and gate
        ``signal`` (the stored reference is of it); nothing changes if it does not.
        """
        self.sync_errors()
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown stream-state format {state.get('format')!r} (expected {STATE_FORMAT})")
        mine, theirs = self._config(), state.get("config", {})
        if mine != theirs:
            diff = {k: (theirs.get(k), mine.get(k)) for k in {**theirs, **mine} if theirs.get(k) != mine.get(k)}
            raise ValueError(f"stream state was saved by an incompatible engine (saved vs this): {diff}")
        self._streams.load(state)
        self._keyframes.forget()

    def state_fingerprint(self) -> dict:
        """What a saved state belongs to: the model (family, geometry, a digest of its weights)
        and the settings that decide what the state means (architecture and its cache options)."""
        return {"model": model_fingerprint(self.adapter), "settings": {**self.architecture.config(),
                                                                        **self._signal_config()}}

    def save_state(self, path: str | Path) -> None:
        """Write every stream's state to ``path`` with a format version and
        :meth:`state_fingerprint` (ids must be str, int or tuples of them); see
        :mod:`neuroflow.engine.state_file`."""
        state = self.stream_state_dict()
        for pool in state["pools"]:
            for i in pool["ids"]:
                if not _is_plain_id(i):
                    raise TypeError(f"stream id {i!r} cannot be saved: use str, int or tuples of them")
        save_state_file(path, state, self.state_fingerprint())

    def load_state(self, path: str | Path) -> None:
        """Restore the streams saved by :meth:`save_state`.

        Raises :class:`neuroflow.engine.state_file.StateFileError` (naming the file and the reason) for a
        corrupt or truncated file, another format version, another model or incompatible
        settings; nothing changes then. No code runs on load (``weights_only=True``).
        """
        state = load_state_file(path, self.state_fingerprint())
        try:
            self.load_stream_state_dict(state)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateFileError(f"state file {path}: its streams do not fit this engine ({exc})") from None

    def get_extra_state(self) -> dict:
        # Makes ``nf.state_dict()`` carry the streams next to the model weights.
        return self.stream_state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.load_stream_state_dict(state)

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, family={self.adapter.family!r}, threshold={self._gate.threshold}, "
            f"ema_decay={self._gate.ema_decay}, floor_tokens={self._gate.floor_tokens}"
            + "".join(f", {k}={v!r}" for k, v in self._gate.as_dict().items()
                      if k not in ("threshold", "ema_decay", "floor_tokens") and v != GateSettings.__dataclass_fields__[k].default)
            + (f", probe_layers={self.probe_layers}" if self.probe_layers else "")
            + (f", layer_threshold={self.layer_threshold}" if self.layer_threshold is not None else "")
            + f", streams={len(self._streams)}"
        )


@dataclass
class _Counts:
    """The device counts a replayed step leaves (as :class:`~neuroflow.engine.capacity.Fitted` does)."""

    need: torch.Tensor
    cut: torch.Tensor


@dataclass
class _Pending:
    """What a call left for the host to learn at the next one: ``[need, cut, bad rows...]`` on
    their way to the host, the planner key, the frames dense by rule (first frames, scheduled
    keyframes), the capacity used, and the batch (committed with its undo log) when its
    finiteness check was deferred."""

    count: HostCount
    plan_key: tuple | None
    num_dense: int
    capacity: int | None
    batch: StreamBatch | None

    @property
    def rest(self) -> int:
        return (self.plan_key[0] - self.num_dense) if self.plan_key is not None else 0


def _normalised(st: GateSettings) -> GateSettings:
    """Numbers as plain Python types (threshold and decay as float, floor as int), so settings
    compare and print the same however they were given."""
    return st.replace(threshold=None if st.threshold is None else float(st.threshold),
                      ema_decay=float(st.ema_decay), floor_tokens=int(st.floor_tokens))


def _ranker_on(value, device: torch.device | None):
    """``NeuroFlow``'s ``ranker`` argument as a :class:`PatchRanker` on ``device`` (None: where it is): a
    path is loaded; None and anything else pass through (:class:`GateSettings` refuses a wrong type)."""
    if isinstance(value, (str, os.PathLike)):
        value = PatchRanker.load(value)
    return value.to(device) if isinstance(value, PatchRanker) and device is not None else value


def _check_probe_reference(probe_layers: int, settings: GateSettings) -> None:
    """A probe's gate keeps last-computed layer-l states: the EMA reference is not implemented
    there, and the layer-0 ``signal`` has no meaning."""
    if probe_layers and settings.reference != "computed":
        raise ValueError(f"probe_layers={probe_layers} needs reference='computed' (the gate compares each patch's "
                         f"layer-{probe_layers} state with its state when last computed), got "
                         f"reference={settings.reference!r}")
    if probe_layers and settings.ranker is not None:
        raise ValueError(f"a ranker orders patches by their layer-0 surprise; with probe_layers={probe_layers} the "
                         f"gate decides on layer-{probe_layers} states: drop ranker or probe_layers")
    if probe_layers and settings.signal != "embedding":
        raise ValueError(f"signal={settings.signal!r} chooses a layer-0 signal; with probe_layers={probe_layers} the "
                         f"gate decides on layer-{probe_layers} states: drop signal or probe_layers")


def _is_plain_id(i) -> bool:
    if isinstance(i, (str, int)) and not isinstance(i, bool):
        return True
    return isinstance(i, tuple) and all(_is_plain_id(x) for x in i)


def _module_bytes(module: nn.Module) -> int:
    """Parameters and buffers of ``module`` (each tensor once, even when shared)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
