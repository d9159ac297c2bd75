"""The learned patch ranking (``NeuroFlow(ranker=...)``, issue #20 part 4): its rule in the reference,
the engine through the kernels (interpreter) against the reference path, its file, bad input, and its
training (:mod:`neuroflow.distill.gate_ranker`, ``neuroflow distill-gate``). The select kernel's RANKED
mode against the reference is ``tests/test_gate.py::test_ranker_order_in_kernel_matches_reference``."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model, video
from helpers import assert_same_state, assert_same_up_to_rounding, random_ranker, stream_tensor
from neuroflow import NeuroFlow
from neuroflow.distill.gate_ranker import collect_ranker_data, fit_ranker, output_error, r_squared
from neuroflow.engine.engine import PARTIAL
from neuroflow.ops import dispatch
from neuroflow.reference.gate import gate_decision_reference
from neuroflow.reference.gate_settings import GateSettings
from neuroflow.reference.patch_ranker import RANKER_FEATURES, PatchRanker, RankerError, ranker_features, ranker_scores

F = len(RANKER_FEATURES)


def linear_ranker(weights: list[float], device="cpu") -> PatchRanker:
    """A ranker whose score is ``sum_j weights[j] * feature_j`` (one ReLU unit over a large bias, taken off
    again by ``b2``), for rules checked by hand."""
    w = torch.tensor(weights, dtype=torch.float32).view(F, 1)
    return PatchRanker(w, torch.tensor([100.0]), torch.tensor([1.0]), torch.tensor(-100.0), torch.zeros(F),
                       torch.ones(F)).to(device)


# -- the rule --------------------------------------------------------------------------------------

def test_features_by_hand():
    s = torch.tensor([[0.5, 0.0, 0.2, 0.1, 0.3, 0.9]])  # a 2 x 3 grid
    x = ranker_features(s, (2, 3), 0.25, torch.tensor([3], dtype=torch.int32))
    assert x.shape == (1, 6, F) and x.dtype == torch.float32
    log = lambda v: torch.log(torch.tensor(max(v, 1e-5)))  # noqa: E731
    # Patch 1 (row 0, col 1): neighbours are every patch of the 2 x 3 grid.
    assert x[0, 1, 0] == log(0.0)
    assert torch.isclose(x[0, 1, 1], log(0.9))
    assert torch.isclose(x[0, 1, 2], log(sum(s[0].tolist()) / 6))
    # Patch 0 (row 0, col 0): its 3x3 neighbourhood is patches 0, 1, 3, 4.
    assert torch.isclose(x[0, 0, 1], log(0.5)) and torch.isclose(x[0, 0, 2], log((0.5 + 0.0 + 0.1 + 0.3) / 4))
    assert torch.isclose(x[0, 0, 3], log(0.9))
    assert torch.isclose(x[0, 0, 4], log(sum(s[0].tolist()) / 6))
    assert torch.isclose(x[0, 0, 5], torch.tensor(3 / 6))  # 0.5, 0.3, 0.9 over 0.25
    age = torch.log1p(torch.tensor(3.0))
    assert torch.isclose(x[0, 0, 6], age) and torch.isclose(x[0, 2, 7], log(0.2) * age)
    with pytest.raises(ValueError, match="grid"):
        ranker_features(s, (2, 2), 0.25)


def test_ranker_keeps_the_count_and_changes_the_choice():
    """A partial frame computes the gate's count k, taken in the ranker's order: here "least surprising first"
    (the negated surprise), so the k patches with the lowest surprise run, under the threshold included."""
    g = torch.Generator().manual_seed(0)
    h, ema = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    first = torch.tensor([False, False])
    st = GateSettings(threshold=1.0, floor_tokens=2, reference="computed")
    plain = gate_decision_reference(h, ema, first, st, grid=(3, 4))
    low_first = linear_ranker([-1.0] + [0.0] * (F - 1))
    ranked = gate_decision_reference(h, ema, first, st.replace(ranker=low_first), grid=(3, 4))
    assert torch.equal(ranked.counts, plain.counts) and (plain.counts > 0).all()
    for b in range(2):
        k = int(plain.counts[b])
        lowest = torch.sort(plain.surprise[b], stable=True).indices[:k]
        assert torch.equal(ranked.active[b].nonzero().flatten(), torch.sort(lowest).values)
    assert not torch.equal(ranked.active, plain.active)
    # The reference keeps to the rule "computed": the computed patches' rows change, no others.
    assert torch.equal(ranked.ema[~ranked.active], ema[~ranked.active])
    with pytest.raises(ValueError, match="grid"):
        gate_decision_reference(h, ema, first, st.replace(ranker=low_first))


def test_stale_patches_still_come_first():
    h, ema = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    age = torch.tensor([[0, 5, 0, 0, 7, 0]], dtype=torch.int32)
    st = GateSettings(threshold=None, budget=3, floor_tokens=0, max_staleness=5,
                      ranker=linear_ranker([1.0] + [0.0] * (F - 1)))
    out = gate_decision_reference(h, ema, torch.tensor([False]), st, age=age, grid=(2, 3))
    assert out.active[0, 1] and out.active[0, 4] and out.counts.item() == 3


def test_scores_ignore_first_frames_and_need_the_ranker_on_the_frames_device():
    r = random_ranker(1)
    raw = torch.tensor([[float("inf")] * 4, [0.1, 0.2, 0.3, 0.4]])
    scores = ranker_scores(r, raw, torch.tensor([True, False]), (2, 2), 0.2)
    assert scores[0].eq(0).all() and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="ranker is on"):
        ranker_scores(r, raw.to("meta"), torch.tensor([True, False], device="meta"), (2, 2), 0.2)


# -- the engine ------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(max_staleness=2, batch_budget=0.3, keyframe_drift=None)],
                         ids=["measured", "stale_batch_budget"])
def test_engine_kernel_path_matches_reference_path(monkeypatch, options):
    """``NeuroFlow(ranker=...)`` through the registered gate op and the kernels (interpreter) against the
    reference path: the same masks, kinds and state, outputs up to rounding; the ranker's choice differs from
    the deterministic gate's; no fallback."""
    pytest.importorskip("triton")
    from conftest import as_double, dense

    model = make_model("dinov2")
    clip = torch.stack([video(6, seed=1), video(6, seed=2)], dim=1)
    settings = dict(threshold=0.01, ranker=random_ranker(3), **options)
    kernels = NeuroFlow(model, capacity=10**6, **settings)
    reference, plain = NeuroFlow(model, **settings), NeuroFlow(model, **{**settings, "ranker": None})
    differs = False
    with torch.inference_mode():
        for t in range(clip.shape[0]):
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            a = kernels(clip[t], stream_ids=["x", "y"])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            b = reference(clip[t], stream_ids=["x", "y"])
            c = plain(clip[t], stream_ids=["x", "y"])
            assert torch.equal(a.active_mask, b.active_mask) and torch.equal(a.frame_kind, b.frame_kind), t
            differs |= not torch.equal(b.active_mask, c.active_mask)
            for sid in ("x", "y"):
                ka, kb = stream_tensor(kernels, sid, "ema"), stream_tensor(reference, sid, "ema")
                assert_same_up_to_rounding(ka, kb, kb, kb.double(), f"frame {t} {sid} ema")
            ref32, ref64 = dense(model, clip[t]), dense(as_double(model), clip[t].double())
            assert_same_up_to_rounding(a.last_hidden_state, b.last_hidden_state, ref32.last_hidden_state,
                                       ref64.last_hidden_state, f"frame {t}")
    assert differs and dispatch.fallbacks == []


