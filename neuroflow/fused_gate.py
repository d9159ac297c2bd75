"""The gate as one fused operation over a batch of frames, and the cache scatter.

``gate(...)`` embeds the frames (patch convolution + position embedding), compares each patch with
its stream's EMA, updates the EMA in place, applies the threshold and floor, and packs the computed
tokens of every frame (prefix tokens, then active patches in ascending order) into one
``[T, D]`` batch with ``cu_seqlens``: the input the packed encoder takes. ``cache_scatter(...)``
writes packed encoder outputs back into a per-stream cache.

Each has a Triton path (``kernels/gate.py``: two launches for the gate, no host synchronisation)
and a PyTorch reference with the same signature; :mod:`neuroflow.dispatch` picks one and records
it. The reference is the unfused chain (conv, add, cosine, compare, sort, gather) built on
:func:`neuroflow.gate.gate_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dispatch
from .gate import gate_reference as _decide

MAX_FLOOR = 16
"""Largest ``min(floor_tokens, N)`` the kernel handles (it keeps that many candidates per block)."""

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocates every kernel output; tests swap it for one that poisons (NaN, sentinels) to prove
    the kernels write each element they return."""
    return torch.empty(*shape, dtype=dtype, device=device)


@dataclass
class PackedFrames:
    """The gate's output for B frames of N patches, P prefix tokens per frame.

    Attributes:
        surprise: ``[B, N]`` float32, ``1 - cos(h, EMA)`` (``inf`` on first frames).
        active: ``[B, N]`` bool.
        cu_seqlens: ``[B + 1]`` int32; segment b = frame b's P prefix tokens then its active patches.
        index: ``[B * (P + N)]`` int32, position in the frame's token sequence of each packed
            token (prefix j -> j, patch n -> P + n); rows past ``cu_seqlens[-1]`` are unused.
        packed: ``[B * (P + N), D]`` model dtype, layer-0 embeddings of the packed tokens; rows past
            ``cu_seqlens[-1]`` are unused (not written).
        num_prefix: P.
    """

    surprise: torch.Tensor
    active: torch.Tensor
    cu_seqlens: torch.Tensor
    index: torch.Tensor
    packed: torch.Tensor
    num_prefix: int

    @property
    def max_seqlen(self) -> int:
        """Upper bound on a segment's length, known without a device sync."""
        return self.num_prefix + self.active.shape[1]


