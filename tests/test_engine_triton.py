"""The whole engine through its Triton kernels (interpreter) against the engine on the reference path."""

import pytest
import torch

from conftest import as_double, dense, make_model, video
from helpers import assert_same_up_to_rounding
from helpers import PaperFlow
from neuroflow import NeuroFlow
from neuroflow.ops import dispatch
from neuroflow.tooling.testing import assert_close


@pytest.mark.parametrize("family,arch", [("siglip", "C"), ("siglip", "B"), ("siglip", "A"), ("clip", "C"),
                                         ("dinov2_registers", "C"), ("siglip", "KV"), ("dinov2", "KV")])
def test_engine_through_kernels_matches_reference_path(monkeypatch, family, arch):
    pytest.importorskip("triton")
    model = make_model(family)
    model64 = as_double(model)
    frames = torch.stack([video(4, seed=0), video(4, seed=1)], dim=1)  # [F, 2, 3, H, W]
    settings = dict(arch=arch, threshold=0.02, ema_decay=0.2, floor_tokens=3)
    kernels, reference = PaperFlow(model, **settings), PaperFlow(model, **settings)
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            a = kernels(frames[t], stream_ids=["x", "y"])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            if arch != "A":  # A attends over every token with dense attention
                assert dispatch.last_path["varlen_attention"] == dispatch.TRITON
            if arch in ("C", "KV"):
                assert dispatch.last_path["cache_scatter"] == dispatch.TRITON
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            b = reference(frames[t], stream_ids=["x", "y"])
            assert dispatch.last_path["gate"] == dispatch.REFERENCE
            assert torch.equal(a.active_mask, b.active_mask)
            ref32, ref64 = dense(model, frames[t]), dense(model64, frames[t].double())
            for field in ("pooler_output", "last_hidden_state"):
                assert_same_up_to_rounding(getattr(a, field), getattr(b, field), getattr(ref32, field),
                                           getattr(ref64, field), f"frame {t} {field}")
    assert dispatch.fallbacks == []


@pytest.mark.parametrize("options", [
    dict(threshold=0.02, floor_tokens=2, reference="computed", max_staleness=2, budget=10, motion_norm=True,
         scene_cut=0.5),
    dict(threshold=None, floor_tokens=0, budget=0.3, max_staleness=1),
], ids=["all_options", "budget_only_stale"])
def test_engine_gate_options_through_kernels_match_oracle(monkeypatch, options):
    """The gate options through the kernels: decisions, ages and references as the independent
    oracle's (tests/oracle.py), with a scene cut in the clip, two streams per call, no fallback."""
    pytest.importorskip("triton")
    import oracle
    from helpers import stream_tensor

    model = make_model("siglip")
    cut = lambda seed: torch.cat([video(5, seed=seed)[:3], video(5, seed=seed + 7)[3:]])  # noqa: E731
    clips = [cut(0), cut(1)]
    opts = dict(options)
    thr, floor = opts.pop("threshold"), opts.pop("floor_tokens")
    nf = PaperFlow(model, arch="C", threshold=thr, ema_decay=0.2, floor_tokens=floor, **opts)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.inference_mode():
        want = [oracle.run_stream(model, c, "C", thr, 0.2, floor, **opts) for c in clips]
        want64 = [oracle.run_stream(as_double(model), c.double(), "C", thr, 0.2, floor, masks=[r["active"] for r in w],
                                    cuts=[r["cut"] for r in w], **opts) for c, w in zip(clips, want)]
        for t in range(5):
            out = nf(torch.stack([clips[0][t], clips[1][t]]), stream_ids=["x", "y"])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            for i, sid in enumerate(["x", "y"]):
                assert torch.equal(out.active_mask[i], want[i][t]["active"]), f"frame {t} stream {sid}"
                assert stream_tensor(nf, sid, "age").tolist() == want[i][t]["ages"]
                assert_close(stream_tensor(nf, sid, "ema"), want64[i][t]["ema"], want[i][t]["ema"], f"frame {t} reference")
    assert dispatch.fallbacks == []
    if "scene_cut" in opts:
        assert [r["cut"] for r in want[0]] == [False, False, False, True, False]


@pytest.mark.parametrize("options", [
    dict(arch="C", threshold=0.02, ema_decay=0.2, floor_tokens=3),
    dict(arch="KV", threshold=0.02, floor_tokens=2, reference="computed", max_staleness=2),
], ids=["paper_rule", "computed_stale"])
def test_engine_patch_signal_through_kernels_matches_reference_path(monkeypatch, options):
    """``signal="patch"`` through the kernels (paper rule and the options path): decisions and
    outputs as the engine on the reference path over frames that carry the stored reference
    (the pools themselves are checked op by op in tests/test_gate.py), no fallback."""
    pytest.importorskip("triton")
    model = make_model("dinov2")
    model64 = as_double(model)
    frames = torch.stack([video(4, seed=2), video(4, seed=3)], dim=1)
    kernels, reference = PaperFlow(model, signal="patch", **options), PaperFlow(model, signal="patch", **options)
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            a = kernels(frames[t], stream_ids=["x", "y"])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            b = reference(frames[t], stream_ids=["x", "y"])
            assert dispatch.last_path["gate"] == dispatch.REFERENCE
            assert torch.equal(a.active_mask, b.active_mask), f"frame {t}"
            if t:
                assert 0 < int(a.active_mask.sum()) < a.active_mask.numel(), "the test clip must gate partially"
            ref32, ref64 = dense(model, frames[t]), dense(model64, frames[t].double())
            for field in ("pooler_output", "last_hidden_state"):
                assert_same_up_to_rounding(getattr(a, field), getattr(b, field), getattr(ref32, field),
                                           getattr(ref64, field), f"frame {t} {field}")
    assert dispatch.fallbacks == []
