"""Packed encoder rows back into per-stream caches: the launcher of ``kernels/cache_scatter.py``
(reference: :func:`neuroflow.reference.cache_scatter.cache_scatter_reference`).

With ``scale`` the same op writes an 8-bit cache (int8 or float8_e4m3fn): each row is quantised
per group of channels (one group per attention head for key/value caches) with an absmax scale
(:func:`neuroflow.reference.cache_scatter.quantize_rows`), stored next to it in ``scale``. One op,
not two: the quantising write is a cache scatter whose store converts, and every caller (the
stream state's undo included) keeps one entry point. The attention reads such a cache with
``varlen_attention(..., k_scale=, v_scale=)``.
"""

from __future__ import annotations

import torch

from . import dispatch
from ..reference.cache_scatter import QUANT_MAX, cache_scatter_reference, quantize_rows
from ._launch import CompileCase, cdiv, next_pow2

__all__ = ["cache_scatter", "cache_scatter_reference", "quantize_rows"]

OP = "cache_scatter"


def _check(cache, slot, src, cu_seqlens, index, scale) -> None:
    if scale is None:
        return
    if cache.dtype not in QUANT_MAX:
        raise TypeError(f"a quantising scatter writes an int8 or float8_e4m3fn cache, got {cache.dtype}")
    if not src.is_floating_point():
        raise TypeError(f"a quantising scatter takes floating-point rows, got {src.dtype}")
    if scale.dtype not in (torch.float32, torch.float16):
        raise TypeError(f"scale must be float32 or float16, got {scale.dtype}")
    if scale.dim() != 3 or scale.shape[:2] != cache.shape[:2] or scale.shape[2] < 1 or cache.shape[2] % scale.shape[2]:
        raise ValueError(f"scale must be [S, T_tok, groups] with groups dividing D, got {tuple(scale.shape)} "
                         f"for a cache of {tuple(cache.shape)}")
    if scale.device != cache.device:
        raise ValueError(f"scale is on {scale.device}, the cache on {cache.device}")


def cache_scatter(cache: torch.Tensor, slot: torch.Tensor, src: torch.Tensor, cu_seqlens: torch.Tensor,
                  index: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """``cache[slot[b], index[t]] = src[t]`` for every packed token t of frame b (in place).

    Args:
        cache: ``[S, T_tok, D]`` contiguous, any float dtype (or int8 / float8_e4m3fn).
        slot: ``[B]`` int64.
        src: ``[T_cap, D]`` packed rows (only rows before ``cu_seqlens[-1]`` are read).
        cu_seqlens: ``[B + 1]`` int32. index: ``[T_cap]`` int32 token positions (as the gate gives).
        scale: optional ``[S, T_tok, G]`` contiguous float32/float16 with ``G`` dividing ``D``: the
            cache is 8-bit and each written row is quantised per group of ``D / G`` channels;
            ``scale[slot[b], index[t], g]`` receives group g's scale. Without it the rows are
            converted to the cache's dtype (an 8-bit cache then takes raw 8-bit rows, e.g. to undo
            a write).
    """
    _check(cache, slot, src, cu_seqlens, index, scale)
    unsupported = None if cache.is_contiguous() and src.stride(-1) == 1 else "non-contiguous cache or rows"
    if scale is not None and not scale.is_contiguous():
        unsupported = "non-contiguous scales"
    if scale is not None and cache.dtype == torch.float8_e4m3fn and dispatch.wants_triton(cache.device):
        if not dispatch.gpu_launch(cache.device):
            unsupported = "float8 stores under the Triton interpreter (it does not round to nearest even)"
        elif cache.device.type == "cuda" and torch.cuda.get_device_capability(cache.device) < (8, 9):
            unsupported = "float8 caches need sm_89 or newer"
    if dispatch.choose(OP, cache.device, unsupported) == dispatch.REFERENCE:
        return cache_scatter_reference(cache, slot, src, cu_seqlens, index, scale)
    from ..kernels.cache_scatter import CACHE_SCATTER_CONFIG, cache_scatter_kernel

    b = slot.shape[0]
    cap = src.shape[0]
    groups = scale.shape[2] if scale is not None else 1
    group_size = cache.shape[2] // groups
    cfg = dict(CACHE_SCATTER_CONFIG)
    if not dispatch.gpu_launch(cache.device):
        cfg.update(BLOCK_T=max(16, next_pow2(cap)), BLOCK_D=next_pow2(cache.shape[2]))
    if scale is not None:
        cfg["BLOCK_D"] = max(16, next_pow2(group_size))  # one group per step
    grid = (cdiv(cap, cfg["BLOCK_T"]),)
    launch = dispatch.launchable(cache_scatter_kernel, cache.device)[grid]
    args = (src, cache, slot.to(torch.int64), cu_seqlens, index, scale if scale is not None else cache,
            b, cache.shape[1], cache.shape[2], src.stride(0), groups, group_size)
    meta = dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_B=next_pow2(b),
                QUANT=scale is not None, QMAX=QUANT_MAX.get(cache.dtype, 0.0), QINT=cache.dtype == torch.int8,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cache.device.type == "cuda":
        with torch.cuda.device(cache.device):
            launch(*args, **meta)
    else:
        launch(*args, **meta)


def compile_cases():
    """Launches of the default GPU configuration (``python -m neuroflow.tooling.compile_check``): a
    SigLIP-base row width (768) for 32 streams, in every float dtype a cache can have, and the
    quantising write of fp16 / fp32 / bf16 rows into an int8 cache (12 heads of 64)."""
    def launcher(dtype, cache_dtype=None):
        def run():
            streams, tokens, dim = 32, 8, 768
            cache = torch.zeros(streams + 1, tokens, dim, dtype=cache_dtype or dtype)
            scale = torch.zeros(streams + 1, tokens, 12) if cache_dtype is not None else None
            cu = torch.arange(streams + 1, dtype=torch.int32)
            cache_scatter(cache, torch.arange(streams), torch.zeros(streams, dim, dtype=dtype), cu,
                          torch.zeros(streams, dtype=torch.int32), scale)
        return run

    def name(dt):
        return str(dt).removeprefix("torch.")

    return ([CompileCase(f"cache_scatter {name(dt)}", launcher(dt)) for dt in (torch.float16, torch.bfloat16, torch.float32)]
            + [CompileCase(f"cache_scatter {name(dt)} -> int8", launcher(dt, torch.int8))
               for dt in (torch.float16, torch.bfloat16, torch.float32)])
