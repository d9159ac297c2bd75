"""The frame policy (skip / partial / keyframe; ``skip_below``, ``keyframe_every``,
``keyframe_drift``) and the compute report (``frame_kind``, ``token_layers``)."""

import pytest
import torch

from conftest import as_double, dense, make_model, video
from helpers import assert_same_state, assert_same_up_to_rounding, stream_tensor
from neuroflow import NeuroFlow
from neuroflow.ops import dispatch
from neuroflow.engine.engine import KEYFRAME, PARTIAL, SKIP
from neuroflow.reference.gate_settings import GateSettings
from neuroflow.tooling.testing import assert_close

ARCHS = [("siglip", "A"), ("siglip", "B"), ("dinov2", "C"), ("clip", "C"), ("vit", "KV"), ("siglip", "KV")]


def _static_and_busy(frames: int = 6):
    """Two clips [F, 3, H, W]: a static one (the same frame repeated) and a moving one."""
    busy = video(frames, seed=3)
    static = video(1, seed=5).expand(frames, -1, -1, -1).clone()
    return static, busy


@pytest.mark.parametrize("family,arch", ARCHS)
def test_every_k_is_dense_on_keyframes_and_repeats_them_bit_for_bit(family, arch):
    """``keyframe_every=k, skip_below=1.0, keyframe_drift=None`` is every-k frame skipping: frame t of each stream is
    the dense model on frame ``k * (t // k)``, bit for bit the engine's own dense frame, and within
    the tolerance policy of the Hugging Face model."""
    model, k = make_model(family), 3
    clips = torch.stack([video(7, seed=0), video(7, seed=1)], dim=1)  # [F, 2, 3, H, W]
    nf = NeuroFlow(model, arch=arch, keyframe_every=k, skip_below=1.0, keyframe_drift=None)
    fresh = NeuroFlow(model, arch=arch)  # its first frame of a stream is dense
    model64 = as_double(model)
    with torch.inference_mode():
        for t in range(clips.shape[0]):
            out = nf(clips[t], stream_ids=["a", "b"])
            if t % k == 0:
                fresh.reset()
                want = fresh(clips[t], stream_ids=["a", "b"])
                ref32, ref64 = dense(model, clips[t]), dense(model64, clips[t].double())
                assert_close(out.pooler_output, ref64.pooler_output, ref32.pooler_output, f"frame {t} pooled")
                assert_close(out.last_hidden_state, ref64.last_hidden_state, ref32.last_hidden_state, f"frame {t} tokens")
            assert out.frame_kind.tolist() == [KEYFRAME if t % k == 0 else SKIP] * 2
            assert torch.equal(out.last_hidden_state, want.last_hidden_state), f"frame {t}"
            assert torch.equal(out.pooler_output, want.pooler_output), f"frame {t}"


@pytest.mark.parametrize("capacity", ["auto", 3])
def test_every_k_through_kernels(triton_path, capacity):
    """Every-k under the Triton interpreter: the gate's kernels decide, no fallback, bit for bit.
    With a capacity smaller than a frame's prefix plus patches the skipped frames go through the
    overflow repacking (which once gave a skipped frame its prefix rows) and the keyframes get the
    dense rows the host schedule reserves."""
    model, k = make_model("dinov2"), 2
    clip = video(5, seed=2)
    nf = NeuroFlow(model, arch="KV", keyframe_every=k, skip_below=1.0, keyframe_drift=None, capacity=capacity)
    fresh = NeuroFlow(model, arch="KV")
    with torch.inference_mode():
        for t in range(5):
            out = nf(clip[t:t + 1])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            if t % k == 0:
                fresh.reset()
                want = fresh(clip[t:t + 1])
            assert out.frame_kind.tolist() == [KEYFRAME if t % k == 0 else SKIP]
            dense_tl = (nf.adapter.num_prefix + out.active_mask.shape[1]) * len(nf.adapter.layers)
            assert out.token_layers.tolist() == ([dense_tl] if t % k == 0 else [0])
            assert torch.equal(out.last_hidden_state, want.last_hidden_state)
            assert torch.equal(out.pooler_output, want.pooler_output)
    assert dispatch.fallbacks == []