def _check(frames, weight, pos_embed, prefix, ema, slot, first) -> tuple[int, int, int]:
    b, c, h, w = frames.shape
    d, wc, p, p2 = weight.shape
    if wc != c or p != p2 or h % p or w % p:
        raise ValueError(f"frames {tuple(frames.shape)} do not fit a {p}x{p2} patch weight over {wc} channels")
    n = (h // p) * (w // p)
    if pos_embed.shape != (n, d) or prefix.shape[1:] != (d,):
        raise ValueError(f"position embeddings {tuple(pos_embed.shape)} / prefix {tuple(prefix.shape)} do not fit N={n}, D={d}")
    if ema.dim() != 3 or ema.shape[1:] != (n, d) or not ema.is_floating_point():
        raise ValueError(f"EMA pool must be [S, {n}, {d}] float, got {tuple(ema.shape)} {ema.dtype}")
    if slot.shape != (b,) or first.shape != (b,):
        raise ValueError("slot and first need one entry per frame")
    return n, d, p


def gate(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    prefix: torch.Tensor,
    ema: torch.Tensor,
    slot: torch.Tensor,
    first: torch.Tensor,
    threshold: float,
    ema_decay: float,
    floor_tokens: int,
    config: dict | None = None,
    force_active: torch.Tensor | None = None,
) -> PackedFrames:
    """Gate and pack a batch of frames, one per stream; updates ``ema`` in place.

    Args:
        frames: ``[B, C, H, W]`` model dtype (fp32, fp16 or bf16).
        weight: patch-embedding convolution weight ``[D, C, p, p]``; bias ``[D]`` or None.
        pos_embed: ``[N, D]`` position embeddings of the frame's patch grid, model dtype.
        prefix: ``[P, D]`` layer-0 embeddings of the prefix tokens (P = 0 for SigLIP).
        ema: ``[S, N, D]`` float32 EMA pool; row ``slot[b]`` belongs to frame b's stream.
        slot: ``[B]`` int64. first: ``[B]`` bool, the stream's first frame (EMA := h).
        config: kernel launch settings (tests); default per device.
        force_active: optional ``[B, N]`` bool replacing the threshold/floor decision (first frames
            stay dense); the reference path runs it.
    """
    n, d, p = _check(frames, weight, pos_embed, prefix, ema, slot, first)
    unsupported = None
    if force_active is not None:
        unsupported = "a forced active mask"
    elif torch.is_grad_enabled() and (frames.requires_grad or weight.requires_grad or pos_embed.requires_grad):
        unsupported = "gradients are needed and the kernel is forward-only"
    elif isinstance(threshold, torch.Tensor) or isinstance(ema_decay, torch.Tensor):
        unsupported = "per-frame thresholds or decays"
    elif frames.dtype not in _TRITON_DTYPES or ema.dtype != torch.float32:
        unsupported = f"dtype {frames.dtype} with EMA {ema.dtype}"
    elif min(floor_tokens, n) > MAX_FLOOR:
        unsupported = f"floor of {min(floor_tokens, n)} tokens (the kernel keeps at most {MAX_FLOOR} candidates)"
    elif not ema.is_contiguous():
        unsupported = "non-contiguous EMA pool"
    elif frames.device.type == "cpu" and frames.dtype == torch.bfloat16:
        unsupported = "bfloat16 under the Triton interpreter (its bf16 arithmetic is broken)"
    if dispatch.choose("gate", frames.device, unsupported) == dispatch.REFERENCE:
        return gate_reference(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay,
                              floor_tokens, force_active)
    return _gate_triton(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay,
                        floor_tokens, n, d, p, config)


def gate_reference(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay, floor_tokens,
                   force_active=None) -> PackedFrames:
    """Same contract as :func:`gate`, as the unfused PyTorch chain."""
    n, d, p = _check(frames, weight, pos_embed, prefix, ema, slot, first)
    h = F.conv2d(frames, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed
    decided = _decide(h, ema[slot], first, threshold, ema_decay, floor_tokens, force_active)
    with torch.no_grad():
        ema.index_copy_(0, slot, decided.ema.to(ema.dtype))
    b, num_prefix = frames.shape[0], prefix.shape[0]
    counts = decided.counts + num_prefix
    cu = torch.zeros(b + 1, dtype=torch.int32, device=frames.device)
    cu[1:] = torch.cumsum(counts, 0)
    tokens = torch.cat([prefix.to(h.dtype).expand(b, -1, -1), h], dim=1)  # [B, P + N, D]
    computed = torch.cat([torch.ones(b, num_prefix, dtype=torch.bool, device=h.device), decided.active], dim=1)
    rows, pos = computed.nonzero(as_tuple=True)
    cap = b * (num_prefix + n)
    packed = tokens.new_empty(cap, d)
    index = torch.empty(cap, dtype=torch.int32, device=h.device)
    packed[: rows.shape[0]] = tokens[rows, pos]
    index[: rows.shape[0]] = pos.to(torch.int32)
    return PackedFrames(decided.surprise, decided.active, cu, index, packed, num_prefix)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _gate_triton(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay, floor_tokens,
                 n, d, p, config) -> PackedFrames:
    from neuroflow.kernels.gate import GATE_CONFIG, gate_embed_kernel, gate_pack_kernel

    cfg = dict(GATE_CONFIG)
    if dispatch.interpreting():
        # The interpreter pays per program and per loop step, not per element: one tile per frame.
        cfg.update(BLOCK_P=min(256, _next_pow2(n)), BLOCK_D=_next_pow2(d), BLOCK_K=_next_pow2(weight[0].numel()))
    cfg.update(config or {})
    b = frames.shape[0]
    k = weight[0].numel()
    num_prefix = prefix.shape[0]
    floor_k = min(floor_tokens, n)
    kf = _next_pow2(max(1, floor_k))
    nb = triton_cdiv(n, cfg["BLOCK_P"])
    dev = frames.device
    w2 = weight.reshape(d, k).contiguous()
    pe = pos_embed.contiguous()
    has_bias = bias is not None
    bias_arg = bias if has_bias else w2
    ieee = frames.dtype == torch.float32
    first_i8 = first.to(torch.int8)
    slot = slot.to(torch.int64)

    surprise = _empty(b, n, dtype=torch.float32, device=dev)
    bcount = _empty(b, nb, dtype=torch.int32, device=dev)
    cand_val = _empty(b, nb, kf, dtype=torch.float32, device=dev)
    cand_idx = _empty(b, nb, kf, dtype=torch.int32, device=dev)
    grid = (nb, b)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    embed = dispatch.launchable(gate_embed_kernel, dev)
    pack = dispatch.launchable(gate_pack_kernel, dev)
    sx = frames.stride()
    embed[grid](
        frames, w2, bias_arg, pe, ema, slot, first_i8, surprise, bcount, cand_val, cand_idx,
        sx[0], sx[1], sx[2], sx[3], n, d, k, frames.shape[3] // p, nb, float(threshold), float(ema_decay),
        PATCH=p, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"], KF=kf,
        HAS_BIAS=has_bias, IEEE=ieee, **launch,
    )
    cap = b * (num_prefix + n)
    active = _empty(b, n, dtype=torch.int8, device=dev)
    cu = _empty(b + 1, dtype=torch.int32, device=dev)
    index = _empty(cap, dtype=torch.int32, device=dev)
    packed = _empty(cap, d, dtype=frames.dtype, device=dev)
    pack[grid](
        frames, w2, bias_arg, pe, prefix.to(frames.dtype).contiguous(), first_i8, surprise, bcount, cand_val, cand_idx,
        active, cu, index, packed,
        sx[0], sx[1], sx[2], sx[3], b, n, d, k, frames.shape[3] // p, nb, float(threshold), floor_k,
        PATCH=p, NUM_PREFIX=num_prefix, BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_NB=_next_pow2(nb), BLOCK_C=_next_pow2(nb * kf), KF=kf, HAS_BIAS=has_bias, IEEE=ieee, **launch,
    )
    return PackedFrames(surprise, active.bool(), cu, index, packed, num_prefix)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cache_scatter(cache: torch.Tensor, slot: torch.Tensor, src: torch.Tensor, cu_seqlens: torch.Tensor,
                  index: torch.Tensor) -> None:
    """``cache[slot[b], index[t]] = src[t]`` for every packed token t of frame b (in place).

    Args:
        cache: ``[S, T_tok, D]`` contiguous, any float dtype. slot: ``[B]`` int64.
        src: ``[T_cap, D]`` packed rows (only rows before ``cu_seqlens[-1]`` are read).
        cu_seqlens: ``[B + 1]`` int32. index: ``[T_cap]`` int32 token positions (as the gate gives).
    """
    unsupported = None if cache.is_contiguous() and src.stride(-1) == 1 else "non-contiguous cache or rows"
    if dispatch.choose("cache_scatter", cache.device, unsupported) == dispatch.REFERENCE:
        return cache_scatter_reference(cache, slot, src, cu_seqlens, index)
    from neuroflow.kernels.gate import SCATTER_CONFIG, cache_scatter_kernel

    b = slot.shape[0]
    cap = src.shape[0]
    cfg = dict(SCATTER_CONFIG)
    if dispatch.interpreting():
        cfg.update(BLOCK_T=max(16, _next_pow2(cap)), BLOCK_D=_next_pow2(cache.shape[2]))
    grid = (triton_cdiv(cap, cfg["BLOCK_T"]),)
    dispatch.launchable(cache_scatter_kernel, cache.device)[grid](
        src, cache, slot.to(torch.int64), cu_seqlens, index, b, cache.shape[1], cache.shape[2], src.stride(0),
        BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_B=_next_pow2(b),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def cache_scatter_reference(cache, slot, src, cu_seqlens, index) -> None:
    """Same contract as :func:`cache_scatter`, in PyTorch (one host sync for the token count)."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(cu_seqlens[-1])
    frame = torch.repeat_interleave(torch.arange(slot.shape[0], device=slot.device), counts)
    with torch.no_grad():
        cache[slot[frame], index[:total].long()] = src[:total].to(cache.dtype)


def compile_cases():
    """Default GPU configurations of the gate kernels, for ``neuroflow.compile_check``."""
    from neuroflow.compile_check import CompileCase
    from neuroflow.kernels.gate import GATE_CONFIG, SCATTER_CONFIG, cache_scatter_kernel, gate_embed_kernel, gate_pack_kernel

    cases = []
    g = GATE_CONFIG
    for dt, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for patch, kf in ((16, 4), (14, 16)):
            tiles = dict(PATCH=patch, BLOCK_P=g["BLOCK_P"], BLOCK_D=g["BLOCK_D"], BLOCK_K=g["BLOCK_K"], KF=kf,
                         HAS_BIAS=True, IEEE=False)
            ptr = f"*{ty}"
            embed_sig = {
                "px_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "pe_ptr": ptr, "ema_ptr": "*fp32", "slot_ptr": "*i64",
                "first_ptr": "*i8", "surprise_ptr": "*fp32", "bcount_ptr": "*i32", "cand_val_ptr": "*fp32",
                "cand_idx_ptr": "*i32", "sx_b": "i32", "sx_c": "i32", "sx_h": "i32", "sx_w": "i32", "N": "i32",
                "D": "i32", "K": "i32", "GW": "i32", "NB": "i32", "threshold": "fp32", "decay": "fp32",
            }
            embed_sig.update({name: "constexpr" for name in tiles})
            cases.append(CompileCase(f"gate_embed {ty} p{patch} KF{kf}", gate_embed_kernel, embed_sig, tiles,
                                     g["num_warps"], g["num_stages"], uses_dot=True))
            pack_tiles = dict(tiles, NUM_PREFIX=1, BLOCK_NB=256, BLOCK_C=256 * kf)
            pack_sig = {
                "px_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "pe_ptr": ptr, "prefix_ptr": ptr, "first_ptr": "*i8",
                "surprise_ptr": "*fp32", "bcount_ptr": "*i32", "cand_val_ptr": "*fp32", "cand_idx_ptr": "*i32",
                "active_ptr": "*i8", "cu_ptr": "*i32", "index_ptr": "*i32", "packed_ptr": ptr,
                "sx_b": "i32", "sx_c": "i32", "sx_h": "i32", "sx_w": "i32", "B": "i32", "N": "i32", "D": "i32",
                "K": "i32", "GW": "i32", "NB": "i32", "threshold": "fp32", "floor_k": "i32",
            }
            pack_sig.update({name: "constexpr" for name in pack_tiles})
            cases.append(CompileCase(f"gate_pack {ty} p{patch} KF{kf}", gate_pack_kernel, pack_sig, pack_tiles,
                                     g["num_warps"], g["num_stages"], uses_dot=True))
        s = SCATTER_CONFIG
        scatter_tiles = dict(BLOCK_T=s["BLOCK_T"], BLOCK_D=s["BLOCK_D"], BLOCK_B=32)
        scatter_sig = {"src_ptr": f"*{ty}", "cache_ptr": f"*{ty}", "slot_ptr": "*i64", "cu_ptr": "*i32",
                       "index_ptr": "*i32", "B": "i32", "T_TOK": "i32", "D": "i32", "src_stride": "i32"}
        scatter_sig.update({name: "constexpr" for name in scatter_tiles})
        cases.append(CompileCase(f"cache_scatter {ty}", cache_scatter_kernel, scatter_sig, scatter_tiles,
                                 s["num_warps"], s["num_stages"]))
    return cases
