"""Defaults come from a preset: ``"measured"`` (chosen on real weights, the default) or
``"paper"``; a setting given explicitly overrides its preset value."""

import pytest
import torch

from conftest import make_model, video
from neuroflow import NeuroFlow
from neuroflow.engine import PRESETS


def test_the_default_is_the_measured_preset():
    nf = NeuroFlow(make_model("siglip"))
    assert nf.preset == "measured"
    measured = PRESETS["measured"]
    assert (nf.arch, nf.threshold, nf.ema_decay, nf.floor_tokens, nf.reference, nf.max_staleness) == (
        measured["arch"], measured["threshold"], measured["ema_decay"], measured["floor_tokens"],
        measured["reference"], measured["max_staleness"])
    assert "age" in nf.state_bytes_per_stream(40, 48)  # the staleness bound keeps ages
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
    with pytest.raises(ValueError, match="preset must be one of measured, paper"):
        NeuroFlow(make_model("siglip"), preset="fast")
