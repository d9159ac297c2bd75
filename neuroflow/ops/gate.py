"""The gate as one fused op over a batch of frames: the launcher of ``kernels/gate.py``.

``gate(...)`` embeds the frames (patch convolution + position embedding), compares each patch with
its stream's EMA, updates the EMA in place, applies the threshold and floor, and packs the computed
tokens of every frame (prefix tokens, then active patches in ascending order) into one ``[T, D]``
batch with ``cu_seqlens``: the input the packed encoder takes.

The Triton path takes two launches and no host synchronisation; the reference with the same
contract is :func:`neuroflow.reference.gate.gate_reference`. :mod:`neuroflow.dispatch` picks one
and records it.
"""

from __future__ import annotations

import torch

from .. import dispatch
from ..gate_settings import GateSettings
from ..reference.gate import PackedFrames, as_settings, check_age_pool, check_gate_args, ema_dtype, gate_reference
from ._launch import cdiv, next_pow2

__all__ = ["MAX_FLOOR", "GateSettings", "PackedFrames", "ema_dtype", "gate", "gate_reference"]

OP = "gate"

MAX_FLOOR = 16
"""Largest ``min(floor_tokens, N)`` the kernel handles (it keeps that many candidates per block)."""

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocates every kernel output; tests swap it for one that poisons (NaN, sentinels) to prove
    the kernels write each element they return."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _unsupported(frames, weight, pos_embed, ema, st: GateSettings, n, force_active) -> str | None:
    """Why the kernel cannot take this call, or None."""
    if force_active is not None:
        return "a forced active mask"
    if torch.is_grad_enabled() and (frames.requires_grad or weight.requires_grad or pos_embed.requires_grad):
        return "gradients are needed and the kernel is forward-only"
    if isinstance(st.threshold, torch.Tensor) or isinstance(st.ema_decay, torch.Tensor):
        return "per-frame thresholds or decays"
    if frames.dtype not in _TRITON_DTYPES or ema.dtype != torch.float32:
        return f"dtype {frames.dtype} with EMA {ema.dtype}"
    if min(st.floor_tokens, n) > MAX_FLOOR:
        return f"floor of {min(st.floor_tokens, n)} tokens (the kernel keeps at most {MAX_FLOOR} candidates)"
    if not st.is_default_rule:
        options = [name for name, on in (("reference='computed'", st.reference == "computed"),
                                          ("max_staleness", st.max_staleness is not None),
                                          ("budget", st.budget is not None), ("motion_norm", st.motion_norm),
                                          ("scene_cut", st.scene_cut is not None)) if on]
        return f"gate options not in the kernel yet: {', '.join(options)}"
    if not ema.is_contiguous():
        return "non-contiguous EMA pool"
    if not dispatch.gpu_launch(frames.device) and frames.dtype == torch.bfloat16:
        return "bfloat16 under the Triton interpreter (its bf16 arithmetic is broken)"
    return None


