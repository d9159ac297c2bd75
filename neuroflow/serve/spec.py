"""What a serving application runs: :class:`ServeConfig` (model, engine settings, batching,
shards, faults) and :func:`build_engine`, which every shard calls to build its own engine.

The model is a local checkpoint folder (``save_pretrained`` layout; never downloaded) or, without
a folder, a SigLIP vision model with random weights built from a config (seeded, so every shard
and every restarted shard holds the same weights). Random weights are for plumbing and load
tests only; their embeddings mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.engine import PRESETS, NeuroFlow
from ..reference.gate_settings import check_batch_budget, check_keyframe_drift, check_skip_below
from ..engine.presets import DEFAULT_PRESET
from ..engine.architectures import ARCHITECTURES, check_layer_threshold
from ..engine.validation import check_ema_decay, check_floor_tokens, check_threshold
from ..models.preprocess import Preprocessor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_DTYPES = {**DTYPES, "int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
"""``cache_dtype`` names serving takes (``NeuroFlow``'s key/value cache dtypes)."""
SUPPORTED_MODEL_TYPES = (
    "siglip", "siglip_vision_model", "clip", "clip_vision_model", "vit", "dinov2", "dinov2_with_registers",
)


@dataclass
class ServeConfig:
    """One serving application.

    Attributes:
        model_name: the name requests use (``/models/{model_name}/...``; handle ``model=``).
        model_folder: a local checkpoint folder, or None for a random-weight SigLIP.
        random_config: ``SiglipVisionConfig`` fields for the random model (default: SigLIP-base
            geometry, 224 px, patch 16, 12 layers).
        seed: seed of the random weights.
        image_size: model input side in pixels (a multiple of the patch size; default: the
            model config's ``image_size``). Images are resized to it; raw pixel arrays must
            already have it.
        preset: the engine preset (``neuroflow.engine.presets.PRESETS``; default ``DEFAULT_PRESET``, the
            measured default of the library) that every gate option left at None comes from.
        arch, threshold, ema_decay, floor_tokens, reference, max_staleness, keyframe_every,
            keyframe_drift: the engine's gate settings (``neuroflow.NeuroFlow``); None: the
            preset's value. ``max_staleness=0`` means no staleness bound, ``keyframe_every=0`` no
            periodic keyframe and ``keyframe_drift=0`` no drift keyframe (the engine's None for each).
        budget, motion_norm, scene_cut, kv_layers: further engine options (None: the engine's
            default: no budget, no motion normalisation, no scene-cut test, every layer).
        skip_below, batch_budget: the frame policy's skip and the batch budget
            (``neuroflow.NeuroFlow``; None: off).
        probe_layers: architecture KV: the first l layers run densely and the gate decides on
            their output (``neuroflow.NeuroFlow``; None: the engine's default 0, layer 0).
        layer_threshold: architecture KV: the per-layer gate's threshold (``neuroflow.NeuroFlow``;
            None: off).
        signal: what the gate's surprise compares, ``"embedding"`` or ``"patch"``
            (``neuroflow.NeuroFlow``; None: the engine's default, ``"embedding"``).
        max_streams: streams each shard's engine keeps (least recently seen evicted beyond it;
            the stream's next reply says ``state_lost``); None: no bound.
        cache_dtype: the engine's key/value cache dtype by name (:data:`CACHE_DTYPES`, e.g.
            ``"int8"``); None: the model's dtype.
        capacity: the engine's packed-row capacity, ``"auto"``, ``"exact"`` or an int (rows for
            the frames that are not first frames or scheduled keyframes); None: ``"auto"``.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        device: ``"cpu"`` or ``"cuda"`` (each GPU shard gets one GPU from Ray: ``num_gpus=1``).
        num_shards: K shard actors, one engine each.
        shard_cpus: CPUs Ray reserves per shard (0 lets shards share CPUs, as in tests).
        shard_gpus: GPUs Ray reserves per shard on CUDA (1: one GPU each; 0.5: two shards per GPU).
        torch_threads: ``torch.set_num_threads`` in each shard (None: torch's default).
        max_batch: most frames one engine call takes (one per stream).
        max_wait_ms: how long a shard waits after the first queued frame for more to batch.
        vnodes: hash-ring points per shard.
        max_restarts: how often Ray restarts a dead shard (-1: always).
        retry_timeout_s: how long the front keeps retrying a frame whose shard died (same
            sequence number) before answering :class:`~neuroflow.serve.errors.ShardUnavailable`.
        shard_timeout_s: how long the front waits for one shard call before answering
            :class:`~neuroflow.serve.errors.ShardTimeout` (the stream's lock is then free).
        max_queue: frames a shard holds queued at most; beyond it a frame is refused with
            :class:`~neuroflow.serve.errors.Overloaded` (HTTP 429 with a retry-after).
        front_streams: streams the front remembers (last answered sequence number and the
            shard process that holds their state), least recently seen forgotten beyond it.
        max_image_side: larger encoded images or uint8 arrays are refused.
        app_name: Ray Serve application name; shard actors are named ``{app_name}/shard-{k}``.
        namespace: Ray namespace of the shard actors.
    """

    model_name: str = "siglip"
    model_folder: str | None = None
    random_config: dict = field(default_factory=dict)
    seed: int = 0
    image_size: int | None = None
    preset: str = DEFAULT_PRESET
    arch: str | None = None
    threshold: float | None = None
    ema_decay: float | None = None
    floor_tokens: int | None = None
    reference: str | None = None
    max_staleness: int | None = None
    budget: int | float | None = None
    motion_norm: bool | None = None
    scene_cut: float | None = None
    kv_layers: int | list | None = None
    skip_below: float | None = None
    keyframe_every: int | None = None
    keyframe_drift: float | None = None
    batch_budget: float | None = None
    probe_layers: int | None = None
    signal: str | None = None
    layer_threshold: float | None = None
    max_streams: int | None = None
    cache_dtype: str | None = None
    capacity: str | int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    num_shards: int = 2
    shard_cpus: float = 1.0
    shard_gpus: float = 1.0
    torch_threads: int | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    vnodes: int = 160
    max_restarts: int = 10
    retry_timeout_s: float = 30.0
    shard_timeout_s: float = 60.0
    max_queue: int = 1024
    front_streams: int = 100_000
    max_image_side: int = 4096
    app_name: str = "neuroflow"
    namespace: str = "neuroflow"

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad field (model files are checked by the shards)."""
        if not isinstance(self.model_name, str) or not self.model_name or "/" in self.model_name:
            raise ValueError(f"model_name must be a non-empty name without '/', got {self.model_name!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.arch is not None and self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.threshold is not None:
            check_threshold(self.threshold)
        if self.ema_decay is not None:
            check_ema_decay(self.ema_decay)
        if self.floor_tokens is not None:
            check_floor_tokens(self.floor_tokens)
        if self.max_staleness is not None and (isinstance(self.max_staleness, bool)
                                               or not isinstance(self.max_staleness, int) or self.max_staleness < 0):
            raise ValueError(f"max_staleness must be an int >= 0 (0: no bound) or None, got {self.max_staleness!r}")
        check_skip_below(self.skip_below)
        if self.keyframe_every is not None and (isinstance(self.keyframe_every, bool)
                                                or not isinstance(self.keyframe_every, int) or self.keyframe_every < 0):
            raise ValueError(f"keyframe_every must be an int >= 0 (0: no periodic keyframe) or None, "
                             f"got {self.keyframe_every!r}")
        check_keyframe_drift(self.keyframe_drift)
        check_batch_budget(self.batch_budget)
        if self.probe_layers is not None and (isinstance(self.probe_layers, bool) or not isinstance(self.probe_layers, int)
                                              or self.probe_layers < 0):
            raise ValueError(f"probe_layers must be an int >= 0 (0: the gate decides on layer 0) or None, "
                             f"got {self.probe_layers!r}")
        check_layer_threshold(self.layer_threshold)
        for name in ("max_streams",):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)} or None, got {self.cache_dtype!r}")
        if self.capacity is not None and self.capacity not in ("auto", "exact") and (
                isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1):
            raise ValueError(f"capacity must be 'auto', 'exact', an int >= 1 or None, got {self.capacity!r}")
        if not self.shard_timeout_s > 0:
            raise ValueError(f"shard_timeout_s must be > 0, got {self.shard_timeout_s!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("num_shards", "max_batch", "vnodes", "max_image_side", "max_queue", "front_streams"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"image_size must be an int >= 1, got {self.image_size!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if not self.retry_timeout_s >= 0:
            raise ValueError(f"retry_timeout_s must be >= 0, got {self.retry_timeout_s!r}")
        if not self.shard_cpus >= 0:
            raise ValueError(f"shard_cpus must be >= 0, got {self.shard_cpus!r}")
        if not 0 < self.shard_gpus <= 1 and not (self.shard_gpus >= 1 and float(self.shard_gpus).is_integer()):
            raise ValueError(f"shard_gpus must be in (0, 1] or a whole number, got {self.shard_gpus!r}")
        if self.model_folder is not None and not Path(self.model_folder).is_dir():
            raise ValueError(f"model folder {self.model_folder}: does not exist or is not a folder")

    @property
    def uses_gpu(self) -> bool:
        return self.device.startswith("cuda")


def load_vision_model(config: ServeConfig) -> torch.nn.Module:
    """The configured model on the CPU in eval mode (random weights seeded; a folder loaded locally).

    Raises:
        ValueError: the folder is not a checkpoint of a supported vision model (message names it).
    """
    dtype = DTYPES[config.dtype]
    if config.model_folder is None:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        torch.manual_seed(config.seed)
        return SiglipVisionModel(SiglipVisionConfig(**config.random_config)).to(dtype).eval()
    from transformers import AutoConfig, AutoModel

    folder = Path(config.model_folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model folder {folder}: no config.json (not a checkpoint saved with save_pretrained)")
    try:
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"model folder {folder}: not a Hugging Face checkpoint ({exc})") from exc
    if getattr(hf_config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model folder {folder}: model type {hf_config.model_type!r} is not a supported vision "
                         f"model (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        return AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype).eval()
    except Exception as exc:
        raise ValueError(f"model folder {folder}: cannot load the weights ({exc})") from exc


@dataclass
class Engine:
    """What a shard (and the front, for preprocessing) needs of the model.

    Attributes:
        nf: the NeuroFlow engine (on the shard's device).
        preprocessor: resize/normalise settings for images.
        image_size: input side in pixels.
        channels: input channels.
        dtype: the model dtype.
    """

    nf: NeuroFlow
    preprocessor: Preprocessor
    image_size: int
    channels: int
    dtype: torch.dtype


def _family(model_type: str) -> str:
    for family in ("siglip", "clip", "dinov2", "vit"):
        if model_type.startswith(family):
            return family
    raise ValueError(f"model type {model_type!r} is not a supported vision model")


def input_geometry(config: ServeConfig) -> tuple[Preprocessor, int, int]:
    """``(preprocessor, image_size, channels)`` from the model's config alone (no weights loaded),
    so the front can check and preprocess frames without holding a model."""
    if config.model_folder is None:
        from transformers import SiglipVisionConfig

        vision, family = SiglipVisionConfig(**config.random_config), "siglip"
    else:
        from transformers import AutoConfig

        folder = Path(config.model_folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"model folder {folder}: no config.json (not a checkpoint saved with save_pretrained)")
        try:
            hf = AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise ValueError(f"model folder {folder}: not a Hugging Face checkpoint ({exc})") from exc
        vision = getattr(hf, "vision_config", hf)
        if getattr(hf, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model folder {folder}: model type {getattr(hf, 'model_type', None)!r} is not a "
                             f"supported vision model (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        family = _family(hf.model_type)
    size = vision.image_size
    native = int(size[0] if isinstance(size, (tuple, list)) else size)
    patch = vision.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    side = config.image_size or native
    if side % patch:
        raise ValueError(f"image_size {side} is not a multiple of the model's patch size {patch}")
    pre = Preprocessor.from_pretrained(config.model_folder, family, native)
    return pre, side, int(getattr(vision, "num_channels", 3))


def engine_options(config: ServeConfig) -> dict:
    """The ``NeuroFlow`` keyword arguments ``config`` sets (options left at None are not passed,
    so the preset or the engine's default decides them)."""
    out = {}
    for name in ("arch", "threshold", "ema_decay", "floor_tokens", "reference", "budget", "motion_norm",
                 "scene_cut", "kv_layers", "skip_below", "batch_budget",
                 "probe_layers", "signal", "layer_threshold"):
        v = getattr(config, name)
        if v is not None:
            out[name] = v
    for name in ("max_staleness", "keyframe_every", "keyframe_drift"):  # 0: off, None: the preset's
        v = getattr(config, name)
        if v is not None:
            out[name] = v or None
    if config.cache_dtype is not None:
        out["cache_dtype"] = CACHE_DTYPES[config.cache_dtype]
    if config.capacity is not None:
        out["capacity"] = config.capacity
    return out


def build_engine(config: ServeConfig) -> Engine:
    """Load the model and wrap it in a NeuroFlow engine on ``config.device``."""
    pre, side, channels = input_geometry(config)
    model = load_vision_model(config)
    nf = NeuroFlow(model, preset=config.preset, max_streams=config.max_streams, **engine_options(config))
    nf = nf.to(torch.device(config.device))
    return Engine(nf, pre, side, channels, DTYPES[config.dtype])
