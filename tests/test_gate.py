"""The gate: its decision reference's rules on hand-made embeddings, then the fused kernels (Triton
interpreter) against the packing reference.

Fresh random inputs per case; every kernel output is poisoned before the launch (NaN for floats,
a sentinel for integers) so an element the kernel forgot to write fails the comparison.
"""

import pytest
import torch

from neuroflow.ops import dispatch
from neuroflow.kernels.gate import GATE_CONFIG, GATE_CONFIG_FP32, GATE_TILES
from neuroflow.ops import gate as gate_op
from neuroflow.ops.gate import MAX_FLOOR, gate
from neuroflow.reference.gate import cosine_surprise, gate_decision_reference, gate_reference, select_active
from neuroflow.tooling.testing import assert_close

# -- the decision reference, one rule at a time --------------------------------------------------


def _unit(n, d, hot):
    """n embeddings of size d, each a one-hot at position hot[i]."""
    x = torch.zeros(n, d)
    x[torch.arange(n), torch.tensor(hot)] = 1.0
    return x


def test_threshold_is_strict():
    ema = _unit(3, 4, [0, 0, 0])[None]
    h = _unit(3, 4, [0, 1, 1])[None]  # surprise exactly 0, 1, 1
    g = gate_decision_reference(h, ema, torch.tensor([False]), threshold=1.0, ema_decay=0.1, floor_tokens=0)
    assert g.surprise.tolist() == [[0.0, 1.0, 1.0]]
    assert not g.active.any()
    g = gate_decision_reference(h, ema, torch.tensor([False]), threshold=0.999, ema_decay=0.1, floor_tokens=0)
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
    g = gate_decision_reference(h, ema, torch.tensor([True, False]), threshold=2.0, ema_decay=0.25, floor_tokens=1)
    assert g.active[0].all() and g.active[1].sum() == 1
    assert torch.isinf(g.surprise[0]).all() and torch.isfinite(g.surprise[1]).all()
    assert torch.equal(g.ema[0], h[0])
    assert torch.allclose(g.ema[1], 0.75 * ema[1] + 0.25 * h[1])
    assert g.cu_seqlens.tolist() == [0, 5, 6]


def test_every_patch_updates_the_ema_active_or_not():
    # Own generator, fixed seed: the data (4 of 6 patches active) cannot depend on test order.
    gen = torch.Generator().manual_seed(0)
    h, ema = torch.randn(1, 6, 4, generator=gen), torch.randn(1, 6, 4, generator=gen)
    g = gate_decision_reference(h, ema, torch.tensor([False]), threshold=0.5, ema_decay=0.1, floor_tokens=0)
    assert 0 < g.active.sum() < 6
    assert torch.equal(g.ema, 0.9 * ema + 0.1 * h)


def test_ema_is_float32_for_half_models():
    """With decay 0.01 a half-precision EMA would round the update away; ours must not."""
    ema = torch.ones(1, 1, 8)
    h = torch.full((1, 1, 8), 1.04, dtype=torch.float16)
    g = gate_decision_reference(h, ema, torch.tensor([False]), threshold=0.35, ema_decay=0.01, floor_tokens=0)
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
    g = gate_decision_reference(h, ema, torch.tensor([False, False]), threshold=0.5, ema_decay=0.0, floor_tokens=0)
    assert g.cu_seqlens.dtype == torch.int32 and g.cu_seqlens.tolist() == [0, 1, 3]
    assert g.index.tolist() == [2, 0, 3]
    assert torch.equal(g.pack(h), torch.stack([h[0, 2], h[1, 0], h[1, 3]]))


def test_per_frame_threshold_and_decay():
    h, ema = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    first = torch.tensor([False, False])
    both = gate_decision_reference(h, ema, first, torch.tensor([0.2, 1.5]), torch.tensor([0.1, 0.5]), floor_tokens=1)
    for b, (thr, decay) in enumerate([(0.2, 0.1), (1.5, 0.5)]):
        one = gate_decision_reference(h[b : b + 1], ema[b : b + 1], first[:1], thr, decay, floor_tokens=1)
        assert torch.equal(both.active[b], one.active[0])
        assert torch.equal(both.ema[b], one.ema[0])


# -- the fused kernels against the packing reference ---------------------------------------------

PATCH = 4  # keeps C*p*p small: the interpreter's cost grows with the reduction length
SENTINEL = -12345


def _poisoned(*shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, SENTINEL if dtype != torch.int8 else 77, dtype=dtype, device=device)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(gate_op, "_empty", _poisoned)


def make_inputs(batch, grid, dim, dtype, prefix, seed, slots=5):
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid
    n = gh * gw

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    frames = rnd(batch, 3, gh * PATCH, gw * PATCH)
    weight = rnd(dim, 3, PATCH, PATCH, scale=0.2)
    bias = rnd(dim, scale=0.1)
    pos = rnd(n, dim, scale=0.5)
    pre = rnd(prefix, dim)
    ema = torch.randn(slots, n, dim, generator=g)
    # A later frame resembles its stream's history, so surprises spread over (0, 1).
    h = torch.nn.functional.conv2d(frames.float(), weight.float(), bias.float(), stride=PATCH).flatten(2).transpose(1, 2)
    slot = torch.randperm(slots, generator=g)[:batch]
    ema[slot] = h + pos.float() + 0.8 * torch.randn(batch, n, dim, generator=g) * h.std()
    return frames, weight, bias, pos, pre, ema, slot


def gap_threshold(surprise):
    """A threshold in the widest gap of the surprises' middle half: no decision is a rounding call."""
    s = torch.sort(surprise[torch.isfinite(surprise)].flatten().double()).values
    lo, hi = len(s) // 4, max(len(s) // 4 + 1, 3 * len(s) // 4)
    gaps = s[lo + 1 : hi + 1] - s[lo:hi]
    i = lo + int(torch.argmax(gaps))
    return float((s[i] + s[i + 1]) / 2)


def run_both(inputs, first, threshold, decay, floor, config=None):
    frames, weight, bias, pos, pre, ema, slot = inputs
    ema_k, ema_r, ema_64 = ema.clone(), ema.clone(), ema.double()
    out = gate(frames, weight, bias, pos, pre, ema_k, slot, first, threshold, decay, floor, config=config)
    assert dispatch.last_path["gate"] == dispatch.TRITON
    ref = gate_reference(frames, weight, bias, pos, pre, ema_r, slot, first, threshold, decay, floor)
    hp = gate_reference(frames.double(), weight.double(), bias.double(), pos.double(), pre.double(),
                        ema_64, slot, first, threshold, decay, floor)
    return out, ref, hp, (ema_k, ema_r, ema_64)


