"""Capacity buckets, the overflow cut, and the deferred finiteness check (neuroflow.engine.capacity)."""

import pytest
import torch

from conftest import make_model, video
from helpers import assert_same_state
from neuroflow import NeuroFlow
from neuroflow.ops import dispatch
from neuroflow.engine.capacity import CapacityPlanner, CapacityWarning, bucket, static_patch_bound
from neuroflow.reference.gate_settings import GateSettings


def test_bucket_is_a_power_of_two_with_headroom_within_bounds():
    assert bucket(10, 1000, 4) == 16  # 12.5 -> 16
    assert bucket(13, 1000, 4) == 32  # 16.25 -> 32
    assert bucket(900, 1000, 4) == 1000  # capped at dense
    assert bucket(1, 1000, 20) == 20  # at least every frame's prefix + floor
    assert bucket(0, 1000, 4) == 4


def test_planner_counts_first_frames_dense_and_learns_per_frame_need():
    plan = CapacityPlanner("auto")
    key = (4, (5, 6))
    # No history: dense.
    assert plan.capacity(key, 4, 0, 1, 30, 3) == 4 * 31
    plan.observe(key, need=40, rest=4)  # 10 rows per frame
    assert plan.capacity(key, 4, 0, 1, 30, 3) == 64  # 1.25 * 40 = 50 -> 64
    # One first frame: it is dense (31 rows), the other three get 1.25 * 30 -> 64 (capped at 93).
    assert plan.capacity(key, 4, 1, 1, 30, 3) == 31 + 64
    fixed = CapacityPlanner(20)
    assert fixed.capacity(key, 4, 1, 1, 30, 3) == 31 + 20
    with pytest.raises(ValueError, match="capacity"):
        CapacityPlanner("big")


def _frames(count=5):
    return torch.stack([video(count, seed=0), video(count, seed=1)], dim=1)


def test_a_budget_without_scene_cut_bounds_the_capacity():
    """A budget caps every later frame (stale patches and floor included): the planner never
    gives those frames more rows than the budget allows; a scene cut (dense keyframes) or no
    budget leaves only the data to decide."""
    assert static_patch_bound(GateSettings(budget=0.25), 16) == 4
    assert static_patch_bound(GateSettings(threshold=None, budget=40), 16) == 16
    assert static_patch_bound(GateSettings(budget=4, scene_cut=0.5), 16) is None
    assert static_patch_bound(GateSettings(), 16) is None
    # keyframe_every: dense keyframes break the bound, unless the host reserved their rows apart.
    assert static_patch_bound(GateSettings(budget=4, keyframe_every=3), 16) is None
    assert static_patch_bound(GateSettings(budget=4, keyframe_every=3), 16, scheduled=True) == 4
    planner = CapacityPlanner("auto")
    # Unseen key: dense for first frames, the budget (not N) for the other 3 frames.
    assert planner.capacity(("k",), 4, 1, 1, 16, 2, most=4) == 1 * 17 + 3 * (1 + 4)
    planner.observe(("k",), need=3 * 5, rest=3)
    assert planner.capacity(("k",), 4, 0, 1, 16, 2, most=4) == 4 * 5  # bucket 32 capped at the bound
    assert CapacityPlanner(1000).capacity(("k",), 2, 0, 0, 16, 0, most=3) == 6
    assert CapacityPlanner(1).capacity(("k",), 2, 0, 0, 16, 8, most=3) == 6  # floor above budget: budget wins


