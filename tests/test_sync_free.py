"""A steady-state step on the kernel path makes no host-synchronising call from NeuroFlow's code.

Under the Triton interpreter every tensor is on the CPU, so a sync cannot be timed; instead the
calls that synchronise on a GPU are intercepted and recorded when the *direct caller* is a file of
the ``neuroflow`` package: ``Tensor.item/tolist/__bool__/__int__/__float__/__index__/nonzero/
cpu/numpy``, ``torch.nonzero``, indexing with a bool tensor (``x[mask]``, ``x[mask] = y``: the
result size needs a device read) and ``torch.cuda.synchronize``. Not counted: calls made inside
``neuroflow/reference/`` (the CPU reference and the interpreter-only offset checks; the test
asserts every op took its kernel) and reads of :class:`neuroflow.capacity.HostCount`'s host copy
(pinned memory written by a copy the host already waited for, never a device tensor).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import neuroflow
from conftest import make_model, video
from neuroflow import NeuroFlow, dispatch

PACKAGE = str(Path(neuroflow.__file__).parent)
REFERENCE = str(Path(PACKAGE) / "reference")
METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


class SyncRecorder:
    def __init__(self):
        self.calls: list[str] = []

    def _record(self, what: str, tensor=None) -> None:
        caller = sys._getframe(2)
        path = caller.f_code.co_filename
        if not path.startswith(PACKAGE) or path.startswith(REFERENCE):
            return
        if tensor is not None and getattr(tensor, "_neuroflow_host_copy", False):
            return
        self.calls.append(f"{what} at {Path(path).relative_to(PACKAGE)}:{caller.f_lineno}")

    def install(self, monkeypatch) -> "SyncRecorder":
        for name in METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(self_, *args, __original=original, __name=name, **kwargs):
                recorder._record(f"Tensor.{__name}", self_)
                return __original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)
        recorder = self
        nonzero = torch.nonzero

        def torch_nonzero(*args, **kwargs):
            recorder._record("torch.nonzero")
            return nonzero(*args, **kwargs)

        monkeypatch.setattr(torch, "nonzero", torch_nonzero)
        for name in ("__getitem__", "__setitem__"):
            original = getattr(torch.Tensor, name)

            def indexing(self_, index, *rest, __original=original, __name=name):
                parts = index if isinstance(index, tuple) else (index,)
                if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                    recorder._record(f"bool-mask Tensor.{__name}")
                return __original(self_, index, *rest)

            monkeypatch.setattr(torch.Tensor, name, indexing)
        sync = torch.cuda.synchronize

        def cuda_sync(*args, **kwargs):
            recorder._record("torch.cuda.synchronize")
            return sync(*args, **kwargs)

        monkeypatch.setattr(torch.cuda, "synchronize", cuda_sync)
        return self


CASES = [("siglip", "A"), ("siglip", "B"), ("siglip", "C"), ("siglip", "KV"), ("clip", "C"),
         ("dinov2_registers", "KV")]


def _steady_state_syncs(monkeypatch, family, arch, **options):
    model = make_model(family)
    nf = NeuroFlow(model, arch=arch, threshold=0.02, ema_decay=0.2, floor_tokens=3, **options)
    frames = torch.stack([video(5, seed=0), video(5, seed=1)], dim=1)  # [F, 2, 3, H, W]
    recorder = SyncRecorder()
    for t in range(frames.shape[0]):
        if t == 2:  # first frames (dense) and one more to learn the bucket: warm-up
            recorder.install(monkeypatch)
        out = nf(frames[t], stream_ids=["x", "y"])
        assert dispatch.last_path["gate"] == dispatch.TRITON
        if arch != "A":
            assert dispatch.last_path["varlen_attention"] == dispatch.TRITON
        if arch in ("C", "KV"):
            assert dispatch.last_path["cache_scatter"] == dispatch.TRITON
    monkeypatch.undo()
    assert dispatch.fallbacks == []
    return recorder.calls, out, nf


@pytest.mark.parametrize("family,arch", CASES)
def test_steady_state_step_makes_no_host_sync(triton_path, monkeypatch, family, arch):
    # check_finite=True defers the check on CUDA only; "deferred" makes the CPU do what CUDA does.
    calls, out, nf = _steady_state_syncs(monkeypatch, family, arch, check_finite="deferred")
    assert calls == []
    assert nf.overflowed_frames == 0
    assert out.pooler_output is not None or out.last_hidden_state is not None


# Gate options that run in the kernels (the select launch), and partial-depth / 8-bit KV caches.
OPTION_CASES = [
    ("siglip", "C", dict(budget=0.5)),  # a static bound: the capacity is capped by the budget
    ("siglip", "KV", dict(reference="computed", max_staleness=2, motion_norm=True)),
    ("clip", "C", dict(max_staleness=3, budget=20)),
    ("siglip", "KV", dict(kv_layers=1)),
    ("dinov2_registers", "KV", dict(kv_layers=1, cache_dtype=torch.int8)),
    ("siglip", "KV", dict(cache_dtype=torch.int8, budget=0.25)),
]


@pytest.mark.parametrize("family,arch,options", OPTION_CASES,
                         ids=[f"{f}-{a}-{'-'.join(o)}" for f, a, o in OPTION_CASES])
def test_steady_state_step_with_gate_options_and_cache_layouts_makes_no_host_sync(triton_path, monkeypatch,
                                                                                 family, arch, options):
    calls, out, nf = _steady_state_syncs(monkeypatch, family, arch, check_finite="deferred", **options)
    assert calls == []
    assert nf.overflowed_frames == 0
    if "budget" in options:  # the budget caps every later frame: the bucket never exceeds it
        n = out.active_mask.shape[1]
        assert (out.active_mask.sum(dim=1) <= nf.gate_settings.budget_count(n)).all()


def test_the_recorder_catches_the_exact_count_read(triton_path, monkeypatch):
    """``capacity="exact"`` reads the token count on the host (what every call did before the
    capacity buckets): the recorder must see it, so the test above can fail."""
    calls, _, _ = _steady_state_syncs(monkeypatch, "siglip", "C", capacity="exact")
    assert any(c.startswith("Tensor.tolist at architectures.py") for c in calls), calls


def test_scene_cut_under_auto_capacity_packs_exactly(triton_path, monkeypatch):
    """A scene cut makes a keyframe dense whatever the bucket: ``capacity="auto"`` then reads the
    count (documented sync) instead of cutting the keyframe."""
    calls, _, nf = _steady_state_syncs(monkeypatch, "siglip", "C", scene_cut=0.9)
    assert any(c.startswith("Tensor.tolist at architectures.py") for c in calls), calls
    assert nf.overflowed_frames == 0


def test_the_recorder_catches_the_eager_finiteness_check(triton_path, monkeypatch):
    """The eager finiteness check (a device read per call) is seen too; the default defers it on
    a GPU only, so here it is forced."""
    calls, _, _ = _steady_state_syncs(monkeypatch, "siglip", "B", check_finite="eager")
    assert any("validation.py" in c for c in calls), calls
