"""Stream state: save/restore gives identical continuations, and state follows .to()."""

import pytest
import torch

from conftest import as_double, dense, make_model, video
from helpers import assert_same_state, assert_same_up_to_rounding, stream_tensor
from helpers import PaperFlow
from neuroflow import NeuroFlow

SETTINGS = dict(threshold=0.02, ema_decay=0.2, floor_tokens=3)


@pytest.mark.parametrize("family,arch", [("siglip", "A"), ("siglip", "B"), ("siglip", "C"), ("clip", "C"),
                                         ("dinov2_registers", "C"), ("vit", "KV")])
def test_saved_state_continues_identically(tmp_path, family, arch):
    model = make_model(family)
    clips = torch.stack([video(6, seed=0), video(6, seed=1)], dim=1)  # [F, 2, 3, H, W]
    ids = ["cam-1", ("site", 7)]
    first = PaperFlow(model, arch=arch, **SETTINGS)
    with torch.inference_mode():
        for t in range(3):
            first(clips[t], stream_ids=ids)
        path = tmp_path / "streams.pt"
        first.save_state(path)
        # A fresh engine (as after a process restart) continues from the file.
        restored = PaperFlow(make_model(family), arch=arch, **SETTINGS)
        restored.load_state(path)
        assert_same_state(first.stream_state_dict(), restored.stream_state_dict())
        model64 = as_double(model)
        for t in range(3, 6):
            a, b = first(clips[t], stream_ids=ids), restored(clips[t], stream_ids=ids)
            assert torch.equal(a.active_mask, b.active_mask)
            assert_same_state(first.stream_state_dict(), restored.stream_state_dict())
            # Same state and inputs; PyTorch's CPU kernels may still round differently between
            # two module instances (seen: 5e-7 in SigLIP's head), so no bitwise claim on outputs.
            ref32, ref64 = dense(model, clips[t]), dense(model64, clips[t].double())
            assert_same_up_to_rounding(b.pooler_output, a.pooler_output, ref32.pooler_output, ref64.pooler_output, "pooled")
            assert_same_up_to_rounding(b.last_hidden_state, a.last_hidden_state, ref32.last_hidden_state,
                                       ref64.last_hidden_state, "tokens")


def test_module_state_dict_carries_streams():
    model, frames = make_model("siglip"), video(3)
    nf = PaperFlow(model, **SETTINGS)
    with torch.inference_mode():
        nf(frames[0:1], stream_ids=["s"])
        nf(frames[1:2], stream_ids=["s"])
    sd = nf.state_dict()
    other = PaperFlow(make_model("siglip", seed=1), **SETTINGS)
    other.load_state_dict(sd)  # weights and streams
    assert_same_state(nf.stream_state_dict(), other.stream_state_dict())
    with torch.inference_mode():
        a, b = nf(frames[2:3], stream_ids=["s"]), other(frames[2:3], stream_ids=["s"])
        ref32, ref64 = dense(model, frames[2:3]), dense(as_double(model), frames[2:3].double())
    assert torch.equal(a.active_mask, b.active_mask)
    assert_same_up_to_rounding(b.pooler_output, a.pooler_output, ref32.pooler_output, ref64.pooler_output, "pooled")


def test_incompatible_state_is_rejected_and_nothing_changes(tmp_path):
    frames = video(2)
    c = PaperFlow(make_model("siglip"), arch="C", **SETTINGS)
    b = PaperFlow(make_model("siglip"), arch="B", **SETTINGS)
    with torch.inference_mode():
        c(frames[0:1], stream_ids=["s"])
        b(frames[0:1], stream_ids=["t"])
    before = b.stream_state_dict()
    with pytest.raises(ValueError, match="incompatible"):
        b.load_stream_state_dict(c.stream_state_dict())
    assert_same_state(before, b.stream_state_dict())
    with pytest.raises(TypeError, match="cannot be saved"):
        c.reset()
        with torch.inference_mode():
            c(frames[0:1], stream_ids=[frozenset({1})])
        c.save_state(tmp_path / "x.pt")


def test_state_moves_with_dtype_and_keeps_ema_float32():
    model, frames = make_model("siglip"), video(3)
    nf = PaperFlow(model, **SETTINGS)
    with torch.inference_mode():
        nf(frames[0:1], stream_ids=["s"])
    nf.to(torch.bfloat16)
    assert stream_tensor(nf, "s", "ema").dtype == torch.float32
    assert stream_tensor(nf, "s", "cache").dtype == torch.bfloat16
    with torch.inference_mode():
        out = nf(frames[1:2].bfloat16(), stream_ids=["s"])
    assert out.pooler_output.dtype == torch.bfloat16 and not out.first_frame.any()


def test_state_written_under_inference_mode_is_usable_outside_it():
    model, frames = make_model("siglip"), video(3)
    nf = PaperFlow(model, **SETTINGS)
    with torch.inference_mode():
        nf(frames[0:1])
    with torch.no_grad():
        out = nf(frames[1:2])
    assert not out.first_frame.any()


