"""The engine against the independent per-stream oracle (tests/oracle.py), frame by frame.

Gate decisions must match the float32 oracle exactly; outputs and the EMA must be as close to a
float64 oracle (replaying the same decisions) as the float32 oracle is, under the tolerance policy.
"""

import pytest
import torch

import oracle
from conftest import as_double, make_model, video
from helpers import stream_tensor
from helpers import PaperFlow
from neuroflow import NeuroFlow
from neuroflow.tooling.testing import assert_close

# (threshold, ema_decay, floor_tokens): "mixed" gives floor-triggered and threshold-decided frames
# on the synthetic clip; "floor" makes every later frame floor-decided.
SETTINGS = {"mixed": (0.02, 0.2, 3), "floor": (1.5, 0.05, 4)}

CASES = [
    ("siglip", "A"), ("siglip", "B"), ("siglip", "C"),
    ("clip", "A"), ("clip", "B"), ("clip", "C"),
    ("vit", "C"), ("dinov2", "B"), ("dinov2", "C"), ("dinov2_registers", "C"),
    ("siglip", "KV"), ("clip", "KV"), ("vit", "KV"), ("dinov2", "KV"), ("dinov2_registers", "KV"),
]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("family,arch", CASES)
def test_engine_matches_oracle(family, arch, setting):
    threshold, decay, floor = SETTINGS[setting]
    model = make_model(family)
    frames = video(6)
    nf = PaperFlow(model, arch=arch, threshold=threshold, ema_decay=decay, floor_tokens=floor)
    with torch.inference_mode():
        r32 = oracle.run_stream(model, frames, arch, threshold, decay, floor)
        r64 = oracle.run_stream(
            as_double(model), frames.double(), arch, threshold, decay, floor, masks=[r["active"] for r in r32]
        )
        counts = []
        for t in range(frames.shape[0]):
            out = nf(frames[t : t + 1], stream_ids=["cam"])
            assert torch.equal(out.active_mask[0], r32[t]["active"]), f"frame {t}: gate decisions differ"
            assert out.first_frame.tolist() == [t == 0]
            counts.append(int(out.active_mask.sum()))
            assert_close(out.pooler_output[0], r64[t]["pooled"], r32[t]["pooled"], f"frame {t} pooled")
            idx = r32[t]["idx"]
            if arch == "B":
                seq = out.last_hidden_state[0]
                assert_close(seq[idx], r64[t]["seq"], r32[t]["seq"], f"frame {t} tokens")
                rest = torch.ones(seq.shape[0], dtype=torch.bool)
                rest[idx] = False
                assert (seq[rest] == 0).all()
            else:
                assert_close(out.last_hidden_state[0], r64[t]["seq"], r32[t]["seq"], f"frame {t} tokens")
            assert_close(stream_tensor(nf, "cam", "ema"), r64[t]["ema"], r32[t]["ema"], f"frame {t} EMA")
    n = frames.shape[-2] // 8 * frames.shape[-1] // 8
    assert counts[0] == n
    if setting == "floor":
        assert counts[1:] == [floor] * (len(counts) - 1)
    else:  # the clip must exercise both rules, or this test proves less than it claims
        assert floor in counts[1:] and any(floor < c < n for c in counts[1:]), counts


def test_cls_context_readout_off_matches_oracle():
    """``cls_readout="active"``: CLS models run Architecture C exactly like SigLIP's."""
    model = make_model("vit")
    frames = video(4)
    nf = PaperFlow(model, arch="C", threshold=0.02, ema_decay=0.2, floor_tokens=3, cls_readout="active")
    with torch.inference_mode():
        r32 = oracle.run_stream(model, frames, "C", 0.02, 0.2, 3, cls_context=False)
        r64 = oracle.run_stream(as_double(model), frames.double(), "C", 0.02, 0.2, 3, cls_context=False,
                                masks=[r["active"] for r in r32])
        for t in range(frames.shape[0]):
            out = nf(frames[t : t + 1])
            assert torch.equal(out.active_mask[0], r32[t]["active"])
            assert_close(out.pooler_output[0], r64[t]["pooled"], r32[t]["pooled"], f"frame {t} pooled")


# Gate options (issue #12): the engine against the oracle's literal rules for each option.
OPTION_SETTINGS = {
    "computed": (0.02, 0.2, 3, dict(reference="computed")),
    "staleness": (0.05, 0.2, 1, dict(max_staleness=2)),
    "budget_only": (None, 0.2, 0, dict(budget=7)),
    "budget_cap": (0.01, 0.2, 2, dict(budget=0.25)),
    "motion_norm": (0.01, 0.2, 3, dict(motion_norm=True)),
    "scene_cut": (0.02, 0.2, 3, dict(scene_cut=0.3)),
    "all": (0.02, 0.2, 2, dict(reference="computed", max_staleness=2, budget=10, motion_norm=True, scene_cut=0.5)),
}


def cut_video(num_frames=6, cut_at=3):
    """The synthetic clip with a different scene from ``cut_at`` on (a scene cut)."""
    a, b = video(num_frames), video(num_frames, seed=7)
    return torch.cat([a[:cut_at], b[cut_at:]])


@pytest.mark.parametrize("setting", sorted(OPTION_SETTINGS))
@pytest.mark.parametrize("family,arch", [("siglip", "C"), ("dinov2", "B"), ("clip", "A"), ("vit", "KV")])
def test_engine_options_match_oracle(family, arch, setting):
    threshold, decay, floor, options = OPTION_SETTINGS[setting]
    model = make_model(family)
    frames = cut_video()
    nf = PaperFlow(model, arch=arch, threshold=threshold, ema_decay=decay, floor_tokens=floor, **options)
    with torch.inference_mode():
        r32 = oracle.run_stream(model, frames, arch, threshold, decay, floor, **options)
        r64 = oracle.run_stream(as_double(model), frames.double(), arch, threshold, decay, floor,
                                masks=[r["active"] for r in r32], cuts=[r["cut"] for r in r32], **options)
        counts = []
        for t in range(frames.shape[0]):
            out = nf(frames[t : t + 1], stream_ids=["cam"])
            assert torch.equal(out.active_mask[0], r32[t]["active"]), f"frame {t}: gate decisions differ"
            assert out.first_frame.tolist() == [t == 0]
            counts.append(int(out.active_mask.sum()))
            assert_close(out.pooler_output[0], r64[t]["pooled"], r32[t]["pooled"], f"frame {t} pooled")
            assert_close(stream_tensor(nf, "cam", "ema"), r64[t]["ema"], r32[t]["ema"], f"frame {t} reference")
            if "max_staleness" in options:
                assert stream_tensor(nf, "cam", "age").tolist() == r32[t]["ages"], f"frame {t} ages"
    n = counts[0]
    if "scene_cut" in options:
        cuts = [t for t, r in enumerate(r32) if r["cut"]]
        assert cuts == [3], f"the clip must cut at frame 3 only, got {cuts}"
        assert counts[3] == n
    if threshold is None:
        assert counts[1:] == [options["budget"]] * (len(counts) - 1)
    elif setting != "all":  # the clip must leave the gate a choice, or this test proves less
        assert any(c < n for c in counts[1:]), counts
