"""Stream state changes in one place: a failure anywhere in a step (gate, encoder, readout) leaves
every stream's state exactly as it was and admits no stream; ``max_streams`` evicts the least
recently seen streams and keeps state memory flat under stream churn."""

import pytest
import torch
from torch import nn

import neuroflow.engine.engine
from helpers import PaperFlow
from neuroflow import NeuroFlow

from conftest import make_model, video
from helpers import assert_same_state

ARCHS = ("A", "B", "C", "KV", "KV-partial")
VARIANTS = {
    # Partial-depth KV: layer 0 keeps key/value caches, layer 1 runs as in C.
    "KV-partial": dict(arch="KV", kv_layers=[0]),
    # 8-bit key/value caches: the quantised writes and their scales roll back too.
    "KV-int8": dict(arch="KV", cache_dtype=torch.int8),
    "KV-int8-partial": dict(arch="KV", cache_dtype=torch.int8, kv_layers=[1]),
}


class _Fail(nn.Module):
    def forward(self, *args, **kwargs):
        raise RuntimeError("simulated failure")


def _engine(arch, family="siglip", **options):
    kwargs = {**VARIANTS.get(arch, dict(arch=arch)), **options}
    return PaperFlow(make_model(family), threshold=0.02, ema_decay=0.2, floor_tokens=3, **kwargs)


def _warm(nf, frames):
    with torch.inference_mode():
        nf(torch.stack([frames[0], frames[0]]), stream_ids=["a", "b"])
        nf(torch.stack([frames[1], frames[1]]), stream_ids=["a", "b"])


def _break(nf, where, monkeypatch):
    """Make the next step fail at ``where``, after the steps before it have written state."""
    if where == "gate":
        real = neuroflow.engine.engine.gate_frames  # the engine's gate call (the registered op)

        def gate_then_fail(*args, **kwargs):
            real(*args, **kwargs)  # the EMA has been updated in place
            raise RuntimeError("simulated failure")
        monkeypatch.setattr(neuroflow.engine.engine, "gate_frames", gate_then_fail)
    elif where == "encoder":
        # The last layer's MLP: every earlier layer (and KV's key/value caches) has run and written.
        monkeypatch.setattr(nf.adapter.layers[-1], "mlp", _Fail())
    else:
        monkeypatch.setattr(nf.adapter, "final_norm", _Fail())


@pytest.mark.parametrize("where", ["gate", "encoder", "readout"])
@pytest.mark.parametrize("arch", ARCHS + ("KV-int8", "KV-int8-partial"))
def test_failure_anywhere_leaves_every_stream_as_it_was(arch, where, monkeypatch):
    frames = video(4)
    nf, twin = _engine(arch), _engine(arch)
    _warm(nf, frames)
    _warm(twin, frames)
    before = nf.stream_state_dict()
    with monkeypatch.context() as patch:
        _break(nf, where, patch)
        with torch.inference_mode(), pytest.raises(RuntimeError, match="simulated failure"):
            nf(torch.stack([frames[2], frames[2], frames[2]]), stream_ids=["a", "new", "b"])
    assert nf.stream_ids == ["a", "b"], "a failed call admitted or forgot a stream"
    assert_same_state(before, nf.stream_state_dict())
    # The engine carries on as if the failed call never happened.
    with torch.inference_mode():
        got = nf(torch.stack([frames[3], frames[3]]), stream_ids=["a", "b"])
        want = twin(torch.stack([frames[3], frames[3]]), stream_ids=["a", "b"])
    assert not got.first_frame.any()
    assert torch.equal(got.active_mask, want.active_mask)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


@pytest.mark.parametrize("where", ["gate", "readout"])
def test_failure_rolls_back_gate_option_state(where, monkeypatch):
    """With staleness ages and last-computed references, a failed step restores both."""
    frames = video(4)
    options = dict(reference="computed", max_staleness=2, budget=8)
    nf, twin = _engine("C", **options), _engine("C", **options)
    _warm(nf, frames)
    _warm(twin, frames)
    before = nf.stream_state_dict()
    assert {"ema", "age"} <= set(before["pools"][0]["tensors"])
    with monkeypatch.context() as patch:
        _break(nf, where, patch)
        with torch.inference_mode(), pytest.raises(RuntimeError, match="simulated failure"):
            nf(torch.stack([frames[2], frames[2], frames[2]]), stream_ids=["a", "new", "b"])
    assert_same_state(before, nf.stream_state_dict())
    with torch.inference_mode():
        got = nf(torch.stack([frames[3], frames[3]]), stream_ids=["a", "b"])
        want = twin(torch.stack([frames[3], frames[3]]), stream_ids=["a", "b"])
    assert torch.equal(got.active_mask, want.active_mask)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


def test_failed_resolution_change_keeps_the_old_state(monkeypatch):
    """A stream arriving at a new resolution is reset only when the call succeeds."""
    frames = video(3)
    nf = _engine("C")
    _warm(nf, frames)
    before = nf.stream_state_dict()
    monkeypatch.setattr(nf.adapter, "final_norm", _Fail())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="simulated failure"):
        nf(video(1, 32, 32), stream_ids=["a"])  # another grid than the streams' 5x6
    assert_same_state(before, nf.stream_state_dict())


def test_max_streams_evicts_the_least_recently_seen():
    frames = video(3)
    nf = PaperFlow(make_model("siglip"), threshold=0.02, floor_tokens=2, max_streams=3)
    with torch.inference_mode():
        nf(torch.stack([frames[0]] * 3), stream_ids=["a", "b", "c"])
        nf(frames[1:2], stream_ids=["a"])  # b is now the least recently seen
        assert nf.last_evicted == []
        out = nf(torch.stack([frames[1]] * 2), stream_ids=["d", "c"])
        assert nf.last_evicted == ["b"] and nf.evictions == 1
        assert sorted(nf.stream_ids) == ["a", "c", "d"]
        assert out.first_frame.tolist() == [True, False]
        assert nf(frames[2:3], stream_ids=["b"]).first_frame.all(), "an evicted stream restarts dense"
    with pytest.raises(ValueError, match="max_streams"):
        PaperFlow(make_model("siglip"), max_streams=0)


def test_state_memory_stays_flat_under_stream_churn():
    """Thousands of frames, a new camera every call, old ones never coming back: with max_streams
    the pools stop growing once full."""
    frames = video(2)
    nf = PaperFlow(make_model("siglip", layers=1), threshold=0.02, floor_tokens=2, max_streams=8)
    batch = torch.stack([frames[1]] * 4)
    sizes = []
    with torch.inference_mode():
        for call in range(600):  # 2,400 frames from 603 distinct streams
            ids = [call, call + 1, call + 2, call + 3]
            nf(batch, stream_ids=ids)
            sizes.append(nf.state_bytes())
            assert len(nf.stream_ids) <= 8
    assert nf.evictions == 603 - 8
    assert max(sizes[10:]) == min(sizes[10:]) == sizes[10], "state memory grew under churn"
