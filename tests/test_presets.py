"""Defaults come from a preset: ``"measured"`` (chosen on real weights, the default) or
``"paper"``; a setting given explicitly overrides its preset value."""

import warnings

import pytest
import torch

from conftest import make_model, video
from neuroflow import NeuroFlow
from neuroflow.engine.engine import KEYFRAME, PRESETS
from neuroflow.engine.presets import DEFAULT_PRESET


def test_the_default_is_the_measured_preset():
    nf = NeuroFlow(make_model("siglip"))
    assert nf.preset == "measured"
    measured = PRESETS["measured"]
    assert (nf.arch, nf.threshold, nf.ema_decay, nf.floor_tokens, nf.reference, nf.max_staleness,
            nf.keyframe_every, nf.keyframe_drift) == (
        measured["arch"], measured["threshold"], measured["ema_decay"], measured["floor_tokens"],
        measured["reference"], measured["max_staleness"], measured["keyframe_every"], measured["keyframe_drift"])
    assert measured["keyframe_drift"] is not None  # drift keyframes: what moved the handheld clip (docs/gate.md)
    assert "policy_since" in nf.state_bytes_per_stream(40, 48)  # the keyframe schedule keeps its counter
    with torch.inference_mode():
        out = [nf(video(3)[t : t + 1]) for t in range(3)]
    assert out[0].first_frame.all() and not out[2].first_frame.any()


def test_the_paper_is_one_argument_away_and_explicit_settings_win():
    paper = NeuroFlow(make_model("siglip"), preset="paper")
    assert (paper.arch, paper.threshold, paper.ema_decay, paper.reference, paper.max_staleness) == ("C", 0.35, 0.01,
                                                                                                   "ema", None)
    mixed = NeuroFlow(make_model("siglip"), preset="paper", arch="KV", threshold=0.1)
    assert (mixed.arch, mixed.threshold, mixed.reference) == ("KV", 0.1, "ema")
    assert NeuroFlow(make_model("siglip"), max_staleness=None).max_staleness is None  # None is a real value
    assert NeuroFlow(make_model("siglip"), keyframe_drift=None).keyframe_drift is None
    assert paper.keyframe_drift is None and paper.keyframe_every is None
    with pytest.raises(ValueError, match="keyframe_drift"):
        NeuroFlow(make_model("siglip"), keyframe_drift=-0.1)
    with pytest.raises(ValueError, match="preset must be one of measured, paper"):
        NeuroFlow(make_model("siglip"), preset="fast")


# -- settings with no effect warn, only when given explicitly ----------------------------------------

def run(nf, frames) -> tuple[torch.Tensor, torch.Tensor]:
    """``[F, N]`` bool, the patches computed on each frame of one stream, and ``[F]`` int8, each
    frame's kind (``NeuroFlowOutput.frame_kind``)."""
    with torch.inference_mode():
        outs = [nf(frames[t : t + 1]) for t in range(frames.shape[0])]
    return torch.cat([o.active_mask for o in outs]), torch.cat([o.frame_kind for o in outs])


def masks(nf, frames) -> torch.Tensor:
    """``[F, N]`` bool: the patches computed on each frame of one stream."""
    return run(nf, frames)[0]


def ineffective(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning) and "no effect" in str(w.message)]


@pytest.mark.parametrize("preset", ["measured", "paper"])
@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_preset_values_never_warn(preset, family):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nf = NeuroFlow(make_model(family), preset=preset)
        masks(nf, video(2))


