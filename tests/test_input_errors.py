"""Error messages that say how to fix the input, warnings for settings that switch sparsity off,
the Preprocessor taking the Frames read_frames yields, and the one pooled-output rule."""

import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import make_model, video
from helpers import assert_same_state
from helpers import PaperFlow
from neuroflow import NeuroFlow
from neuroflow.models.families import VisionAdapter
from neuroflow.models.pooling import dense_forward, dense_outputs, pooled_output
from neuroflow.engine.validation import check_frames, warn_ineffective_settings
from neuroflow.models.preprocess import Preprocessor
from neuroflow.video.decode import Frame


@pytest.fixture(scope="module")
def adapter():
    return VisionAdapter(make_model("siglip"))


# -- frame errors ----------------------------------------------------------------------------------

def test_channels_last_frames_are_named_with_the_fix(adapter):
    x = video(2)[:2].permute(0, 2, 3, 1).contiguous()  # [B, H, W, 3]
    with pytest.raises(ValueError) as err:
        check_frames(x, adapter)
    msg = str(err.value)
    assert "looks channels-last [B, H, W, C]" in msg and "permute(0, 3, 1, 2)" in msg, msg
    assert check_frames(x.permute(0, 3, 1, 2), adapter) == (5, 6)  # the fix it names works: 40x48 px


def test_a_wrong_channel_count_is_not_called_channels_last(adapter):
    with pytest.raises(ValueError) as err:
        check_frames(video(2)[:2, :2], adapter)
    msg = str(err.value)
    assert "has 2 channels" in msg and "expects 3" in msg and "channels-last" not in msg, msg


def test_uint8_frames_point_to_the_preprocessor_not_a_cast(adapter):
    x = (video(2)[:2] * 255).to(torch.uint8)
    with pytest.raises(TypeError) as err:
        check_frames(x, adapter)
    msg = str(err.value)
    assert "torch.uint8" in msg and "neuroflow.models.preprocess.Preprocessor" in msg and "normalise" in msg, msg
    assert ".to(torch.float32)" not in msg and "un-normalised 0-255" in msg, msg


def test_uint8_channels_last_frames_get_the_layout_hint_first(adapter):
    x = (video(2)[:2] * 255).to(torch.uint8).permute(0, 2, 3, 1)
    with pytest.raises(ValueError, match="channels-last"):
        check_frames(x, adapter)


def test_float_dtype_mismatch_still_suggests_the_cast(adapter):
    with pytest.raises(TypeError, match=r"convert with pixel_values.to\(torch.float32\)"):
        check_frames(video(2)[:2].double(), adapter)


def test_a_single_frame_gets_the_batch_hint(adapter):
    with pytest.raises(ValueError, match=r"add the batch dimension: pixel_values\[None\]"):
        check_frames(video(2)[0], adapter)


def test_engine_rejects_uint8_and_channels_last_without_touching_state():
    nf = PaperFlow(make_model("siglip"), threshold=0.02, ema_decay=0.2, floor_tokens=3)
    frames = video(2)
    with torch.inference_mode():
        nf(frames[:2], stream_ids=["a", "b"])
        before = nf.stream_state_dict()
        with pytest.raises(TypeError, match="Preprocessor"):
            nf((frames[:2] * 255).to(torch.uint8), stream_ids=["a", "b"])
        with pytest.raises(ValueError, match="channels-last"):
            nf(frames[:2].permute(0, 2, 3, 1).contiguous(), stream_ids=["a", "b"])
    assert_same_state(nf.stream_state_dict(), before)


# -- settings that switch sparsity off -------------------------------------------------------------

def _set_threshold(value):  # stands for the engine's setter: the warning must point at its caller
    warn_ineffective_settings(threshold=value)


def test_negative_threshold_warns_that_everything_runs_dense():
    with pytest.warns(UserWarning, match=r"threshold -0.1 is below 0.*every patch is computed.*runs dense") as rec:
        _set_threshold(-0.1)
    assert len(rec) == 1 and rec[0].filename == __file__  # points at the caller of the setter


@pytest.mark.parametrize("threshold", [0.0, 0.35, 2.0])
def test_thresholds_from_zero_up_do_not_warn(threshold):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_ineffective_settings(threshold=threshold)


