"""Engine behaviour: dense equivalences, stream independence, resolution changes, wrappers."""

import warnings

import pytest
import torch

from conftest import as_double, dense, make_model, video
from helpers import PaperFlow
from neuroflow import NeuroFlow, NeuroFlowSiglipVisionArchA, NeuroFlowSiglipVisionArchB, NeuroFlowSiglipVisionArchC
from helpers import assert_same_up_to_rounding
from neuroflow.tooling.testing import assert_close


def assert_dense(out, model, model64, x, what):
    ref32, ref64 = dense(model, x), dense(model64, x.double())
    assert_close(out.last_hidden_state, ref64.last_hidden_state, ref32.last_hidden_state, f"{what} tokens")
    assert_close(out.pooler_output, ref64.pooler_output, ref32.pooler_output, f"{what} pooled")


@pytest.mark.parametrize("arch", ["A", "B", "C", "KV"])
def test_first_frame_equals_dense(family, arch):
    model = make_model(family)
    frames = video(1, height=40, width=48)  # non-native, non-square grid: PE interpolated
    x = torch.cat([frames, frames.flip(-1)])
    with torch.inference_mode():
        out = PaperFlow(model, arch=arch)(x)
        assert out.active_mask.all() and out.first_frame.all() and (out.sparsity == 0).all()
        assert_dense(out, model, as_double(model), x, "first frame")


@pytest.mark.parametrize("arch", ["A", "B", "C", "KV"])
def test_negative_threshold_is_dense_every_frame(family, arch):
    model, frames = make_model(family), video(4)
    model64 = as_double(model)
    nf = PaperFlow(model, arch=arch, threshold=-1.0, floor_tokens=1)
    with torch.inference_mode():
        for t in range(4):
            out = nf(frames[t : t + 1])
            assert out.active_mask.all()
            assert_dense(out, model, model64, frames[t : t + 1], f"frame {t}")


@pytest.mark.parametrize("arch", ["A", "C", "KV"])
def test_every_patch_forced_active_equals_dense(family, arch):
    """A floor of N patches forces every patch active whatever the threshold."""
    model, frames = make_model(family), video(4)
    n = (frames.shape[-2] // 8) * (frames.shape[-1] // 8)
    nf = PaperFlow(model, arch=arch, threshold=2.0, floor_tokens=n)
    model64 = as_double(model)
    with torch.inference_mode():
        for t in range(4):
            out = nf(frames[t : t + 1])
            assert out.active_mask.all()
            assert_dense(out, model, model64, frames[t : t + 1], f"frame {t}")


@pytest.mark.parametrize("arch", ["A", "B", "C", "KV"])
def test_batched_streams_equal_single_streams(family, arch):
    """Streams appear, skip frames and disappear; a batch gives what one call per stream gives."""
    model = make_model(family)
    clips = {name: video(5, seed=s) for s, name in enumerate(["a", "b", "c"])}
    schedule = [["a", "b"], ["a", "b", "c"], ["c", "a"], ["b", "c", "a"], ["c"]]  # b skips, then stops
    settings = dict(arch=arch, threshold=0.02, ema_decay=0.2, floor_tokens=3)
    batched, single = PaperFlow(model, **settings), PaperFlow(model, **settings)
    seen = {k: 0 for k in clips}
    model64 = as_double(model)
    with torch.inference_mode():
        for ids in schedule:
            x = torch.stack([clips[i][seen[i]] for i in ids])
            out = batched(x, stream_ids=ids)
            for b, i in enumerate(ids):
                one = single(x[b : b + 1], stream_ids=[i])
                assert torch.equal(out.active_mask[b], one.active_mask[0])
                ref32, ref64 = dense(model, x[b : b + 1]), dense(model64, x[b : b + 1].double())
                for field in ("pooler_output", "last_hidden_state"):
                    assert_same_up_to_rounding(getattr(out, field)[b : b + 1], getattr(one, field),
                                               getattr(ref32, field), getattr(ref64, field), field)
                seen[i] += 1
    assert sorted(batched.stream_ids) == ["a", "b", "c"]


def test_new_stream_in_a_batch_starts_dense():
    model = make_model("siglip")
    frames = video(3)
    nf = PaperFlow(model, threshold=0.02, ema_decay=0.2, floor_tokens=2)
    with torch.inference_mode():
        nf(frames[0:1], stream_ids=["old"])
        out = nf(torch.stack([frames[1], frames[1]]), stream_ids=["old", "new"])
    assert out.first_frame.tolist() == [False, True]
    assert not out.active_mask[0].all() and out.active_mask[1].all()


def test_resolution_change_resets_only_that_stream():
    model = make_model("siglip")
    small, large = video(3, 40, 48), video(3, 48, 48)
    nf = PaperFlow(model, threshold=0.02, ema_decay=0.2, floor_tokens=2)
    with torch.inference_mode():
        nf(torch.stack([small[0], small[0]]), stream_ids=["x", "y"])
        with pytest.warns(UserWarning, match="changed resolution"):
            out = nf(large[1:2], stream_ids=["x"])
        assert out.first_frame.tolist() == [True] and out.active_mask.all()
        assert_close(out.pooler_output, dense(as_double(model), large[1:2].double()).pooler_output,
                     dense(model, large[1:2]).pooler_output, "dense after reset")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out_y = nf(small[1:2], stream_ids=["y"])  # y kept its state at the old grid
            out_x = nf(large[2:3], stream_ids=["x"])
    assert out_y.first_frame.tolist() == [False] and out_x.first_frame.tolist() == [False]


def test_reset_some_and_all_streams():
    model, frames = make_model("siglip"), video(2)
    nf = PaperFlow(model)
    with torch.inference_mode():
        nf(torch.stack([frames[0]] * 3), stream_ids=["a", "b", "c"])
        nf.reset(["b"])
        assert sorted(nf.stream_ids) == ["a", "c"]
        out = nf(torch.stack([frames[1]] * 3), stream_ids=["a", "b", "c"])
        assert out.first_frame.tolist() == [False, True, False]
        nf.reset()
        assert nf.stream_ids == []


def test_reference_class_names():
    model, frames = make_model("siglip"), video(3)
    for cls, arch in [(NeuroFlowSiglipVisionArchA, "A"), (NeuroFlowSiglipVisionArchB, "B"), (NeuroFlowSiglipVisionArchC, "C")]:
        wrapper = cls(model, threshold=0.02, ema_decay=0.2, floor_tokens=3)
        engine = PaperFlow(model, arch=arch, threshold=0.02, ema_decay=0.2, floor_tokens=3)
        with torch.inference_mode():
            for t in range(3):
                pooled = wrapper(frames[t : t + 1], reset_state=(t == 0))
                out = engine(frames[t : t + 1])
                assert torch.equal(pooled, out.pooler_output)
                assert wrapper.last_sparsity == pytest.approx(float(out.sparsity.mean()))
            wrapper.reset()
            assert wrapper(frames[2:3]) is not None and wrapper.last_sparsity == 0.0


def test_full_multimodal_model_uses_its_vision_tower():
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=49408),
    )
    full = SiglipModel(cfg).eval()
    nf = PaperFlow(full)
    assert nf.adapter.model is full.vision_model
    x = video(1, 32, 32)
    with torch.inference_mode():
        assert_close(nf(x).pooler_output, as_double(full.vision_model)(x.double()).pooler_output,
                     full.vision_model(x).pooler_output, "pooled")


