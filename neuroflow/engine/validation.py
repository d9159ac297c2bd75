"""Checks on everything a caller hands the engine; each raises before any state is touched."""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence

import torch

from ..reference.gate_settings import (  # noqa: F401  (the engine's checks, re-exported)
    check_budget,
    check_ema_decay,
    check_floor_tokens,
    check_max_staleness,
    check_reference,
    check_scene_cut,
    check_threshold,
)
from ..models.families import VisionAdapter


def warn_ineffective_settings(*, threshold: float | None = None, floor_tokens: int | None = None,
                              num_patches: int | None = None, ema_decay: float | None = None,
                              reference: str | None = None, floor_tokens_given: int | None = None,
                              threshold_none: bool = False, cls_readout: str | None = None,
                              cls_readout_used: bool = True, head_cache: bool | None = None,
                              head_cache_used: bool = True, cache_dtype=None, cache_dtype_used: bool = True,
                              where: str = "", stacklevel: int = 3) -> None:
    """Warn (``UserWarning``) about valid settings that switch the sparsity off, or that have no
    effect under the other settings (pass only settings the caller gave explicitly, never a
    preset's value, so a default never warns).

    - ``threshold < 0``: surprise ``1 - cos`` is never below 0 and a patch is active iff its
      surprise is strictly above the threshold, so every patch is computed on every frame.
    - ``floor_tokens >= num_patches`` (``num_patches``: the patch count of a frame's grid, known
      once a frame is seen): the floor alone makes every patch active.
    - ``ema_decay`` with ``reference="computed"``: the reference is the embedding as last
      computed; no EMA is kept, so the decay is unused.
    - ``floor_tokens_given > 0`` with ``threshold_none``: without a threshold every patch is a
      candidate and the budget alone picks the count, so the floor never tops a frame up.
    - ``cls_readout`` where ``cls_readout_used`` is False (it applies to CLS-pooling models under
      Architecture C only; ``where`` names the architecture and family).
    - ``head_cache`` where ``head_cache_used`` is False (it applies to SigLIP's attention-pooling
      head under Architectures C and KV only).
    - ``cache_dtype`` where ``cache_dtype_used`` is False (the architecture keeps no key/value
      cache: A, B, and C without the context readout).

    Each argument left None is not checked. ``stacklevel`` as in ``warnings.warn``; the default
    points at the caller of the function that calls this one (the engine's constructor or setter).
    """
    if threshold is not None and threshold < 0:
        warnings.warn(
            f"threshold {threshold} is below 0, the smallest possible surprise (1 - cos), so every patch is "
            "computed on every frame: the model runs dense and nothing is saved; use a threshold in [0, 2)",
            UserWarning, stacklevel=stacklevel,
        )
    if floor_tokens is not None and num_patches is not None and floor_tokens >= num_patches:
        warnings.warn(
            f"floor_tokens {floor_tokens} is not below the {num_patches} patches per frame, so the floor alone "
            "makes every patch active: the model runs dense and nothing is saved; lower floor_tokens",
            UserWarning, stacklevel=stacklevel,
        )
    if ema_decay is not None and reference == "computed":
        warnings.warn(
            f"ema_decay {ema_decay} has no effect with reference='computed' (the surprise compares each patch "
            "with its embedding as last computed; no EMA is kept): drop ema_decay, or pass reference='ema' "
            "(or preset='paper') for the EMA gate",
            UserWarning, stacklevel=stacklevel,
        )
    if floor_tokens_given and threshold_none:
        warnings.warn(
            f"floor_tokens {floor_tokens_given} has no effect with threshold=None (every patch is a candidate, "
            "so the budget alone sets the count): drop floor_tokens, or set a threshold",
            UserWarning, stacklevel=stacklevel,
        )
    if cls_readout is not None and not cls_readout_used:
        warnings.warn(
            f"cls_readout={cls_readout!r} has no effect here ({where}): it applies to CLS-pooling models "
            "(CLIP, ViT, DINOv2) under Architecture C only; drop it",
            UserWarning, stacklevel=stacklevel,
        )
    if head_cache is not None and not head_cache_used:
        warnings.warn(
            f"head_cache={head_cache!r} has no effect here ({where}): it caches the keys and values of SigLIP's "
            "attention-pooling head under Architectures C and KV only; drop it",
            UserWarning, stacklevel=stacklevel,
        )
    if cache_dtype is not None and not cache_dtype_used:
        warnings.warn(
            f"cache_dtype={cache_dtype} has no effect here ({where}): this architecture keeps no key/value cache "
            "(KV does, and C with cls_readout='context' on a CLS-pooling model); drop it",
            UserWarning, stacklevel=stacklevel,
        )


def check_frames(pixel_values: torch.Tensor, adapter: VisionAdapter, check_finite: bool = True) -> tuple[int, int]:
    """Validate a batch of frames ``[B, C, H, W]``; return its patch grid ``(H/p, W/p)``.

    Each error says how to fix the input: channels-last frames ``[B, H, W, C]`` are named as such
    (with the ``permute`` that fixes them), and raw integer pixels (uint8 0-255) are pointed to
    :class:`neuroflow.models.preprocess.Preprocessor`, since casting them to float would skip the
    normalisation the model was trained with.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor [B, C, H, W], got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        hint = ""
        if pixel_values.dim() == 3:
            hint = " (a single frame? add the batch dimension: pixel_values[None])"
        raise ValueError(
            f"pixel_values must have shape [B, C, H, W] (one frame per stream), got shape "
            f"{tuple(pixel_values.shape)}{hint}"
        )
    b, c, h, w = pixel_values.shape
    if b == 0:
        raise ValueError("pixel_values holds no frame (B = 0)")
    expected = adapter.num_channels
    if c != expected:
        if w == expected:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} looks channels-last [B, H, W, C] (its last "
                f"dimension is {w}, the model's channel count); the model expects [B, C, H, W]: "
                "pixel_values.permute(0, 3, 1, 2)"
            )
        raise ValueError(
            f"pixel_values has {c} channels in dimension 1 of shape {tuple(pixel_values.shape)} [B, C, H, W], "
            f"the model expects {expected}"
        )
    if not (pixel_values.is_floating_point() or pixel_values.is_complex()):
        raise TypeError(
            f"pixel_values dtype {pixel_values.dtype}: raw pixel values? The model expects resized, "
            f"normalised {str(adapter.dtype).removeprefix('torch.')} input, and a cast alone would feed "
            "un-normalised 0-255 values: build the input with neuroflow.models.preprocess.Preprocessor, e.g. "
            "Preprocessor.from_pretrained(checkpoint_folder, family)(frames) (resize, rescale to [0, 1], "
            "normalise with the checkpoint's mean and std)"
        )
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
