"""CUDA-graph replay of the steady-state step equals the eager step exactly (GPU only)."""

import pytest
import torch

from conftest import make_model, video
from neuroflow import NeuroFlow

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("family,arch", [("siglip", "C"), ("siglip", "B"), ("siglip", "A"), ("siglip", "KV"),
                                         ("clip", "C"), ("dinov2_registers", "KV")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_replay_equals_eager(family, arch, dtype):
    model = make_model(family, dtype=dtype).cuda()
    settings = dict(arch=arch, threshold=0.02, ema_decay=0.2, floor_tokens=3)
    graphed, eager = NeuroFlow(model, cuda_graphs=True, **settings), NeuroFlow(model, **settings)
    frames = torch.stack([video(8, seed=s) for s in range(3)], dim=1).to("cuda", dtype)  # [F, 3, 3, H, W]
    ids = [["a", "b", "c"], ["c", "a", "b"]]  # same batch shape, other slot order: same graph
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            order = ids[t % 2]
            x = frames[t][[["a", "b", "c"].index(i) for i in order]]
            g, e = graphed(x, stream_ids=order), eager(x, stream_ids=order)
            for field in ("pooler_output", "last_hidden_state", "active_mask", "sparsity", "surprise", "first_frame"):
                a, b = getattr(g, field), getattr(e, field)
                assert (a is None) == (b is None), field
                if a is not None:
                    assert torch.equal(a, b), f"frame {t} {field}"
        graphed.sync_errors()
        eager.sync_errors()
    assert graphed._graphs.replays > 0 and graphed._graphs.captures >= 1
    assert graphed.overflowed_frames == eager.overflowed_frames
    gs, es = graphed.stream_state_dict(), eager.stream_state_dict()
    for pg, pe in zip(gs["pools"], es["pools"]):
        for k in pg["tensors"]:
            assert torch.equal(pg["tensors"][k], pe["tensors"][k]), k


@cuda
@pytest.mark.cuda
def test_deferred_finiteness_on_cuda_undoes_the_bad_call():
    model = make_model("siglip").cuda()
    nf = NeuroFlow(model, threshold=0.02, ema_decay=0.2, floor_tokens=3, cuda_graphs=True)
    frames = video(4).cuda()
    with torch.inference_mode():
        for t in range(3):
            nf(torch.stack([frames[t], frames[t]]), stream_ids=["a", "b"])
        before = nf.stream_state_dict()
        bad = torch.stack([frames[3], frames[3]])
        bad[0, 0, 0, 0] = float("nan")
        nf(bad, stream_ids=["a", "b"])  # no sync: returns
        with pytest.raises(ValueError, match=r"previous call contained NaN or Inf in batch row\(s\) \[0\]"):
            nf.sync_errors()
    after = nf.stream_state_dict()
    for pb, pa in zip(before["pools"], after["pools"]):
        for k in pb["tensors"]:
            assert torch.equal(pb["tensors"][k], pa["tensors"][k]), k