def test_cls_context_readout_is_closer_to_dense_than_active_only():
    """Architecture C on a CLS model: the full-context last layer against CLS-from-active-tokens.

    Random-weight fidelity (a correctness signal, not a quality figure): the readout that lets
    the CLS token see every patch must track dense better on a static-camera clip.
    """
    frames = video(8, 48, 64)
    for family in ("clip", "vit", "dinov2"):
        model = make_model(family, layers=3)
        fid = {}
        for readout in ("context", "active"):
            nf = PaperFlow(model, arch="C", threshold=0.02, ema_decay=0.1, floor_tokens=2, cls_readout=readout)
            cos = []
            with torch.inference_mode():
                for t in range(frames.shape[0]):
                    out = nf(frames[t : t + 1])
                    if t:
                        ref = dense(model, frames[t : t + 1]).pooler_output
                        cos.append(torch.nn.functional.cosine_similarity(out.pooler_output, ref).item())
            fid[readout] = sum(cos) / len(cos)
        print(f"{family}: random-weight fidelity context={fid['context']:.5f} active={fid['active']:.5f}")
        assert fid["context"] > fid["active"]


def test_forced_active_mask_replaces_the_gate_decision():
    model, frames = make_model("siglip"), video(3)
    nf = PaperFlow(model, threshold=0.02, ema_decay=0.2, floor_tokens=3)
    n = (frames.shape[-2] // 8) * (frames.shape[-1] // 8)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        forced = torch.rand(1, n, generator=g) < 0.3
        first = nf(frames[0:1], active=forced)
        assert first.active_mask.all()  # first frames stay dense
        out = nf(frames[1:2], active=forced)
        assert torch.equal(out.active_mask, forced)
        with pytest.raises(ValueError, match=r"active must be a bool tensor \[B, N\]"):
            nf(frames[2:3], active=forced[:, :-1])


def test_stage_timer_charges_gate_encoder_and_readout():
    from neuroflow.engine.profiling import StageTimer

    model, frames = make_model("clip"), video(2)
    for arch in ("A", "B", "C", "KV"):
        nf = PaperFlow(model, arch=arch)
        with torch.inference_mode():
            nf(frames[0:1])
            with StageTimer() as timer:
                nf(frames[1:2])
            nf(frames[1:2])  # outside the block: nothing is recorded
        assert set(timer.ms) == {"gate", "encoder", "readout"} and all(v > 0 for v in timer.ms.values())
