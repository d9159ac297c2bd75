"""The cache scatter in plain PyTorch: the reference ``kernels/cache_scatter.py`` is tested against,
with the 8-bit quantisation rule (:func:`quantize_rows`) both paths implement."""

from __future__ import annotations

import torch

QUANT_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
"""Largest magnitude an 8-bit cache stores: ``scale = absmax / QUANT_MAX``."""


def quantize_rows(x: torch.Tensor, groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-group absmax quantisation: ``x`` ``[..., D]`` -> (``[..., D]`` in ``dtype``,
    scales ``[..., groups]`` float32) with ``D = groups * group_size``.

    ``scale = absmax / QUANT_MAX[dtype]`` over each group's channels (fp32); the group is stored
    as ``x / scale`` (correctly rounded fp32 division) rounded half away from zero and clamped to
    +-127 for int8, cast (round to nearest even) for float8_e4m3fn; an all-zero group is stored as
    zeros with scale 0. Dequantised: ``stored.float() * scale``.
    """
    qmax = QUANT_MAX[dtype]
    g = x.float().reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    scale = g.abs().amax(dim=-1) / qmax
    y = g / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    if dtype == torch.int8:
        y = (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-qmax, qmax)
    return y.to(dtype).reshape(x.shape), scale


def cache_scatter_reference(cache, slot, src, cu_seqlens, index, scale=None) -> None:
    """Same contract as :func:`neuroflow.ops.cache_scatter.cache_scatter`, in PyTorch (one host sync for the token count)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(cu_seqlens[-1])
    frame = torch.repeat_interleave(torch.arange(slot.shape[0], device=slot.device), counts)
    rows, pos = slot[frame], index[:total].long()
    with torch.no_grad():
        if scale is None:
            cache[rows, pos] = src[:total].to(cache.dtype)
        else:
            values, scales = quantize_rows(src[:total], scale.shape[-1], cache.dtype)
            cache[rows, pos] = values
            scale[rows, pos] = scales.to(scale.dtype)
