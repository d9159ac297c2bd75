"""Preprocess: the second step of decode -> preprocess -> gate -> encoder -> readout.

:class:`Preprocessor` resizes and normalises frames (decoded :class:`neuroflow.video.decode.Frame` or
uint8 RGB arrays) as the model's own image processor does: settings from the checkpoint's
``preprocessor_config.json``, else the model family's defaults (:data:`neuroflow.models.families.FAMILIES`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .families import FAMILY_BY_NAME
from ..video.decode import Frame

# PIL resampling codes as stored in preprocessor_config.json.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}
# (1 = LANCZOS, 4 = BOX and 5 = HAMMING have no torch equivalent: the closest antialiased kernel.)


def _triple(value, name: str, source: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    raise ValueError(f"{source}: {name} must be a number or 3 numbers, got {value!r}")


def _side(value, source: str, key: str) -> tuple[int, bool]:
    """A ``size`` entry as ``(side, keep_aspect)``: ``shortest_edge`` keeps the aspect ratio,
    ``height``/``width`` resizes to that box."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, False
    if isinstance(value, dict):
        if isinstance(value.get("shortest_edge"), int):
            return value["shortest_edge"], True
        if isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
            # Frames are fed square (one patch grid per stream); every published SigLIP/ViT
            # checkpoint has height == width, a non-square one is read as its smaller side.
            return min(value["height"], value["width"]), False
    raise ValueError(f"{source}: cannot read {key}={value!r} (expected an int, height/width or shortest_edge)")