def test_cache_memory_report_and_dtype():
    model = make_model("vit", layers=2)  # D = 48, 2 layers, 1 prefix token
    full = PaperFlow(model, arch="KV").state_bytes_per_stream(40, 48)  # 5 x 6 patches
    tokens, n = 31, 30
    assert full["ema"] == n * 48 * 4 and full["cache"] == tokens * 48 * 4
    assert full["kv_k"] == full["kv_v"] == 2 * tokens * 48 * 4
    assert full["total"] == sum(v for k, v in full.items() if k != "total")
    half = PaperFlow(model, arch="KV", cache_dtype=torch.float16)
    assert half.state_bytes_per_stream(40, 48)["kv_k"] == full["kv_k"] // 2
    with torch.inference_mode():
        half(video(1))
    assert stream_tensor(half, 0, "kv_k").dtype == torch.float16
    with pytest.raises(ValueError, match="incompatible"):
        PaperFlow(model, arch="KV").load_stream_state_dict(half.stream_state_dict())
    with pytest.raises(ValueError, match="cache_dtype"):
        PaperFlow(model, arch="KV", cache_dtype=torch.int32)


def _saved_engine(tmp_path, arch="C", seed=0):
    nf = PaperFlow(make_model("siglip", seed=seed), arch=arch, **SETTINGS)
    with torch.inference_mode():
        nf(video(1), stream_ids=["cam"])
    path = tmp_path / "streams.pt"
    nf.save_state(path)
    return nf, path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "plain_torch_file"])
def test_corrupt_state_file_raises_our_error_naming_the_file(tmp_path, damage):
    from neuroflow.engine.state_file import StateFileError

    nf, path = _saved_engine(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a state file at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"some": "dict"}, path)
    other = PaperFlow(make_model("siglip"), **SETTINGS)
    with torch.inference_mode():
        other(video(1), stream_ids=["kept"])
    before = other.stream_state_dict()
    with pytest.raises(StateFileError, match=str(path.name)):
        other.load_state(path)
    assert_same_state(before, other.stream_state_dict())


def test_state_file_of_another_model_settings_or_version_is_refused(tmp_path):
    import neuroflow.engine.state_file as state_file
    from neuroflow.engine.state_file import StateFileError

    _, path = _saved_engine(tmp_path)
    with pytest.raises(StateFileError, match=r"model\.weights"):
        PaperFlow(make_model("siglip", seed=1), **SETTINGS).load_state(path)  # same geometry, other weights
    with pytest.raises(StateFileError, match=r"settings\.arch"):
        PaperFlow(make_model("siglip"), arch="KV", **SETTINGS).load_state(path)
    payload = torch.load(path, weights_only=True)
    payload["version"] = state_file.FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(StateFileError, match="version"):
        PaperFlow(make_model("siglip"), **SETTINGS).load_state(path)


def test_settings_that_do_nothing_warn_in_the_engine():
    with pytest.warns(UserWarning, match="threshold -0.5 is below 0"):
        nf = PaperFlow(make_model("siglip"), threshold=-0.5)
    with pytest.warns(UserWarning, match="threshold -0.1 is below 0"):
        nf.threshold = -0.1
    nf = PaperFlow(make_model("siglip"), floor_tokens=30)
    with torch.inference_mode(), pytest.warns(UserWarning, match="floor_tokens 30 is not below the 30 patches"):
        nf(video(1), stream_ids=["a"])  # a 5x6 grid


def test_int8_kv_cache_state_and_memory():
    """cache_dtype=torch.int8: 8-bit keys/values plus per-token, per-head float32 scales."""
    model = make_model("vit", layers=2)  # D = 48, 2 layers, 1 prefix token
    full = PaperFlow(model, arch="KV").state_bytes_per_stream(40, 48)
    nf = PaperFlow(model, arch="KV", cache_dtype=torch.int8)
    heads = nf.adapter.layers[-1].num_heads
    tokens = 31
    q8 = nf.state_bytes_per_stream(40, 48)
    assert q8["kv_k"] == q8["kv_v"] == full["kv_k"] // 4
    assert q8["kv_k_scale"] == q8["kv_v_scale"] == 2 * tokens * heads * 4
    with torch.inference_mode():
        out = nf(video(1))
    assert torch.isfinite(out.last_hidden_state).all()
    k, k_scale = stream_tensor(nf, 0, "kv_k"), stream_tensor(nf, 0, "kv_k_scale")
    assert k.dtype == torch.int8 and k_scale.shape == (2, tokens, heads) and k_scale.dtype == torch.float32
    # The dense first frame wrote every token: each head's absmax maps to +-127.
    assert (k.view(2, tokens, heads, -1).abs().amax(-1) == 127).all() and (k_scale > 0).all()