NO_CUT = 10**6
"""A ``capacity`` no call reaches (the planner caps it at the call's dense size)."""

POLICIES = [
    dict(reference="computed", max_staleness=2, skip_below=0.2, keyframe_every=4),
    dict(reference="ema", skip_below=0.2, keyframe_drift=0.05, motion_norm=True),
    dict(reference="computed", skip_below=0.1, scene_cut=0.6, budget=8, keyframe_drift=0.2),
]


@pytest.mark.parametrize("options", POLICIES, ids=["computed_stale_every", "ema_drift_motion", "cut_budget_drift"])
@pytest.mark.parametrize("arch", ["B", "KV"])
def test_policy_kernel_path_matches_reference_path(monkeypatch, options, arch):
    """The frame policy through the gate kernels (interpreter) against the reference path: the
    same frame kinds, masks and state (counters, references, ages), outputs up to rounding; a
    static and a busy stream in one batch, with a scene change in the busy one."""
    pytest.importorskip("triton")
    model = make_model("siglip")
    static, busy = _static_and_busy(7)
    busy = torch.cat([busy[:4], video(3, seed=11)])
    settings = dict(arch=arch, threshold=0.01, ema_decay=0.2, floor_tokens=2, **options)
    # A capacity past every frame's dense size: the sync-free path, no bucket to overflow (the
    # decisions are compared; overflow has its own tests in test_capacity.py).
    kernels, reference = NeuroFlow(model, capacity=NO_CUT, **settings), NeuroFlow(model, **settings)
    kinds = []
    with torch.inference_mode():
        for t in range(static.shape[0]):
            frames = torch.stack([static[t], busy[t]])
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            a = kernels(frames, stream_ids=["s", "b"])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            b = reference(frames, stream_ids=["s", "b"])
            assert dispatch.last_path["gate"] == dispatch.REFERENCE
            assert torch.equal(a.frame_kind, b.frame_kind), f"frame {t}"
            assert torch.equal(a.active_mask, b.active_mask), f"frame {t}"
            assert torch.equal(a.token_layers, b.token_layers), f"frame {t}"
            for sid in ("s", "b"):
                assert torch.equal(stream_tensor(kernels, sid, "policy_since"), stream_tensor(reference, sid, "policy_since"))
                for name in ("policy_drift", "ema"):
                    ka, kb = stream_tensor(kernels, sid, name), stream_tensor(reference, sid, name)
                    assert_same_up_to_rounding(ka, kb, kb, kb.double(), f"frame {t} {sid} {name}")
                if "max_staleness" in options:
                    assert torch.equal(stream_tensor(kernels, sid, "age"), stream_tensor(reference, sid, "age"))
            ref32, ref64 = dense(model, frames), dense(as_double(model), frames.double())
            for field in ("pooler_output", "last_hidden_state"):
                assert_same_up_to_rounding(getattr(a, field), getattr(b, field), getattr(ref32, field),
                                           getattr(ref64, field), f"frame {t} {field}")
            kinds.append(a.frame_kind.tolist())
    assert dispatch.fallbacks == []
    # The static stream is skipped after its first frame unless a keyframe bound fires.
    assert any(k[0] == SKIP for k in kinds) and any(k[1] != SKIP for k in kinds[1:])


def test_skip_leaves_caches_and_reference_untouched_and_ages_advance():
    model = make_model("siglip")
    static, _ = _static_and_busy(4)
    nf = NeuroFlow(model, arch="KV", threshold=0.01, reference="ema", ema_decay=0.2, max_staleness=3,
                   skip_below=0.0)
    with torch.inference_mode():
        first = nf(static[0:1], stream_ids=["s"])
        before = {name: stream_tensor(nf, "s", name).clone() for name in ("ema", "cache", "kv_k", "kv_v")}
        age = stream_tensor(nf, "s", "age").clone()
        for t in (1, 2):
            out = nf(static[t:t + 1], stream_ids=["s"])
            assert out.frame_kind.tolist() == [SKIP] and out.token_layers.tolist() == [0]
            assert not out.active_mask.any()
            assert torch.equal(out.last_hidden_state, first.last_hidden_state)
            assert torch.equal(out.pooler_output, first.pooler_output)
            for name, value in before.items():
                assert torch.equal(stream_tensor(nf, "s", name), value), name
            assert torch.equal(stream_tensor(nf, "s", "age"), (age + t))
            assert stream_tensor(nf, "s", "policy_since").tolist() == [t]