def check(out, ref, hp, emas, slot):
    assert torch.equal(out.active, ref.active), "active masks differ"
    assert torch.equal(out.cu_seqlens, ref.cu_seqlens)
    total = int(ref.cu_seqlens[-1])
    assert torch.equal(out.index[:total], ref.index[:total])
    finite = torch.isfinite(ref.surprise)
    assert torch.equal(torch.isfinite(out.surprise), finite) and torch.isinf(out.surprise[~finite]).all()
    assert_close(out.surprise[finite], hp.surprise[finite].double(), ref.surprise[finite], "surprise")
    assert_close(out.packed[:total], hp.packed[:total], ref.packed[:total], "packed tokens")
    ema_k, ema_r, ema_64 = emas
    assert_close(ema_k, ema_64, ema_r, "EMA pool")
    others = torch.ones(ema_k.shape[0], dtype=torch.bool, device=ema_k.device)
    others[slot] = False
    assert torch.equal(ema_k[others], ema_r[others]), "rows of other streams changed"


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (5, 7)])
@pytest.mark.parametrize("dim", [64, 384, 768, 1152])
def test_gate_matches_reference_mixed_batch(triton_path, poisoned, grid, dim):
    inputs = make_inputs(3, grid, dim, torch.float32, prefix=1, seed=dim + grid[1])
    first = torch.tensor([False, True, False])
    probe = gate_reference(*inputs[:5], inputs[5].clone(), inputs[6], first, 0.0, 0.1, 0)
    thr = gap_threshold(probe.surprise)
    out, ref, hp, emas = run_both(inputs, first, thr, 0.1, 4)
    n = grid[0] * grid[1]
    counts = ref.active.sum(1).tolist()
    assert counts[1] == n and 4 < counts[0] < n and 4 < counts[2] < n, counts
    check(out, ref, hp, emas, inputs[6])