def test_floor_not_below_the_patch_count_warns_once_the_grid_is_known():
    with pytest.warns(UserWarning, match=r"floor_tokens 16 is not below the 16 patches per frame.*runs dense"):
        warn_ineffective_settings(floor_tokens=16, num_patches=16)
    with pytest.warns(UserWarning, match=r"floor_tokens 40 is not below the 16 patches"):
        warn_ineffective_settings(floor_tokens=40, num_patches=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_ineffective_settings(floor_tokens=15, num_patches=16)
        warn_ineffective_settings(floor_tokens=10_000)  # grid not known yet: nothing to say
        warn_ineffective_settings()


def test_both_settings_warn_together():
    with pytest.warns(UserWarning) as rec:
        warn_ineffective_settings(threshold=-1.0, floor_tokens=4, num_patches=4)
    messages = [str(r.message) for r in rec]
    assert len(messages) == 2 and "threshold -1.0" in messages[0] and "floor_tokens 4" in messages[1]


# -- Preprocessor input ----------------------------------------------------------------------------

def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_preprocessor_takes_frames_as_read_frames_yields_them():
    pre = Preprocessor.for_family("siglip", image_size=32)
    arrays = [_rgb(40, 60, 0), _rgb(24, 24, 1)]
    frames = [Frame(index=i, time=i / 25, rgb=a) for i, a in enumerate(arrays)]
    expected = pre(arrays)
    assert expected.shape == (2, 3, 32, 32) and expected.dtype == torch.float32
    assert torch.equal(pre(frames), expected)
    assert torch.equal(pre([frames[0], arrays[1]]), expected)  # mixed
    assert torch.equal(pre(frames[0]), expected[:1])  # one Frame: a batch of one
    assert torch.equal(pre(arrays[1]), expected[1:])  # one [H, W, 3] array
    assert torch.equal(pre(np.stack([arrays[1], arrays[1]])), torch.cat([expected[1:]] * 2))  # [B, H, W, 3]


def test_preprocessor_refuses_other_input_naming_what_it_takes():
    pre = Preprocessor.for_family("siglip", image_size=32)
    bads = ([_rgb(8, 8, 0).astype(np.float32)], [torch.zeros(8, 8, 3, dtype=torch.uint8)], [_rgb(8, 8, 0)[..., :2]])
    for bad in bads:
        with pytest.raises(ValueError, match=r"must be a neuroflow.video.decode.Frame or a uint8 \[H, W, 3\] RGB array"):
            pre(bad)
    with pytest.raises(ValueError, match="no frames"):
        pre([])


# -- the demo without scikit-image -----------------------------------------------------------------

def test_demo_warns_when_scikit_image_is_missing(monkeypatch):
    from neuroflow.commands.demo import demo_clip

    monkeypatch.setitem(sys.modules, "skimage", None)  # `import skimage.data` now raises ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.warns(UserWarning, match="scikit-image is not installed.*synthetic texture"):
        frames, what = demo_clip(3, 32, seed=0, background="auto")
    assert frames.shape == (3, 32, 32, 3) and what.startswith("synthetic texture")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        demo_clip(3, 32, seed=0, background="texture")  # asked for: no warning


# -- pooled output ---------------------------------------------------------------------------------

def test_pooled_output_is_the_pooler_else_the_first_token():
    from transformers import ViTConfig, ViTModel

    x = video(2)[:2]
    siglip = make_model("siglip")
    out = siglip(x, interpolate_pos_encoding=True)
    assert torch.equal(pooled_output(out), out.pooler_output)
    assert torch.equal(dense_forward(VisionAdapter(siglip), x), out.pooler_output)
    torch.manual_seed(0)
    bare = ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96,
                              image_size=32, patch_size=8), add_pooling_layer=False).eval()
    out = dense_outputs(VisionAdapter(bare), x)
    assert out.pooler_output is None
    assert torch.equal(dense_forward(VisionAdapter(bare), x), out.last_hidden_state[:, 0])
    dino = make_model("dinov2")
    assert torch.equal(dense_forward(VisionAdapter(dino), x), dino(x).pooler_output)
