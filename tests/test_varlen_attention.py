"""The varlen attention kernel (Triton interpreter on the CPU) against its PyTorch reference.

Fresh random inputs per case; every launch writes into a NaN-filled ``out`` so an element the
kernel forgot fails the comparison. Tolerances come from ``neuroflow.tooling.testing.assert_close`` only:
the kernel's error against the reference on float64 inputs may be at most twice the error of the
reference run in the input dtype (plus an 8-ulp floor).

The interpreter is switched per test by the ``triton_path`` fixture (tests/conftest.py). Triton
itself must be imported with ``TRITON_INTERPRET=1`` for its interpreter to work at all (it builds
``tl.sum``/``tl.max`` for one mode at import), which tests/conftest.py does before anything imports
Triton; the autouse fixture then sets it to "0" for every test that does not ask for the kernels,
and subprocess tests (tests/test_compile.py) start without it. The kernel itself may be defined in
either mode: the launcher re-wraps it for the device it runs on.
bf16 is broken in the interpreter, so bf16 runs only in the CUDA test (skipped without a GPU).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuroflow.ops import dispatch
from neuroflow.tooling.testing import assert_close
from neuroflow.ops.cache_scatter import quantize_rows
from neuroflow.ops.varlen_attention import (
    OP,
    head_dim_split,
    launch_config,
    launch_schedule,
    varlen_attention,
    varlen_attention_reference,
)
from neuroflow.reference.varlen_attention import DEBUG_ENV
from neuroflow.tooling.testing import round_to_tf32

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [0, 1, 5, 64, 197]


def cu_seqlens(lengths, device="cpu"):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def randn(generator, *shape, dtype, device="cpu"):
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def check(q, k, v, cu_q, cu_k, max_q, max_k, *, kv_start=None, scale=None, config=None, expect="triton",
          k_scale=None, v_scale=None):
    """Run the kernel into a NaN-filled ``out`` and compare it with the reference under the policy.

    8-bit k/v (with scales): the reference dequantises them (float64 for the high-precision
    reference, q's dtype for the baseline), i.e. the quantise-then-dequantise reference. fp32 on
    a GPU runs on TF32 tensor cores: the baseline then takes TF32-rounded inputs
    (``neuroflow.tooling.testing.round_to_tf32``)."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    got = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, kv_start, out=out, config=config,
                           k_scale=k_scale, v_scale=v_scale)
    assert got is out
    assert dispatch.last_path[OP] == expect
    args = (cu_q, cu_k, max_q, max_k, scale, kv_start)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if k_scale is None:
        reference = varlen_attention_reference(q.double(), k.double(), v.double(), *args)
    else:
        reference = varlen_attention_reference(q.double(), k, v, *args, **scales)
    if q.dtype == torch.float32 and q.is_cuda and k_scale is None:
        baseline = varlen_attention_reference(round_to_tf32(q), round_to_tf32(k), round_to_tf32(v), *args)
    else:
        baseline = varlen_attention_reference(q, k, v, *args, **scales)
    assert_close(got, reference, baseline, what=f"varlen attention {q.dtype} d{q.shape[-1]}")
    return got


def quantized(x, dtype=torch.int8):
    """``[T, H, Dh]`` -> 8-bit values ``[T, H, Dh]`` and per-row, per-head scales ``[T, H]``."""
    values, scale = quantize_rows(x.reshape(x.shape[0], -1), x.shape[1], dtype)
    return values.view(x.shape), scale


