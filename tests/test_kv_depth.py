"""Architecture KV with partial depth (``kv_layers``): key/value caches for only some layers.

The two ends are existing architectures, bit for bit: every layer cached is today's KV, no layer
cached is C with the active-token readout (plain C for SigLIP), and for CLS models only the last
layer cached is C's context readout. In between, the engine follows the oracle (tests/oracle.py).
"""

import pytest
import torch

import oracle
from conftest import FAMILIES, as_double, make_model, video
from helpers import assert_same_state, stream_tensor
from helpers import PaperFlow
from neuroflow import NeuroFlow
from neuroflow.tooling.testing import assert_close

GATE = dict(threshold=0.02, ema_decay=0.2, floor_tokens=3)
LAYERS = 3


def _run(nf, frames):
    """Two streams, one lagging a frame behind, so batches mix first and later frames."""
    outs = []
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            lag = max(t - 1, 0)
            out = nf(torch.stack([frames[t], frames[lag]]), stream_ids=["a", "b"])
            outs.append((out.pooler_output, out.last_hidden_state, out.active_mask))
    return outs


def _assert_identical(got, want):
    for t, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g[2], w[2]), f"frame {t}: gate decisions differ"
        assert torch.equal(g[1], w[1]), f"frame {t}: last_hidden_state differs"
        if w[0] is None:
            assert g[0] is None
        else:
            assert torch.equal(g[0], w[0]), f"frame {t}: pooler_output differs"


def _states_equal_but_config(a: NeuroFlow, b: NeuroFlow, rename: dict | None = None):
    """Same streams and same state tensors (``rename`` maps a's names to b's)."""
    rename = rename or {}
    sa, sb = a.stream_state_dict(), b.stream_state_dict()
    for pa, pb in zip(sa["pools"], sb["pools"]):
        assert pa["ids"] == pb["ids"]
        assert {rename.get(n, n) for n in pa["tensors"]} == set(pb["tensors"])
        for name, t in pa["tensors"].items():
            other = pb["tensors"][rename.get(name, name)]
            assert torch.equal(t.reshape(other.shape), other), f"state {name!r} differs"


@pytest.mark.parametrize("family", FAMILIES)
def test_all_layers_is_full_kv(family):
    model, frames = make_model(family, layers=LAYERS), video(4)
    full = PaperFlow(model, arch="KV", **GATE)
    for every in (LAYERS, range(LAYERS), [2, 0, 1]):
        nf = PaperFlow(model, arch="KV", kv_layers=every, **GATE)
        assert nf.kv_layers is None and nf._config() == full._config()
        assert nf.state_bytes_per_stream(40, 48) == full.state_bytes_per_stream(40, 48)
    _assert_identical(_run(nf, frames), _run(full, frames))
    assert_same_state(nf.stream_state_dict(), full.stream_state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_no_layer_is_c_with_the_active_readout(family):
    model, frames = make_model(family, layers=LAYERS), video(4)
    nf = PaperFlow(model, arch="KV", kv_layers=0, **GATE)
    c = PaperFlow(model, arch="C", cls_readout="active", **GATE)
    assert nf.kv_layers == () and "kv_k" not in nf.state_bytes_per_stream(40, 48)
    assert nf.state_bytes_per_stream(40, 48) == c.state_bytes_per_stream(40, 48)
    _assert_identical(_run(nf, frames), _run(c, frames))
    _states_equal_but_config(nf, c)
    if family == "siglip":  # SigLIP's C has no context readout: plain C is the same thing
        _assert_identical(_run(PaperFlow(model, arch="KV", kv_layers=[], **GATE), frames),
                          _run(PaperFlow(model, arch="C", **GATE), frames))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "siglip"])
def test_last_layer_only_is_c_with_the_context_readout(family):
    """C's context readout caches the last layer's keys/values: KV with ``kv_layers=1``."""
    model, frames = make_model(family, layers=LAYERS), video(4)
    nf = PaperFlow(model, arch="KV", kv_layers=1, **GATE)
    c = PaperFlow(model, arch="C", **GATE)
    assert nf.kv_layers == (LAYERS - 1,)
    assert nf.state_bytes_per_stream(40, 48)["total"] == c.state_bytes_per_stream(40, 48)["total"]
    _assert_identical(_run(nf, frames), _run(c, frames))
    _states_equal_but_config(nf, c, rename={"kv_k": "last_k", "kv_v": "last_v"})


@pytest.mark.parametrize("family,kv_layers", [("siglip", [1]), ("clip", range(0, LAYERS, 2)), ("dinov2", [0, 1]),
                                              ("dinov2_registers", [1]), ("vit", 2)])
