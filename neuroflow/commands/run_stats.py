"""Timing and scoring for ``neuroflow run``: each call of every engine (and of the dense model with
``--compare-dense``) timed on the same batch, and per architecture the latencies, sparsity and
fidelity (cosine of pooled embeddings to dense) that the summary reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..models.pooling import dense_forward, pooled_output
from ._common import synchronize


@dataclass
class ArchStats:
    """Per-architecture measurements; ``steady_*``: calls in which no stream had its first frame."""

    arch: str
    call_ms: list[float] = field(default_factory=list)
    steady_ms: list[float] = field(default_factory=list)
    frames: int = 0
    steady_frames: int = 0
    sparsity: list[float] = field(default_factory=list)  # frames after each stream's first
    fidelity: list[float] = field(default_factory=list)  # frames after each stream's first

    def add_call(self, ms: float, steady: bool, frames: int) -> None:
        self.call_ms.append(ms)
        self.frames += frames
        if steady:
            self.steady_ms.append(ms)
            self.steady_frames += frames


@dataclass
class CallResult:
    """One batch through every contender.

    Attributes:
        outs: each engine's ``NeuroFlowOutput`` (the first architecture's is the one written).
        call_ms: each engine's call time in ms.
        dense_pooled: the dense model's pooled ``[B, D_out]`` (``--compare-dense``), else None.
        dense_ms: its call time, else None.
    """

    outs: list
    call_ms: list[float]
    dense_pooled: torch.Tensor | None = None
    dense_ms: float | None = None

    @property
    def main(self):
        return self.outs[0]

    def fidelity(self) -> list[float] | None:
        """Per frame: cosine of the first architecture's pooled embedding to dense (None without)."""
        return None if self.dense_pooled is None else cosine_to_dense(self.main, self.dense_pooled).tolist()


def cosine_to_dense(out, dense_pooled: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32 on the CPU: cosine of ``out``'s pooled embedding to the dense one."""
    return torch.nn.functional.cosine_similarity(pooled_output(out).float(), dense_pooled.float(), dim=-1).cpu()


def timed(fn: Callable, device: torch.device):
    """``(fn(), milliseconds)``, the device synchronised around the call."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, 1e3 * (time.perf_counter() - t0)


def run_contenders(engines: Sequence, adapter, x: torch.Tensor, ids: list[str], compare_dense: bool,
                   device: torch.device) -> CallResult:
    """``x`` ``[B, 3, H, W]`` (model dtype and device) through the dense model (when
    ``compare_dense``) and every engine, each timed."""
    dense_pooled = dense_ms = None
    if compare_dense:
        dense_pooled, dense_ms = timed(lambda: dense_forward(adapter, x), device)
    outs, call_ms = [], []
    for nf in engines:
        out, ms = timed(lambda nf=nf: nf(x, stream_ids=ids), device)
        outs.append(out)
        call_ms.append(ms)
    return CallResult(outs, call_ms, dense_pooled, dense_ms)


def score(stats: Sequence[ArchStats], dense: ArchStats, result: CallResult) -> None:
    """Add one call to every architecture's stats (and the dense model's). Sparsity and fidelity
    count only frames after each stream's first (first frames are dense by design); a call with a
    first frame in it is not ``steady``."""
    first = result.main.first_frame
    steady = not bool(first.any())
    later = ~first.cpu()
    for st, out, ms in zip(stats, result.outs, result.call_ms, strict=True):
        st.add_call(ms, steady, out.sparsity.shape[0])
        st.sparsity.extend(out.sparsity.float().cpu()[later].tolist())
        if result.dense_pooled is not None:
            st.fidelity.extend(cosine_to_dense(out, result.dense_pooled)[later].tolist())
    if result.dense_ms is not None:
        dense.add_call(result.dense_ms, steady, len(first))


def arch_summary(st: ArchStats, dense: ArchStats) -> dict:
    """One architecture's summary row; its speedup is over the dense calls of the same batches."""
    use_steady = bool(st.steady_ms)
    ms = st.steady_ms if use_steady else st.call_ms
    frames = st.steady_frames if use_steady else st.frames
    row = {
        "arch": st.arch,
        "frames": st.frames,
        "sparsity": statistics.mean(st.sparsity) if st.sparsity else None,
        "fps": 1e3 * frames / sum(ms) if ms and sum(ms) > 0 else None,
        "ms_per_call_p50": statistics.median(ms) if ms else None,
        "timing_basis": "calls without a first frame" if use_steady else "all calls",
    }
    if dense.call_ms:
        dms = dense.steady_ms if use_steady else dense.call_ms
        row["dense_fps"] = 1e3 * frames / sum(dms) if sum(dms) > 0 else None
        row["dense_ms_per_call_p50"] = statistics.median(dms)
        row["speedup"] = sum(dms) / sum(ms) if sum(ms) > 0 else None
        row["fidelity"] = statistics.mean(st.fidelity) if st.fidelity else None
        row["fidelity_min"] = min(st.fidelity) if st.fidelity else None
    return row
