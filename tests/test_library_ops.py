"""The registered ops (neuroflow.ops.library): schema, fake implementations and mutation
declarations checked by ``torch.library.opcheck``; ``torch.compile(fullgraph=True)`` through the
packed encoder layer; the engine's step calls the ops (eager) and compiles through them."""

import pytest
import torch

import neuroflow  # noqa: F401  (registers the ops)
from conftest import as_double, dense, make_model, video
from helpers import PaperFlow, assert_same_up_to_rounding
from neuroflow import NeuroFlow
from neuroflow.ops import dispatch
from neuroflow.models.encoder import Packed, packed_layer
from neuroflow.models.families import VisionAdapter


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
    # The mutated ``age``, ``since`` and ``drift`` have no default (torch 2.11 needs every mutated
    # argument passed): None.
    return (frames, weight, bias, pos, prefix, ema, torch.tensor([2, 0]), torch.tensor([False, True]), 0.1, 0.2, 2,
            None, None, None)


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
    from neuroflow.reference.gate_settings import GateSettings
    from neuroflow.ops.library import gate_op_settings

    frames, weight, bias, pos, prefix, ema, slot, first = _gate_args()[:8]
    st = GateSettings(threshold=0.1, ema_decay=0.2, floor_tokens=2, reference="computed", max_staleness=2,
                      budget=0.5, motion_norm=True, scene_cut=0.9)
    kw = gate_op_settings(st, pos.shape[0])
    age = torch.ones(3, 6, dtype=torch.int32)
    positional = (frames, weight, bias, pos, prefix, ema, slot, first, kw.pop("threshold"), kw.pop("ema_decay"),
                  kw.pop("floor_tokens"), age, None, None)
    return positional, kw


POLICY_SETTINGS = dict(threshold=0.1, ema_decay=0.2, floor_tokens=2, max_staleness=2, skip_below=0.5,
                       keyframe_every=3, keyframe_drift=0.4, batch_budget=0.5)


def _gate_policy_args(since=((2,), (0,), (1,))):
    """The gate with the frame policy and the batch budget: the counters ``since`` / ``drift``
    mutated like ``ema`` and ``age``, the frame kinds returned. By default both frames are dense
    (a first frame, and a keyframe: ``since + 1`` reaches ``keyframe_every``), because rows past
    ``cu_seqlens[-1]`` are never written and opcheck compares whole outputs; sparse outcomes are
    compared on their written rows in :func:`test_policy_and_forced_forms_match_the_launcher`."""
    from neuroflow.reference.gate_settings import GateSettings
    from neuroflow.ops.library import gate_op_settings

    frames, weight, bias, pos, prefix, ema, slot, first = _gate_args()[:8]
    kw = gate_op_settings(GateSettings(**POLICY_SETTINGS), pos.shape[0])
    age = torch.ones(3, 6, dtype=torch.int32)
    since, drift = torch.tensor(since, dtype=torch.int32), torch.tensor([[0.1], [0.0], [0.3]])
    positional = (frames, weight, bias, pos, prefix, ema, slot, first, kw.pop("threshold"), kw.pop("ema_decay"),
                  kw.pop("floor_tokens"), age, since, drift)
    return positional, kw


def _gate_forced_args(mask=(True,) * 6):
    """The gate with a forced ``[B, N]`` active mask (``NeuroFlow(..., active=)``); dense by
    default, for opcheck's whole-output comparison (see :func:`_gate_policy_args`)."""
    return (*_gate_args(), torch.tensor([mask] * 2))


