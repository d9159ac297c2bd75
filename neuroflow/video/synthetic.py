"""A deterministic synthetic static-camera video: smooth textured background, moving boxes with
known positions, sensor noise and a slow lighting drift. Needs no download.

Numbers measured on it with random-weight models are correctness checks, not quality figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SyntheticVideo:
    """Attributes:
    frames: ``[F, 3, H, W]`` float32 in [0, 1].
    boxes: ``[F, K, 4]`` int64 ``(top, left, bottom, right)`` of each moving object per frame.
    """

    frames: torch.Tensor
    boxes: torch.Tensor

    def normalized(self, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
        """Frames as model input, ``(x - mean) / std`` (SigLIP's default normalisation)."""
        return (self.frames - mean) / std


def static_camera_video(
    num_frames: int = 16,
    height: int = 224,
    width: int = 224,
    num_objects: int = 2,
    object_size: float = 0.18,
    speed: float = 0.02,
    noise: float = 0.01,
    drift: float = 0.05,
    seed: int = 0,
    background: torch.Tensor | None = None,
) -> SyntheticVideo:
    """Args:
    background: optional ``[3, h, w]`` float image in [0, 1] (e.g. a real photograph), resized to
        the frame size; default: a smooth procedural texture.
    object_size: box side as a fraction of the shorter frame side.
    speed: box motion per frame as a fraction of the frame size.
    noise: standard deviation of per-pixel Gaussian sensor noise.
    drift: total relative change of brightness over the clip (slow lighting drift).
    """
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, height).view(-1, 1)
    xx = torch.linspace(0, 1, width).view(1, -1)
    if background is None:
        background = torch.zeros(3, height, width)
        for c in range(3):
            for _ in range(4):
                fy, fx, phase = (torch.rand(3, generator=g) * torch.tensor([12.0, 12.0, 6.28])).tolist()
                background[c] += torch.sin(fy * 6.28 * yy + fx * 6.28 * xx + phase)
        background = 0.5 + 0.12 * background
    else:
        background = torch.nn.functional.interpolate(
            background[None].float(), size=(height, width), mode="bilinear", align_corners=False
        )[0].clamp(0, 1)
    side = max(2, int(object_size * min(height, width)))
    colors = torch.rand(num_objects, 3, generator=g)
    pos = torch.rand(num_objects, 2, generator=g) * torch.tensor([height - side, width - side])
    vel = (torch.rand(num_objects, 2, generator=g) - 0.5) * 2 * speed * torch.tensor([height, width])
    frames, boxes = [], []
    for t in range(num_frames):
        frame = background * (1.0 + drift * t / max(1, num_frames - 1))
        frame_boxes = []
        for k in range(num_objects):
            top, left = int(pos[k, 0]), int(pos[k, 1])
            frame[:, top : top + side, left : left + side] = colors[k].view(3, 1, 1)
            frame_boxes.append([top, left, top + side, left + side])
        frame = frame + noise * torch.randn(3, height, width, generator=g)
        frames.append(frame.clamp(0, 1))
        boxes.append(frame_boxes)
        pos += vel
        for k in range(num_objects):  # bounce off the borders
            for axis, limit in ((0, height - side), (1, width - side)):
                if not 0 <= pos[k, axis] <= limit:
                    vel[k, axis] = -vel[k, axis]
                    pos[k, axis] = pos[k, axis].clamp(0, limit)
    return SyntheticVideo(torch.stack(frames), torch.tensor(boxes, dtype=torch.int64))