@pytest.mark.parametrize("family,arch", ARCHS)
def test_frame_kind_and_token_layers(family, arch):
    """token_layers = (prefix tokens + active patches) * L on computed frames, T * L on keyframes,
    0 on skips; frame kinds as the rule says (first frame and keyframe_every keyframes, skips of
    the static stream, partial frames of the busy one)."""
    model = make_model(family)
    static, busy = _static_and_busy(6)
    nf = NeuroFlow(model, arch=arch, threshold=0.01, floor_tokens=2, skip_below=0.05, keyframe_every=4)
    p, layers = nf.adapter.num_prefix, len(nf.adapter.layers)
    with torch.inference_mode():
        for t in range(6):
            out = nf(torch.stack([static[t], busy[t]]), stream_ids=["s", "b"])
            n = out.active_mask.shape[1]
            want_kind = KEYFRAME if t % 4 == 0 else None
            if want_kind is not None:
                assert out.frame_kind.tolist() == [KEYFRAME, KEYFRAME]
                assert out.token_layers.tolist() == [(p + n) * layers] * 2
                assert out.active_mask.all()
            else:
                assert out.frame_kind[0].item() == SKIP
                assert out.frame_kind[1].item() == PARTIAL
            ran = (out.frame_kind != SKIP).long()
            assert torch.equal(out.token_layers, (out.active_mask.sum(1) + p * ran) * layers)
            assert out.token_layers.dtype == torch.int64 and out.frame_kind.dtype == torch.int8


def test_frame_kind_without_policy():
    """Without the frame policy: 2 on first frames and scene cuts, 1 otherwise."""
    model = make_model("siglip")
    clip = torch.cat([video(3, seed=0), video(2, seed=9)])
    nf = NeuroFlow(model, arch="C", threshold=0.01, floor_tokens=2, scene_cut=0.5)
    with torch.inference_mode():
        kinds = [nf(clip[t:t + 1]).frame_kind.item() for t in range(5)]
    assert kinds == [KEYFRAME, PARTIAL, PARTIAL, KEYFRAME, PARTIAL]


def _neighbour_spread(ref: torch.Tensor) -> float:
    """Mean ``1 - cos`` between consecutive rows of one stream's reference ``[N, D]`` (row-major, the
    unit of ``keyframe_drift``), written out here rather than taken from the library."""
    a, b = ref[:-1].double(), ref[1:].double()
    return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()


