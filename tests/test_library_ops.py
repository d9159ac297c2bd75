"""The registered ops (neuroflow.ops.library): schema, fake implementations and mutation
declarations checked by ``torch.library.opcheck``; ``torch.compile(fullgraph=True)`` through the
packed encoder layer."""

import pytest
import torch

import neuroflow  # noqa: F401  (registers the ops)
from conftest import make_model, video
from neuroflow import dispatch
from neuroflow.encoder import Packed, packed_layer
from neuroflow.models import VisionAdapter


def _varlen_args(dtype=torch.float32):
    torch.manual_seed(0)
    lengths = [5, 0, 9]
    cu = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    q, k, v = (torch.randn(14, 2, 24, dtype=dtype) for _ in range(3))
    return (q, k, v, cu, cu, max(lengths), max(lengths), 0.3, None)


def _gate_args():
    torch.manual_seed(0)
    frames = torch.randn(2, 3, 16, 24)
    weight, bias = torch.randn(32, 3, 8, 8) * 0.1, torch.randn(32)
    pos, prefix = torch.randn(6, 32), torch.randn(1, 32)
    ema = torch.randn(3, 6, 32)
    return (frames, weight, bias, pos, prefix, ema, torch.tensor([2, 0]), torch.tensor([False, True]), 0.1, 0.2, 2)


def _scatter_args():
    torch.manual_seed(0)
    cache = torch.randn(3, 5, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    index = torch.tensor([0, 3, 1, 2, 4, 0, 0], dtype=torch.int32)
    return (cache, torch.tensor([2, 0]), torch.randn(7, 16), cu, index)


OPS = {
    "varlen_attention": (lambda: torch.ops.neuroflow.varlen_attention, _varlen_args),
    "gate": (lambda: torch.ops.neuroflow.gate, _gate_args),
    "cache_scatter": (lambda: torch.ops.neuroflow.cache_scatter, _scatter_args),
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_opcheck(name, path, request):
    if path == "triton":
        request.getfixturevalue("triton_path")
    op, args = OPS[name]
    torch.library.opcheck(op(), args())
    assert dispatch.last_path[name] == path


def test_ops_match_the_python_functions():
    from neuroflow.ops.cache_scatter import cache_scatter
    from neuroflow.ops.gate import gate
    from neuroflow.ops.varlen_attention import varlen_attention

    args = _varlen_args()
    assert torch.equal(torch.ops.neuroflow.varlen_attention(*args), varlen_attention(*args))
    a, b = _gate_args(), _gate_args()
    got, want = torch.ops.neuroflow.gate(*a), gate(*b)
    assert torch.equal(a[5], b[5])  # the EMA, updated in place by both
    for g, w in zip(got, (want.surprise, want.active, want.cu_seqlens)):
        assert torch.equal(g, w)
    a, b = _scatter_args(), _scatter_args()
    torch.ops.neuroflow.cache_scatter(*a)
    cache_scatter(*b)
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_compiled_packed_layer_runs_through_the_varlen_op(family):
    """``torch.compile(fullgraph=True)`` (inductor, which builds C++ on the CPU here) traces the
    packed encoder layer, varlen op included, without a graph break; same result as eager."""
    torch._dynamo.reset()
    layer = VisionAdapter(make_model(family)).layers[0]
    torch.manual_seed(0)
    lengths = [7, 3, 12]
    cu = torch.tensor([0, 7, 10, 22], dtype=torch.int32)
    x = torch.randn(22, 48)
    index = torch.zeros(22, dtype=torch.int32)

    def run(x, cu):
        return packed_layer(layer, x, Packed(cu, index, num_frames=3, tokens=22, capacity=22, max_seqlen=max(lengths)))

    with torch.no_grad():
        eager = run(x, cu)
        compiled = torch.compile(run, fullgraph=True)(x, cu)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # The compiled graph holds the registered op (not a trace through the launcher's Python).
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(run, fullgraph=True, backend=backend)(x, cu)
    assert any("neuroflow.varlen_attention" in str(node.target) for gm in graphs for node in gm.graph.nodes)
    assert dispatch.last_path["varlen_attention"] == dispatch.REFERENCE