def test_ema_decay_with_the_computed_reference_warns_once_and_changes_nothing():
    frames = video(5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engines = [NeuroFlow(make_model("siglip"), ema_decay=d) for d in (0.01, 0.5, 1.0)]
    messages = ineffective(record)
    assert len(messages) == 3 and all("ema_decay" in m and "reference='computed'" in m for m in messages)
    assert engines[0].reference == "computed"
    got = [masks(nf, frames) for nf in engines]
    assert not got[0][1:].all(), "the gate must skip patches here for the comparison to mean anything"
    assert all(torch.equal(got[0], m) for m in got[1:])  # the decay is unused: identical masks
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engines[0].ema_decay = 0.3  # set later, explicitly: warns too
    assert len(ineffective(record)) == 1


def test_ema_decay_with_the_ema_reference_does_not_warn_and_matters():
    frames = video(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = NeuroFlow(make_model("siglip"), reference="ema", ema_decay=0.01, threshold=0.02)
        b = NeuroFlow(make_model("siglip"), reference="ema", ema_decay=1.0, threshold=0.02)
    assert not torch.equal(masks(a, frames), masks(b, frames))


def test_floor_tokens_without_a_threshold_warns_and_changes_nothing():
    frames = video(5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        floored = NeuroFlow(make_model("siglip"), threshold=None, budget=3, floor_tokens=8)
    messages = ineffective(record)
    assert len(messages) == 1 and "floor_tokens 8" in messages[0] and "threshold=None" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the preset's floor, and an explicit 0, do not warn
        plain = NeuroFlow(make_model("siglip"), threshold=None, budget=3)
        NeuroFlow(make_model("siglip"), threshold=None, budget=3, floor_tokens=0)
    got, (expected, kinds) = masks(floored, frames), run(plain, frames)
    assert (kinds[1:] != KEYFRAME).any(), "the comparison needs gated frames"
    # the preset's keyframes are dense, the other frames compute the budget's 3 patches
    counts = torch.where(kinds[1:] == KEYFRAME, got.shape[1], 3)
    assert torch.equal(got, expected) and (got[1:].sum(dim=1) == counts).all()


@pytest.mark.parametrize(("family", "arch"), [("siglip", "C"), ("clip", "KV"), ("clip", "A")])
def test_cls_readout_where_it_does_not_apply_warns_and_changes_nothing(family, arch):
    frames = video(4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        given = NeuroFlow(make_model(family), arch=arch, cls_readout="active")
    messages = ineffective(record)
    assert len(messages) == 1 and "cls_readout='active'" in messages[0] and f"arch={arch!r}" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = NeuroFlow(make_model(family), arch=arch)
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            x, y = given(frames[t : t + 1]), default(frames[t : t + 1])
            assert torch.equal(x.active_mask, y.active_mask)
            assert torch.equal(x.last_hidden_state, y.last_hidden_state)


def test_cls_readout_where_it_applies_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for readout in ("context", "active"):
            nf = NeuroFlow(make_model("clip"), arch="C", cls_readout=readout)
            assert nf.cls_readout == readout
    assert NeuroFlow(make_model("clip"), arch="C").cls_readout == "context"  # the default


@pytest.mark.parametrize(("family", "arch", "setting", "needle"), [
    ("siglip", "A", dict(head_cache=False), "head_cache=False"),
    ("clip", "KV", dict(head_cache=False), "head_cache=False"),  # CLS pooling: no attention-pooling head
    ("siglip", "A", dict(cache_dtype=torch.float16), "cache_dtype=torch.float16"),
    ("siglip", "B", dict(cache_dtype=torch.float16), "cache_dtype=torch.float16"),
    ("siglip", "C", dict(cache_dtype=torch.float16), "cache_dtype=torch.float16"),  # no context readout
    ("siglip", "KV", dict(cache_dtype=torch.float16, kv_layers=0), "cache_dtype=torch.float16"),
])
def test_cache_settings_where_no_cache_exists_warn_and_change_nothing(family, arch, setting, needle):
    frames = video(4)
    base = {k: v for k, v in setting.items() if k == "kv_layers"}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        given = NeuroFlow(make_model(family), arch=arch, **setting)
    messages = ineffective(record)
    assert len(messages) == 1 and needle in messages[0] and f"arch={arch!r}" in messages[0], messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = NeuroFlow(make_model(family), arch=arch, **base)
    assert given.stream_state_dict()["config"] == default.stream_state_dict()["config"]
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            x, y = given(frames[t : t + 1]), default(frames[t : t + 1])
            assert torch.equal(x.active_mask, y.active_mask)
            assert torch.equal(x.last_hidden_state, y.last_hidden_state)


@pytest.mark.parametrize(("family", "arch", "setting"), [
    ("siglip", "C", dict(head_cache=False)), ("siglip", "KV", dict(head_cache=True)),
    ("siglip", "KV", dict(cache_dtype=torch.float16)), ("clip", "C", dict(cache_dtype=torch.float16)),
])
def test_cache_settings_where_they_apply_do_not_warn(family, arch, setting):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NeuroFlow(make_model(family), arch=arch, **setting)


def test_one_default_preset_for_the_api_and_the_command_line():
    import argparse
    import inspect

    from neuroflow.commands._common import add_gate_arguments, chosen_archs, gate_kwargs

    assert inspect.signature(NeuroFlow).parameters["preset"].default == DEFAULT_PRESET
    p = argparse.ArgumentParser()
    add_gate_arguments(p)
    args = p.parse_args([])
    assert gate_kwargs(args) == {"preset": DEFAULT_PRESET} and chosen_archs(args) == [PRESETS[DEFAULT_PRESET]["arch"]]
    args = p.parse_args(["--preset", "paper", "--threshold", "none", "--budget", "0.25", "--max-staleness", "none",
                         "--kv-layers", "1,3", "--motion-norm", "--reference", "ema", "--floor", "2"])
    assert gate_kwargs(args) == {"preset": "paper", "threshold": None, "budget": 0.25, "max_staleness": None,
                                 "kv_layers": (1, 3), "motion_norm": True, "reference": "ema", "floor_tokens": 2}
    assert gate_kwargs(p.parse_args(["--budget", "12", "--kv-layers", "2", "--arch", "C", "--signal", "patch"])) == {
        "preset": DEFAULT_PRESET, "budget": 12, "kv_layers": 2, "arch": "C", "signal": "patch"}
    with pytest.raises(SystemExit):
        p.parse_args(["--signal", "raw"])
    several = argparse.ArgumentParser()
    add_gate_arguments(several, several_archs=True)
    assert chosen_archs(several.parse_args(["--arch", "C", "KV", "C"])) == ["C", "KV"]
    assert "arch" not in gate_kwargs(several.parse_args(["--arch", "C", "KV"]))
