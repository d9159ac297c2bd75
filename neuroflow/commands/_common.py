"""What ``neuroflow demo``, ``run`` and ``serve`` share: the gate options (``add_gate_arguments``,
``gate_kwargs``, from ``_gate_options``), one-line errors, the library's loading,
device and output-folder errors mapped to :class:`CommandError` (with the option names and exit
codes of the command line), the progress bar and zero-shot tagging with the checkpoint's own text
tower."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from ..models.loading import (
    DTYPES,
    DeviceError,
    LoadedModel,
    ModelLoadError,
    build_default_model,
    default_device,
    one_line,
    quiet_transformers,
)
from ..models.loading import load_model as _load_model
from ..models.loading import pick_device as _pick_device
from ..video.output_folder import OutputFolderError
from ..video.output_folder import prepare_output_folder as _prepare_output_folder
from ._gate_options import add_gate_arguments, chosen_archs, gate_kwargs

__all__ = [
    "DTYPES", "CommandError", "LoadedModel", "Progress", "ZeroShotTagger", "add_gate_arguments", "build_default_model",
    "chosen_archs", "default_device", "gate_kwargs", "load_model", "one_line", "parse_labels", "pick_device", "prepare_output_folder", "print_error", "print_warning",
    "quiet_transformers", "synchronize",
]


class CommandError(Exception):
    """A problem the user can fix; printed as one line, the process exits with ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def print_error(command: str, message: str) -> None:
    """``neuroflow COMMAND: error: MESSAGE`` on stderr."""
    print(f"neuroflow {command}: error: {one_line(message, limit=1000)}", file=sys.stderr, flush=True)


def print_warning(command: str, message: str) -> None:
    """``neuroflow COMMAND: warning: MESSAGE`` on stderr."""
    print(f"neuroflow {command}: warning: {one_line(message, limit=2000)}", file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    """``--device NAME`` -> ``torch.device``; a bad name is a usage error (exit status 2)."""
    try:
        return _pick_device(name)
    except DeviceError as exc:
        raise CommandError(f"--{exc}", code=2) from exc


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """:func:`neuroflow.models.loading.load_model`, its :class:`ModelLoadError` as a CommandError (exit 1)."""
    try:
        return _load_model(path, dtype, device)
    except ModelLoadError as exc:
        raise CommandError(str(exc)) from exc


def prepare_output_folder(path: str | Path) -> Path:
    """:func:`neuroflow.video.output_folder.prepare_output_folder`, its error as a CommandError (exit 1)."""
    try:
        return _prepare_output_folder(path)
    except OutputFolderError as exc:
        raise CommandError(str(exc)) from exc


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
        self.sigmoid_scores = loaded.adapter.spec.sigmoid_scores
        text_config = model.config.text_config
        kwargs = dict(truncation=True, return_tensors="pt", max_length=int(text_config.max_position_embeddings))
        kwargs["padding"] = "max_length" if self.sigmoid_scores else True
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
        return torch.sigmoid(logits) if self.sigmoid_scores else torch.softmax(logits, dim=-1)