@dataclass(frozen=True)
class Preprocessor:
    """Resize, centre-crop, rescale and normalise frames as the model's image processor does.

    Geometry, as in transformers' image processors, for an output side ``size``:

    - ``keep_aspect=False`` (SigLIP, ViT): the whole frame is resized to ``r x r`` (aspect ratio
      not kept), ``r = resize`` (``== size`` unless the checkpoint also crops);
    - ``keep_aspect=True`` (CLIP, DINOv2): the shorter side is resized to ``r`` (aspect kept);
    - then the central ``size x size`` is cropped (zero-padded where the resized frame is smaller).

    At another output side than :attr:`size`, ``r`` scales with it (``r = resize * side / size``),
    so DINOv2's 256 -> 224 crop stays a 8/7 ratio. Resizing runs on uint8 with antialiasing and
    rounds back to uint8, as transformers' torchvision backend does; then
    ``(x * rescale_factor - mean) / std``.

    Attributes:
        size: default output side in pixels (the model's input size).
        mean, std: per-channel normalisation, applied after rescaling.
        resize: resize target side at the default :attr:`size`.
        keep_aspect: resize the shorter side (True) or the whole frame (False).
        rescale_factor: multiplies the 0..255 values first (None: no rescaling).
        normalize: apply mean/std.
        resample: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        source: where the settings came from (a file or ``"<family> defaults"``), for messages.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int
    keep_aspect: bool = False
    rescale_factor: float | None = 1 / 255
    normalize: bool = True
    resample: str = "bicubic"
    source: str = ""

    @classmethod
    def for_family(cls, family: str, image_size: int | None = None) -> Preprocessor:
        """The family's published settings; ``image_size`` (the model config's) replaces their 224."""
        if family not in FAMILY_BY_NAME:
            raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILY_BY_NAME)}")
        d = FAMILY_BY_NAME[family].preprocess
        size = int(image_size or d["crop"])
        mean, std = d["mean_std"]
        return cls(size=size, mean=mean, std=std, resize=round(d["resize"] * size / d["crop"]),
                   keep_aspect=d["keep_aspect"], resample=d["resample"], source=f"{family} defaults")

    @classmethod
    def from_pretrained(cls, path: str | Path | None, family: str, image_size: int | None = None) -> Preprocessor:
        """Settings from ``path/preprocessor_config.json`` when it exists, else :meth:`for_family`.

        Args:
            path: a checkpoint folder, or None.
            family: ``"siglip"``, ``"clip"``, ``"vit"`` or ``"dinov2"`` (``VisionAdapter.family``).
            image_size: the model config's ``image_size``, the default side when the checkpoint
                has no preprocessor config.
        Raises:
            ValueError: the file exists but cannot be read or understood (the message names it).
        """
        defaults = cls.for_family(family, image_size)
        file = None if path is None else Path(path) / "preprocessor_config.json"
        if file is None or not file.is_file():
            return defaults
        source = str(file)
        try:
            cfg = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{source}: cannot read ({_reason(exc)})") from exc
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object")
        mean = _triple(cfg["image_mean"], "image_mean", source) if "image_mean" in cfg else defaults.mean
        std = _triple(cfg["image_std"], "image_std", source) if "image_std" in cfg else defaults.std
        if cfg.get("size") is not None:
            resize, keep_aspect = _side(cfg["size"], source, "size")
        else:
            resize, keep_aspect = defaults.resize, defaults.keep_aspect
        size = resize
        if cfg.get("do_center_crop", False) and cfg.get("crop_size") is not None:
            size, _ = _side(cfg["crop_size"], source, "crop_size")
        if size < 1 or resize < 1:
            raise ValueError(f"{source}: sizes must be positive, got size={cfg.get('size')!r}")
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
        code = cfg.get("resample")
        resample = _RESAMPLE.get(code, defaults.resample) if isinstance(code, int) else defaults.resample
        return cls(size=size, mean=mean, std=std, resize=resize, keep_aspect=keep_aspect, rescale_factor=rescale,
                   normalize=bool(cfg.get("do_normalize", True)), resample=resample, source=source)

    # -- geometry ------------------------------------------------------------------------------
    def _resized_shape(self, height: int, width: int, side: int) -> tuple[int, int]:
        r = round(self.resize * side / self.size)
        if not self.keep_aspect:
            return r, r
        # transformers' get_resize_output_image_size(default_to_square=False): int() of the long side.
        if height <= width:
            return r, int(r * width / height)
        return int(r * height / width), r

    def view_box(self, height: int, width: int, size: int | None = None) -> tuple[float, float, float, float]:
        """The region of an ``height x width`` frame that the model sees, in frame pixels.

        Returns ``(top, left, bottom, right)`` (floats; outside the frame where the crop pads).
        Patch ``(i, j)`` of the model's ``g x g`` grid covers cell ``(i, j)`` of a ``g x g`` split
        of this box.
        """
        side = int(size or self.size)
        rh, rw = self._resized_shape(height, width, side)
        top, left = int((rh - side) / 2.0), int((rw - side) / 2.0)
        sy, sx = height / rh, width / rw
        return top * sy, left * sx, (top + side) * sy, (left + side) * sx

    # -- the transform ---------------------------------------------------------------------------
    def __call__(self, frames: Sequence[Frame | np.ndarray] | Frame | np.ndarray,
                 size: int | None = None) -> torch.Tensor:
        """Frames -> model input.

        Args:
            frames: B frames, each a :class:`Frame` (as :func:`neuroflow.video.decode.read_frames` yields) or an
                ``[H, W, 3]`` uint8 RGB array (sizes may differ between frames); a single
                ``Frame`` or ``[H, W, 3]`` array is a batch of one, a ``[B, H, W, 3]`` array a
                batch of B.
            size: output side (default :attr:`size`); the caller keeps it a multiple of the
                model's patch size.
        Returns:
            ``[B, 3, size, size]`` float32, normalised.
        """
        side = int(size or self.size)
        if side < 1:
            raise ValueError(f"size must be >= 1, got {side}")
        if isinstance(frames, Frame) or (isinstance(frames, np.ndarray) and frames.ndim == 3):
            frames = [frames]
        frames = [f.rgb if isinstance(f, Frame) else f for f in frames]
        if len(frames) == 0:
            raise ValueError("no frames to preprocess")
        out = torch.empty(len(frames), 3, side, side, dtype=torch.float32)
        # Frames of one shape (one video) are resized together: one interpolate call per shape.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, f in enumerate(frames):
            if not (isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3):
                desc = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
                raise ValueError(f"frame {i} must be a neuroflow.video.decode.Frame or a uint8 [H, W, 3] RGB array, "
                                 f"got {desc}")
            groups.setdefault(f.shape, []).append(i)
        for (h, w, _), rows in groups.items():
            x = torch.from_numpy(np.stack([frames[i] for i in rows])).permute(0, 3, 1, 2).contiguous()
            rh, rw = self._resized_shape(h, w, side)
            if (rh, rw) != (h, w):
                smooth = self.resample != "nearest"
                x = F.interpolate(x, size=(rh, rw), mode=self.resample, antialias=smooth,
                                  **({"align_corners": False} if smooth else {}))
            out[rows] = _center_crop(x, side).float()
        if self.rescale_factor is not None:
            out.mul_(self.rescale_factor)
        if self.normalize:
            out.sub_(torch.tensor(self.mean).view(1, 3, 1, 1)).div_(torch.tensor(self.std).view(1, 3, 1, 1))
        return out


def _center_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    """Central ``side x side`` of ``x [B, C, H, W]``, zero-padded where ``x`` is smaller (as
    transformers' center_crop pads)."""
    h, w = x.shape[-2:]
    if (h, w) == (side, side):
        return x
    if h < side or w < side:
        ph, pw = max(0, side - h), max(0, side - w)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int((h - side) / 2.0), int((w - side) / 2.0)
    return x[..., top : top + side, left : left + side]
