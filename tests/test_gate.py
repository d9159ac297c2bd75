"""The reference gate's rules, one at a time, on hand-made embeddings."""

import torch

from neuroflow.gate import cosine_surprise, gate_reference, select_active


def _unit(n, d, hot):
    """n embeddings of size d, each a one-hot at position hot[i]."""
    x = torch.zeros(n, d)
    x[torch.arange(n), torch.tensor(hot)] = 1.0
    return x


def test_threshold_is_strict():
    ema = _unit(3, 4, [0, 0, 0])[None]
    h = _unit(3, 4, [0, 1, 1])[None]  # surprise exactly 0, 1, 1
    g = gate_reference(h, ema, torch.tensor([False]), threshold=1.0, ema_decay=0.1, floor_tokens=0)
    assert g.surprise.tolist() == [[0.0, 1.0, 1.0]]
    assert not g.active.any()
    g = gate_reference(h, ema, torch.tensor([False]), threshold=0.999, ema_decay=0.1, floor_tokens=0)
    assert g.active.tolist() == [[False, True, True]]


def test_floor_takes_top_surprise_and_breaks_ties_by_index():
    s = torch.tensor([[0.1, 0.5, 0.3, 0.5, 0.5, 0.0]])
    assert select_active(s, threshold=0.9, floor_tokens=2).tolist() == [[False, True, False, True, False, False]]
    assert select_active(s, threshold=0.9, floor_tokens=4).tolist() == [[False, True, True, True, True, False]]
    # Enough patches pass: the floor does nothing.
    assert select_active(s, threshold=0.2, floor_tokens=2).tolist() == [[False, True, True, True, True, False]]
    # A floor above N activates everything.
    assert select_active(s, threshold=0.9, floor_tokens=10).all()


def test_first_frame_is_dense_and_sets_ema():
    h = torch.randn(2, 5, 8)
    ema = torch.randn(2, 5, 8)
    g = gate_reference(h, ema, torch.tensor([True, False]), threshold=2.0, ema_decay=0.25, floor_tokens=1)
    assert g.active[0].all() and g.active[1].sum() == 1
    assert torch.isinf(g.surprise[0]).all() and torch.isfinite(g.surprise[1]).all()
    assert torch.equal(g.ema[0], h[0])
    assert torch.allclose(g.ema[1], 0.75 * ema[1] + 0.25 * h[1])
    assert g.cu_seqlens.tolist() == [0, 5, 6]


def test_every_patch_updates_the_ema_active_or_not():
    h, ema = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    g = gate_reference(h, ema, torch.tensor([False]), threshold=0.5, ema_decay=0.1, floor_tokens=0)
    assert 0 < g.active.sum() < 6
    assert torch.equal(g.ema, 0.9 * ema + 0.1 * h)


def test_ema_is_float32_for_half_models():
    """With decay 0.01 a half-precision EMA would round the update away; ours must not."""
    ema = torch.ones(1, 1, 8)
    h = torch.full((1, 1, 8), 1.04, dtype=torch.float16)
    g = gate_reference(h, ema, torch.tensor([False]), threshold=0.35, ema_decay=0.01, floor_tokens=0)
    assert g.ema.dtype == torch.float32 and g.surprise.dtype == torch.float32
    exact = 0.99 * ema.double() + 0.01 * h.double()  # 1.0004: below half an fp16 ulp above 1
    assert (exact - 1.0 < torch.finfo(torch.float16).eps / 2).all()
    assert ((g.ema.double() - exact).abs() < torch.finfo(torch.float32).eps).all()


def test_zero_embedding_has_surprise_one():
    assert cosine_surprise(torch.zeros(1, 4), torch.ones(1, 4)).item() == 1.0


def test_packing_order_and_offsets():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    ema = h.clone()
    ema[0, 2] = -ema[0, 2]
    ema[1, 0] = -ema[1, 0]
    ema[1, 3] = -ema[1, 3]
    g = gate_reference(h, ema, torch.tensor([False, False]), threshold=0.5, ema_decay=0.0, floor_tokens=0)
    assert g.cu_seqlens.dtype == torch.int32 and g.cu_seqlens.tolist() == [0, 1, 3]
    assert g.index.tolist() == [2, 0, 3]
    assert torch.equal(g.pack(h), torch.stack([h[0, 2], h[1, 0], h[1, 3]]))


def test_per_frame_threshold_and_decay():
    h, ema = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    first = torch.tensor([False, False])
    both = gate_reference(h, ema, first, torch.tensor([0.2, 1.5]), torch.tensor([0.1, 0.5]), floor_tokens=1)
    for b, (thr, decay) in enumerate([(0.2, 0.1), (1.5, 0.5)]):
        one = gate_reference(h[b : b + 1], ema[b : b + 1], first[:1], thr, decay, floor_tokens=1)
        assert torch.equal(both.active[b], one.active[0])
        assert torch.equal(both.ema[b], one.ema[0])