@pytest.mark.parametrize("head_dim", [64, 72, 80])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_packed_segments_match_reference(triton_path, dtype, head_dim):
    g = torch.Generator().manual_seed(1000 + head_dim + (dtype == torch.float32))
    cu = cu_seqlens(LENGTHS)
    total, heads = int(cu[-1]), 2
    q, k, v = (randn(g, total, heads, head_dim, dtype=dtype) for _ in range(3))
    check(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_query_and_key_lengths_differ(triton_path, dtype):
    g = torch.Generator().manual_seed(7)
    len_q = [1, 5, 0, 197, 64]
    len_k = [197, 64, 5, 1, 0]  # the last segment has queries but no keys
    cu_q, cu_k = cu_seqlens(len_q), cu_seqlens(len_k)
    heads, head_dim = 2, 64
    q = randn(g, sum(len_q), heads, head_dim, dtype=dtype)
    k, v = (randn(g, sum(len_k), heads, head_dim, dtype=dtype) for _ in range(2))
    got = check(q, k, v, cu_q, cu_k, max(len_q), max(len_k), scale=0.3)
    assert torch.equal(got[-64:], torch.zeros_like(got[-64:])), "a segment without keys must give zeros"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kv_start_reads_a_per_stream_cache(triton_path, dtype):
    """Active queries of 4 streams attend to their slots of a [S * T, H, Dh] cache in place."""
    g = torch.Generator().manual_seed(11)
    slots, tokens, heads, head_dim = 5, 70, 2, 72
    cache_k, cache_v = (randn(g, slots * tokens, heads, head_dim, dtype=dtype) for _ in range(2))
    slot = torch.tensor([3, 0, 4, 1])
    len_q = [5, 1, 64, 0]
    len_k = [tokens, tokens, 13, tokens]  # the third stream only sees the first 13 cached rows
    # q as a view into a packed qkv projection: rows are strided, the last dim is contiguous.
    qkv = randn(g, sum(len_q), 3, heads, head_dim, dtype=dtype)
    q = qkv[:, 0]
    assert not q.is_contiguous()
    kv_start = (slot * tokens).to(torch.int64)
    check(q, cache_k, cache_v, cu_seqlens(len_q), cu_seqlens(len_k), max(len_q), max(len_k), kv_start=kv_start)


def test_small_tiles_cross_many_tile_boundaries(triton_path):
    """16x16 tiles: several query tiles per segment and several key blocks per tile, with
    segment ends on, just past and well inside tile boundaries."""
    g = torch.Generator().manual_seed(3)
    lengths = [0, 1, 16, 17, 37, 5]
    cu = cu_seqlens(lengths)
    q, k, v = (randn(g, int(cu[-1]), 2, 80, dtype=torch.float16) for _ in range(3))
    check(q, k, v, cu, cu, max(lengths), max(lengths), config=dict(BLOCK_M=16, BLOCK_N=16))


def test_layouts_without_16_byte_alignment(triton_path):
    """Head dim 36 (rows not 16-byte aligned) and a q view one element into its storage: the
    launcher must drop the kernel's alignment hints (ALIGN=1)."""
    g = torch.Generator().manual_seed(9)
    lengths = [7, 0, 20]
    cu = cu_seqlens(lengths)
    k, v = (randn(g, 27, 2, 36, dtype=torch.float16) for _ in range(2))
    q = randn(g, 27 * 2 * 36 + 1, dtype=torch.float16)[1:].view(27, 2, 36)
    assert q.data_ptr() % 16
    check(q, k, v, cu, cu, 20, 20)


def test_gpu_default_config_on_gate_sized_segments(triton_path):
    """The tiles the GPU would use for short segments (from the config table), on a gate-like mix:
    6 streams with 2-30% of 49 patches active, attending to all 49 cached keys of their stream."""
    g = torch.Generator().manual_seed(5)
    tokens, heads, head_dim = 49, 2, 64
    len_q = [1, 4, 15, 9, 2, 12]
    cfg = launch_config(max(len_q), head_dim, interpreting=False)
    assert cfg["BLOCK_M"] == 16
    cache_k, cache_v = (randn(g, len(len_q) * tokens, heads, head_dim, dtype=torch.float16) for _ in range(2))
    q = randn(g, sum(len_q), heads, head_dim, dtype=torch.float16)
    kv_start = torch.arange(len(len_q), dtype=torch.int32) * tokens
    cu_k = cu_seqlens([tokens] * len(len_q))
    check(q, cache_k, cache_v, cu_seqlens(len_q), cu_k, max(len_q), tokens, kv_start=kv_start, config=cfg)


def test_one_launch_per_length_class_on_a_mixed_batch(triton_path):
    """The GPU's schedule (16/32/64/128-row tiles per segment-length class) under the
    interpreter: one dense 130-token segment next to 1-, 5-, 20-, 33- and 64-token ones; each
    class's programs find their (segment, tile) on the device."""
    g = torch.Generator().manual_seed(12)
    len_q = [1, 130, 5, 20, 0, 33, 64, 17]
    heads, head_dim = 1, 64
    schedule = launch_schedule(max(len_q), head_dim)
    assert [(lo, hi, cfg["BLOCK_M"]) for lo, hi, cfg in schedule] == [
        (0, 16, 16), (16, 32, 32), (32, 64, 64), (64, None, 128)]
    cu = cu_seqlens(len_q)
    q, k, v = (randn(g, sum(len_q), heads, head_dim, dtype=torch.float32) for _ in range(3))
    small = [(lo, hi, dict(cfg, BLOCK_N=128)) for lo, hi, cfg in schedule]
    check(q, k, v, cu, cu, max(len_q), max(len_q), config=small)


def test_max_seqlen_is_an_upper_bound(triton_path):
    """Bounds from capacity buckets (larger than every segment) give the same result."""
    g = torch.Generator().manual_seed(13)
    len_q, len_k = [3, 9, 1], [40, 7, 0]
    q = randn(g, sum(len_q) + 5, 2, 32, dtype=torch.float16)  # rows past cu[-1]: no segment
    k, v = (randn(g, sum(len_k), 2, 32, dtype=torch.float16) for _ in range(2))
    cu_q, cu_k = cu_seqlens(len_q), cu_seqlens(len_k)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    varlen_attention(q, k, v, cu_q, cu_k, 512, 4096, out=out)
    exact = varlen_attention(q, k, v, cu_q, cu_k, max(len_q), max(len_k))
    assert torch.equal(out[: sum(len_q)], exact[: sum(len_q)])
    assert out[sum(len_q):].isnan().all(), "rows outside every segment are not written"


def test_offset_checks_on_cuda_only_in_debug_mode(monkeypatch):
    """The offsets' values are checked on the host only on the CPU, or with NEUROFLOW_DEBUG_CHECKS=1
    (the launcher otherwise never syncs on CUDA); the launcher runs under the device guard."""
    from neuroflow.ops import varlen_attention as module
    from neuroflow.reference import varlen_attention as ref

    assert not ref.debug_checks()
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert ref.debug_checks()
    source = Path(module.__file__).read_text()
    assert "with torch.cuda.device(q.device):" in source
    assert "interpreted or debug_checks()" in source


@pytest.mark.parametrize("head_dim", [64, 72, 80])
def test_int8_cache_matches_the_dequantised_reference(triton_path, head_dim):
    """int8 keys/values with per-row, per-head scales read in place through kv_start."""
    g = torch.Generator().manual_seed(20 + head_dim)
    slots, tokens, heads = 4, 37, 2
    cache_k, k_scale = quantized(3 * randn(g, slots * tokens, heads, head_dim, dtype=torch.float32))
    cache_v, v_scale = quantized(randn(g, slots * tokens, heads, head_dim, dtype=torch.float32))
    len_q = [5, 0, 1, 30]
    q = randn(g, sum(len_q), heads, head_dim, dtype=torch.float16)
    kv_start = torch.tensor([2, 0, 3, 1]) * tokens
    cu_k = cu_seqlens([tokens, tokens, 0, 20])
    check(q, cache_k, cache_v, cu_seqlens(len_q), cu_k, max(len_q), tokens, kv_start=kv_start,
          k_scale=k_scale, v_scale=v_scale)


def test_int8_cache_with_fp32_queries_and_fp16_scales(triton_path):
    g = torch.Generator().manual_seed(31)
    cache_k, k_scale = quantized(randn(g, 50, 2, 72, dtype=torch.float32))
    cache_v, v_scale = quantized(randn(g, 50, 2, 72, dtype=torch.float32))
    len_q = [7, 16]
    q = randn(g, sum(len_q), 2, 72, dtype=torch.float32)
    cu_k = cu_seqlens([25, 25])
    check(q, cache_k, cache_v, cu_seqlens(len_q), cu_k, 16, 25, k_scale=k_scale.half(), v_scale=v_scale.half())


def test_fp8_cache_matches_the_dequantised_reference(triton_path):
    """float8_e4m3fn caches: the interpreter's fp8 loads work, so the kernel runs here too."""
    g = torch.Generator().manual_seed(41)
    cache_k, k_scale = quantized(randn(g, 60, 2, 80, dtype=torch.float32), torch.float8_e4m3fn)
    cache_v, v_scale = quantized(randn(g, 60, 2, 80, dtype=torch.float32), torch.float8_e4m3fn)
    len_q = [9, 1, 0]
    q = randn(g, sum(len_q), 2, 80, dtype=torch.float16)
    cu_k = cu_seqlens([20, 40, 0])
    check(q, cache_k, cache_v, cu_seqlens(len_q), cu_k, 9, 40, k_scale=k_scale, v_scale=v_scale)


@pytest.mark.parametrize("kv", ["float", "int8"])
def test_split_over_keys_matches_reference(triton_path, kv):
    """Flash-decoding: each segment's keys in 3 runs, partials combined on the device. Rows of
    no segment keep out's contents; a segment without keys gives zeros; splits shorter than a
    key block or empty (5 keys over 3 splits) are handled."""
    g = torch.Generator().manual_seed(17)
    tokens, heads, head_dim = 300, 2, 72
    len_q, len_k = [4, 1, 0, 2], [tokens, 5, tokens, 0]
    q = randn(g, sum(len_q), heads, head_dim, dtype=torch.float32)
    cache_k, cache_v = (randn(g, 4 * tokens, heads, head_dim, dtype=torch.float32) for _ in range(2))
    scales = {}
    if kv == "int8":
        (cache_k, ks), (cache_v, vs) = quantized(cache_k), quantized(cache_v)
        scales = dict(k_scale=ks, v_scale=vs)
    kv_start = torch.tensor([1, 0, 3, 2]) * tokens
    cfg = dict(launch_config(max(len_q), head_dim, interpreting=True), BLOCK_N=64, num_splits=3)
    check(q, cache_k, cache_v, cu_seqlens(len_q), cu_seqlens(len_k), max(len_q), tokens, kv_start=kv_start,
          config=cfg, **scales)
    # rows past cu_seqlens_q[-1] keep what out held
    q2 = torch.cat([q, q[:2]])
    out = torch.full(q2.shape, 7.0)
    varlen_attention(q2, cache_k, cache_v, cu_seqlens(len_q), cu_seqlens(len_k), max(len_q), tokens, None, kv_start,
                     out=out, config=cfg, **scales)
    assert (out[-2:] == 7.0).all()
    assert (out[5:7] == 0).all(), "the segment without keys gives zeros"


def test_head_dim_split():
    assert head_dim_split(64) == (64, 0)
    assert head_dim_split(72) == (64, 16)
    assert head_dim_split(80) == (64, 16)
    assert head_dim_split(96) == (64, 32)
    assert head_dim_split(36) == (32, 16)
    assert head_dim_split(16) == (16, 0)
    assert head_dim_split(128) == (128, 0)


@pytest.mark.parametrize("head_dim", [16, 24, 36, 100, 128])
def test_other_head_dims(triton_path, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    cu = cu_seqlens([3, 12])
    q, k, v = (randn(g, 15, 1, head_dim, dtype=torch.float16) for _ in range(3))
    check(q, k, v, cu, cu, 12, 12)


def test_launch_config_follows_the_longest_query_segment():
    assert launch_config(8, 64)["BLOCK_M"] == 16
    assert launch_config(30, 72)["BLOCK_M"] == 32
    assert launch_config(64, 80)["BLOCK_M"] == 64
    assert launch_config(3136, 64)["BLOCK_M"] == 128
    assert launch_config(5, 64, interpreting=True)["BLOCK_M"] == 16
    assert launch_config(197, 64, interpreting=True)["BLOCK_M"] == 128


def test_empty_batches(triton_path):
    q = torch.zeros(0, 2, 64)
    cu = torch.zeros(1, dtype=torch.int32)
    assert varlen_attention(q, q, q, cu, cu, 0, 0).shape == (0, 2, 64)
    cu = cu_seqlens([0, 0])
    assert varlen_attention(q, q, q, cu, cu, 0, 0).shape == (0, 2, 64)
    assert dispatch.last_path[OP] == "triton"


def test_cpu_without_interpreter_runs_the_reference():
    g = torch.Generator().manual_seed(2)
    cu = cu_seqlens([3, 0, 9])
    q, k, v = (randn(g, 12, 2, 64, dtype=torch.float32) for _ in range(3))
    got = varlen_attention(q, k, v, cu, cu, 9, 9)
    assert dispatch.last_path[OP] == "reference"
    assert dispatch.fallbacks == []
    assert torch.equal(got, varlen_attention_reference(q, k, v, cu, cu, 9, 9))


@pytest.mark.parametrize(
    "head_dim, dtype, reason",
    [(256, torch.float16, "head dim"), (8, torch.float32, "head dim"), (64, torch.bfloat16, "bfloat16")],
)
def test_unsupported_calls_fall_back_and_strict_mode_refuses(triton_path, monkeypatch, head_dim, dtype, reason):
    g = torch.Generator().manual_seed(4)
    cu = cu_seqlens([3, 5])
    q, k, v = (randn(g, 8, 1, head_dim, dtype=dtype) for _ in range(3))
    got = varlen_attention(q, k, v, cu, cu, 5, 5)
    assert dispatch.last_path[OP] == "reference"
    assert len(dispatch.fallbacks) == 1 and dispatch.fallbacks[0][0] == OP and reason in dispatch.fallbacks[0][1]
    assert torch.equal(got, varlen_attention_reference(q, k, v, cu, cu, 5, 5))
    monkeypatch.setenv(dispatch.STRICT_ENV, "1")
    with pytest.raises(dispatch.FallbackError, match="varlen_attention"):
        varlen_attention(q, k, v, cu, cu, 5, 5)


def test_mixed_dtypes_fall_back_to_the_reference(triton_path):
    g = torch.Generator().manual_seed(6)
    cu = cu_seqlens([4, 2])
    q = randn(g, 6, 2, 32, dtype=torch.float32)
    k, v = (randn(g, 6, 2, 32, dtype=torch.float16) for _ in range(2))
    got = varlen_attention(q, k, v, cu, cu, 4, 4)
    assert got.dtype == torch.float32
    assert dispatch.last_path[OP] == "reference" and "dtypes differ" in dispatch.fallbacks[-1][1]


def _bad_calls():
    q = torch.zeros(8, 2, 64)
    cu = cu_seqlens([3, 5])
    ok = dict(q=q, k=q, v=q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5)
    return [
        ("rank", dict(ok, q=q[:, 0]), ValueError),
        ("heads differ", dict(ok, k=torch.zeros(8, 3, 64), v=torch.zeros(8, 3, 64)), ValueError),
        ("k/v shapes differ", dict(ok, v=torch.zeros(9, 2, 64)), ValueError),
        ("integer q", dict(ok, q=q.long()), TypeError),
        ("float offsets", dict(ok, cu_seqlens_q=cu.float()), TypeError),
        ("cu_seqlens lengths differ", dict(ok, cu_seqlens_k=cu_seqlens([3, 5, 0])), ValueError),
        ("2-D offsets", dict(ok, cu_seqlens_q=cu[None], cu_seqlens_k=cu[None]), ValueError),
        ("kv_start length", dict(ok, kv_start=torch.zeros(3, dtype=torch.int32)), ValueError),
        ("max_seqlen tensor", dict(ok, max_seqlen_q=torch.tensor(5)), TypeError),
        ("max_seqlen too small", dict(ok, max_seqlen_q=4), ValueError),
        ("decreasing offsets", dict(ok, cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError),
        ("offsets past q", dict(ok, cu_seqlens_q=cu_seqlens([3, 6]), max_seqlen_q=6), ValueError),
        ("keys past k", dict(ok, kv_start=torch.tensor([0, 4], dtype=torch.int32)), ValueError),
        ("out dtype", dict(ok, out=torch.zeros(8, 2, 64, dtype=torch.float16)), ValueError),
        ("int8 k without scales", dict(ok, k=q.to(torch.int8), v=q.to(torch.int8)), TypeError),
        ("scales with float k", dict(ok, k_scale=torch.ones(8, 2), v_scale=torch.ones(8, 2)), TypeError),
        ("scale shape", dict(ok, k=q.to(torch.int8), v=q.to(torch.int8), k_scale=torch.ones(8, 1),
                             v_scale=torch.ones(8, 2)), ValueError),
        ("int8 k, float v", dict(ok, k=q.to(torch.int8), k_scale=torch.ones(8, 2), v_scale=torch.ones(8, 2)),
         TypeError),
        ("integer q", dict(ok, q=q.to(torch.int8)), TypeError),
    ]


@pytest.mark.parametrize("interpreted", [False, True], ids=["reference", "interpreter"])
@pytest.mark.parametrize("what, kwargs, error", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_arguments_raise_clear_errors(monkeypatch, interpreted, what, kwargs, error):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreted else "0")
    with pytest.raises(error):
        varlen_attention(**kwargs)
    with pytest.raises(error):
        varlen_attention_reference(**kwargs)


def test_interpreter_switched_on_after_triton_was_imported_falls_back():
    """Triton builds tl.sum/tl.max for the interpreter or the compiler when it is imported, so
    setting TRITON_INTERPRET later cannot run kernels: the launcher says so (a recorded fallback,
    an error in strict mode) instead of crashing inside Triton."""
    probe = (
        "import os, torch, triton.language\n"
        "from neuroflow.ops import dispatch\n"
        "from neuroflow.ops import varlen_attention as varlen\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "cu = torch.tensor([0, 3, 7], dtype=torch.int32)\n"
        "q = torch.randn(7, 1, 32)\n"
        "o = varlen.varlen_attention(q, q, q, cu, cu, 4, 4)\n"
        "assert dispatch.last_path['varlen_attention'] == 'reference'\n"
        "assert 'TRITON_INTERPRET' in dispatch.fallbacks[-1][1], dispatch.fallbacks\n"
        "assert torch.equal(o, varlen.varlen_attention_reference(q, q, q, cu, cu, 4, 4))\n"
        "os.environ[dispatch.STRICT_ENV] = '1'\n"
        "try:\n"
        "    varlen.varlen_attention(q, q, q, cu, cu, 4, 4)\n"
        "except dispatch.FallbackError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('strict mode did not refuse the fallback')\n"
    )
    env = {k: val for k, val in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.STRICT_ENV)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernel and bf16 need a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 72, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    for len_q, len_k in ((LENGTHS, LENGTHS), ([5, 33, 0, 12] * 8, [784] * 32), ([1024, 3, 4096], [1024, 3, 4096])):
        cu_q, cu_k = cu_seqlens(len_q, "cuda"), cu_seqlens(len_k, "cuda")
        q = randn(g, sum(len_q), 4, head_dim, dtype=dtype, device="cuda")
        k, v = (randn(g, sum(len_k), 4, head_dim, dtype=dtype, device="cuda") for _ in range(2))
        check(q, k, v, cu_q, cu_k, max(len_q), max(len_k))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernel needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 72, 80])
@pytest.mark.parametrize("kv", ["float32-tf32", "int8"])
def test_cuda_fp32_and_int8_caches(kv, head_dim):
    """fp32 on TF32 tensor cores (against the TF32-rounded baseline) and int8 caches with fp16
    queries, on ragged gate mixes over a per-stream cache (one stream: the split over keys)."""
    g = torch.Generator().manual_seed(head_dim + 1)
    for streams in (32, 1):
        len_q, tokens = ([5, 33, 0, 12] * 8)[:streams], 784
        dtype = torch.float32 if kv.startswith("float32") else torch.float16
        q = randn(g, sum(len_q), 4, head_dim, dtype=dtype, device="cuda")
        k, v = (randn(g, streams * tokens, 4, head_dim, dtype=dtype, device="cuda") for _ in range(2))
        scales = {}
        if kv == "int8":
            (k, ks), (v, vs) = quantized(k.float()), quantized(v.float())
            scales = dict(k_scale=ks, v_scale=vs)
        cu_k = cu_seqlens([tokens] * streams, "cuda")
        check(q, k, v, cu_seqlens(len_q, "cuda"), cu_k, max(len_q), tokens, kv_start=cu_k[:-1], **scales)


def test_gradients_take_the_differentiable_reference(triton_path):
    """The kernel is forward-only: a call that needs gradients must not silently drop them."""
    q = torch.randn(5, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    out = varlen_attention(q, q.detach(), q.detach(), cu, cu, 5, 5)
    assert dispatch.last_path["varlen_attention"] == dispatch.REFERENCE
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