def gate(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor,
    prefix: torch.Tensor,
    ema: torch.Tensor,
    slot: torch.Tensor,
    first: torch.Tensor,
    threshold: GateSettings | float,
    ema_decay: float | None = None,
    floor_tokens: int | None = None,
    config: dict | None = None,
    force_active: torch.Tensor | None = None,
    age: torch.Tensor | None = None,
) -> PackedFrames:
    """Gate and pack a batch of frames, one per stream; updates ``ema`` in place.

    Args:
        frames: ``[B, C, H, W]`` model dtype (fp32, fp16 or bf16).
        weight: patch-embedding convolution weight ``[D, C, p, p]``; bias ``[D]`` or None.
        pos_embed: ``[N, D]`` position embeddings of the frame's patch grid, model dtype.
        prefix: ``[P, D]`` layer-0 embeddings of the prefix tokens (P = 0 for SigLIP).
        ema: ``[S, N, D]`` float32 EMA pool; row ``slot[b]`` belongs to frame b's stream.
        slot: ``[B]`` int64. first: ``[B]`` bool, the stream's first frame (EMA := h).
        threshold: a :class:`GateSettings` (then ``ema_decay`` and ``floor_tokens`` stay None), or
            the paper's three settings ``threshold, ema_decay, floor_tokens`` as numbers.
        config: kernel launch settings (tests); default per device.
        force_active: optional ``[B, N]`` bool replacing the threshold/floor decision (first frames
            stay dense); the reference path runs it.
        age: ``[S, N]`` int32 age pool (frames since each patch was last computed), needed exactly
            when ``max_staleness`` is set; updated in place at the frames' slots like ``ema``.
    """
    n, d, p = check_gate_args(frames, weight, pos_embed, prefix, ema, slot, first)
    st = as_settings(threshold, ema_decay, floor_tokens)
    check_age_pool(st, age, ema)
    unsupported = _unsupported(frames, weight, pos_embed, ema, st, n, force_active)
    if dispatch.choose(OP, frames.device, unsupported) == dispatch.REFERENCE:
        return gate_reference(frames, weight, bias, pos_embed, prefix, ema, slot, first, st,
                              force_active=force_active, age=age)
    return _gate_triton(frames, weight, bias, pos_embed, prefix, ema, slot, first, st.threshold, st.ema_decay,
                        st.floor_tokens, n, d, p, config)


def _gate_triton(frames, weight, bias, pos_embed, prefix, ema, slot, first, threshold, ema_decay, floor_tokens,
                 n, d, p, config) -> PackedFrames:
    from ..kernels.gate import GATE_CONFIG, gate_embed_kernel, gate_pack_kernel

    dev = frames.device
    cfg = dict(GATE_CONFIG)
    if not dispatch.gpu_launch(dev):
        # The interpreter pays per program and per loop step, not per element: one tile per frame.
        cfg.update(BLOCK_P=min(256, next_pow2(n)), BLOCK_D=next_pow2(d), BLOCK_K=next_pow2(weight[0].numel()))
    cfg.update(config or {})
    b = frames.shape[0]
    k = weight[0].numel()
    num_prefix = prefix.shape[0]
    floor_k = min(floor_tokens, n)
    kf = next_pow2(max(1, floor_k))
    nb = cdiv(n, cfg["BLOCK_P"])
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
        BLOCK_NB=next_pow2(nb), BLOCK_C=next_pow2(nb * kf), KF=kf, HAS_BIAS=has_bias, IEEE=ieee, **launch,
    )
    return PackedFrames(surprise, active.bool(), cu, index, packed, num_prefix)


def compile_cases():
    """Launches of the gate's default GPU configuration to compile for sm_80/sm_90
    (``python -m neuroflow.compile_check``) at the largest frames the engine is for, so the pack
    kernel's per-frame block tables are full size: SigLIP-base geometry at 1792 px (16-px patches,
    D 768, floor 4) and so400m geometry at 1792 px (14-px patches, D 1152, floor 16), one CLS
    token, in each dtype the kernel accepts on a GPU. Nothing runs: the launches are recorded."""
    from ..compile_check import CompileCase

    def launcher(dtype, patch, dim, floor):
        def run():
            side = 1792 // patch * patch
            n = (side // patch) ** 2
            gate(torch.empty(2, 3, side, side, dtype=dtype), torch.empty(dim, 3, patch, patch, dtype=dtype),
                 torch.empty(dim, dtype=dtype), torch.empty(n, dim, dtype=dtype), torch.empty(1, dim, dtype=dtype),
                 torch.empty(3, n, dim), torch.tensor([0, 2]), torch.tensor([False, True]), 0.35, 0.01, floor)
        return run

    return [
        CompileCase(f"gate {str(dtype).removeprefix('torch.')} p{patch} d{dim} floor{floor}",
                    launcher(dtype, patch, dim, floor), uses_dot=True)
        for dtype in (torch.float16, torch.bfloat16)
        for patch, dim, floor in ((16, 768, 4), (14, 1152, 16))
    ]
