"""The whole engine through its Triton kernels (interpreter) against the engine on the reference path."""

import pytest
import torch

from conftest import as_double, dense, make_model, video
from helpers import assert_same_up_to_rounding
from neuroflow import NeuroFlow, dispatch


@pytest.mark.parametrize("family,arch", [("siglip", "C"), ("siglip", "B"), ("siglip", "A"), ("clip", "C"),
                                         ("dinov2_registers", "C"), ("siglip", "KV"), ("dinov2", "KV")])
def test_engine_through_kernels_matches_reference_path(monkeypatch, family, arch):
    pytest.importorskip("triton")
    model = make_model(family)
    model64 = as_double(model)
    frames = torch.stack([video(4, seed=0), video(4, seed=1)], dim=1)  # [F, 2, 3, H, W]
    settings = dict(arch=arch, threshold=0.02, ema_decay=0.2, floor_tokens=3)
    kernels, reference = NeuroFlow(model, **settings), NeuroFlow(model, **settings)
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
