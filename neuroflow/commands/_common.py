"""What ``neuroflow demo`` and ``neuroflow run`` share: one-line errors, model loading (local
checkpoint folders only, never a download), the dense reference call, the output folder check,
the progress bar and zero-shot tagging with the checkpoint's own text tower."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import UnsupportedModelError, VisionAdapter
from ..video import Preprocessor

# config.model_type values whose AutoModel class NeuroFlow can wrap (directly or its vision tower).
SUPPORTED_MODEL_TYPES = (
    "siglip", "siglip_vision_model", "clip", "clip_vision_model", "vit", "dinov2", "dinov2_with_registers",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CommandError(Exception):
    """A problem the user can fix; printed as one line, the process exits with ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception's message on one line (the first non-empty line, whitespace collapsed)."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else text.strip()
    return first if len(first) <= limit else first[: limit - 3] + "..."


def print_error(command: str, message: str) -> None:
    """``neuroflow COMMAND: error: MESSAGE`` on stderr."""
    print(f"neuroflow {command}: error: {one_line(message, limit=1000)}", file=sys.stderr, flush=True)


# -- device and dtype ------------------------------------------------------------------------------

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise CommandError(f"--device {name!r} is not a device name ({one_line(exc)})", code=2) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine (use --device cpu)", code=2)
    return device