def test_engine_takes_a_file_and_reports_the_ranker(tmp_path):
    model = make_model("siglip")
    path = random_ranker(4).save(tmp_path / "r.pt")
    nf = NeuroFlow(model, ranker=str(path))
    assert isinstance(nf.ranker, PatchRanker) and nf.gate_settings.as_dict()["ranker"] == f"PatchRanker({F} -> 8 -> 1)"
    assert "ranker=" in repr(nf)
    loaded = PatchRanker.load(path)
    assert torch.equal(loaded.flat(), random_ranker(4).flat())
    again = PatchRanker.from_flat(loaded.flat())
    assert all(torch.equal(getattr(again, k), getattr(loaded, k)) for k in ("w1", "b1", "w2", "b2", "mean", "std"))
    nf.ranker = None
    assert nf.ranker is None and nf.gate_settings.is_default_rule is False  # the measured preset has options


def _corrupt(tmp_path, what):
    path = tmp_path / f"{what}.pt"
    r = random_ranker(5)
    if what == "text":
        path.write_text("not a ranker")
    elif what == "format":
        torch.save({"format": "something-else"}, path)
    elif what == "features":
        r.save(path)
        data = torch.load(path, weights_only=True)
        torch.save({**data, "features": ["log surprise"]}, path)
    elif what == "shape":
        r.save(path)
        data = torch.load(path, weights_only=True)
        torch.save({**data, "b1": torch.zeros(3)}, path)
    elif what == "nan":
        r.save(path)
        data = torch.load(path, weights_only=True)
        torch.save({**data, "w2": torch.full((8,), float("nan"))}, path)
    return path


@pytest.mark.parametrize("what,match", [("missing", "does not exist"), ("text", "cannot be read"),
                                        ("format", "not a NeuroFlow patch ranker"), ("features", "trained on features"),
                                        ("shape", "b1 must be"), ("nan", "finite")])
def test_bad_ranker_files_are_refused_by_name(tmp_path, what, match):
    path = tmp_path / "missing.pt" if what == "missing" else _corrupt(tmp_path, what)
    with pytest.raises(RankerError, match=match) as err:
        PatchRanker.load(path)
    assert str(path) in str(err.value)
    with pytest.raises(RankerError, match=match):
        NeuroFlow(make_model("siglip"), ranker=path)


