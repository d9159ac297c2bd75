"""Probe depth (``NeuroFlow(probe_layers=l)``, Architecture KV): the first l layers run densely,
the gate decides on layer-l features, the computed tokens continue with caches.

``probe_layers=0`` is today's engine bit for bit; with l > 0 the engine follows the independent
oracle (tests/oracle.py, ``probe_layers``), counts the probe in ``token_layers``, decides on the
layer-l signal (not layer 0's), rejects bad settings without touching any stream, and runs the
same decisions through the gate's kernels (interpreter) as on the reference path.
"""

import pytest
import torch

import oracle
from conftest import as_double, dense, make_model, video
from helpers import assert_same_state, assert_same_up_to_rounding, stream_tensor
from neuroflow import NeuroFlow
from neuroflow.ops import dispatch
from neuroflow.engine.engine import KEYFRAME, PARTIAL, SKIP
from neuroflow.ops import gate as gate_op
from neuroflow.ops.gate import gate_features
from neuroflow.reference.gate import gate_features_reference
from neuroflow.reference.gate_settings import GateSettings
from neuroflow.tooling.testing import assert_close

LAYERS = 3
# The measured preset's rule (last-computed reference, staleness bound) at a threshold where the
# test clips' layer-l surprises give partial frames (checked in the tests that rely on it).
GATE = dict(arch="KV", threshold=0.01, floor_tokens=2, max_staleness=2, keyframe_every=None,
            keyframe_drift=None)  # no preset keyframes


def _run(nf, frames, ids=("a", "b")):
    """Two streams, the second a frame behind, so batches mix first and later frames."""
    outs = []
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            out = nf(torch.stack([frames[t], frames[max(t - 1, 0)]]), stream_ids=list(ids))
            outs.append(out)
    return outs


def _same_outputs(got, want):
    for t, (g, w) in enumerate(zip(got, want)):
        for field in ("active_mask", "last_hidden_state", "pooler_output", "surprise", "frame_kind", "token_layers"):
            assert torch.equal(getattr(g, field), getattr(w, field)), f"frame {t}: {field} differs"


@pytest.mark.parametrize("options", [{}, dict(skip_below=0.1, keyframe_every=3, budget=0.5)], ids=["plain", "policy"])
def test_zero_is_todays_engine(options):
    model, frames = make_model("dinov2", layers=LAYERS), video(5)
    today, zero = NeuroFlow(model, **options), NeuroFlow(model, probe_layers=0, **options)
    assert zero.probe_layers == 0 and zero._config() == today._config() and "probe_layers" not in zero._config()
    _same_outputs(_run(zero, frames), _run(today, frames))
    assert_same_state(zero.stream_state_dict(), today.stream_state_dict())
    zero.load_stream_state_dict(today.stream_state_dict())  # states saved without the option still load


def _oracle_pair(model, frames, probe, **gate):
    thr, floor = gate["threshold"], gate["floor_tokens"]
    opts = dict(reference="computed", max_staleness=gate["max_staleness"])
    r32 = oracle.run_stream(model, frames, "KV", thr, 0.0, floor, probe_layers=probe, **opts)
    r64 = oracle.run_stream(as_double(model), frames.double(), "KV", thr, 0.0, floor, probe_layers=probe,
                            masks=[r["active"] for r in r32], **opts)
    return r32, r64


@pytest.mark.parametrize("family,probe", [("dinov2", 1), ("dinov2", 2), ("clip", 1), ("dinov2_registers", 2),
                                          ("siglip", 1)])
def test_partial_frames_match_the_oracle(family, probe):
    model, frames = make_model(family, layers=LAYERS), video(5)
    nf = NeuroFlow(model, probe_layers=probe, **GATE)
    n = nf.adapter.grid(40, 48)[0] * nf.adapter.grid(40, 48)[1]
    partial = 0
    with torch.inference_mode():
        r32, r64 = _oracle_pair(model, frames, probe, **GATE)
        for t in range(frames.shape[0]):
            out = nf(frames[t : t + 1], stream_ids=["cam"])
            assert torch.equal(out.active_mask[0], r32[t]["active"]), f"frame {t}: gate decisions differ"
            assert stream_tensor(nf, "cam", "age").tolist() == r32[t]["ages"]
            assert_close(stream_tensor(nf, "cam", "ema"), r64[t]["ema"], r32[t]["ema"], f"frame {t} reference")
            if out.pooler_output is not None:
                assert_close(out.pooler_output[0], r64[t]["pooled"], r32[t]["pooled"], f"frame {t} pooled")
            assert_close(out.last_hidden_state[0], r64[t]["seq"], r32[t]["seq"], f"frame {t} tokens")
            partial += bool(0 < int(out.active_mask.sum()) < n)
    assert partial >= 2, "the clip gave no partial frames: the test would not see the gated layers"
    assert stream_tensor(nf, "cam", "kv_k").shape[0] == LAYERS - probe  # the probe layers keep no cache


