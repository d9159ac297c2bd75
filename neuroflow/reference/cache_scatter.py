"""The cache scatter in plain PyTorch: the reference ``kernels/cache_scatter.py`` is tested against."""

from __future__ import annotations

import torch


def cache_scatter_reference(cache, slot, src, cu_seqlens, index) -> None:
    """Same contract as :func:`neuroflow.ops.cache_scatter.cache_scatter`, in PyTorch (one host sync for the token count)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(cu_seqlens[-1])
    frame = torch.repeat_interleave(torch.arange(slot.shape[0], device=slot.device), counts)
    with torch.no_grad():
        cache[slot[frame], index[:total].long()] = src[:total].to(cache.dtype)