def test_overflow_cuts_least_surprising_patches_reports_it_and_equals_the_forced_reference(triton_path, monkeypatch):
    """A fixed capacity too small for the frames: the kernel path computes only what fits, says so
    (active_mask, overflowed_frames, CapacityWarning at the next call), and its outputs are those
    of the reference engine made to compute the same patches."""
    model = make_model("siglip")
    settings = dict(arch="C", threshold=-0.5, ema_decay=0.2, floor_tokens=3)  # every patch active
    small, reference = NeuroFlow(model, capacity=8, **settings), NeuroFlow(model, **settings)
    frames = _frames(3)
    with torch.no_grad():
        for t in range(frames.shape[0]):
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            if t == 2:
                with pytest.warns(CapacityWarning, match="capacity bucket"):
                    a = small(frames[t], stream_ids=["x", "y"])
            else:
                a = small(frames[t], stream_ids=["x", "y"])
            assert dispatch.last_path["gate"] == dispatch.TRITON
            counts = a.active_mask.sum(dim=1)
            if t == 0:
                assert counts.tolist() == [30, 30]  # first frames are never cut
            else:
                assert counts.tolist() == [4, 4]  # 8 rows, round-robin across the two frames
                # The kept patches are each frame's most surprising ones.
                for b in range(2):
                    kept = a.surprise[b][a.active_mask[b]].min()
                    dropped = a.surprise[b][~a.active_mask[b]].max()
                    assert kept >= dropped
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            r = reference(frames[t], stream_ids=["x", "y"], active=a.active_mask)
            assert torch.equal(r.active_mask, a.active_mask)
            torch.testing.assert_close(a.pooler_output, r.pooler_output, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(a.last_hidden_state, r.last_hidden_state, atol=1e-4, rtol=1e-4)
    with pytest.warns(CapacityWarning, match="fixed capacity=8"):
        small.sync_errors()
    assert small.overflowed_frames == 4  # frames 1 and 2 of both streams


def test_auto_capacity_grows_after_an_overflow(triton_path):
    model = make_model("siglip")
    nf = NeuroFlow(model, arch="B", threshold=0.02, ema_decay=0.2, floor_tokens=3, keyframe_every=None,
                    keyframe_drift=None)
    frames = _frames(4)
    with torch.no_grad():
        for t in range(3):
            nf(frames[t], stream_ids=["x", "y"])
        nf.sync_errors()
        before = nf.overflowed_frames
        nf.threshold = -0.5  # every patch active from now on: far above the learnt bucket
        with pytest.warns(CapacityWarning):
            nf(frames[3], stream_ids=["x", "y"])
            nf.sync_errors()
        assert nf.overflowed_frames > before
        out = nf(frames[3], stream_ids=["x", "y"])  # the bucket grew: nothing is cut
        nf.sync_errors()
    assert out.active_mask.all()


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_deferred_finiteness_check_undoes_the_bad_call_and_raises_at_the_next(path, request):
    if path == "triton":
        request.getfixturevalue("triton_path")
    nf = NeuroFlow(make_model("siglip"), threshold=0.02, ema_decay=0.2, floor_tokens=3, check_finite="deferred")
    frames = video(3)
    with torch.no_grad():
        nf(torch.stack([frames[0], frames[0]]), stream_ids=["a", "b"])
        nf(torch.stack([frames[1], frames[1]]), stream_ids=["a", "b"])
        before = nf.stream_state_dict()
        bad = torch.stack([frames[2], frames[2], frames[2]])
        bad[1, 0, 3, 3] = float("nan")
        nf(bad, stream_ids=["a", "b", "new"])  # returns: the flag is on its way to the host
        with pytest.raises(ValueError, match=r"previous call contained NaN or Inf in batch row\(s\) \[1\]"):
            nf(torch.stack([frames[2], frames[2]]), stream_ids=["a", "b"])
    after = nf.stream_state_dict()
    assert_same_state(before, after)
    assert "new" not in nf.stream_ids
    with torch.no_grad():  # and the engine goes on
        nf(torch.stack([frames[2], frames[2]]), stream_ids=["a", "b"])


def test_deferred_check_passes_good_frames_and_sync_errors_is_idempotent():
    nf = NeuroFlow(make_model("siglip"), check_finite="deferred")
    with torch.no_grad():
        nf(video(1), stream_ids=["a"])
    nf.sync_errors()
    nf.sync_errors()
    with pytest.raises(ValueError, match="check_finite"):
        NeuroFlow(make_model("siglip"), check_finite="sometimes")


def test_engine_leaves_autograd_off_unless_frames_need_grad(triton_path):
    """Hugging Face weights require grad; without inference_mode the call still takes the kernels
    and builds no graph."""
    model = make_model("siglip")
    assert next(model.parameters()).requires_grad
    nf = NeuroFlow(model, arch="C")
    out = nf(video(1), stream_ids=["a"])
    assert dispatch.last_path["gate"] == dispatch.TRITON
    assert not out.pooler_output.requires_grad
    pixels = video(1).requires_grad_()
    differentiable = NeuroFlow(model, arch="B")
    monkeypatch_env = pytest.MonkeyPatch()
    monkeypatch_env.setenv("TRITON_INTERPRET", "0")
    try:
        out = differentiable(pixels, stream_ids=["a"])
    finally:
        monkeypatch_env.undo()
    assert out.pooler_output.requires_grad
