"""Checks on everything a caller hands the engine; each raises before any state is touched."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from .gate_settings import (  # noqa: F401  (the engine's checks, re-exported)
    check_budget,
    check_ema_decay,
    check_floor_tokens,
    check_max_staleness,
    check_reference,
    check_scene_cut,
    check_threshold,
)
from .models import VisionAdapter


def check_frames(pixel_values: torch.Tensor, adapter: VisionAdapter, check_finite: bool = True) -> tuple[int, int]:
    """Validate a batch of frames ``[B, C, H, W]``; return its patch grid ``(H/p, W/p)``."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor [B, C, H, W], got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must have shape [B, C, H, W] (one frame per stream), got shape {tuple(pixel_values.shape)}"
        )
    b, c, h, w = pixel_values.shape
    if b == 0:
        raise ValueError("pixel_values holds no frame (B = 0)")
    if c != adapter.num_channels:
        raise ValueError(f"pixel_values has {c} channels, the model expects {adapter.num_channels}")
    p = adapter.patch_size
    if h < p or w < p or h % p or w % p:
        raise ValueError(f"frame size {h}x{w} is not a positive multiple of the patch size {p}")
    if pixel_values.dtype != adapter.dtype:
        raise TypeError(
            f"pixel_values dtype {pixel_values.dtype} does not match the model dtype {adapter.dtype}; "
            f"convert with pixel_values.to({adapter.dtype})"
        )
    if pixel_values.device != adapter.device:
        raise ValueError(
            f"pixel_values are on {pixel_values.device}, the model is on {adapter.device}; "
            f"move them with pixel_values.to('{adapter.device}')"
        )
    if check_finite:
        bad = ~torch.isfinite(pixel_values).flatten(1).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"pixel_values contain NaN or Inf in batch row(s) {rows}; no stream was updated")
    return h // p, w // p


def check_stream_ids(stream_ids: Sequence[Hashable] | None, batch: int) -> list[Hashable]:
    """Default ``range(B)``; otherwise B distinct hashable ids."""
    if stream_ids is None:
        return list(range(batch))
    if isinstance(stream_ids, torch.Tensor):
        stream_ids = stream_ids.tolist()
    if isinstance(stream_ids, (str, bytes)) or not isinstance(stream_ids, Sequence):
        raise TypeError("stream_ids must be a sequence (list or tuple) with one id per batch row")
    ids = list(stream_ids)
    if len(ids) != batch:
        raise ValueError(f"got {len(ids)} stream ids for a batch of {batch} frames")
    for i in ids:
        if not isinstance(i, Hashable) or (isinstance(i, float) and math.isnan(i)):
            raise TypeError(f"stream id {i!r} is not usable as a key (must be hashable and equal to itself)")
    if len(set(ids)) != len(ids):
        dup = sorted({repr(i) for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate stream ids in one batch: {', '.join(dup)} (one frame per stream per call)")
    return ids
