"""The per-layer gate (``NeuroFlow(layer_threshold=...)``, Architecture KV): at every cached layer
a computed patch goes on only while its key moved by more than the threshold against its cached
key; the others drop out, their deeper caches and outputs kept.

None is today's engine bit for bit; with a threshold the engine follows the independent oracle
(tests/oracle.py, ``layer_threshold``: keys from the model's own modules, Python loops) in its
per-layer decisions, outputs and ``token_layers``; first frames and keyframes stay dense; the
sync-free path (gate kernels under the interpreter, a capacity bucket, the buffers compacted in
place) makes the same decisions as the reference path; bad settings are refused.
"""

import pytest
import torch

import oracle
from conftest import as_double, make_model, video
from helpers import assert_same_state, assert_same_up_to_rounding, stream_tensor
from neuroflow import NeuroFlow
from neuroflow.engine.engine import KEYFRAME, PARTIAL
from neuroflow.ops import dispatch
from neuroflow.tooling.testing import assert_close

LAYERS = 3
# A partial-frame gate without keyframes; the layer threshold is set where these tiny random
# models' keys drop some patches and keep others, under transformers 5.17's and 5.25's initialisations
GATE = dict(arch="KV", threshold=0.005, floor_tokens=2, reference="computed", max_staleness=3, keyframe_every=None,
            keyframe_drift=None)
LAYER_THRESHOLD = 0.005


def _run(nf, frames, ids=("cam",)):
    outs = []
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            outs.append(nf(frames[t : t + 1].expand(len(ids), -1, -1, -1).clone(), stream_ids=list(ids)))
    return outs


def test_none_is_todays_engine():
    model, frames = make_model("dinov2", layers=LAYERS), video(5)
    today, off = NeuroFlow(model, **GATE), NeuroFlow(model, layer_threshold=None, **GATE)
    assert off.layer_threshold is None and off._config() == today._config()
    for t, (a, b) in enumerate(zip(_run(off, frames), _run(today, frames))):
        for field in ("active_mask", "last_hidden_state", "pooler_output", "token_layers"):
            assert torch.equal(getattr(a, field), getattr(b, field)), f"frame {t}: {field}"
    assert_same_state(off.stream_state_dict(), today.stream_state_dict())


def _oracle_pair(model, frames, **opts):
    args = dict(reference="computed", max_staleness=GATE["max_staleness"], layer_threshold=LAYER_THRESHOLD, **opts)
    r32 = oracle.run_stream(model, frames, "KV", GATE["threshold"], 0.0, GATE["floor_tokens"], **args)
    r64 = oracle.run_stream(as_double(model), frames.double(), "KV", GATE["threshold"], 0.0, GATE["floor_tokens"],
                            masks=[r["active"] for r in r32], layer_keeps=[r["layer_keeps"] for r in r32], **args)
    return r32, r64


@pytest.mark.parametrize("family", ["dinov2", "clip", "siglip", "dinov2_registers"])
def test_follows_the_oracle(family):
    """Layer-0 decisions, per-layer drops (through token_layers and the cached keys), the written
    caches and the outputs, frame by frame."""
    model, frames = make_model(family, layers=LAYERS), video(6)
    nf = NeuroFlow(model, layer_threshold=LAYER_THRESHOLD, **GATE)
    dropped = 0
    with torch.inference_mode():
        r32, r64 = _oracle_pair(model, frames)
        for t in range(frames.shape[0]):
            out = nf(frames[t : t + 1], stream_ids=["cam"])
            assert torch.equal(out.active_mask[0], r32[t]["active"]), f"frame {t}: layer-0 decisions differ"
            assert int(out.token_layers[0]) == r32[t]["token_layers"], f"frame {t}: token-layers differ"
            keeps = r32[t]["layer_keeps"]
            dropped += sum(not k for keep in keeps.values() for k in keep)
            if out.pooler_output is not None:
                assert_close(out.pooler_output[0], r64[t]["pooled"], r32[t]["pooled"], f"frame {t} pooled")
            assert_close(out.last_hidden_state[0], r64[t]["seq"], r32[t]["seq"], f"frame {t} tokens")
    assert dropped >= 2, "no patch dropped out at a layer: the test would not see the per-layer gate"


def test_first_frames_and_keyframes_stay_dense():
    model, frames = make_model("dinov2", layers=LAYERS), video(7)
    nf = NeuroFlow(model, layer_threshold=1.99, **{**GATE, "keyframe_every": 3})  # everything else drops
    t_tok = nf.adapter.num_prefix + 30
    kinds = set()
    for t, out in enumerate(_run(nf, frames)):
        kind = int(out.frame_kind[0])
        kinds.add(kind)
        if kind == KEYFRAME:
            assert int(out.token_layers[0]) == t_tok * LAYERS, f"frame {t}"
        else:
            # Prefix tokens run every layer; the patches compute their layer-0 key, then drop.
            active = int(out.active_mask.sum())
            assert int(out.token_layers[0]) == nf.adapter.num_prefix * LAYERS + active, f"frame {t}"
    assert kinds == {KEYFRAME, PARTIAL}