@pytest.mark.parametrize("case", ["all_active", "floor", "single_survivor", "first_frames"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gate_edge_cases(triton_path, poisoned, case, batch):
    threshold, floor = {"all_active": (-1.0, 4), "floor": (2.0, 4), "single_survivor": (2.0, 1),
                        "first_frames": (0.3, 4)}[case]
    inputs = make_inputs(batch, (6, 5), 72, torch.float32, prefix=0, seed=batch)
    first = torch.full((batch,), case == "first_frames")
    out, ref, hp, emas = run_both(inputs, first, threshold, 0.25, floor)
    check(out, ref, hp, emas, inputs[6])
    expected = {"all_active": 30, "floor": 4, "single_survivor": 1, "first_frames": 30}[case]
    assert out.active.sum(1).tolist() == [expected] * batch


def test_floor_ties_break_by_patch_index(triton_path, poisoned):
    """Identical patches tie on surprise: the floor must take the lowest indices, as the reference.

    Small integers (weights in eighths) make every embedding and dot product exact in fp32, so the
    ties are exact in the kernel too: with random floats the interpreter's matmul may round one row
    an ulp apart from another, and the "tie" becomes a strict order the kernel rightly follows.
    """
    g = torch.Generator().manual_seed(3)
    frames, weight, bias, pos, pre, ema, slot = make_inputs(2, (4, 8), 64, torch.float32, prefix=2, seed=3)
    pixels = torch.randint(-2, 3, (2, 3, PATCH, PATCH), generator=g).float()
    frames = pixels.repeat(1, 1, 4, 8)  # every patch the same pixels
    weight = torch.randint(-2, 3, weight.shape, generator=g).float() / 8
    bias = torch.randint(-2, 3, bias.shape, generator=g).float() / 8
    pos = torch.zeros_like(pos)
    ema[:] = torch.randint(-3, 4, (64,), generator=g).float()
    inputs = (frames, weight, bias, pos, pre, ema, slot)
    out, ref, hp, emas = run_both(inputs, torch.tensor([False, False]), 2.0, 0.1, 3)
    check(out, ref, hp, emas, slot)
    assert out.active[:, :3].all() and out.active.sum() == 6


def test_small_tiles_cross_block_placement(triton_path, poisoned):
    """GPU-sized tiles: several patch blocks, D tiles and K chunks per frame, floor candidates merged
    across blocks, prefix tokens, a non-power-of-two D."""
    cfg = {"BLOCK_P": 8, "BLOCK_D": 32, "BLOCK_K": 16}
    inputs = make_inputs(3, (5, 6), 72, torch.float32, prefix=1, seed=11)
    first = torch.tensor([False, False, True])
    probe = gate_reference(*inputs[:5], inputs[5].clone(), inputs[6], first, 0.0, 0.1, 0)
    thr = gap_threshold(probe.surprise[:1])  # frame 0 by threshold; frame 1 stays under it -> floor
    inputs[5][inputs[6][1]] = inputs[5][inputs[6][1]] * 0 + 1.0  # frame 1: EMA of ones
    for floor in (3, 9):
        out, ref, hp, emas = run_both(inputs, first, max(thr, 0.0), 0.1, floor, config=cfg)
        check(out, ref, hp, emas, inputs[6])


@pytest.mark.parametrize("tile", sorted(GATE_TILES))
def test_gpu_launch_tiles_match_reference(triton_path, poisoned, tile):
    """Each GPU launch tile (the default first among them) on the interpreter: two 64-patch blocks
    (N = 80), a D of 200 that no tile width divides, floor candidates merged across blocks."""
    inputs = make_inputs(2, (8, 10), 200, torch.float32, prefix=1, seed=13)
    first = torch.tensor([False, False])
    probe = gate_reference(*inputs[:5], inputs[5].clone(), inputs[6], first, 0.0, 0.1, 0)
    out, ref, hp, emas = run_both(inputs, first, gap_threshold(probe.surprise), 0.1, 3, config=GATE_TILES[tile])
    check(out, ref, hp, emas, inputs[6])


def test_gate_half_precision(triton_path, poisoned):
    inputs = make_inputs(2, (6, 6), 80, torch.float16, prefix=1, seed=5)
    first = torch.tensor([False, False])
    probe = gate_reference(*inputs[:5], inputs[5].clone(), inputs[6], first, 0.0, 0.1, 0)
    out, ref, hp, emas = run_both(inputs, first, gap_threshold(probe.surprise), 0.1, 2)
    check(out, ref, hp, emas, inputs[6])


def test_reference_path_on_cpu_without_interpreter():
    inputs = make_inputs(1, (4, 4), 64, torch.float32, prefix=0, seed=0)
    gate(*inputs, torch.tensor([True]), 0.3, 0.1, 2)
    assert dispatch.last_path["gate"] == dispatch.REFERENCE
    assert dispatch.fallbacks == []


def test_fallback_is_recorded_and_strict_mode_refuses_it(triton_path, monkeypatch):
    inputs = make_inputs(1, (5, 5), 64, torch.float32, prefix=0, seed=0)
    too_many = MAX_FLOOR + 1
    gate(*inputs, torch.tensor([False]), 2.0, 0.1, too_many)
    assert dispatch.last_path["gate"] == dispatch.REFERENCE
    assert dispatch.fallbacks and "floor" in dispatch.fallbacks[-1][1]
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    with pytest.raises(dispatch.FallbackError, match="floor"):
        gate(*inputs, torch.tensor([False]), 2.0, 0.1, too_many)


# -- the gate options (issue #12) against the independent oracle (tests/oracle.py) ---------------

import math  # noqa: E402

import oracle  # noqa: E402
from neuroflow.reference.gate_settings import GateSettings  # noqa: E402


def option_stream(frames=8, n=40, d=24, seed=0, moving=6, cut_at=None, dtype=torch.float64):
    """Layer-0 embeddings ``[F, N, D]`` of one stream: a static background with small noise,
    ``moving`` patches that change a lot each frame, and (at ``cut_at``) a new scene."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = []
    for t in range(frames):
        if cut_at is not None and t == cut_at:
            base = torch.randn(n, d, generator=g, dtype=torch.float64)
        h = base + 0.15 * torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
        hot = torch.randperm(n, generator=g)[:moving]
        h[hot] = torch.randn(moving, d, generator=g, dtype=torch.float64)
        out.append(h)
    return torch.stack(out).to(dtype)


def run_reference_stream(emb, st):
    """The package's decision reference, frame by frame over one stream ``[F, N, D]``."""
    n = emb.shape[1]
    ref = torch.zeros(1, n, emb.shape[2], dtype=torch.float64 if emb.dtype == torch.float64 else torch.float32)
    age = torch.zeros(1, n, dtype=torch.int32) if st.max_staleness is not None else None
    out = []
    for t in range(emb.shape[0]):
        g = gate_decision_reference(emb[t : t + 1], ref, torch.tensor([t == 0]), st, age=age)
        ref, age = g.ema, g.age
        out.append(g)
    return out


OPTION_CASES = {
    "computed": dict(threshold=0.05, floor_tokens=2, reference="computed"),
    "staleness": dict(threshold=0.05, floor_tokens=2, max_staleness=2),
    "budget_only": dict(threshold=None, floor_tokens=0, budget=5),
    "budget_fraction_cap": dict(threshold=0.02, floor_tokens=1, budget=0.1),
    "motion_norm": dict(threshold=0.02, floor_tokens=2, motion_norm=True),
    "scene_cut": dict(threshold=0.05, floor_tokens=2, scene_cut=0.5),
    "stale_budget": dict(threshold=None, floor_tokens=0, budget=6, max_staleness=3),
    "all": dict(threshold=0.03, floor_tokens=3, reference="computed", max_staleness=2, budget=9,
                motion_norm=True, scene_cut=0.6),
    "ema_all": dict(threshold=0.03, floor_tokens=3, max_staleness=1, budget=0.3, motion_norm=True, scene_cut=0.6),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_options_decision_matches_oracle(case):
    """Decisions exactly as the oracle's; reference state and surprises within the tolerance policy."""
    opts = dict(OPTION_CASES[case])
    thr, floor = opts.pop("threshold"), opts.pop("floor_tokens")
    emb = option_stream(cut_at=5)
    st = GateSettings(threshold=thr, ema_decay=0.2, floor_tokens=floor, **opts)
    ours = run_reference_stream(emb.float(), st)
    o32 = oracle.gate_stream(emb.float(), thr, 0.2, floor, **opts)
    o64 = oracle.gate_stream(emb, thr, 0.2, floor, **opts)
    counts = []
    for t, (g, a, b) in enumerate(zip(ours, o32, o64)):
        assert g.active[0].tolist() == a["active"].tolist(), f"frame {t}: decisions differ"
        assert torch.equal(a["active"], b["active"]), f"frame {t}: the oracle's precision decided ({case})"
        assert bool(g.keyframe[0]) == (t == 0 or a["cut"])
        assert_close(g.ema[0], b["ref"], a["ref"], f"frame {t} reference")
        if a["ages"] is not None:
            assert g.age[0].tolist() == a["ages"], f"frame {t}: ages differ"
        if t > 0:
            assert_close(g.surprise[0], torch.tensor(b["surprise"]), torch.tensor(a["surprise"]), f"frame {t} surprise")
        counts.append(int(g.active.sum()))
    if "budget" in opts:
        cap = opts["budget"] if isinstance(opts["budget"], int) else math.floor(opts["budget"] * emb.shape[1] + 0.5)
        later = [c for t, c in enumerate(counts) if t and not o32[t]["cut"]]
        assert max(later) <= cap
        if thr is None:
            assert later == [cap] * len(later), counts  # the budget alone: static token counts
    if "scene_cut" in opts:
        assert [t for t, a in enumerate(o32) if a["cut"]] == [5], "the test clip must cut at frame 5 only"


def test_computed_reference_changes_only_where_computed():
    emb = option_stream(frames=4, moving=3)
    st = GateSettings(threshold=0.2, ema_decay=0.5, floor_tokens=1, reference="computed")
    out = run_reference_stream(emb, st)
    for t in range(1, 4):
        act = out[t].active[0]
        assert 0 < int(act.sum()) < emb.shape[1]
        assert torch.equal(out[t].ema[0][act], emb[t][act])
        assert torch.equal(out[t].ema[0][~act], out[t - 1].ema[0][~act])


@pytest.mark.parametrize("k", [1, 3, 7])
def test_staleness_refreshes_are_spread_and_bounded(k):
    """On a static clip no patch passes the threshold: only the staleness rule computes patches.
    No patch goes more than k frames without being computed, and the forced refreshes per frame
    stay at ceil(N / (k + 1)), never all N at once."""
    n = 50
    still = option_stream(frames=1, n=n, moving=0)[0]
    emb = still.expand(3 * (k + 1) + 2, *still.shape).clone()
    st = GateSettings(threshold=0.5, floor_tokens=0, max_staleness=k)
    out = run_reference_stream(emb, st)
    last = [0] * n
    per_frame = []
    for t in range(1, emb.shape[0]):
        act = out[t].active[0]
        per_frame.append(int(act.sum()))
        for i in range(n):
            if act[i]:
                assert t - last[i] <= k + 1
                last[i] = t
            else:
                assert t - last[i] <= k, f"patch {i} skipped more than {k} frames"
    assert max(per_frame) == math.ceil(n / (k + 1)), per_frame
    assert min(per_frame) >= n // (k + 1), per_frame


def test_stale_patches_take_the_budget_first_oldest_first():
    s = torch.tensor([[0.9, 0.1, 0.2, 0.8, 0.0]])
    age = torch.tensor([[0, 3, 2, 0, 5]], dtype=torch.int32)
    h = torch.randn(1, 5, 4)
    st = GateSettings(threshold=None, floor_tokens=0, budget=2, max_staleness=2)
    # Stale: patches 1 (age 3), 2 (age 2), 4 (age 5): the oldest two win over surprise.
    from neuroflow.reference.gate import priority_rank
    assert priority_rank(s, age >= 2, age).tolist() == [[3, 1, 2, 4, 0]]
    g = gate_decision_reference(h, torch.randn(1, 5, 4), torch.tensor([False]), st, age=age)
    assert g.active.tolist() == [[False, True, False, False, True]]
    assert g.age.tolist() == [[1, 0, 3, 1, 0]]


def test_budget_ties_break_by_index_and_cap_the_floor():
    h = torch.ones(1, 6, 4)
    ema = torch.ones(1, 6, 4)
    ema[0, 2:] = -1.0  # patches 2..5 tie at surprise 2
    st = GateSettings(threshold=0.5, floor_tokens=5, budget=3)
    g = gate_decision_reference(h, ema, torch.tensor([False]), st)
    assert g.active.tolist() == [[False, False, True, True, True, False]]


def test_motion_norm_reports_the_normalised_surprise():
    h, ema = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    plain = gate_decision_reference(h, ema, torch.tensor([False, True]), 0.1, 0.1, 0)
    st = GateSettings(threshold=0.1, ema_decay=0.1, floor_tokens=0, motion_norm=True)
    norm = gate_decision_reference(h, ema, torch.tensor([False, True]), st)
    expect = plain.surprise[0] - plain.surprise[0].mean()
    assert torch.allclose(norm.surprise[0], expect, atol=1e-6)
    assert torch.equal(norm.active[0], norm.surprise[0] > 0.1)
    assert torch.isinf(norm.surprise[1]).all() and norm.active[1].all()


def test_default_settings_take_the_papers_rule_bit_for_bit():
    h, ema = torch.randn(3, 20, 16), torch.randn(3, 20, 16)
    first = torch.tensor([False, True, False])
    a = gate_decision_reference(h, ema, first, 0.9, 0.1, 3)
    b = gate_decision_reference(h, ema, first, GateSettings(threshold=0.9, ema_decay=0.1, floor_tokens=3))
    # The general rule with the options at their neutral values decides the same.
    c = gate_decision_reference(h, ema, first, GateSettings(threshold=0.9, ema_decay=0.1, floor_tokens=3, budget=1.0))
    assert torch.equal(a.active, b.active) and torch.equal(a.ema, b.ema) and torch.equal(a.surprise, b.surprise)
    assert torch.equal(a.active, c.active) and torch.equal(a.ema, c.ema)


@pytest.mark.parametrize("bad,match", [
    (dict(threshold=None), "needs a budget"),
    (dict(threshold=None, budget=3, motion_norm=True), "motion_norm needs a threshold"),
    (dict(threshold=None, budget=3, scene_cut=0.5), "scene_cut needs a threshold"),
    (dict(reference="last"), "reference must be"),
    (dict(max_staleness=0), "max_staleness"),
    (dict(max_staleness=2.0), "max_staleness"),
    (dict(budget=0), "budget as a count"),
    (dict(budget=1.5), "budget as a fraction"),
    (dict(budget=True), "budget must be"),
    (dict(motion_norm=1), "motion_norm must be"),
    (dict(scene_cut=0.0), "scene_cut"),
    (dict(scene_cut=1.2), "scene_cut"),
])
def test_settings_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        GateSettings(**bad)


def test_age_pool_must_match_the_staleness_setting():
    inputs = make_inputs(1, (4, 4), 64, torch.float32, prefix=0, seed=0)
    st = GateSettings(threshold=0.3, max_staleness=2)
    with pytest.raises(ValueError, match="age pool"):
        gate(*inputs, torch.tensor([True]), st)
    with pytest.raises(ValueError, match="max_staleness is not set"):
        gate(*inputs, torch.tensor([True]), 0.3, 0.1, 2, age=torch.zeros(5, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        gate(*inputs, torch.tensor([True]), st, age=torch.zeros(5, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="not both"):
        gate(*inputs, torch.tensor([True]), st, 0.1, 2)


def test_op_with_options_matches_decision_reference():
    """gate_reference (the op's contract) with every option: same decision and state updates as
    the decision reference on the conv embeddings; rows of other streams untouched."""
    frames, weight, bias, pos, pre, ema, slot = make_inputs(3, (5, 6), 48, torch.float32, prefix=1, seed=4)
    age = torch.randint(0, 4, (5, 30), dtype=torch.int32)
    first = torch.tensor([False, True, False])
    st = GateSettings(threshold=0.5, ema_decay=0.1, floor_tokens=2, reference="computed", max_staleness=3,
                      budget=8, motion_norm=True, scene_cut=0.9)
    ema_r, age_r = ema.clone(), age.clone()
    out = gate(frames, weight, bias, pos, pre, ema_r, slot, first, st, age=age_r)
    h = torch.nn.functional.conv2d(frames, weight, bias, stride=PATCH).flatten(2).transpose(1, 2) + pos
    g = gate_decision_reference(h, ema[slot], first, st, age=age[slot])
    assert torch.equal(out.active, g.active) and torch.equal(ema_r[slot], g.ema) and torch.equal(age_r[slot], g.age)
    others = torch.ones(5, dtype=torch.bool)
    others[slot] = False
    assert torch.equal(ema_r[others], ema[others]) and torch.equal(age_r[others], age[others])
    assert out.active.sum(1).tolist()[1] == 30 and max(out.active.sum(1).tolist()[::2]) <= 8


# -- the gate options in the fused kernels (Triton interpreter) ----------------------------------

def run_both_options(inputs, first, st, age=None, config=None):
    frames, weight, bias, pos, pre, ema, slot = inputs
    ema_k, ema_r, ema_64 = ema.clone(), ema.clone(), ema.double()
    ages = [None if age is None else age.clone() for _ in range(3)]
    out = gate(frames, weight, bias, pos, pre, ema_k, slot, first, st, config=config, age=ages[0])
    assert dispatch.last_path["gate"] == dispatch.TRITON and not dispatch.fallbacks
    ref = gate_reference(frames, weight, bias, pos, pre, ema_r, slot, first, st, age=ages[1])
    hp = gate_reference(frames.double(), weight.double(), bias.double(), pos.double(), pre.double(),
                        ema_64, slot, first, st, age=ages[2])
    assert torch.equal(ref.active, hp.active), "the test's decision is a rounding call: pick other settings"
    if age is not None:
        assert torch.equal(ages[0], ages[1]), "ages differ"
    return out, ref, hp, (ema_k, ema_r, ema_64)


KERNEL_OPTION_CASES = {
    "computed": dict(reference="computed"),
    "staleness": dict(max_staleness=2),
    "budget_only": dict(threshold=None, floor_tokens=0, budget=7),
    "budget_cap": dict(budget=0.2),
    "floor_above_16": dict(threshold=2.0, floor_tokens=20, budget=25),
    "motion_norm": dict(motion_norm=True),
    "scene_cut": dict(scene_cut=0.8),
    "all_computed": dict(reference="computed", max_staleness=1, budget=9, motion_norm=True, scene_cut=0.9),
    "all_ema": dict(max_staleness=3, budget=0.5, motion_norm=True, scene_cut=0.4),
}


@pytest.mark.parametrize("case", sorted(KERNEL_OPTION_CASES))
@pytest.mark.parametrize("tiles", ["one_tile", "small_tiles"])
def test_gate_options_in_kernel_match_reference(triton_path, poisoned, case, tiles):
    config = {"BLOCK_P": 8, "BLOCK_D": 32, "BLOCK_K": 16, "BLOCK_S": 16} if tiles == "small_tiles" else None
    inputs = make_inputs(3, (5, 7), 48, torch.float32, prefix=1, seed=21)
    first = torch.tensor([False, True, False])
    probe = gate_reference(*inputs[:5], inputs[5].clone(), inputs[6], first, 0.0, 0.1, 0)
    opts = dict(KERNEL_OPTION_CASES[case])
    if "motion_norm" in opts:  # the threshold compares normalised surprises: a gap among those
        normed = probe.surprise - torch.where(torch.isinf(probe.surprise), 0, probe.surprise).mean(1, keepdim=True)
        thr = gap_threshold(torch.where(first.view(-1, 1), float("inf"), normed))
    else:  # frame 0's own gap: 25-75% of it passes (no scene cut at 0.8)
        thr = gap_threshold(probe.surprise[:1] if case == "scene_cut" else probe.surprise)
    opts.setdefault("threshold", thr)
    opts.setdefault("floor_tokens", 3)
    if case == "scene_cut":  # frame 2 is a scene cut: its stream's reference is unrelated
        inputs[5][inputs[6][2]] = torch.randn(35, 48)
    st = GateSettings(ema_decay=0.1, **opts)
    age = torch.randint(0, 4, (5, 35), dtype=torch.int32) if st.max_staleness else None
    out, ref, hp, emas = run_both_options(inputs, first, st, age, config)
    check(out, ref, hp, emas, inputs[6])
    counts = ref.active.sum(1).tolist()
    assert counts[1] == 35
    if case == "scene_cut":
        assert counts[2] == 35 and counts[0] < 35
    if st.budget is not None and st.scene_cut is None:
        assert max(counts[0], counts[2]) <= st.budget_count(35)


def test_gate_options_kernel_over_frames(triton_path, poisoned):
    """Several frames of two streams through the kernels, state carried in the pools (ages,
    last-computed references), against the reference path carrying its own."""
    frames, weight, bias, pos, pre, ema, slot = make_inputs(2, (4, 6), 40, torch.float32, prefix=0, seed=8)
    st = GateSettings(threshold=0.3, ema_decay=0.1, floor_tokens=2, reference="computed", max_staleness=2, budget=10)
    ema_k, ema_r = ema.clone(), ema.clone()
    age_k, age_r = torch.zeros(5, 24, dtype=torch.int32), torch.zeros(5, 24, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    for t in range(5):
        x = frames + 0.3 * torch.randn(frames.shape, generator=g) * (torch.rand(1, 1, 16, 24, generator=g) > 0.7)
        first = torch.tensor([t == 0, t == 0])
        out = gate(x, weight, bias, pos, pre, ema_k, slot, first, st, age=age_k)
        ref = gate_reference(x, weight, bias, pos, pre, ema_r, slot, first, st, age=age_r)
        assert torch.equal(out.active, ref.active), f"frame {t}"
        assert torch.equal(age_k, age_r), f"frame {t} ages"
        assert torch.equal(out.cu_seqlens, ref.cu_seqlens)
        assert (ema_k - ema_r).abs().max() < 1e-5
        ema_k.copy_(ema_r)  # keep the streams' references identical, so decisions stay comparable


@pytest.mark.parametrize("config", [None, {"BLOCK_P": 8, "BLOCK_S": 8}])
def test_budget_ties_in_kernel_take_the_lowest_indices(triton_path, poisoned, config):
    """Identical patches tie on surprise (and, stale, on age): the kernel's selection at the k-th
    key takes them in index order, across select chunks and pack blocks, as the reference does.
    Exact small-integer inputs and a generator of its own, as in the floor tie test above (random
    floats let the interpreter's matmul round identical patches an ulp apart)."""
    g = torch.Generator().manual_seed(3)
    frames, weight, bias, pos, pre, ema, slot = make_inputs(2, (4, 8), 64, torch.float32, prefix=1, seed=3)
    frames = torch.randint(-2, 3, (2, 3, PATCH, PATCH), generator=g).float().repeat(1, 1, 4, 8)
    weight = torch.randint(-2, 3, weight.shape, generator=g).float() / 8
    bias = torch.randint(-2, 3, bias.shape, generator=g).float() / 8
    pos = torch.zeros_like(pos)
    ema[:] = torch.randint(-3, 4, (64,), generator=g).float()
    inputs = (frames, weight, bias, pos, pre, ema, slot)
    age = torch.zeros(5, 32, dtype=torch.int32)
    age[slot[1], 5:20] = 4  # stream 1: patches 5..19 stale with equal ages
    st = GateSettings(threshold=None, floor_tokens=0, budget=11, max_staleness=3)
    out, ref, hp, emas = run_both_options(inputs, torch.tensor([False, False]), st, age, config)
    check(out, ref, hp, emas, slot)
    assert out.active[0].nonzero().flatten().tolist() == list(range(11))
    assert out.active[1].nonzero().flatten().tolist() == list(range(5, 16))


def test_staleness_in_kernel_spreads_refreshes_on_a_static_clip(triton_path, poisoned):
    """The same frame again and again: only the staleness rule computes patches, at most
    ceil(N / (K + 1)) per frame, every patch within K + 1 frames; ages as the reference's."""
    frames, weight, bias, pos, pre, ema, slot = make_inputs(1, (5, 7), 32, torch.float32, prefix=0, seed=2)
    k, n = 2, 35
    st = GateSettings(threshold=0.5, ema_decay=0.1, floor_tokens=0, max_staleness=k)
    age_k, age_r = torch.zeros(5, n, dtype=torch.int32), torch.zeros(5, n, dtype=torch.int32)
    ema_r = ema.clone()
    counts, last = [], torch.zeros(n, dtype=torch.int64)
    for t in range(7):
        first = torch.tensor([t == 0])
        out = gate(frames, weight, bias, pos, pre, ema, slot, first, st, age=age_k)
        ref = gate_reference(frames, weight, bias, pos, pre, ema_r, slot, first, st, age=age_r)
        assert torch.equal(out.active, ref.active) and torch.equal(age_k, age_r), f"frame {t}"
        if t:
            counts.append(int(out.active.sum()))
            last[out.active[0]] = t
            assert (t - last <= k).all()
    assert max(counts) == math.ceil(n / (k + 1)) and min(counts) >= n // (k + 1), counts


# -- every dtype the kernels accept, on CUDA (and the same test bodies under the interpreter) -----

ON_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a CUDA GPU")])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _on(device, request, dtype):
    """Route to the Triton path on ``device``: the compiled kernels on CUDA, the interpreter on the
    CPU (whose bf16 arithmetic is broken: bf16 runs on CUDA only)."""
    if device == "interpreter":
        if dtype == torch.bfloat16:
            pytest.skip("the interpreter's bf16 arithmetic is broken; bf16 runs on CUDA")
        request.getfixturevalue("triton_path")
        return "cpu"
    return device


@pytest.mark.parametrize("device", ["interpreter", ON_CUDA])
@pytest.mark.parametrize("dtype, options", [
    *((dtype, "paper") for dtype in DTYPES),
    # Budgets rank patches: in fp16/bf16 a near-tie at the k-th place is a rounding call, so the
    # options run in fp32 (their decisions are checked against float64 too).
    (torch.float32, "all_computed"), (torch.float32, "all_ema"),
], ids=lambda v: str(v).removeprefix("torch."))
def test_gate_kernels_per_dtype_match_reference(request, monkeypatch, device, dtype, options):
    """The default GPU launch tile of each dtype (135 patches in three 64-patch blocks, D = 200 over
    two 128-wide tiles; in fp32 five 32-patch blocks and seven 32-wide D tiles), one first frame,
    NaN-poisoned outputs; with the paper's rule and with every option but motion norm."""
    dev = _on(device, request, dtype)
    config = GATE_CONFIG_FP32 if dtype == torch.float32 else GATE_CONFIG
    monkeypatch.setattr(gate_op, "_empty", _poisoned)
    inputs = [t.to(dev) for t in make_inputs(3, (9, 15), 200, dtype, prefix=1, seed=31)]
    first = torch.tensor([False, True, False], device=dev)
    probe = gate_reference(*inputs[:5], inputs[5].clone(), inputs[6], first, 0.0, 0.1, 0)
    threshold = gap_threshold(probe.surprise.cpu())
    if options == "paper":
        out, ref, hp, emas = run_both(inputs, first, threshold, 0.1, 4, config=config)
    else:
        opts = dict(KERNEL_OPTION_CASES[options])
        opts.pop("motion_norm")  # a normalised threshold needs a gap of its own (covered above)
        st = GateSettings(threshold=threshold, ema_decay=0.1, floor_tokens=4, **opts)
        age = (torch.arange(135, device=dev) % (st.max_staleness + 1)).to(torch.int32).repeat(5, 1)
        out, ref, hp, emas = run_both_options(inputs, first, st, age=age, config=config)
    check(out, ref, hp, emas, inputs[6])


# -- signal="patch": the surprise on the patch embedding, without the position embedding --------

def _patch_embeddings(frames, weight, bias):
    """``[B, N, D]`` patch embeddings ``W x + b`` (no position embedding)."""
    return torch.nn.functional.conv2d(frames, weight, bias, stride=PATCH).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("reference", ["ema", "computed"])
def test_patch_signal_is_blind_to_position_embeddings(reference):
    """The same pixels again under other position embeddings: under ``signal="patch"`` nothing is
    surprising (only the floor computes), under the default signal the position change alone
    passes the threshold. The reference holds p (no PE) under the patch signal, h under the
    default; the packed tokens are p + PE under both."""
    frames, weight, bias, pos, pre, ema, slot = make_inputs(2, (5, 7), 48, torch.float64, prefix=1, seed=41)
    g = torch.Generator().manual_seed(41)
    moved = torch.randn(pos.shape, generator=g, dtype=torch.float64) * pos.std()
    p = _patch_embeddings(frames, weight, bias)
    counts = {}
    for signal in ("embedding", "patch"):
        st = GateSettings(threshold=0.01, ema_decay=0.5, floor_tokens=2, reference=reference, signal=signal)
        pool = ema.double()
        gate_reference(frames, weight, bias, pos, pre, pool, slot, torch.tensor([True, True]), st)
        assert torch.equal(pool[slot], p if signal == "patch" else p + pos)
        out = gate_reference(frames, weight, bias, moved, pre, pool, slot, torch.tensor([False, False]), st)
        counts[signal] = out.active.sum(1).tolist()
        if signal == "patch":
            assert out.surprise.abs().max() < 1e-12
        rows = torch.cat([out.active.new_ones(2, 1), out.active], dim=1)  # the prefix token, then patches
        want = torch.cat([pre.expand(2, -1, -1), p + moved], dim=1)[rows]
        assert torch.equal(out.packed[: int(out.cu_seqlens[-1])], want)
    assert counts["patch"] == [2, 2]
    assert min(counts["embedding"]) > 2, counts


def test_patch_signal_ranks_equal_content_changes_equally():
    """Two patches with the same pixels change the same way; patch 0 has a large position
    embedding, patch 1 none. In the default signal the shared PE dilutes patch 0's cosine (it
    looks less surprising); the patch signal gives both the same surprise. A threshold between
    the two default surprises computes patch 1 alone under the default, both under "patch"."""
    g = torch.Generator().manual_seed(5)
    dim = 16
    weight = torch.randn(dim, 3, PATCH, PATCH, generator=g, dtype=torch.float64) * 0.2
    bias = torch.randn(dim, generator=g, dtype=torch.float64) * 0.1
    pos = torch.zeros(2, dim, dtype=torch.float64)
    pos[0] = 10 * torch.randn(dim, generator=g, dtype=torch.float64)
    tile = torch.randn(1, 3, PATCH, PATCH, generator=g, dtype=torch.float64)
    change = torch.randn(1, 3, PATCH, PATCH, generator=g, dtype=torch.float64)
    before, after = tile.repeat(1, 1, 1, 2), (tile + change).repeat(1, 1, 1, 2)
    pre, slot = torch.zeros(0, dim, dtype=torch.float64), torch.tensor([0])
    emb = gate_decision_reference(_patch_embeddings(after, weight, bias) + pos,
                                  _patch_embeddings(before, weight, bias) + pos, torch.tensor([False]), 0.5, 0.0, 0)
    s0, s1 = emb.surprise[0].tolist()
    assert s0 < s1 / 4, (s0, s1)
    threshold = (s0 + s1) / 2
    active = {}
    for signal in ("embedding", "patch"):
        st = GateSettings(threshold=threshold, ema_decay=0.0, floor_tokens=0, signal=signal)
        pool = torch.zeros(1, 2, dim, dtype=torch.float64)
        gate_reference(before, weight, bias, pos, pre, pool, slot, torch.tensor([True]), st)
        out = gate_reference(after, weight, bias, pos, pre, pool, slot, torch.tensor([False]), st)
        active[signal] = out.active[0].tolist()
        if signal == "patch":  # the same pixels through the same weights: the same p, bit for bit
            assert out.surprise[0, 0] == out.surprise[0, 1]
    assert active == {"embedding": [False, True], "patch": [True, True]}


def test_patch_signal_is_validated():
    with pytest.raises(ValueError, match="signal must be 'embedding'"):
        GateSettings(signal="raw")
    with pytest.raises(ValueError, match="signal must be"):
        GateSettings(signal=None)
    assert GateSettings(signal="patch").is_default_rule  # the paper's decision rule on another signal


PATCH_SIGNAL_CASES = {
    # name: (grid, dtype, settings besides signal="patch"; threshold None: a gap of the surprises)
    "paper_odd_grid": ((5, 7), torch.float32, dict(floor_tokens=3)),
    "paper_fp16": ((6, 5), torch.float16, dict(floor_tokens=2)),
    "paper_one_patch": ((1, 1), torch.float32, dict(floor_tokens=1)),
    "paper_none_beyond_floor": ((4, 6), torch.float32, dict(threshold=2.0, floor_tokens=0)),
    "one_patch_none_active": ((1, 1), torch.float32, dict(threshold=2.0, floor_tokens=0)),
    "computed_stale": ((5, 7), torch.float32, dict(floor_tokens=3, reference="computed", max_staleness=2)),
    "ema_scene_cut": ((5, 7), torch.float32, dict(floor_tokens=3, scene_cut=0.9)),
    "computed_floor_only": ((3, 5), torch.float32, dict(threshold=2.0, floor_tokens=4, reference="computed",
                                                        budget=9)),
}


@pytest.mark.parametrize("case", sorted(PATCH_SIGNAL_CASES))
@pytest.mark.parametrize("tiles", ["one_tile", "small_tiles"])
def test_patch_signal_in_kernel_matches_reference(triton_path, poisoned, case, tiles):
    """``signal="patch"`` through the kernels (two-launch paper path and the options path),
    against the reference: decisions, surprises, packed tokens (with PE), and the reference pool
    (without PE), NaN-poisoned outputs, awkward shapes (N = 35, N = 1, nothing active)."""
    grid, dtype, opts = PATCH_SIGNAL_CASES[case]
    config = {"BLOCK_P": 8, "BLOCK_D": 16, "BLOCK_K": 16, "BLOCK_S": 8} if tiles == "small_tiles" else None
    frames, weight, bias, pos, pre, ema, slot = make_inputs(3, grid, 40, dtype, prefix=1, seed=51)
    ema[slot] -= pos.float()  # a history of p, not of p + PE
    inputs = (frames, weight, bias, pos, pre, ema, slot)
    first = torch.tensor([False, True, False])
    opts = dict(opts)
    if "threshold" not in opts:
        probe = gate_reference(*inputs[:5], ema.clone(), slot, first, GateSettings(threshold=0.0, floor_tokens=0,
                                                                                     signal="patch"))
        opts["threshold"] = gap_threshold(probe.surprise)
    st = GateSettings(ema_decay=0.1, signal="patch", **opts)
    n = grid[0] * grid[1]
    age = (torch.arange(n) % 3).to(torch.int32).repeat(5, 1) if st.max_staleness else None
    out, ref, hp, emas = run_both_options(inputs, first, st, age, config)
    check(out, ref, hp, emas, slot)
    counts = out.active.sum(1).tolist()
    assert counts[1] == n
    if case.endswith("none_active") or case.endswith("none_beyond_floor"):
        assert counts[0] == counts[2] == 0 and out.cu_seqlens.tolist() == [0, 1, 2 + n, 3 + n]


# -- the frame policy's drift keyframe in the fused kernels (Triton interpreter) -----------------

DRIFT_CASES = {
    # name: (grid, settings besides threshold and keyframe_drift)
    "computed_n35": ((5, 7), dict(floor_tokens=3, reference="computed")),
    "ema_skip_n35": ((5, 7), dict(floor_tokens=3, skip_below=0.3)),
    "computed_none_active": ((3, 5), dict(threshold=2.0, floor_tokens=0, reference="computed")),
    "one_patch": ((1, 1), dict(floor_tokens=1, reference="computed")),
}


@pytest.mark.parametrize("case", sorted(DRIFT_CASES))
@pytest.mark.parametrize("tiles", ["one_tile", "small_tiles"])
def test_drift_keyframe_in_kernel_matches_reference(triton_path, poisoned, case, tiles):
    """``keyframe_drift`` through the select kernel (its texture unit computed from the reference rows before
    the embed kernel's update) against the reference: NaN-poisoned outputs, D = 72, awkward shapes (N = 35,
    N = 15 with nothing active, N = 1); the bound sits between two frames' accumulated drift, so one of them
    must become a keyframe and the other must not, decided by the texture as much as by the surprise."""
    from neuroflow.reference.gate import reference_texture

    grid, opts = DRIFT_CASES[case]
    config = {"BLOCK_P": 8, "BLOCK_D": 16, "BLOCK_K": 16, "BLOCK_S": 8} if tiles == "small_tiles" else None
    frames, weight, bias, pos, pre, ema, slot = make_inputs(3, grid, 72, torch.float32, prefix=1, seed=33)
    n = grid[0] * grid[1]
    first = torch.tensor([False, True, False])
    opts = dict(opts)
    probe = gate_reference(frames, weight, bias, pos, pre, ema.clone(), slot, first, 0.0, 0.1, 0)
    opts.setdefault("threshold", gap_threshold(probe.surprise))
    # Each later frame's drift increment, as the rule defines it; the bound halves the two.
    raw = probe.surprise.double().mean(dim=1)
    step = raw / reference_texture(ema[slot]).double()
    since = torch.zeros(5, 1, dtype=torch.int32)
    drift = torch.zeros(5, 1)
    drift[slot[0]], drift[slot[2]] = 0.25, 0.05
    acc = [drift[slot[b]].item() + step[b].item() for b in (0, 2)]
    bound = sum(acc) / 2
    assert abs(acc[0] - acc[1]) > 1e-3 * max(acc), "the test's drift bound is a rounding call"
    st = GateSettings(ema_decay=0.1, keyframe_every=100, keyframe_drift=bound, **opts)
    pools = [(since.clone(), drift.clone()) for _ in range(2)]
    emas = (ema.clone(), ema.clone(), ema.double())
    out = gate(frames, weight, bias, pos, pre, emas[0], slot, first, st, config=config, policy=pools[0])
    assert dispatch.last_path["gate"] == dispatch.TRITON and not dispatch.fallbacks
    ref = gate_reference(frames, weight, bias, pos, pre, emas[1], slot, first, st, policy=pools[1])
    hp = gate_reference(frames.double(), weight.double(), bias.double(), pos.double(), pre.double(), emas[2], slot,
                        first, st, policy=(since.clone(), drift.clone()))
    assert torch.equal(ref.frame_kind, hp.frame_kind), "the test's decision is a rounding call"
    check(out, ref, hp, emas, slot)
    assert torch.equal(out.frame_kind, ref.frame_kind)
    assert torch.equal(pools[0][0], pools[1][0]), "frames since the last keyframe differ"
    assert_close(pools[0][1], pools[1][1].double(), pools[1][1], "drift counters")
    kinds = out.frame_kind.tolist()
    assert kinds[1] == 2 and sorted([kinds[0] == 2, kinds[2] == 2]) == [False, True]
    keyed = 0 if acc[0] > bound else 2
    assert kinds[keyed] == 2 and out.active[keyed].all() and pools[0][1][slot[keyed]].item() == 0.0


# -- the learned ranking (ranker) in the select kernel (Triton interpreter) ----------------------

RANKER_CASES = {
    # name: (grid, settings besides threshold and ranker)
    "computed_n35": ((5, 7), dict(floor_tokens=3, reference="computed")),
    "ema_stale_batch_budget_n35": ((5, 7), dict(floor_tokens=2, max_staleness=2, batch_budget=0.2)),
    "budget_only_n15": ((3, 5), dict(threshold=None, floor_tokens=0, budget=4, reference="computed")),
    "policy_skip_none_active_n15": ((3, 5), dict(threshold=2.0, floor_tokens=0, skip_below=0.5, keyframe_every=9)),
    "one_patch": ((1, 1), dict(floor_tokens=1, reference="computed")),
}


@pytest.mark.parametrize("case", sorted(RANKER_CASES))
@pytest.mark.parametrize("tiles", ["one_tile", "small_tiles"])
def test_ranker_order_in_kernel_matches_reference(triton_path, poisoned, case, tiles):
    """``ranker`` through the select kernel (RANKED: k counted on the surprise, the patches taken in the
    ranker's order) against the reference: NaN-poisoned outputs, D = 72, N = 35 / 15 (nothing active on a
    skipped frame) / 1, with staleness and the batch budget; the ranker's choice must differ from the
    surprise's somewhere, so the test cannot pass by ignoring it."""
    from helpers import random_ranker
    from neuroflow.reference.patch_ranker import ranker_scores

    grid, opts = RANKER_CASES[case]
    config = {"BLOCK_P": 8, "BLOCK_D": 16, "BLOCK_K": 16, "BLOCK_S": 8} if tiles == "small_tiles" else None
    inputs = make_inputs(3, grid, 72, torch.float32, prefix=1, seed=41)
    frames, weight, bias, pos, pre, ema, slot = inputs
    n = grid[0] * grid[1]
    first = torch.tensor([False, True, False])
    opts = dict(opts)
    probe = gate_reference(*inputs[:5], ema.clone(), slot, first, 0.0, 0.1, 0)
    opts.setdefault("threshold", gap_threshold(probe.surprise))
    ranker = random_ranker(7, hidden=6)
    st = GateSettings(ema_decay=0.1, ranker=ranker, **opts)
    # No decision may be a rounding call: distinct scores, well apart, on the frames that rank.
    scores = ranker_scores(ranker, probe.surprise, first, grid, opts["threshold"])
    for b in (0, 2):
        s = torch.sort(scores[b].double()).values
        assert n == 1 or (s[1:] - s[:-1]).min() > 1e-4 * s.abs().max(), "the test's ranking is a rounding call"
    age = (torch.arange(n) % 3).to(torch.int32).repeat(5, 1) if st.max_staleness else None
    policy = (torch.zeros(5, 1, dtype=torch.int32), torch.zeros(5, 1)) if st.policy else None
    emas = (ema.clone(), ema.clone(), ema.double())
    ages = [None if age is None else age.clone() for _ in range(3)]
    pools = [None if policy is None else (policy[0].clone(), policy[1].clone()) for _ in range(3)]
    out = gate(frames, weight, bias, pos, pre, emas[0], slot, first, st, config=config, age=ages[0], policy=pools[0])
    assert dispatch.last_path["gate"] == dispatch.TRITON and not dispatch.fallbacks
    ref = gate_reference(frames, weight, bias, pos, pre, emas[1], slot, first, st, age=ages[1], policy=pools[1])
    hp = gate_reference(frames.double(), weight.double(), bias.double(), pos.double(), pre.double(), emas[2], slot,
                        first, st, age=ages[2], policy=pools[2])
    assert torch.equal(ref.active, hp.active), "the test's decision is a rounding call: pick other settings"
    check(out, ref, hp, emas, slot)
    if age is not None:
        assert torch.equal(ages[0], ages[1]), "ages differ"
    if policy is not None:
        assert torch.equal(out.frame_kind, ref.frame_kind) and torch.equal(pools[0][0], pools[1][0])
    # The count is the deterministic gate's; the choice is the ranker's.
    plain = gate_reference(frames, weight, bias, pos, pre, ema.clone(), slot, first, st.replace(ranker=None),
                           age=None if age is None else age.clone(),
                           policy=None if policy is None else (policy[0].clone(), policy[1].clone()))
    counts = out.active.sum(1)
    if st.batch_budget is None:
        assert torch.equal(counts, plain.active.sum(1))
    else:
        assert counts.sum() <= plain.active.sum() + n  # the keyframe's n plus at most the shared budget
    assert counts[1] == n
    if case.startswith("policy_skip"):
        assert out.frame_kind.tolist() == [0, 2, 0] and counts[0] == counts[2] == 0
    elif n > 1:
        assert not torch.equal(out.active, plain.active), "the ranker chose the surprise's patches: a weak test"