def test_decides_on_layer_l_features():
    """The decisions and the reported surprise are the layer-l signal's, and they differ from
    what the layer-0 embedding would decide (so a layer-0 gate could not pass this test)."""
    model, frames = make_model("dinov2", layers=LAYERS), video(5)
    probe = 2
    nf = NeuroFlow(model, probe_layers=probe, **GATE)
    with torch.inference_mode():
        r32, _ = _oracle_pair(model, frames, probe, **GATE)
        layer0 = oracle.run_stream(model, frames, "KV", GATE["threshold"], 0.0, GATE["floor_tokens"],
                                   reference="computed", max_staleness=GATE["max_staleness"])
        differs = 0
        for t in range(frames.shape[0]):
            out = nf(frames[t : t + 1], stream_ids=["cam"])
            assert torch.equal(out.active_mask[0], r32[t]["active"]), f"frame {t}"
            differs += not torch.equal(out.active_mask[0], layer0[t]["active"])
            if t:
                # The surprise against the reference the oracle held before this frame.
                h, ref = r32[t]["probed"][0, nf.adapter.num_prefix :], r32[t - 1]["ema"]

                def surprise(h, ref):
                    return 1 - (h * ref).sum(-1) / (h.norm(dim=-1) * ref.norm(dim=-1))
                assert_close(out.surprise[0], surprise(h.double(), ref.double()), surprise(h, ref), f"frame {t} surprise")
    assert differs >= 1, "layer-0 and layer-l decisions agree on every frame: the test cannot tell them apart"


def test_token_layers_count_the_probe():
    model = make_model("dinov2", layers=LAYERS)
    frames = video(7)
    probe = 1
    nf = NeuroFlow(model, probe_layers=probe, skip_below=0.05, **{**GATE, "keyframe_every": 4})
    n = 5 * 6  # 40 x 48 frames, 8-px patches
    t_tok, L = nf.adapter.num_prefix + n, LAYERS
    kinds = set()
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            # Frame 3 repeats frame 2: nothing passes the threshold, so it is skipped.
            out = nf(frames[min(t, 2) if t == 3 else t][None], stream_ids=["cam"])
            kind = int(out.frame_kind[0])
            kinds.add(kind)
            active = int(out.active_mask.sum())
            want = {SKIP: t_tok * probe, KEYFRAME: t_tok * L,
                    PARTIAL: t_tok * probe + (nf.adapter.num_prefix + active) * (L - probe)}[kind]
            assert int(out.token_layers[0]) == want, f"frame {t} (kind {kind}): {int(out.token_layers[0])} != {want}"
    assert kinds == {SKIP, PARTIAL, KEYFRAME}


@pytest.mark.parametrize("kwargs,match", [
    (dict(probe_layers=LAYERS), r"probe_layers must be an int in \[0, 3\)"),
    (dict(probe_layers=-1), r"probe_layers must be an int in \[0, 3\)"),
    (dict(probe_layers=1.0), r"probe_layers must be an int"),
    (dict(probe_layers=True), r"probe_layers must be an int"),
    (dict(probe_layers="1"), r"probe_layers must be an int"),
    (dict(probe_layers=1, arch="C"), "option of architecture KV, not 'C'"),
    (dict(probe_layers=1, arch="A"), "option of architecture KV, not 'A'"),
    (dict(probe_layers=1, arch="B"), "option of architecture KV, not 'B'"),
    (dict(probe_layers=1, reference="ema"), "needs reference='computed'"),
    (dict(probe_layers=1, signal="patch"), "chooses a layer-0 signal"),
    (dict(probe_layers=1, kv_layers=[0, 2]), "one of the 1 dense probe layers"),
    (dict(probe_layers=2, kv_layers=2), r"in \[0, 1\]"),
])
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuroFlow(make_model("dinov2", layers=LAYERS), **kwargs)


