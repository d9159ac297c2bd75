"""The fused gate and cache-scatter kernels (Triton interpreter) against their PyTorch references.

Fresh random inputs per case; every kernel output is poisoned before the launch (NaN for floats,
a sentinel for integers) so an element the kernel forgot to write fails the comparison.
"""

import pytest
import torch

from neuroflow import dispatch, fused_gate
from neuroflow.testing import assert_close

PATCH = 4  # keeps C*p*p small: the interpreter's cost grows with the reduction length
SENTINEL = -12345


def _poisoned(*shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, SENTINEL if dtype != torch.int8 else 77, dtype=dtype, device=device)


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(fused_gate, "_empty", _poisoned)


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
    out = fused_gate.gate(frames, weight, bias, pos, pre, ema_k, slot, first, threshold, decay, floor, config=config)
    assert dispatch.last_path["gate"] == dispatch.TRITON
    ref = fused_gate.gate_reference(frames, weight, bias, pos, pre, ema_r, slot, first, threshold, decay, floor)
    hp = fused_gate.gate_reference(frames.double(), weight.double(), bias.double(), pos.double(), pre.double(),
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
    others = torch.ones(ema_k.shape[0], dtype=torch.bool)
    others[slot] = False
    assert torch.equal(ema_k[others], ema_r[others]), "rows of other streams changed"


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (5, 7)])
@pytest.mark.parametrize("dim", [64, 384, 768, 1152])
def test_gate_matches_reference_mixed_batch(triton_path, poisoned, grid, dim):
    inputs = make_inputs(3, grid, dim, torch.float32, prefix=1, seed=dim + grid[1])
    first = torch.tensor([False, True, False])
    probe = fused_gate.gate_reference(*inputs[:5], inputs[5].clone(), inputs[6], first, 0.0, 0.1, 0)
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
    """Identical patches tie on surprise: the floor must take the lowest indices, as the reference."""
    frames, weight, bias, pos, pre, ema, slot = make_inputs(2, (4, 8), 64, torch.float32, prefix=2, seed=3)
    frames = frames[:, :, :PATCH, :PATCH].repeat(1, 1, 4, 8)  # every patch the same pixels
    pos = torch.zeros_like(pos)
    ema[:] = torch.randn(64)
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
    probe = fused_gate.gate_reference(*inputs[:5], inputs[5].clone(), inputs[6], first, 0.0, 0.1, 0)
    thr = gap_threshold(probe.surprise[:1])  # frame 0 by threshold; frame 1 stays under it -> floor
    inputs[5][inputs[6][1]] = inputs[5][inputs[6][1]] * 0 + 1.0  # frame 1: EMA of ones
    for floor in (3, 9):
        out, ref, hp, emas = run_both(inputs, first, max(thr, 0.0), 0.1, floor, config=cfg)
        check(out, ref, hp, emas, inputs[6])


def test_gate_half_precision(triton_path, poisoned):
    inputs = make_inputs(2, (6, 6), 80, torch.float16, prefix=1, seed=5)
    first = torch.tensor([False, False])
    probe = fused_gate.gate_reference(*inputs[:5], inputs[5].clone(), inputs[6], first, 0.0, 0.1, 0)
    out, ref, hp, emas = run_both(inputs, first, gap_threshold(probe.surprise), 0.1, 2)
    check(out, ref, hp, emas, inputs[6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cache_scatter_matches_reference(triton_path, dtype):
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(6, 11, 72, generator=g).to(dtype)
    slot = torch.tensor([4, 0, 2])
    lengths = [3, 0, 11]  # an empty segment and a full one
    cu = torch.tensor([0, 3, 3, 14], dtype=torch.int32)
    index = torch.cat([torch.tensor([0, 5, 10]), torch.arange(11)]).to(torch.int32)
    src = torch.randn(sum(lengths) + 4, 72, generator=g).to(dtype)  # rows past cu[-1] must be ignored
    a, b = cache.clone(), cache.clone()
    fused_gate.cache_scatter(a, slot, src, cu, index)
    assert dispatch.last_path["cache_scatter"] == dispatch.TRITON
    fused_gate.cache_scatter_reference(b, slot, src, cu, index)
    assert torch.equal(a, b)


def test_reference_path_on_cpu_without_interpreter():
    inputs = make_inputs(1, (4, 4), 64, torch.float32, prefix=0, seed=0)
    fused_gate.gate(*inputs, torch.tensor([True]), 0.3, 0.1, 2)
    assert dispatch.last_path["gate"] == dispatch.REFERENCE
    assert dispatch.fallbacks == []


def test_fallback_is_recorded_and_strict_mode_refuses_it(triton_path, monkeypatch):
    inputs = make_inputs(1, (5, 5), 64, torch.float32, prefix=0, seed=0)
    too_many = fused_gate.MAX_FLOOR + 1
    fused_gate.gate(*inputs, torch.tensor([False]), 2.0, 0.1, too_many)
    assert dispatch.last_path["gate"] == dispatch.REFERENCE
    assert dispatch.fallbacks and "floor" in dispatch.fallbacks[-1][1]
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    with pytest.raises(dispatch.FallbackError, match="floor"):
        fused_gate.gate(*inputs, torch.tensor([False]), 2.0, 0.1, too_many)
