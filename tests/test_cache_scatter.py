"""The cache-scatter kernel (Triton interpreter) against its PyTorch reference."""

import pytest
import torch

from neuroflow import dispatch
from neuroflow.ops.cache_scatter import cache_scatter
from neuroflow.reference.cache_scatter import cache_scatter_reference


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
    cache_scatter(a, slot, src, cu, index)
    assert dispatch.last_path["cache_scatter"] == dispatch.TRITON
    cache_scatter_reference(b, slot, src, cu, index)
    assert torch.equal(a, b)