def _gate_patch_signal_args():
    """The gate with ``signal="patch"`` (the surprise without the position embedding), the paper's
    rule otherwise: the signal as the op's keyword argument."""
    from neuroflow.reference.gate_settings import GateSettings
    from neuroflow.ops.library import gate_op_settings

    frames, weight, bias, pos, prefix, ema, slot, first = _gate_args()[:8]
    kw = gate_op_settings(GateSettings(threshold=0.1, ema_decay=0.2, floor_tokens=2, signal="patch"), pos.shape[0])
    positional = (frames, weight, bias, pos, prefix, ema, slot, first, kw.pop("threshold"), kw.pop("ema_decay"),
                  kw.pop("floor_tokens"), None, None, None)
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
    "gate policy": (lambda: torch.ops.neuroflow.gate, _gate_policy_args),
    "gate forced": (lambda: torch.ops.neuroflow.gate, _gate_forced_args),
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
    if name == "gate forced" and path == "triton":
        # A forced mask is the reference's case: through the op as through the launcher, a
        # recorded fallback.
        assert dispatch.last_path["gate"] == dispatch.REFERENCE
        assert ("gate", "a forced active mask") in dispatch.fallbacks
    else:
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
    from neuroflow.reference.gate_settings import GateSettings
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


def test_policy_and_forced_forms_match_the_launcher():
    """The extended schema on sparse outcomes (a skipped frame, a forced sparse mask): the op and
    the launcher give the same results on every written row and the same in-place writes (ema,
    age, since, drift)."""
    from neuroflow.reference.gate_settings import GateSettings
    from neuroflow.ops.gate import gate

    def written(out):
        surprise, active, cu, index, packed, kind = out
        return surprise, active, cu, kind, index[: cu[-1]], packed[: cu[-1]]

    # Two frames of two streams: their first frames, then frame 0 again (nothing passes: a skip)
    # and frame 1 negated (its drift passes keyframe_drift: a keyframe).
    (pa, kw), (pb, _) = _gate_policy_args(), _gate_policy_args()
    frames = pa[0]
    again = torch.stack([frames[0], -frames[1]])
    for x, first in ((frames, torch.tensor([True, True])), (again, torch.tensor([False, False]))):
        got = torch.ops.neuroflow.gate(x, *pa[1:7], first, *pa[8:], **kw)
        ref = gate(x, *pb[1:7], first, GateSettings(**POLICY_SETTINGS), age=pb[11], policy=(pb[12], pb[13]))
        for g, w in zip(written(got), written((ref.surprise, ref.active, ref.cu_seqlens, ref.index, ref.packed,
                                               ref.frame_kind))):
            assert torch.equal(g, w)
        for i in (5, 11, 12, 13):  # ema, age, since, drift
            assert torch.equal(pa[i], pb[i])
    assert got[5].tolist() == [0, 2] and got[2].tolist() == [0, 0, 7]  # a skip packs nothing
    a, b = _gate_forced_args((True, False, False, True, False, True)), _gate_args()
    got = torch.ops.neuroflow.gate(*a)
    ref = gate(*b[:11], force_active=a[14])
    assert got[1][0].sum() == 3  # the forced mask on the later frame
    for g, w in zip(written(got), written((ref.surprise, ref.active, ref.cu_seqlens, ref.index, ref.packed,
                                           ref.frame_kind))):
        assert torch.equal(g, w)
    assert torch.equal(a[5], b[5])


class _OpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts calls of the ``neuroflow`` ops that reach the dispatcher (the registered ops; a direct
    call of a Python launcher never does)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "neuroflow":
            self.calls[func.__name__] = self.calls.get(func.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["KV", "C"])
def test_engine_step_calls_the_registered_ops(arch):
    """The engine's gate and every stream-state cache write go through ``torch.ops.neuroflow.*``
    (one code path eager and compiled), a forced mask included; only a call that needs gradients
    takes the gate's Python launcher (:func:`neuroflow.ops.library.launcher_only`)."""
    model, frames = make_model("vit"), video(3)
    nf = NeuroFlow(model, arch=arch, keyframe_every=3, skip_below=0.0, budget=0.5)  # the policy's counters too
    with torch.inference_mode():
        for t in range(2):
            with _OpCalls() as ops:
                nf(frames[t : t + 1])
            assert ops.calls.get("gate.default") == 1
            assert ops.calls.get("cache_scatter.default", 0) >= 1
        with _OpCalls() as ops:
            nf(frames[2:3], active=torch.ones(1, 30, dtype=torch.bool))
        assert ops.calls.get("gate.default") == 1 and dispatch.last_path["gate"] == dispatch.REFERENCE
    nf = NeuroFlow(model, arch=arch, differentiable=True)
    with _OpCalls() as ops:
        nf(frames[:1].clone().requires_grad_(True))
    assert "gate.default" not in ops.calls and ops.calls.get("cache_scatter.default", 0) >= 1