def quiet_transformers() -> None:
    """No progress bars from transformers (weight loading) for ``--quiet``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _image_size(config) -> int:
    size = getattr(config, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def random_siglip_base(dtype: torch.dtype, device: torch.device, seed: int = 0) -> LoadedModel:
    """SigLIP-base-patch16-224's geometry with random weights (seeded): no download needed."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig()).to(device=device, dtype=dtype).eval()
    adapter = VisionAdapter(model)
    return LoadedModel(model, adapter, _image_size(model.config),
                       "SigLIP-base-patch16-224 geometry, random weights", True, None,
                       Preprocessor.for_family(adapter.family, _image_size(model.config)))


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """A local checkpoint folder (``save_pretrained`` layout) -> :class:`LoadedModel`.

    Raises:
        CommandError: the folder is missing, not a Hugging Face checkpoint, not a supported
            vision model, its weights do not load, or its preprocessor config is unreadable;
            the message names the folder.
    """
    from transformers import AutoConfig, AutoModel

    folder = Path(path)
    if not folder.exists():
        raise CommandError(f"model folder {folder}: does not exist")
    if not folder.is_dir():
        raise CommandError(f"{folder}: --model takes a checkpoint folder (save_pretrained layout), not a file")
    if not (folder / "config.json").is_file():
        raise CommandError(f"model folder {folder}: no config.json (not a checkpoint saved with save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # OSError (no config.json), ValueError (unknown model_type), JSON errors
        raise CommandError(f"model folder {folder}: not a Hugging Face checkpoint ({one_line(exc)})") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CommandError(
            f"model folder {folder}: model type {model_type!r} is not a supported vision model "
            f"(supported: SigLIP, CLIP, ViT, DINOv2; model types {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except Exception as exc:  # missing or mismatched weights, unreadable safetensors, ...
        raise CommandError(f"model folder {folder}: cannot load the {model_type} weights ({one_line(exc)})") from exc
    try:
        adapter = VisionAdapter(model)
    except UnsupportedModelError as exc:
        raise CommandError(f"model folder {folder}: {one_line(exc)}") from exc
    model = model.to(device).eval()
    image_size = _image_size(adapter.model.config)
    try:
        preprocessor = Preprocessor.from_pretrained(folder, adapter.family, image_size)
    except ValueError as exc:
        raise CommandError(one_line(exc)) from exc
    return LoadedModel(model, adapter, image_size, f"{type(model).__name__} from {folder}", False, folder, preprocessor)


def dense_forward(adapter: VisionAdapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """The unmodified vision model on full frames: pooled ``[B, D_out]`` (CLS/first token of the
    last hidden state where the model has no pooling). Position embeddings are interpolated as
    NeuroFlow does for other resolutions than the native one."""
    model = adapter.model
    if adapter.family == "dinov2":
        out = model(pixel_values)
    else:
        out = model(pixel_values, interpolate_pos_encoding=True)
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]


# -- outputs ---------------------------------------------------------------------------------------

def prepare_output_folder(path: str | Path) -> Path:
    """Create ``path`` (and parents) and check that a file can be written in it.

    Raises:
        CommandError: naming the folder and why it cannot be written.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"output folder {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".neuroflow-write-check-"):
            pass
    except OSError as exc:
        raise CommandError(f"output folder {folder}: cannot be written ({exc.strerror or one_line(exc)})") from exc
    return folder


class Progress:
    """A progress bar on stderr (frames done, frames/s, current sparsity); silent when ``quiet``.

    ``write`` prints a line (stdout by default) without breaking the bar.
    """

    def __init__(self, total: int | None, quiet: bool, desc: str = "frames"):
        self.quiet = quiet
        self._bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, dynamic_ncols=True,
                             mininterval=0.25, smoothing=0.1)

    def update(self, frames: int, sparsity: float | None, streams: int) -> None:
        if self._bar is None:
            return
        if sparsity is not None:
            self._bar.set_postfix_str(f"sparsity {sparsity:.0%}, {streams} stream(s)", refresh=False)
        self._bar.update(frames)

    def write(self, line: str, file=None) -> None:
        """Print ``line`` above the bar (on stdout unless ``file``); errors print even when quiet."""
        file = file or sys.stdout
        if self._bar is not None:
            self._bar.write(line, file=file)
        else:
            print(line, file=file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# -- zero-shot tagging -----------------------------------------------------------------------------

def parse_labels(text: str) -> list[str]:
    """``"car, person,dog"`` -> ``["car", "person", "dog"]`` (blank and repeated entries dropped)."""
    labels: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part and part not in labels:
            labels.append(part)
    return labels


class ZeroShotTagger:
    """Scores pooled image embeddings against text labels with the checkpoint's own text tower.

    SigLIP: ``sigmoid(scale * cos + bias)`` per label (independent probabilities; prompts padded
    to the text model's full length, as SigLIP was trained). CLIP: ``softmax(scale * cos)`` over
    the labels, image embedding through ``visual_projection``. The tokenizer is loaded from the
    checkpoint folder (no download).

    Args:
        loaded: a full SiglipModel/CLIPModel checkpoint with its tokenizer files.
        labels: label names; each is put in ``template``.
        template: prompt with one ``{}`` for the label.
    Raises:
        CommandError: the checkpoint has no text tower or no tokenizer.
    """

    def __init__(self, loaded: LoadedModel, labels: list[str], template: str = "a photo of a {}."):
        if not labels:
            raise CommandError("--labels needs at least one label, e.g. --labels 'car,person,dog'", code=2)
        if "{}" not in template:
            raise CommandError(f"--label-template must contain {{}} for the label, got {template!r}", code=2)
        folder = loaded.folder
        if folder is None or not loaded.has_text_tower:
            what = "the random demo model" if folder is None else f"model folder {folder}"
            raise CommandError(
                f"{what}: --labels needs a checkpoint with a text tower (a full SiglipModel or CLIPModel "
                "folder with its tokenizer), not a vision-only model"
            )
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise CommandError(
                f"model folder {folder}: cannot load its tokenizer for --labels ({one_line(exc)})"
            ) from exc
        model = loaded.model
        self.labels = labels
        self.family = loaded.family
        text_config = model.config.text_config
        kwargs = dict(truncation=True, return_tensors="pt", max_length=int(text_config.max_position_embeddings))
        kwargs["padding"] = "max_length" if self.family == "siglip" else True
        try:
            tokens = tokenizer([template.format(label) for label in labels], **kwargs)
        except Exception as exc:
            raise CommandError(f"model folder {folder}: its tokenizer fails on the labels ({one_line(exc)})") from exc
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            text = model.get_text_features(**inputs)
            text = getattr(text, "pooler_output", text)  # transformers >= 5 returns a model output
            self.text = nn.functional.normalize(text.float(), dim=-1)  # [L, D]
            self.scale = float(model.logit_scale.float().exp())
            bias = getattr(model, "logit_bias", None)
            self.bias = float(bias.float()) if bias is not None else 0.0
        self.projection = getattr(model, "visual_projection", None)

    def scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled vision output ``[B, D]`` (NeuroFlow's ``pooler_output``) -> ``[B, L]`` float32 in
        [0, 1] (SigLIP: per-label probabilities; CLIP: a distribution over the labels)."""
        image = pooled
        if self.projection is not None:
            image = self.projection(image.to(self.projection.weight.dtype))
        image = nn.functional.normalize(image.float(), dim=-1)
        logits = self.scale * image @ self.text.T + self.bias
        return torch.sigmoid(logits) if self.family == "siglip" else torch.softmax(logits, dim=-1)
