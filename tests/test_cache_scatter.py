"""The cache-scatter kernel (Triton interpreter) against its PyTorch reference."""

import pytest
import torch

from neuroflow.ops import dispatch
from neuroflow.ops.cache_scatter import cache_scatter
from neuroflow.reference.cache_scatter import cache_scatter_reference, quantize_rows


ON_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["interpreter", ON_CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_cache_scatter_matches_reference(request, device, dtype):
    """A copy, so exact in every dtype: compiled on CUDA, interpreted on the CPU (no bf16 there)."""
    if device == "interpreter":
        if dtype == torch.bfloat16:
            pytest.skip("the interpreter's bf16 arithmetic is broken; bf16 runs on CUDA")
        request.getfixturevalue("triton_path")
    dev = "cpu" if device == "interpreter" else device
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(6, 11, 72, generator=g).to(dev, dtype)
    slot = torch.tensor([4, 0, 2], device=dev)
    lengths = [3, 0, 11]  # an empty segment and a full one
    cu = torch.tensor([0, 3, 3, 14], dtype=torch.int32, device=dev)
    index = torch.cat([torch.tensor([0, 5, 10]), torch.arange(11)]).to(dev, torch.int32)
    src = torch.randn(sum(lengths) + 4, 72, generator=g).to(dev, dtype)  # rows past cu[-1] must be ignored
    a, b = cache.clone(), cache.clone()
    cache_scatter(a, slot, src, cu, index)
    assert dispatch.last_path["cache_scatter"] == dispatch.TRITON
    cache_scatter_reference(b, slot, src, cu, index)
    assert torch.equal(a, b)


def _quant_case(g, dtype):
    """6 slots x 11 tokens x 3 heads of 24 channels; one all-zero row (scale 0)."""
    cache = torch.randint(-127, 128, (6, 11, 72), generator=g).to(torch.int8)
    scale = torch.rand(6, 11, 3, generator=g)
    slot = torch.tensor([4, 0, 2])
    cu = torch.tensor([0, 3, 3, 14], dtype=torch.int32)
    index = torch.cat([torch.tensor([0, 5, 10]), torch.arange(11)]).to(torch.int32)
    src = (3 * torch.randn(18, 72, generator=g)).to(dtype)
    src[1] = 0
    return cache, scale, slot, src, cu, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantising_scatter_matches_reference(triton_path, dtype):
    g = torch.Generator().manual_seed(1)
    cache, scale, slot, src, cu, index = _quant_case(g, dtype)
    a, sa = cache.clone(), torch.full_like(scale, float("nan"))
    b, sb = cache.clone(), sa.clone()
    sa[0, 1] = sb[0, 1] = 0.5  # a position nobody writes keeps its scale
    cache_scatter(a, slot, src, cu, index, sa)
    assert dispatch.last_path["cache_scatter"] == dispatch.TRITON
    cache_scatter_reference(b, slot, src, cu, index, sb)
    assert torch.equal(a, b)
    assert torch.equal(sa.isnan(), sb.isnan()) and torch.equal(sa.nan_to_num(), sb.nan_to_num())
    assert sa[0, 1, 0] == 0.5 and (sa[4, 5] == 0).all(), "an all-zero row has scale 0"


def test_quantisation_rule_round_trips_within_half_a_step():
    """Dequantised rows are within half a quantisation step of the input, per head."""
    g = torch.Generator().manual_seed(2)
    x = 5 * torch.randn(40, 4 * 16, generator=g)
    values, scale = quantize_rows(x, 4, torch.int8)
    assert values.dtype == torch.int8 and scale.shape == (40, 4)
    back = (values.float().view(40, 4, 16) * scale[..., None]).view(40, 64)
    err = (back - x).abs().view(40, 4, 16).amax(-1)
    assert (err <= scale / 2 * (1 + 1e-6)).all()
    assert (values.abs().view(40, 4, 16).amax(-1) == 127).all(), "each head's absmax maps to 127"


@pytest.mark.parametrize("what, kwargs, error", [
    ("float cache", dict(cache=torch.zeros(2, 3, 8)), TypeError),
    ("groups do not divide D", dict(scale=torch.zeros(2, 3, 3)), ValueError),
    ("scale shape", dict(scale=torch.zeros(2, 4, 2)), ValueError),
    ("integer scale", dict(scale=torch.zeros(2, 3, 2, dtype=torch.int32)), TypeError),
])
def test_quantising_scatter_rejects_bad_arguments(what, kwargs, error):
    ok = dict(cache=torch.zeros(2, 3, 8, dtype=torch.int8), slot=torch.tensor([1]), src=torch.ones(2, 8),
              cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), index=torch.tensor([0, 2], dtype=torch.int32),
              scale=torch.zeros(2, 3, 2))
    args = {**ok, **kwargs}
    before = args["cache"].clone()
    with pytest.raises(error):
        cache_scatter(**args)
    assert torch.equal(args["cache"], before)


def test_fp8_cache_quantises_like_the_reference(triton_path):
    """float8_e4m3fn caches: the interpreter's fp8 stores do not round to nearest even, so the
    CPU takes the reference (a recorded fallback); the kernel runs on sm_89+ GPUs."""
    g = torch.Generator().manual_seed(3)
    cache = torch.zeros(3, 5, 32, dtype=torch.float8_e4m3fn)
    scale_a, scale_b = torch.zeros(3, 5, 2), torch.zeros(3, 5, 2)
    src = 2 * torch.randn(4, 32, generator=g)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    index = torch.tensor([0, 1, 3, 4], dtype=torch.int32)
    a, b = cache.clone(), cache.clone()
    cache_scatter(a, torch.tensor([2]), src, cu, index, scale_a)
    if not torch.cuda.is_available():
        assert dispatch.last_path["cache_scatter"] == dispatch.REFERENCE
        assert "float8" in dispatch.fallbacks[-1][1]
    cache_scatter_reference(b, torch.tensor([2]), src, cu, index, scale_b)
    assert torch.equal(scale_a, scale_b)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