COMPILED_ENGINES = {
    "KV default preset": lambda model: NeuroFlow(model),
    "C paper preset": lambda model: PaperFlow(model, threshold=0.05),
    "KV policy + batch budget": lambda model: NeuroFlow(model, keyframe_every=3, skip_below=0.1, batch_budget=0.5),
}


@pytest.mark.parametrize("name", sorted(COMPILED_ENGINES))
def test_compiled_engine_step_matches_eager(name):
    """``torch.compile`` of the engine's step body (``NeuroFlow._step_body``: gate, encoder,
    cache writes, readout; the stream bookkeeping around it stays eager) on the CPU reference
    path, backend ``aot_eager`` (inductor builds C++ for every graph and recompile here: minutes
    per engine): the same decisions (masks, frame kinds, token counts, ages) as the eager engine
    over several frames, and outputs and stream state equal up to rounding (the compiled graph
    decomposes the layers: held to the dense model's own fp32 error). The gate, the encoder's
    attention and the cache writes are in the compiled graphs, as the registered ops; the one
    graph break is the CPU path's exact token count read on the host
    (``Architecture.encoder_inputs``: ``cu_seqlens.tolist()``)."""
    from torch._dynamo.utils import counters

    model, frames = make_model("vit"), video(4)
    model64 = as_double(model)
    eager, compiled = COMPILED_ENGINES[name](model), COMPILED_ENGINES[name](model)
    targets = set()

    def backend(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled._step_body = torch.compile(compiled._step_body, backend=backend)
    kinds, sparse = [], False
    try:
        with torch.inference_mode():
            for t in range(4):
                x = torch.stack([frames[t], frames[t].flip(-1)])
                got, want = compiled(x), eager(x)
                ref32, ref64 = dense(model, x).last_hidden_state, dense(model64, x.double()).last_hidden_state
                for field in ("active_mask", "first_frame", "frame_kind", "token_layers"):
                    assert torch.equal(getattr(got, field), getattr(want, field)), (t, field)
                for field in ("last_hidden_state", "pooler_output", "sparsity"):
                    assert_same_up_to_rounding(getattr(got, field), getattr(want, field), ref32, ref64, f"{t} {field}")
                finite = want.surprise.isfinite()  # first frames' surprise is inf
                assert torch.equal(got.surprise.isfinite(), finite)
                assert_same_up_to_rounding(got.surprise[finite], want.surprise[finite], ref32, ref64, f"{t} surprise")
                kinds += got.frame_kind.tolist()
                sparse |= t > 0 and not got.active_mask.all()
    finally:
        torch._dynamo.reset()
    assert sparse and (0 in kinds) == ("policy" in name), kinds  # later frames sparse; the policy skips
    assert {"neuroflow.gate.default", "neuroflow.cache_scatter.default", "neuroflow.varlen_attention.default"} <= targets
    assert counters["graph_break"] and all("_local_scalar_dense" in reason for reason in counters["graph_break"])
    (pool_got,), (pool_want,) = compiled.stream_state_dict()["pools"], eager.stream_state_dict()["pools"]
    for key, value in pool_want["tensors"].items():
        if value.is_floating_point():
            assert_same_up_to_rounding(pool_got["tensors"][key], value, ref32, ref64, key)
        else:
            assert torch.equal(pool_got["tensors"][key], value), key