@pytest.mark.parametrize("bad,match", [
    (dict(ranker="not-a-file.pt"), "does not exist"),
    (dict(ranker=42), "must be None or a PatchRanker"),
    (dict(ranker=True), "must be None or a PatchRanker"),
    (dict(probe_layers=1, arch="KV"), "drop ranker or probe_layers"),
])
def test_bad_ranker_settings_raise_and_leave_every_stream_unchanged(bad, match):
    model = make_model("dinov2")
    nf = NeuroFlow(model)
    clip = video(3, seed=4)
    with torch.inference_mode():
        nf(clip[0:1], stream_ids=["a"])
        nf(clip[1:2], stream_ids=["a"])
    before = nf.stream_state_dict()
    settings = nf.gate_settings
    with pytest.raises(ValueError, match=match):
        if "probe_layers" in bad:
            NeuroFlow(model, ranker=random_ranker(0), **bad)
        else:
            nf.ranker = bad["ranker"]
    assert nf.gate_settings is settings
    assert_same_state(before, nf.stream_state_dict())
    with pytest.raises(ValueError, match="one threshold"):
        GateSettings(threshold=torch.tensor([0.1, 0.2]), ranker=random_ranker(0))


def test_bad_ranker_tensors_are_refused():
    r = random_ranker(0)
    with pytest.raises(RankerError, match="w1 must be"):
        PatchRanker(torch.zeros(F + 1, 4), r.b1[:4], r.w2[:4], r.b2, r.mean, r.std)
    with pytest.raises(RankerError, match="float32"):
        PatchRanker(r.w1.double(), r.b1, r.w2, r.b2, r.mean, r.std)
    with pytest.raises(RankerError, match="std > 0"):
        PatchRanker(r.w1, r.b1, r.w2, r.b2, r.mean, torch.zeros(F))
    with pytest.raises(RankerError, match="F\\*H"):
        PatchRanker.from_flat(torch.zeros(5))


# -- training --------------------------------------------------------------------------------------

def test_fit_recovers_a_learnable_target_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, F, generator=g)
    y = torch.relu(x[:, 0] - 0.5 * x[:, 3]) + 0.3 * x[:, 6]
    r = fit_ranker(x, y, hidden=8, steps=600)
    constant = r_squared(fit_ranker(x, y, hidden=1, steps=1, lr=0.0), x, y)
    assert r_squared(r, x, y) > 0.9 > constant + 0.5
    assert torch.equal(fit_ranker(x, y, hidden=8, steps=50).flat(), fit_ranker(x, y, hidden=8, steps=50).flat())
    with torch.inference_mode():  # the fit works from inside inference mode too
        assert torch.isfinite(fit_ranker(x, y, hidden=4, steps=5).flat()).all()
    with pytest.raises(ValueError, match="features"):
        fit_ranker(x[:, :3], y)
    with pytest.raises(ValueError, match="finite"):
        fit_ranker(x, torch.full_like(y, float("nan")))


def test_collected_samples_are_the_held_outputs_error_on_partial_frames():
    """Each sample's target is the engine's previous output of that patch against the dense model now, and
    its features are those of the surprise the gate reported on that frame."""
    model = make_model("dinov2")
    clip = video(6, seed=7)
    engine = NeuroFlow(model, threshold=0.01)
    data = collect_ranker_data(engine, [clip])
    # Replay by hand with a second engine.
    replay = NeuroFlow(model, threshold=0.01)
    a = replay.adapter
    want_f, want_t, held, since = [], [], None, 0
    with torch.inference_mode():
        for t in range(6):
            out = replay(clip[t:t + 1], stream_ids=["s"])
            if held is not None and int(out.frame_kind[0]) == PARTIAL:
                d = model(pixel_values=clip[t:t + 1]).last_hidden_state[:, a.num_prefix:]
                want_t.append(output_error(d, held)[0])
                grid = (clip.shape[2] // a.patch_size, clip.shape[3] // a.patch_size)
                want_f.append(ranker_features(out.surprise, grid, 0.01, torch.tensor([since]))[0])
            since = 0 if int(out.frame_kind[0]) == 2 else since + 1
            held = out.last_hidden_state[:, a.num_prefix:]
    assert data.frames == len(want_t) > 0 and data.clips == 1
    assert torch.allclose(data.target, torch.cat(want_t)) and torch.allclose(data.features, torch.cat(want_f))
    assert len(engine._streams) == 0  # the clip's stream is forgotten
    with pytest.raises(ValueError, match="deterministic gate"):
        collect_ranker_data(NeuroFlow(model, ranker=random_ranker(0)), [clip])
    with pytest.raises(ValueError, match="motion_norm"):
        collect_ranker_data(NeuroFlow(model, motion_norm=True), [clip])
    with pytest.raises(ValueError, match="T >= 2"):
        collect_ranker_data(NeuroFlow(model), [clip[:1]])
