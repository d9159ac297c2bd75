"""Getting a vision model ready for NeuroFlow: device and dtype names, local checkpoint folders
(never a download), the random-weight default model, and quiet weight loading.

Used by the command line, distillation and the benchmarks; errors are this module's own
(:class:`ModelLoadError`, :class:`DeviceError`), each one line naming the folder or device, so
each caller words them for its users (the command line adds its option names and exit codes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .families import UnsupportedModelError, VisionAdapter
from .preprocess import Preprocessor

# config.model_type values whose AutoModel class NeuroFlow can wrap (directly or its vision tower).
SUPPORTED_MODEL_TYPES = (
    "siglip", "siglip_vision_model", "clip", "clip_vision_model", "vit", "dinov2", "dinov2_with_registers",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Model dtype names accepted by the command lines and the language-model ablation."""


class ModelLoadError(ValueError):
    """A checkpoint folder cannot be used: missing, not a ``save_pretrained`` folder, not a
    supported vision model, unloadable weights or an unreadable preprocessor config. One line
    naming the folder."""


class DeviceError(ValueError):
    """A device name that is not one, or a CUDA device on a machine without CUDA."""


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception's message on one line (the first non-empty line, whitespace collapsed,
    cut to ``limit`` characters)."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else text.strip()
    return first if len(first) <= limit else first[: limit - 3] + "..."


# -- device and dtype ------------------------------------------------------------------------------

def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(name: str | torch.device) -> torch.device:
    """``name`` -> a usable ``torch.device``.

    Raises:
        DeviceError: not a device name, or CUDA asked for where there is none.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DeviceError(f"device {name!r} is not a device name ({one_line(exc)})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name}: CUDA is not available on this machine (use cpu)")
    return device


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"float16"``, ``"bfloat16"`` (or a ``torch.dtype``) -> ``torch.dtype``.

    Raises:
        ValueError: another name.
    """
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Transformers' progress bars (loading and saving weights) off inside the block, restored
    after it: for ``--quiet`` runs and for loops that draw their own bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# -- models ----------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready for NeuroFlow.

    Attributes:
        model: the module as loaded (a vision model, or a full SiglipModel/CLIPModel).
        adapter: NeuroFlow's view of its vision tower (family, patch size, ...).
        image_size: the config's native input side in pixels.
        description: one line for summaries.
        random_weights: True when built here with random weights (numbers are then
            correctness signals, not quality figures).
        folder: the checkpoint folder (None for a random model).
        preprocessor: resize/normalise settings (the checkpoint's, else the family's).
    """

    model: nn.Module
    adapter: VisionAdapter
    image_size: int
    description: str
    random_weights: bool
    folder: Path | None
    preprocessor: Preprocessor

    @property
    def vision(self) -> nn.Module:
        return self.adapter.model

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def patch_size(self) -> int:
        return self.adapter.patch_size

    @property
    def has_text_tower(self) -> bool:
        return hasattr(self.model, "get_text_features") and hasattr(self.model, "logit_scale")


def image_size_of(config) -> int:
    """A vision config's native input side (``image_size``, an int or a pair; 224 when absent)."""
    size = getattr(config, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def build_default_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        seed: int = 0) -> LoadedModel:
    """SigLIP-base-patch16-224's geometry with random weights (seeded): no download needed. Its
    numbers are correctness signals, not quality figures (``random_weights=True``)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig()).to(device=device, dtype=dtype).eval()
    adapter = VisionAdapter(model)
    size = image_size_of(model.config)
    return LoadedModel(model, adapter, size, "SigLIP-base-patch16-224 geometry, random weights", True, None,
                       Preprocessor.for_family(adapter.family, size))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LoadedModel:
    """A local checkpoint folder (``save_pretrained`` layout) -> :class:`LoadedModel`, in eval
    mode on ``device`` in ``dtype``. Never downloads.

    Raises:
        ModelLoadError: the folder is missing, not a Hugging Face checkpoint, not a supported
            vision model, its weights do not load, or its preprocessor config is unreadable;
            one line naming the folder.
    """
    from transformers import AutoConfig, AutoModel

    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder}: does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: a model is a checkpoint folder (save_pretrained layout), not a file")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder}: no config.json (not a checkpoint saved with save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # OSError (no config.json), ValueError (unknown model_type), JSON errors
        raise ModelLoadError(f"model folder {folder}: not a Hugging Face checkpoint ({one_line(exc)})") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model folder {folder}: model type {model_type!r} is not a supported vision model "
            f"(supported: SigLIP, CLIP, ViT, DINOv2; model types {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except Exception as exc:  # missing or mismatched weights, unreadable safetensors, ...
        raise ModelLoadError(f"model folder {folder}: cannot load the {model_type} weights ({one_line(exc)})") from exc
    try:
        adapter = VisionAdapter(model)
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"model folder {folder}: {one_line(exc)}") from exc
    model = model.to(device).eval()
    image_size = image_size_of(adapter.model.config)
    try:
        preprocessor = Preprocessor.from_pretrained(folder, adapter.family, image_size)
    except ValueError as exc:
        raise ModelLoadError(one_line(exc)) from exc
    return LoadedModel(model, adapter, image_size, f"{type(model).__name__} from {folder}", False, folder, preprocessor)