@pytest.mark.parametrize("kernel_path", [False, True], ids=["reference", "kernels"])
def test_keyframe_drift_accumulates_mean_surprise_over_texture(monkeypatch, kernel_path):
    """The drift counter sums each frame's mean surprise divided by the spread between neighbouring patches'
    references before the frame; a bound of 0 makes every frame of a moving clip a keyframe."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if kernel_path else "0")
    model = make_model("siglip")
    clip = video(6, seed=4)
    nf = NeuroFlow(model, arch="C", threshold=0.5, floor_tokens=1, reference="computed", keyframe_drift=0.0)
    with torch.inference_mode():
        kinds = [nf(clip[t:t + 1]).frame_kind.item() for t in range(4)]
    assert kinds == [KEYFRAME] * 4
    nf = NeuroFlow(model, arch="C", threshold=0.5, floor_tokens=1, reference="computed", keyframe_drift=1e9)
    with torch.inference_mode():
        nf(clip[0:1])
        total = 0.0
        for t in range(1, 4):
            spread = _neighbour_spread(stream_tensor(nf, 0, "ema"))
            out = nf(clip[t:t + 1])
            assert dispatch.last_path["gate"] == (dispatch.TRITON if kernel_path else dispatch.REFERENCE)
            assert out.frame_kind.item() == PARTIAL
            total += out.surprise.mean().item() / spread
            assert stream_tensor(nf, 0, "policy_drift").item() == pytest.approx(total, rel=1e-5)


def test_reference_texture():
    """The drift's unit: the neighbour spread of each frame's reference, floored, 1 for a single patch."""
    from neuroflow.reference.gate import TEXTURE_FLOOR, reference_texture

    ref = torch.randn(3, 7, 72, generator=torch.Generator().manual_seed(0))
    got = reference_texture(ref)
    assert got.dtype == torch.float32 and got.shape == (3,)
    for b in range(3):
        assert got[b].item() == pytest.approx(_neighbour_spread(ref[b]), rel=1e-5)
    flat = torch.ones(2, 5, 8)  # identical rows: no texture at all
    assert torch.equal(reference_texture(flat), torch.full((2,), TEXTURE_FLOOR))
    assert torch.equal(reference_texture(torch.randn(2, 1, 8)), torch.ones(2))


def test_drift_counter_is_the_raw_mean_surprise_without_keyframe_drift():
    """Without ``keyframe_drift`` nothing reads the counter, and it is not divided by any texture."""
    model = make_model("siglip")
    clip = video(4, seed=4)
    nf = NeuroFlow(model, arch="C", threshold=0.5, floor_tokens=1, reference="computed", keyframe_every=100,
                   keyframe_drift=None)
    with torch.inference_mode():
        nf(clip[0:1])
        total = 0.0
        for t in range(1, 4):
            total += nf(clip[t:t + 1]).surprise.mean().item()
            assert stream_tensor(nf, 0, "policy_drift").item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(skip_below=1.5), "skip_below"), (dict(skip_below=-0.1), "skip_below"), (dict(skip_below="x"), "skip_below"),
    (dict(keyframe_every=0), "keyframe_every"), (dict(keyframe_every=2.0), "keyframe_every"),
    (dict(keyframe_every=True), "keyframe_every"), (dict(keyframe_drift=-1.0), "keyframe_drift"),
    (dict(keyframe_drift=float("inf")), "keyframe_drift"),
    (dict(threshold=None, budget=4, skip_below=0.5), "skip_below below 1.0 needs a threshold"),
])
def test_bad_policy_settings_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        GateSettings(**{"threshold": 0.1, **bad})
    with pytest.raises(ValueError, match=match):
        NeuroFlow(make_model("siglip"), **{"threshold": 0.1, **bad})


def test_bad_policy_change_leaves_every_stream_unchanged():
    model = make_model("siglip")
    clip = video(3)
    nf = NeuroFlow(model, arch="KV", keyframe_every=2, skip_below=0.5)
    with torch.inference_mode():
        nf(clip[0:1], stream_ids=["s"])
        nf(clip[1:2], stream_ids=["s"])
    snapshot = nf.stream_state_dict()
    for attr, value in (("skip_below", 2.0), ("keyframe_every", 0), ("keyframe_drift", -1.0),
                        ("skip_below", None)):
        with pytest.raises(ValueError):
            setattr(nf, attr, value)
        assert_same_state(snapshot, nf.stream_state_dict())
    assert nf.skip_below == 0.5 and nf.keyframe_every == 2
    nf.keyframe_every = 3  # a change that keeps the state layout is fine with streams
    assert nf.keyframe_every == 3
    snapshot = nf.stream_state_dict()
    # A failing call (wrong frame shape) rolls the policy state back too.
    with pytest.raises(ValueError), torch.inference_mode():
        nf(torch.zeros(1, 3, 41, 48), stream_ids=["s"])
    assert_same_state(snapshot, nf.stream_state_dict())


def test_policy_state_saves_and_continues(tmp_path):
    model = make_model("siglip")
    static, busy = _static_and_busy(6)
    settings = dict(arch="KV", threshold=0.01, skip_below=0.05, keyframe_every=3, reference="computed")
    a = NeuroFlow(model, **settings)
    with torch.inference_mode():
        for t in range(2):
            a(torch.stack([static[t], busy[t]]), stream_ids=["s", "b"])
        a.save_state(tmp_path / "s.pt")
        b = NeuroFlow(model, **settings)
        b.load_state(tmp_path / "s.pt")
        assert_same_state(a.stream_state_dict(), b.stream_state_dict())
        for t in range(2, 6):
            x = torch.stack([static[t], busy[t]])
            oa, ob = a(x, stream_ids=["s", "b"]), b(x, stream_ids=["s", "b"])
            assert torch.equal(oa.frame_kind, ob.frame_kind) and torch.equal(oa.active_mask, ob.active_mask)
            assert_same_state(a.stream_state_dict(), b.stream_state_dict())


@pytest.mark.parametrize("options", [
    dict(threshold=0.01, floor_tokens=2, reference="computed", max_staleness=2),
    dict(threshold=None, floor_tokens=0, motion_norm=False),
    dict(threshold=0.01, floor_tokens=1, skip_below=0.05, keyframe_every=3),
], ids=["threshold_stale", "budget_alone", "with_policy"])
def test_batch_budget_kernel_path_matches_reference_and_shares_the_budget(monkeypatch, options):
    """``batch_budget``: the non-keyframe frames of a call compute at most floor(M * f * N)
    patches together; the busy stream gets more of them than the static one; the kernel path
    (interpreter) decides as the reference path does, masks, ages and references alike."""
    pytest.importorskip("triton")
    model = make_model("siglip")
    static, busy = _static_and_busy(6)
    quiet = 0.8 * static + 0.2 * video(6, seed=8)  # a quieter stream: smaller changes
    f = 0.3
    settings = dict(arch="KV", ema_decay=0.2, batch_budget=f, **options)
    # A capacity past every frame's dense size: the sync-free path, no bucket to overflow (the
    # decisions are compared; overflow has its own tests in test_capacity.py).
    kernels, reference = NeuroFlow(model, capacity=NO_CUT, **settings), NeuroFlow(model, **settings)
    got = torch.zeros(2, dtype=torch.int64)
    with torch.inference_mode():
        for t in range(6):
            frames = torch.stack([quiet[t], busy[t]])
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            a = kernels(frames, stream_ids=["s", "b"])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            b = reference(frames, stream_ids=["s", "b"])
            assert torch.equal(a.active_mask, b.active_mask), f"frame {t}"
            assert torch.equal(a.frame_kind, b.frame_kind), f"frame {t}"
            for sid in ("s", "b"):
                if "max_staleness" in options:
                    assert torch.equal(stream_tensor(kernels, sid, "age"), stream_tensor(reference, sid, "age"))
                ka, kb = stream_tensor(kernels, sid, "ema"), stream_tensor(reference, sid, "ema")
                assert_same_up_to_rounding(ka, kb, kb, kb.double(), f"frame {t} {sid} reference")
            n = a.active_mask.shape[1]
            rest = a.frame_kind != KEYFRAME
            assert a.active_mask[rest].sum().item() <= int(rest.sum().item() * (f * n))
            got += torch.where(rest, a.active_mask.sum(1), 0)
    assert dispatch.fallbacks == []
    assert got[1] > got[0], got


def test_batch_budget_alone_fills_the_budget_from_the_busy_stream():
    """threshold=None: the batch budget alone decides; exactly floor(M * f * N) patches, and the
    static stream (surprise 0 everywhere) gets none while the busy one has changing patches."""
    model = make_model("siglip")
    static, busy = _static_and_busy(3)
    nf = NeuroFlow(model, arch="C", threshold=None, floor_tokens=0, ema_decay=0.2, batch_budget=0.25)
    with torch.inference_mode():
        nf(torch.stack([static[0], busy[0]]), stream_ids=["s", "b"])
        out = nf(torch.stack([static[1], busy[1]]), stream_ids=["s", "b"])
    n = out.active_mask.shape[1]
    assert out.active_mask.sum().item() == int(2 * (0.25 * n))
    assert out.active_mask[1].sum() > out.active_mask[0].sum()


@pytest.mark.parametrize("bad", [0.0, 1.5, 1, True, "half", -0.2])
def test_bad_batch_budget_raises_and_leaves_state_unchanged(bad):
    with pytest.raises(ValueError, match="batch_budget"):
        NeuroFlow(make_model("siglip"), batch_budget=bad)
    nf = NeuroFlow(make_model("siglip"), batch_budget=0.5)
    with torch.inference_mode():
        nf(video(1), stream_ids=["s"])
    snapshot = nf.stream_state_dict()
    with pytest.raises(ValueError, match="batch_budget"):
        nf.batch_budget = bad
    assert nf.batch_budget == 0.5
    assert_same_state(snapshot, nf.stream_state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_policy_and_batch_budget_on_cuda():
    """On a GPU: every-k through the compiled kernels (bit for bit against the engine's own dense
    frames), and the adaptive policy with a batch budget keeps its bound, with no fallback."""
    model = make_model("dinov2").cuda()
    clips = torch.stack([video(6, seed=0), video(6, seed=1)], dim=1).cuda()
    nf, fresh = NeuroFlow(model, keyframe_every=2, skip_below=1.0, keyframe_drift=None), NeuroFlow(model)
    adaptive = NeuroFlow(model, threshold=0.01, skip_below=0.05, keyframe_every=4, batch_budget=0.3)
    with torch.inference_mode():
        for t in range(clips.shape[0]):
            out = nf(clips[t], stream_ids=["a", "b"])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            if t % 2 == 0:
                fresh.reset()
                want = fresh(clips[t], stream_ids=["a", "b"])
            assert out.frame_kind.tolist() == [KEYFRAME if t % 2 == 0 else SKIP] * 2
            assert torch.equal(out.last_hidden_state, want.last_hidden_state)
            assert torch.equal(out.pooler_output, want.pooler_output)
            o = adaptive(clips[t], stream_ids=["a", "b"])
            rest = o.frame_kind != KEYFRAME
            n = o.active_mask.shape[1]
            assert o.active_mask[rest].sum().item() <= int(rest.sum().item() * (0.3 * n))
    assert dispatch.fallbacks == []


def test_batch_budget_ranks_across_frames_in_texture_units():
    """Across frames the batch budget compares each frame's surprise divided by its reference's texture: a frame
    whose reference is smooth (small neighbour spread) outranks a textured one with the same raw surprise, and
    inside a frame the surprise order holds."""
    from neuroflow.reference.gate import batch_budget_mask, cosine_surprise, gate_decision_reference, reference_texture

    surprise = torch.tensor([[0.30, 0.20, 0.10, 0.05], [0.12, 0.11, 0.10, 0.01]])
    chosen = torch.ones(2, 4, dtype=torch.bool)
    none = torch.tensor([False, False])
    raw = batch_budget_mask(surprise, chosen, none, 0.5)  # 4 of 8 kept
    assert raw.tolist() == [[True, True, False, False], [True, True, False, False]]
    scaled = batch_budget_mask(surprise, chosen, none, 0.5, unit=torch.tensor([1.0, 0.1]))
    assert scaled.tolist() == [[True, False, False, False], [True, True, True, False]]
    # Through the reference decision: the texture comes from the frames' references.
    g = torch.Generator().manual_seed(3)
    smooth = torch.randn(1, 1, 8, generator=g).expand(1, 9, 8) + 0.05 * torch.randn(1, 9, 8, generator=g)
    textured = torch.randn(1, 9, 8, generator=g)
    ema = torch.cat([textured, smooth])
    h = ema + 0.6 * torch.randn(2, 9, 8, generator=g)
    st = GateSettings(threshold=None, floor_tokens=0, reference="computed", batch_budget=0.25)
    out = gate_decision_reference(h, ema, none, st)
    unit = reference_texture(ema)
    assert unit[1] < unit[0] / 5
    s = cosine_surprise(h, ema).float()
    assert torch.equal(out.active, batch_budget_mask(s, torch.ones(2, 9, dtype=torch.bool), none, 0.25, unit=unit))
    assert not torch.equal(out.active, batch_budget_mask(s, torch.ones(2, 9, dtype=torch.bool), none, 0.25))