def test_rejections_and_failures_leave_every_stream_as_it_was(monkeypatch):
    model, frames = make_model("dinov2", layers=LAYERS), video(3)
    nf = NeuroFlow(model, probe_layers=1, **GATE)
    _run(nf, frames[:2])
    before, settings = nf.stream_state_dict(), nf.gate_settings
    with pytest.raises(ValueError, match="needs reference='computed'"):
        nf.reference = "ema"
    nf2 = NeuroFlow(model, probe_layers=1, **GATE)
    with pytest.raises(ValueError, match="chooses a layer-0 signal"):
        nf2.signal = "patch"
    assert nf2.signal == "embedding"
    assert nf.gate_settings == settings
    # A failure after the gate wrote its references (in the gated layers) is rolled back.
    monkeypatch.setattr(type(nf.architecture), "_readout_from_cache",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"), torch.inference_mode():
        nf(torch.stack([frames[2], frames[2]]), stream_ids=["a", "b"])
    assert_same_state(nf.stream_state_dict(), before)


def test_state_file_round_trip(tmp_path):
    model, frames = make_model("dinov2", layers=LAYERS), video(5)
    nf = NeuroFlow(model, probe_layers=1, **GATE)
    _run(nf, frames[:3])
    nf.save_state(tmp_path / "s.pt")
    again = NeuroFlow(model, probe_layers=1, **GATE)
    again.load_state(tmp_path / "s.pt")
    assert_same_state(again.stream_state_dict(), nf.stream_state_dict())
    _same_outputs(_run(again, frames[3:]), _run(nf, frames[3:]))
    for other in (0, 2):  # another probe depth reads the references differently: refused, nothing changes
        eng = NeuroFlow(model, probe_layers=other, **GATE)
        with pytest.raises(Exception, match="incompatible|do not fit|settings"):
            eng.load_state(tmp_path / "s.pt")
        assert eng.stream_ids == []


@pytest.mark.parametrize("options", [
    dict(threshold=0.01, floor_tokens=2, max_staleness=2),
    dict(threshold=0.01, floor_tokens=1, max_staleness=1, motion_norm=True, skip_below=0.05, keyframe_every=3,
         batch_budget=0.5),
], ids=["measured", "policy_batch_budget"])
def test_engine_through_kernels_matches_reference_path(monkeypatch, options):
    pytest.importorskip("triton")
    model = make_model("dinov2", layers=LAYERS)
    model64 = as_double(model)
    frames = video(5, seed=0)
    settings = dict(arch="KV", probe_layers=1, **options)
    # A capacity past every frame's dense size: the sync-free path with no bucket to overflow (the
    # decisions are compared; overflow has its own tests in test_capacity.py).
    kernels, reference = NeuroFlow(model, capacity=10**6, **settings), NeuroFlow(model, **settings)
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            pair = torch.stack([frames[t], frames[max(t - 1, 0)]])
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            a = kernels(pair, stream_ids=["x", "y"])
            assert dispatch.last_path["gate_features"] == dispatch.TRITON
            assert dispatch.last_path["varlen_attention"] == dispatch.TRITON
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            b = reference(pair, stream_ids=["x", "y"])
            assert dispatch.last_path["gate_features"] == dispatch.REFERENCE
            assert torch.equal(a.active_mask, b.active_mask), f"frame {t}"
            assert torch.equal(a.frame_kind, b.frame_kind) and torch.equal(a.token_layers, b.token_layers)
            ref32, ref64 = dense(model, pair), dense(model64, pair.double())
            for field in ("pooler_output", "last_hidden_state"):
                assert_same_up_to_rounding(getattr(a, field), getattr(b, field), getattr(ref32, field),
                                           getattr(ref64, field), f"frame {t} {field}")
    for sid in ("x", "y"):
        assert torch.equal(stream_tensor(kernels, sid, "age"), stream_tensor(reference, sid, "age"))
    assert dispatch.fallbacks == []


SENTINEL = -12345


def _poisoned(*shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, SENTINEL if dtype != torch.int8 else 77, dtype=dtype, device=device)


@pytest.mark.parametrize("n,prefix,batch,settings", [
    (35, 1, 3, GateSettings(threshold=0.3, floor_tokens=2, reference="computed", max_staleness=2)),
    (1, 0, 2, GateSettings(threshold=0.3, floor_tokens=0, reference="computed")),
    (35, 2, 3, GateSettings(threshold=1.9, floor_tokens=0, reference="computed")),  # no active patch
    (20, 1, 4, GateSettings(threshold=0.3, floor_tokens=1, reference="computed", skip_below=0.2,
                            keyframe_every=3, batch_budget=0.4, max_staleness=3, motion_norm=True)),
], ids=["stale", "one_patch", "none_active", "policy"])
def test_gate_features_kernel_matches_reference(triton_path, monkeypatch, n, prefix, batch, settings):
    """The op alone on fresh random features, outputs poisoned before the launches."""
    monkeypatch.setattr(gate_op, "_empty", _poisoned)
    g = torch.Generator().manual_seed(n + batch)
    d, slots = 24, 6
    tokens = torch.randn(batch, prefix + n, d, generator=g)
    ema = torch.randn(slots, n, d, generator=g)
    slot = torch.randperm(slots, generator=g)[:batch]
    ema[slot] = tokens[:, prefix:] + 0.7 * torch.randn(batch, n, d, generator=g)  # surprises spread over (0, 1)
    first = torch.zeros(batch, dtype=torch.bool)
    first[0] = batch > 2
    age = torch.randint(0, 4, (slots, n), generator=g, dtype=torch.int32) if settings.max_staleness else None
    policy = ((torch.randint(0, 3, (slots, 1), generator=g, dtype=torch.int32), torch.rand(slots, 1, generator=g))
              if settings.policy else None)

    def pools():
        return (ema.clone(), None if age is None else age.clone(),
                None if policy is None else (policy[0].clone(), policy[1].clone()))

    ema_k, age_k, pol_k = pools()
    ema_r, age_r, pol_r = pools()
    out = gate_features(tokens, prefix, ema_k, slot, first, settings, age=age_k, policy=pol_k)
    assert dispatch.last_path["gate_features"] == dispatch.TRITON
    ref = gate_features_reference(tokens, prefix, ema_r, slot, first, settings, age=age_r, policy=pol_r)
    assert torch.equal(out.active, ref.active) and torch.equal(out.cu_seqlens, ref.cu_seqlens)
    assert torch.equal(out.frame_kind, ref.frame_kind)
    total = int(ref.cu_seqlens[-1])
    assert torch.equal(out.index[:total], ref.index[:total])
    assert torch.equal(out.packed[:total], ref.packed[:total])  # rows are copies of the features
    assert torch.equal(out.surprise, ref.surprise) or settings.motion_norm
    assert_close(out.surprise[~first], ref.surprise[~first].double(), ref.surprise[~first], "surprise")
    assert torch.equal(ema_k, ema_r)
    if age is not None:
        assert torch.equal(age_k, age_r)
    if policy is not None:
        assert torch.equal(pol_k[0], pol_r[0]) and torch.equal(pol_k[1], pol_r[1])
    if settings.threshold == 1.9:
        assert int(out.active[~first].sum()) == 0


def test_kernel_path_fallback_is_recorded(triton_path):
    """A forced mask runs the reference path: recorded and warned, never silent."""
    model, frames = make_model("dinov2", layers=LAYERS), video(2)
    nf = NeuroFlow(model, probe_layers=1, **GATE)
    with torch.inference_mode():
        nf(frames[:1])
        with pytest.warns(dispatch.FallbackWarning, match="gate_features"):
            nf(frames[1:], active=torch.ones(1, 30, dtype=torch.bool))
    assert dispatch.last_path["gate_features"] == dispatch.REFERENCE
    assert ("gate_features", "a forced active mask") in dispatch.fallbacks


def test_command_line_and_serving_pass_the_option_on():
    import argparse

    from neuroflow.commands._common import add_gate_arguments, gate_kwargs
    from neuroflow.serve.spec import ServeConfig, engine_options

    p = argparse.ArgumentParser()
    add_gate_arguments(p)
    assert gate_kwargs(p.parse_args(["--probe-layers", "2", "--threshold", "0.1"]))["probe_layers"] == 2
    assert "probe_layers" not in gate_kwargs(p.parse_args([]))
    assert engine_options(ServeConfig(probe_layers=2))["probe_layers"] == 2
    assert "probe_layers" not in engine_options(ServeConfig())
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="probe_layers"):
            ServeConfig(probe_layers=bad).check()
