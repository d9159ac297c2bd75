"""Packed encoder rows back into per-stream caches: the launcher of ``kernels/cache_scatter.py``
(reference: :func:`neuroflow.reference.cache_scatter.cache_scatter_reference`)."""

from __future__ import annotations

import contextlib

import torch

from .. import dispatch
from ..reference.cache_scatter import cache_scatter_reference
from ._launch import cdiv, next_pow2

__all__ = ["cache_scatter", "cache_scatter_reference"]

OP = "cache_scatter"


def cache_scatter(cache: torch.Tensor, slot: torch.Tensor, src: torch.Tensor, cu_seqlens: torch.Tensor,
                  index: torch.Tensor) -> None:
    """``cache[slot[b], index[t]] = src[t]`` for every packed token t of frame b (in place).

    Args:
        cache: ``[S, T_tok, D]`` contiguous, any float dtype. slot: ``[B]`` int64.
        src: ``[T_cap, D]`` packed rows (only rows before ``cu_seqlens[-1]`` are read).
        cu_seqlens: ``[B + 1]`` int32. index: ``[T_cap]`` int32 token positions (as the gate gives).
    """
    unsupported = None if cache.is_contiguous() and src.stride(-1) == 1 else "non-contiguous cache or rows"
    if dispatch.choose(OP, cache.device, unsupported) == dispatch.REFERENCE:
        return cache_scatter_reference(cache, slot, src, cu_seqlens, index)
    from ..kernels.cache_scatter import CACHE_SCATTER_CONFIG, cache_scatter_kernel

    b = slot.shape[0]
    cap = src.shape[0]
    cfg = dict(CACHE_SCATTER_CONFIG)
    if not dispatch.gpu_launch(cache.device):
        cfg.update(BLOCK_T=max(16, next_pow2(cap)), BLOCK_D=next_pow2(cache.shape[2]))
    grid = (cdiv(cap, cfg["BLOCK_T"]),)
    # Launch on the cache's GPU, whatever the current device is.
    guard = torch.cuda.device(cache.device) if cache.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _launch(cache_scatter_kernel, grid, cache, slot, src, cu_seqlens, index, b, cfg)


def _launch(cache_scatter_kernel, grid, cache, slot, src, cu_seqlens, index, b, cfg) -> None:
    dispatch.launchable(cache_scatter_kernel, cache.device)[grid](
        src, cache, slot.to(torch.int64), cu_seqlens, index, b, cache.shape[1], cache.shape[2], src.stride(0),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_B=next_pow2(b),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def compile_cases():
    """Launches of the default GPU configuration (``python -m neuroflow.compile_check``): a
    SigLIP-base row width (768) for 32 streams, in every float dtype a cache can have."""
    from ..compile_check import CompileCase

    def launcher(dtype):
        def run():
            streams, tokens, dim = 32, 8, 768
            cache = torch.zeros(streams + 1, tokens, dim, dtype=dtype)
            cu = torch.arange(streams + 1, dtype=torch.int32)
            cache_scatter(cache, torch.arange(streams), torch.zeros(streams, dim, dtype=dtype), cu,
                          torch.zeros(streams, dtype=torch.int32))
        return run

    return [CompileCase(f"cache_scatter {str(dt).removeprefix('torch.')}", launcher(dt))
            for dt in (torch.float16, torch.bfloat16, torch.float32)]