def test_partial_depth_matches_the_oracle(family, kv_layers):
    threshold, decay, floor = GATE["threshold"], GATE["ema_decay"], GATE["floor_tokens"]
    model, frames = make_model(family, layers=LAYERS), video(5)
    nf = PaperFlow(model, arch="KV", kv_layers=kv_layers, **GATE)
    ids = set(nf.kv_layers)
    with torch.inference_mode():
        r32 = oracle.run_stream(model, frames, "KV", threshold, decay, floor, kv_layers=ids)
        r64 = oracle.run_stream(as_double(model), frames.double(), "KV", threshold, decay, floor,
                                masks=[r["active"] for r in r32], kv_layers=ids)
        for t in range(frames.shape[0]):
            out = nf(frames[t : t + 1], stream_ids=["cam"])
            assert torch.equal(out.active_mask[0], r32[t]["active"]), f"frame {t}: gate decisions differ"
            assert_close(out.pooler_output[0], r64[t]["pooled"], r32[t]["pooled"], f"frame {t} pooled")
            assert_close(out.last_hidden_state[0], r64[t]["seq"], r32[t]["seq"], f"frame {t} tokens")
    assert stream_tensor(nf, "cam", "kv_k").shape[0] == len(ids)


def test_partial_depth_differs_from_both_ends():
    """The middle settings are not silently one of the ends (the test above could not tell)."""
    model, frames = make_model("clip", layers=LAYERS), video(4)
    pooled = {k: _run(PaperFlow(model, arch="KV", kv_layers=k, **GATE), frames)[-1][0] for k in (0, 1, 2, 3)}
    for a in pooled:
        for b in pooled:
            if a < b:
                assert not torch.equal(pooled[a], pooled[b]), f"kv_layers={a} and {b} gave the same output"


def test_memory_report_and_state_shapes():
    model = make_model("vit", layers=4)  # D = 48, 1 prefix token; 5 x 6 patches -> 31 tokens
    full = PaperFlow(model, arch="KV").state_bytes_per_stream(40, 48)
    for kv_layers, count in ((1, 1), (range(1, 4, 2), 2), ([0, 3, 2], 3)):
        nf = PaperFlow(model, arch="KV", kv_layers=kv_layers)
        report = nf.state_bytes_per_stream(40, 48)
        assert report["kv_k"] == report["kv_v"] == count * 31 * 48 * 4
        assert report["kv_k"] * 4 == full["kv_k"] * count
        assert report["total"] == sum(v for k, v in report.items() if k != "total")
        with torch.inference_mode():
            nf(video(1))
        assert stream_tensor(nf, 0, "kv_k").shape == (count, 31, 48)
        assert nf.state_bytes() == 4 * report["total"]  # a new pool holds 4 slots
    half = PaperFlow(model, arch="KV", kv_layers=2, cache_dtype=torch.float16).state_bytes_per_stream(40, 48)
    assert half["kv_k"] == 2 * 31 * 48 * 2
    # 8-bit caches: one byte per value plus a float32 scale per cached layer, token and head (2 heads)
    q = PaperFlow(model, arch="KV", kv_layers=2, cache_dtype=torch.int8)
    q8 = q.state_bytes_per_stream(40, 48)
    assert q8["kv_k"] == 2 * 31 * 48 and q8["kv_k_scale"] == q8["kv_v_scale"] == 2 * 31 * 2 * 4
    with torch.inference_mode():
        q(video(2)[:1])
        q(video(2)[1:])
    assert stream_tensor(q, 0, "kv_k").shape == (2, 31, 48) and stream_tensor(q, 0, "kv_k_scale").shape == (2, 31, 2)


def test_state_fingerprint_includes_the_cached_layers():
    model = make_model("dinov2", layers=LAYERS)
    a = PaperFlow(model, arch="KV", kv_layers=[0, 2], **GATE)
    with torch.inference_mode():
        a(video(1))
    assert a._config()["kv_layers"] == [0, 2]
    assert PaperFlow(model, arch="KV", kv_layers=[0, 2])._config() == a._config()
    for other in (None, 2, [0, 1], 0):
        with pytest.raises(ValueError, match="incompatible"):
            PaperFlow(model, arch="KV", kv_layers=other).load_stream_state_dict(a.stream_state_dict())
    b = PaperFlow(model, arch="KV", kv_layers=(2, 0), **GATE)
    b.load_stream_state_dict(a.stream_state_dict())
    assert_same_state(a.stream_state_dict(), b.stream_state_dict())


@pytest.mark.parametrize("kv_layers,match", [
    (LAYERS + 1, r"in \[0, 3\]"), (-1, r"in \[0, 3\]"), ([0, LAYERS], "out of range"), ([-1], "out of range"),
    ([1, 1], "more than once"), ([0.5], "int layer indices"), ([True], "int layer indices"),
    (True, "None, an int or a sequence"), (1.0, "None, an int or a sequence"),
])
def test_bad_kv_layers_are_rejected(kv_layers, match):
    with pytest.raises(ValueError, match=match):
        PaperFlow(make_model("siglip", layers=LAYERS), arch="KV", kv_layers=kv_layers)


@pytest.mark.parametrize("arch", ["A", "B", "C"])
def test_kv_layers_belongs_to_kv_only(arch):
    with pytest.raises(ValueError, match="option of architecture KV"):
        PaperFlow(make_model("siglip"), arch=arch, kv_layers=1)
    assert PaperFlow(make_model("siglip"), arch=arch).kv_layers is None
