"""Bad input gets a clear error naming the problem, and leaves every stream exactly as it was."""

import pytest
import torch

from conftest import make_model, video
from helpers import assert_same_state, stream_tensor
from helpers import PaperFlow
from neuroflow import NeuroFlow, UnsupportedModelError
from neuroflow.engine.state_file import StateFileError


@pytest.fixture
def engine_with_streams():
    nf = PaperFlow(make_model("siglip"), threshold=0.02, ema_decay=0.2, floor_tokens=3)
    frames = video(2)
    with torch.inference_mode():
        nf(torch.stack([frames[0], frames[0]]), stream_ids=["a", "b"])
        nf(torch.stack([frames[1], frames[1]]), stream_ids=["a", "b"])
    return nf, frames


def _nan_frame(frames):
    x = frames[:2].clone()
    x[1, 0, 3, 3] = float("nan")
    return x


def _inf_frame(frames):
    x = frames[:2].clone()
    x[0, 2, 0, 0] = float("inf")
    return x


BAD_CALLS = {
    "rank 3": (lambda f: f[0], None, ValueError, r"\[B, C, H, W\]"),
    "rank 5": (lambda f: f[None], None, ValueError, r"\[B, C, H, W\]"),
    "two channels": (lambda f: f[:2, :2], None, ValueError, "channels"),
    "height not a patch multiple": (lambda f: f[:2, :, :36], None, ValueError, "multiple of the patch size"),
    "width not a patch multiple": (lambda f: f[:2, :, :, :45], None, ValueError, "multiple of the patch size"),
    "smaller than a patch": (lambda f: f[:2, :, :4, :4], None, ValueError, "multiple of the patch size"),
    "empty batch": (lambda f: f[:0], [], ValueError, "no frame"),
    "NaN": (_nan_frame, None, ValueError, r"NaN or Inf in batch row\(s\) \[1\]"),
    "Inf": (_inf_frame, None, ValueError, r"NaN or Inf in batch row\(s\) \[0\]"),
    "float64 frames": (lambda f: f[:2].double(), None, TypeError, "dtype"),
    "int frames": (lambda f: (f[:2] * 100).to(torch.int32), None, TypeError, "dtype"),
    "meta device": (lambda f: f[:2].to("meta"), None, ValueError, "on meta"),
    "not a tensor": (lambda f: f[:2].numpy(), None, TypeError, "torch.Tensor"),
    "duplicate ids": (lambda f: f[:2], ["a", "a"], ValueError, "duplicate stream ids"),
    "too few ids": (lambda f: f[:2], ["a"], ValueError, "1 stream ids for a batch of 2"),
    "unhashable id": (lambda f: f[:2], [["a"], "b"], TypeError, "hashable"),
    "ids as a string": (lambda f: f[:2], "ab", TypeError, "sequence"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_call_is_rejected_and_state_untouched(engine_with_streams, case):
    nf, frames = engine_with_streams
    make, ids, error, message = BAD_CALLS[case]
    before = nf.stream_state_dict()
    with torch.inference_mode(), pytest.raises(error, match=message):
        nf(make(frames), stream_ids=ids)
    assert_same_state(before, nf.stream_state_dict())


@pytest.mark.parametrize("setting,value", [
    ("threshold", 2.5), ("threshold", -1.5), ("threshold", float("nan")), ("threshold", "0.3"),
    ("ema_decay", -0.1), ("ema_decay", 1.5), ("ema_decay", float("nan")),
    ("floor_tokens", -1), ("floor_tokens", 2.5), ("floor_tokens", True),
    ("threshold", None), ("reference", "last"), ("max_staleness", 0), ("max_staleness", 1.5),
    ("budget", 0), ("budget", 1.5), ("budget", -0.5), ("motion_norm", "yes"), ("scene_cut", 0.0),
    ("scene_cut", 2.0), ("signal", "raw"), ("signal", None),
])
def test_settings_out_of_range(engine_with_streams, setting, value):
    nf, _ = engine_with_streams
    before = nf.stream_state_dict()
    with pytest.raises(ValueError, match=setting):
        setattr(nf, setting, value)
    with pytest.raises(ValueError, match=setting):
        PaperFlow(make_model("siglip"), **{setting: value})
    assert_same_state(before, nf.stream_state_dict())


def test_gate_option_combinations_are_checked(engine_with_streams):
    nf, _ = engine_with_streams
    before = nf.stream_state_dict()
    model = make_model("siglip")
    with pytest.raises(ValueError, match="motion_norm needs a threshold"):
        PaperFlow(model, threshold=None, budget=4, motion_norm=True)
    with pytest.raises(ValueError, match="scene_cut needs a threshold"):
        PaperFlow(model, threshold=None, budget=4, scene_cut=0.5)
    nf.budget = 5
    nf.threshold = None  # allowed now that there is a budget
    with pytest.raises(ValueError, match="needs a budget"):
        nf.budget = None
    assert nf.budget == 5 and nf.threshold is None
    # Staleness adds a state tensor: it cannot be switched on under live streams.
    with pytest.raises(ValueError, match="reset"):
        nf.max_staleness = 3
    assert nf.max_staleness is None
    assert_same_state({**before, "settings": nf.stream_state_dict()["settings"]}, nf.stream_state_dict())
    nf.reset()
    nf.max_staleness = 3
    assert "age" in nf.state_bytes_per_stream(40, 48)


def test_signal_switches_only_without_streams(engine_with_streams, tmp_path):
    """The stored reference is of the gate's signal: switching it under live streams raises and
    changes nothing; a state saved under one signal does not load into an engine of the other."""
    nf, frames = engine_with_streams
    before = nf.stream_state_dict()
    with pytest.raises(ValueError, match="signal can change only without streams"):
        nf.signal = "patch"
    assert nf.signal == "embedding" and nf.gate_settings.signal == "embedding"
    assert_same_state(before, nf.stream_state_dict())
    nf.save_state(tmp_path / "embedding.pt")
    other = PaperFlow(make_model("siglip"), threshold=0.02, ema_decay=0.2, floor_tokens=3, signal="patch")
    with pytest.raises(ValueError, match="signal"):
        other.load_stream_state_dict(before)
    with pytest.raises(StateFileError):
        other.load_state(tmp_path / "embedding.pt")
    assert other.stream_ids == []
    nf.reset()
    nf.signal = "patch"
    assert nf.gate_settings.signal == "patch"


def test_bad_arch_and_readout():
    model = make_model("siglip")
    with pytest.raises(ValueError, match="arch must be one of A, B, C, KV"):
        PaperFlow(model, arch="D")
    with pytest.raises(ValueError, match="cls_readout"):
        PaperFlow(model, cls_readout="mean")
    with pytest.raises(ValueError, match="floor_tokens >= 1"):
        PaperFlow(model, arch="B", floor_tokens=0)


def test_unknown_stream_reset_changes_nothing(engine_with_streams):
    nf, _ = engine_with_streams
    before = nf.stream_state_dict()
    with pytest.raises(KeyError, match="unknown stream id"):
        nf.reset(["a", "zzz"])
    assert_same_state(before, nf.stream_state_dict())


def test_unsupported_models():
    with pytest.raises(UnsupportedModelError, match="not a supported vision model"):
        PaperFlow(torch.nn.Linear(3, 3))
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    naflex = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, patch_size=8, num_patches=16))
    with pytest.raises(UnsupportedModelError, match="NaFlex"):
        PaperFlow(naflex)
