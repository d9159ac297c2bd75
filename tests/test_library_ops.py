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
    # The mutated ``age`` has no default (torch 2.11 needs every mutated argument passed): None.
    return (frames, weight, bias, pos, prefix, ema, torch.tensor([2, 0]), torch.tensor([False, True]), 0.1, 0.2, 2,
            None)


def _scatter_args():
    torch.manual_seed(0)
    cache = torch.randn(3, 5, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    index = torch.tensor([0, 3, 1, 2, 4, 0, 0], dtype=torch.int32)
    return (cache, torch.tensor([2, 0]), torch.randn(7, 16), cu, index, None)  # no scales: not quantising


def _varlen_int8_args():
    """8-bit key/value caches with their per-row, per-head scales (the quantised form)."""
    from neuroflow.reference.cache_scatter import quantize_rows

    q, k, v, cu, cu_k, mq, mk, scale, kv_start = _varlen_args()
    k8, k_scale = quantize_rows(k, 1, torch.int8)  # one group per (row, head): scales [T, H, 1]
    v8, v_scale = quantize_rows(v, 1, torch.int8)
    return (q, k8, v8, cu, cu_k, mq, mk, scale, kv_start, k_scale[..., 0], v_scale[..., 0])


def _gate_options_args():
    """The gate with options (computed reference, staleness with its age pool, a budget, motion
    norm, scene cut): the settings as the op's arguments, ``age`` mutated like ``ema``."""
    from neuroflow.gate_settings import GateSettings
    from neuroflow.ops.library import gate_op_settings

    frames, weight, bias, pos, prefix, ema, slot, first = _gate_args()[:8]
    st = GateSettings(threshold=0.1, ema_decay=0.2, floor_tokens=2, reference="computed", max_staleness=2,
                      budget=0.5, motion_norm=True, scene_cut=0.9)
    kw = gate_op_settings(st, pos.shape[0])
    age = torch.ones(3, 6, dtype=torch.int32)
    positional = (frames, weight, bias, pos, prefix, ema, slot, first, kw.pop("threshold"), kw.pop("ema_decay"),
                  kw.pop("floor_tokens"), age)
    return positional, kw


def _gate_patch_signal_args():
    """The gate with ``signal="patch"`` (the surprise without the position embedding), the paper's
    rule otherwise: the signal as the op's keyword argument."""
    from neuroflow.gate_settings import GateSettings
    from neuroflow.ops.library import gate_op_settings

    frames, weight, bias, pos, prefix, ema, slot, first = _gate_args()[:8]
    kw = gate_op_settings(GateSettings(threshold=0.1, ema_decay=0.2, floor_tokens=2, signal="patch"), pos.shape[0])
    positional = (frames, weight, bias, pos, prefix, ema, slot, first, kw.pop("threshold"), kw.pop("ema_decay"),
                  kw.pop("floor_tokens"), None)
    return positional, kw


def _scatter_int8_args():
    """The quantising cache scatter: an int8 cache and its ``[S, T, G]`` scales, both mutated."""
    cache, slot, src, cu, index, _ = _scatter_args()
    return (torch.zeros(3, 5, 16, dtype=torch.int8), slot, src, cu, index, torch.zeros(3, 5, 2))


OPS = {
    "varlen_attention": (lambda: torch.ops.neuroflow.varlen_attention, _varlen_args),
    "varlen_attention int8": (lambda: torch.ops.neuroflow.varlen_attention, _varlen_int8_args),
    "gate": (lambda: torch.ops.neuroflow.gate, _gate_args),
    "gate options": (lambda: torch.ops.neuroflow.gate, _gate_options_args),
    "gate patch signal": (lambda: torch.ops.neuroflow.gate, _gate_patch_signal_args),
    "cache_scatter": (lambda: torch.ops.neuroflow.cache_scatter, _scatter_args),
    "cache_scatter int8": (lambda: torch.ops.neuroflow.cache_scatter, _scatter_int8_args),
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_opcheck(name, path, request):
    if path == "triton":
        request.getfixturevalue("triton_path")
    op, make = OPS[name]
    args = make()
    args, kwargs = args if isinstance(args[-1], dict) else (args, {})
    torch.library.opcheck(op(), args, kwargs)
    assert dispatch.last_path[name.split()[0]] == path


@pytest.mark.parametrize("name", ["gate", "cache_scatter", "varlen_attention"])
def test_mutated_arguments_have_no_default(name):
    """torch 2.11 bumps the version of each mutated argument by its schema position and raises
    IndexError when a defaulted one is left out of the call: every mutated argument is required."""
    schema = getattr(torch.ops.neuroflow, name).default._schema
    mutated = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert all(not a.has_default_value() for a in mutated), [a.name for a in mutated if a.has_default_value()]
    assert bool(mutated) == (name != "varlen_attention")


def test_ops_match_the_python_functions():
    from neuroflow.ops.cache_scatter import cache_scatter
    from neuroflow.ops.gate import gate
    from neuroflow.ops.varlen_attention import varlen_attention

    args = _varlen_args()
    assert torch.equal(torch.ops.neuroflow.varlen_attention(*args), varlen_attention(*args))
    a, b = _gate_args(), _gate_args()
    got, want = torch.ops.neuroflow.gate(*a), gate(*b[:11])
    assert torch.equal(a[5], b[5])  # the EMA, updated in place by both
    for g, w in zip(got, (want.surprise, want.active, want.cu_seqlens)):
        assert torch.equal(g, w)
    a, b = _scatter_args(), _scatter_args()
    torch.ops.neuroflow.cache_scatter(*a)
    cache_scatter(*b[:5])
    assert torch.equal(a[0], b[0])


def test_option_forms_of_the_ops_match_the_python_functions():
    """The quantised attention and scatter and the gate with options, through the ops and the
    Python functions: same results and the same in-place writes (cache + scales, ema + age)."""
    from neuroflow.gate_settings import GateSettings
    from neuroflow.ops.cache_scatter import cache_scatter
    from neuroflow.ops.gate import gate
    from neuroflow.ops.varlen_attention import varlen_attention

    args = _varlen_int8_args()
    want = varlen_attention(*args[:9], k_scale=args[9], v_scale=args[10])
    assert torch.equal(torch.ops.neuroflow.varlen_attention(*args), want)
    (pa, kw), (pb, _) = _gate_options_args(), _gate_options_args()
    got = torch.ops.neuroflow.gate(*pa, **kw)
    st = GateSettings(threshold=0.1, ema_decay=0.2, floor_tokens=2, reference="computed", max_staleness=2,
                      budget=0.5, motion_norm=True, scene_cut=0.9)
    ref = gate(*pb[:8], st, age=pb[11])
    assert torch.equal(pa[5], pb[5]) and torch.equal(pa[11], pb[11])  # ema and age, in place
    assert not torch.equal(pa[11], _gate_options_args()[0][11])  # the ages did change
    for g, w in zip(got, (ref.surprise, ref.active, ref.cu_seqlens)):
        assert torch.equal(g, w)
    (pa, kw), (pb, _) = _gate_patch_signal_args(), _gate_patch_signal_args()
    assert kw["signal"] == "patch"
    got = torch.ops.neuroflow.gate(*pa, **kw)
    ref = gate(*pb[:8], GateSettings(threshold=0.1, ema_decay=0.2, floor_tokens=2, signal="patch"))
    assert torch.equal(pa[5], pb[5])  # the EMA (of the patch embeddings), in place
    for g, w in zip(got, (ref.surprise, ref.active, ref.cu_seqlens)):
        assert torch.equal(g, w)
    assert not torch.equal(got[0], torch.ops.neuroflow.gate(*_gate_args())[0])  # the signal reached the gate
    a, b = _scatter_int8_args(), _scatter_int8_args()
    torch.ops.neuroflow.cache_scatter(*a)
    cache_scatter(*b[:5], scale=b[5])
    assert torch.equal(a[0], b[0]) and torch.equal(a[5], b[5]) and a[5].abs().sum() > 0


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
