"""neuroflow.engine.memory.streams_that_fit against what the engine really allocates."""

import pytest
import torch
from transformers import SiglipVisionConfig

from conftest import make_model, video
from neuroflow import NeuroFlow
from neuroflow.engine.memory import GIB, streams_that_fit

CASES = [
    ("vit", dict(arch="KV")),
    ("vit", dict(arch="KV", kv_layers=1)),
    ("dinov2", dict(arch="KV", kv_layers=range(0, 3, 2), cache_dtype=torch.float16)),
    ("dinov2_registers", dict(arch="C")),
    ("clip", dict(arch="C", cls_readout="active")),
    ("siglip", dict(arch="C")),
    ("siglip", dict(arch="C", head_cache=False)),
    ("siglip", dict(arch="A")),
    ("siglip", dict(arch="KV", kv_layers=[1])),
    ("vit", dict(arch="KV", cache_dtype=torch.int8)),
    ("dinov2", dict(arch="KV", kv_layers=2, cache_dtype=torch.int8)),
]


def _storage_bytes(model) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("family,settings", CASES)
def test_the_streams_that_fit_are_what_the_pools_allocate(family, settings):
    model, frames = make_model(family, layers=3), video(2)
    probe = streams_that_fit(model, 40, 48, gib=1, **settings)
    per, weights = probe.per_stream["total"], probe.weight_bytes
    assert weights == _storage_bytes(model)
    reserve = 3 * per  # any stated reserve, here a few streams' worth
    gib = (weights + reserve + 6.5 * per) / GIB
    fit = streams_that_fit(model, 40, 48, gib=gib, reserve_gib=reserve / GIB, **settings)
    assert fit.streams == 6 and fit.tokens == NeuroFlow(model).adapter.num_prefix + 30
    assert fit.state_bytes(fit.streams) <= fit.state_budget_bytes < fit.state_bytes(fit.streams + 1)
    nf = NeuroFlow(model, threshold=0.02, **settings)
    with torch.inference_mode():  # all streams in one call: exactly that many slots
        nf(torch.stack([frames[0]] * fit.streams), stream_ids=list(range(fit.streams)))
        nf(torch.stack([frames[1]] * fit.streams), stream_ids=list(range(fit.streams)))
    assert nf.state_bytes() == fit.state_bytes(fit.streams)
    assert nf.streams_that_fit(40, 48, gib, reserve_gib=reserve / GIB) == fit


def test_streams_admitted_one_call_at_a_time_hold_up_to_twice_the_slots():
    """The documented growth policy: capacity max(needed, 2 x capacity, 4)."""
    model, frames = make_model("vit"), video(1)
    nf = NeuroFlow(model, arch="KV")
    per = streams_that_fit(nf, 40, 48, gib=1).per_stream["total"]
    held = []
    with torch.inference_mode():
        for s in range(9):
            nf(frames, stream_ids=[s])
            held.append(nf.state_bytes() // per)
    assert held == [4, 4, 4, 4, 8, 8, 8, 8, 16]
    assert all(slots < 2 * (s + 1) or slots == 4 for s, slots in enumerate(held))


def test_a_config_gives_the_same_answer_as_its_model():
    model = make_model("dinov2", layers=2)
    for settings in (dict(arch="KV"), dict(arch="KV", kv_layers=1), dict(arch="C")):
        from_model = streams_that_fit(model, 56, 40, gib=0.01, **settings)
        from_config = streams_that_fit(model.config, 56, 40, gib=0.01, **settings)
        assert from_config == from_model
    half = streams_that_fit(model.config, 56, 40, gib=0.01, dtype=torch.float16, arch="KV")
    assert half.weight_bytes * 2 == from_model.weight_bytes
    assert half.per_stream["kv_k"] * 2 == streams_that_fit(model, 56, 40, gib=0.01, arch="KV").per_stream["kv_k"]


def test_siglip_so400m_at_1792_px():
    """The so400m geometry (27 layers, hidden 1152, patch 14): 1792 px is a 128 x 128 grid, 16,384
    tokens. Built on the meta device, nothing allocated."""
    so400m = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, patch_size=14, image_size=384)
    kv = streams_that_fit(so400m, 1792, 1792, gib=80, reserve_gib=10, dtype=torch.float16, arch="KV")
    c = streams_that_fit(so400m, 1792, 1792, gib=80, reserve_gib=10, dtype=torch.float16, arch="C")
    third = streams_that_fit(so400m, 1792, 1792, gib=80, reserve_gib=10, dtype=torch.float16, arch="KV",
                             kv_layers=range(2, 27, 3))
    assert kv.tokens == c.tokens == 128 * 128 == 16_384
    assert kv.per_stream["kv_k"] == 27 * 16_384 * 1152 * 2
    assert third.per_stream["kv_k"] == 9 * 16_384 * 1152 * 2
    assert c.per_stream["ema"] == 16_384 * 1152 * 4  # float32 whatever the model dtype
    assert c.per_stream["cache"] == c.per_stream["head_k"] == 16_384 * 1152 * 2
    assert 0.38e9 < kv.weight_bytes / 2 < 0.45e9, "so400m's vision tower has about 0.4 B parameters"
    for fit in (kv, c, third):
        assert fit.streams == (80 * GIB - fit.weight_bytes - 10 * GIB) // fit.per_stream["total"]
    assert c.streams > third.streams > kv.streams >= 1


def test_bad_requests_are_rejected():
    model = make_model("siglip")
    nf = NeuroFlow(model)
    with pytest.raises(ValueError, match="gib"):
        streams_that_fit(model, 40, 48, gib=0)
    with pytest.raises(ValueError, match="reserve_gib"):
        streams_that_fit(model, 40, 48, gib=1, reserve_gib=-1)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        streams_that_fit(model, 41, 48, gib=1)
    with pytest.raises(ValueError, match="pass settings to the NeuroFlow"):
        streams_that_fit(nf, 40, 48, gib=1, arch="KV")
    with pytest.raises(ValueError, match="option of architecture KV"):
        streams_that_fit(model, 40, 48, gib=1, arch="C", kv_layers=1)
    with pytest.raises(TypeError, match="transformers config"):
        streams_that_fit("siglip", 40, 48, gib=1)
    tiny = streams_that_fit(model, 40, 48, gib=1e-9)
    assert tiny.streams == 0 and tiny.state_budget_bytes < 0