def test_a_dropped_patch_keeps_its_deeper_cache():
    """A patch that drops at layer l keeps its keys at layers >= l and its output as they were."""
    model, frames = make_model("dinov2", layers=LAYERS), video(4)
    nf = NeuroFlow(model, layer_threshold=1.99, **GATE)
    with torch.inference_mode():
        nf(frames[:1], stream_ids=["cam"])
        keys, cache = stream_tensor(nf, "cam", "kv_k").clone(), stream_tensor(nf, "cam", "cache").clone()
        out = nf(frames[1:2], stream_ids=["cam"])
    p = nf.adapter.num_prefix
    active = out.active_mask[0].nonzero().flatten() + p
    assert active.numel() > 0
    new_keys, new_cache = stream_tensor(nf, "cam", "kv_k"), stream_tensor(nf, "cam", "cache")
    assert torch.equal(new_keys[:, active], keys[:, active]) and torch.equal(new_cache[active], cache[active])
    assert not torch.equal(new_cache[:p], cache[:p])  # the prefix went on


def test_sync_free_path_matches_the_reference_path(monkeypatch):
    """Gate kernels (interpreter) with a capacity bucket, so each layer compacts in place with no
    host read, against the reference path that shrinks the buffers: same decisions and counts,
    outputs and caches up to rounding; two streams, the second a frame behind."""
    pytest.importorskip("triton")
    model, frames = make_model("dinov2", layers=LAYERS), video(6)
    kernels = NeuroFlow(model, layer_threshold=LAYER_THRESHOLD, capacity=64, **GATE)
    reference = NeuroFlow(model, layer_threshold=LAYER_THRESHOLD, **GATE)
    dropped = 0
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            pair = torch.stack([frames[t], frames[max(t - 1, 0)]])
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            a = kernels(pair, stream_ids=["a", "b"])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            b = reference(pair, stream_ids=["a", "b"])
            assert torch.equal(a.active_mask, b.active_mask) and torch.equal(a.token_layers, b.token_layers), t
            dropped += int(((a.active_mask.sum(1) + 1) * LAYERS - a.token_layers).clamp_min(0).sum())
            for field in ("pooler_output", "last_hidden_state"):
                got, want = getattr(a, field), getattr(b, field)
                assert_same_up_to_rounding(got, want, want, want.double(), f"frame {t} {field}")
            for sid in ("a", "b"):
                ka, kb = stream_tensor(kernels, sid, "kv_k"), stream_tensor(reference, sid, "kv_k")
                assert_same_up_to_rounding(ka, kb, kb, kb.double(), f"frame {t} {sid} keys")
    assert dropped > 0, "no patch dropped out: the test would not see the compaction"
    assert dispatch.fallbacks == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer_threshold=2.0), r"layer_threshold must be None or a number in \[0, 2\)"),
    (dict(layer_threshold=-0.1), r"layer_threshold must be None or a number in \[0, 2\)"),
    (dict(layer_threshold=float("nan")), r"layer_threshold must be None or a number in \[0, 2\)"),
    (dict(layer_threshold=True), r"layer_threshold must be None or a number"),
    (dict(layer_threshold="0.1"), r"layer_threshold must be None or a number"),
    (dict(layer_threshold=0.1, arch="C"), "option of architecture KV, not 'C'"),
    (dict(layer_threshold=0.1, arch="B"), "option of architecture KV, not 'B'"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuroFlow(make_model("dinov2", layers=LAYERS), **{**GATE, **kwargs})


def test_works_with_a_probe_partial_depth_and_8_bit_caches():
    """With probe layers, uncached layers (they never drop) and int8 caches (the cached key is
    dequantised for the comparison), the per-layer count still follows the oracle's rule."""
    model, frames = make_model("dinov2", layers=4), video(5)
    nf = NeuroFlow(model, layer_threshold=LAYER_THRESHOLD, probe_layers=1, kv_layers=[1, 3],
                   cache_dtype=torch.int8, **GATE)
    t_tok = nf.adapter.num_prefix + 30
    for t, out in enumerate(_run(nf, frames)):
        entered = int(out.token_layers[0]) - t_tok  # the probe: one dense layer
        active = nf.adapter.num_prefix + int(out.active_mask.sum())
        assert entered <= active * 3 and (t > 0 or entered == active * 3), f"frame {t}"
        assert torch.isfinite(out.last_hidden_state).all()
