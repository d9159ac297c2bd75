"""Microbenchmark of the varlen attention kernel against PyTorch SDPA and flash-attn.

    python bench/bench_varlen_attention.py [--quick] [--out bench/results]

Workloads (fixed seed):

* ``active-N``: 32 streams, each with 2%-30% of N patch tokens active (N = 784: 224 px / 8 or
  448 px / 16; N = 3136: 448 px / 8); the active tokens of a stream attend to each other.
* ``cache-N``: the same active queries attend to all N cached keys/values of their stream, read
  in place from a ``[32 * N, H, Dh]`` cache through ``kv_start``.
* ``cache-N-int8``: as ``cache-N`` with int8 keys/values and per-row, per-head scales (the
  quantised KV cache); the SDPA contenders run on the dequantised fp16 cache.
* ``mixed-N``: one stream sends a dense first frame (N tokens), 31 a gate mix (the case the
  per-length-class tiles are for: the short segments do not inherit the dense frame's tiles).
* ``uniform-197``: 32 frames of 197 tokens (the dense packed encoder, ViT-B/16 at 224 px).
* ``long-L``: one segment of L tokens (L = 512, 1024, 4096).

Head dims 64 (12 heads, ViT-B), 72 (16 heads, SigLIP so400m) and 80 (16 heads, ViT-H). On a GPU, fp16: the Triton
kernel, SDPA on the same work padded to a rectangle with a key padding mask (the padding copies
are not timed, which favours SDPA), SDPA called per segment, and ``flash_attn_varlen_func`` when
it imports. Every method's output is checked against the float64 reference under the project's
tolerance policy first; no speedup is reported for a method whose check failed, and none at all
for a configuration whose kernel check failed.

On the CPU there is no kernel timing (the Triton interpreter measures Python, not the kernel):
only the PyTorch reference and padded / per-segment SDPA run, in fp32, on small shapes, timed
with ``time.perf_counter`` medians.

Writes one JSON line per configuration to ``<out>/varlen_attention.jsonl`` (appended) and the
readable table to ``<out>/varlen_attention.md`` (overwritten), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common import add_out_argument, environment, median_ms, write_results

try:
    from neuroflow.ops import dispatch
    from neuroflow.tooling.testing import assert_close
    from neuroflow.ops.cache_scatter import quantize_rows
    from neuroflow.ops.varlen_attention import launch_schedule, varlen_attention, varlen_attention_reference
    from neuroflow.reference.varlen_attention import dequantize_kv
except ImportError as exc:  # pragma: no cover - only without an installed package
    sys.exit(f"neuroflow is not importable ({exc}); run `pip install -e .` in the repository first")

SEED = 20240611
STREAMS = 32
ACTIVE_FRACTION = (0.02, 0.30)
MIN_ACTIVE = 4  # the gate's default floor_tokens
HEADS = {64: 12, 72: 16, 80: 16}


@dataclass
class Workload:
    name: str
    len_q: list[int]
    len_k: list[int]
    uses_cache: bool  # keys read through kv_start from a [streams * tokens] cache
    kv_int8: bool = False  # int8 keys/values with per-row, per-head scales


def gate_mix(tokens: int, generator: torch.Generator) -> list[int]:
    """Active-token counts of STREAMS streams with 2%-30% of ``tokens`` active (at least the floor)."""
    lo, hi = ACTIVE_FRACTION
    fractions = lo + (hi - lo) * torch.rand(STREAMS, generator=generator)
    return [max(MIN_ACTIVE, round(f * tokens)) for f in fractions.tolist()]


def workloads(on_gpu: bool, quick: bool) -> list[Workload]:
    g = torch.Generator().manual_seed(SEED)
    mixes = {n: gate_mix(n, g) for n in (784, 3136)}
    if on_gpu:
        tokens, longs = ((784,), (1024,)) if quick else ((784, 3136), (512, 1024, 4096))
    else:  # the CPU times only PyTorch paths: keep the shapes small
        tokens, longs = ((784,), (512,)) if quick else ((784, 3136), (512, 1024))
    out = []
    for n in tokens:
        active = mixes[n]
        out.append(Workload(f"active-{n}", active, active, False))
        out.append(Workload(f"cache-{n}", active, [n] * STREAMS, True))
        out.append(Workload(f"cache-{n}-int8", active, [n] * STREAMS, True, kv_int8=True))
        mixed = [n] + active[1:]
        out.append(Workload(f"mixed-{n}", mixed, [n] * STREAMS, True))
    if on_gpu or not quick:
        out.append(Workload("uniform-197", [197] * STREAMS, [197] * STREAMS, False))
    for length in longs:
        out.append(Workload(f"long-{length}", [length], [length], False))
    return out


def cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def attention_flops(w: Workload, heads: int, head_dim: int) -> int:
    """Two matmuls (QK^T and PV) of 2 flops per multiply-add each."""
    return 4 * heads * head_dim * sum(a * b for a, b in zip(w.len_q, w.len_k))


def make_inputs(w: Workload, heads: int, head_dim: int, dtype, device, generator):
    cu_q, cu_k = cu_seqlens(w.len_q, device), cu_seqlens(w.len_k, device)

    def rnd(rows):
        return torch.randn(rows, heads, head_dim, generator=generator).to(device=device, dtype=dtype)

    q, k, v = rnd(sum(w.len_q)), rnd(sum(w.len_k)), rnd(sum(w.len_k))
    kv_start = cu_k[:-1].clone() if w.uses_cache else None
    scales = {}
    if w.kv_int8:
        (k, ks), (v, vs) = (quantized(x) for x in (k, v))
        scales = dict(k_scale=ks, v_scale=vs)
    return q, k, v, cu_q, cu_k, kv_start, scales


def quantized(x: torch.Tensor):
    """``[T, H, D]`` -> int8 ``[T, H, D]`` and per-row, per-head scales ``[T, H]``."""
    values, scale = quantize_rows(x.reshape(x.shape[0], -1), x.shape[1], torch.int8)
    return values.view(x.shape), scale


def padded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Packed ``[T, H, D]`` -> ``[B, H, max_len, D]`` with zero rows after each segment."""
    out = x.new_zeros(len(lengths), max(lengths), *x.shape[1:])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = x[start : start + n]
        start += n
    return out.transpose(1, 2).contiguous()


def unpadded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``[B, H, max_len, D]`` -> packed ``[T, H, D]``."""
    x = x.transpose(1, 2)
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)])


def methods(w: Workload, q, k, v, cu_q, cu_k, kv_start, scales: dict, on_gpu: bool) -> dict:
    """name -> zero-argument callable returning the packed ``[Tq, H, D]`` output."""
    max_q, max_k = max(w.len_q), max(w.len_k)
    k8, v8 = k, v
    if scales:  # the SDPA contenders read the dequantised cache
        k, v = dequantize_kv(k8, scales["k_scale"], q.dtype), dequantize_kv(v8, scales["v_scale"], q.dtype)
    qp, kp, vp = padded(q, w.len_q), padded(k, w.len_k), padded(v, w.len_k)
    key_ok = torch.arange(max_k, device=q.device)[None, :] < torch.tensor(w.len_k, device=q.device)[:, None]
    mask = key_ok[:, None, None, :]  # [B, 1, 1, max_k]: True = attend
    starts_q = cu_q.tolist()
    starts_k = cu_k.tolist()

    def sdpa_padded():
        return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)

    def sdpa_per_segment():
        out = torch.empty_like(q)
        for b in range(len(w.len_q)):
            qs, ks = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
            qb, kb, vb = (x.transpose(0, 1)[None] for x in (q[qs], k[ks], v[ks]))  # [1, H, L, D]
            out[qs] = F.scaled_dot_product_attention(qb, kb, vb)[0].transpose(0, 1)
        return out

    out = {}
    if on_gpu:
        out["triton"] = lambda: varlen_attention(q, k8, v8, cu_q, cu_k, max_q, max_k, kv_start=kv_start, **scales)
    else:
        out["reference"] = lambda: varlen_attention_reference(q, k8, v8, cu_q, cu_k, max_q, max_k, kv_start=kv_start,
                                                              **scales)
    out["sdpa_padded"] = (sdpa_padded, lambda o: unpadded(o, w.len_q))
    out["sdpa_per_segment"] = sdpa_per_segment
    if on_gpu and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_varlen_func
        except Exception:  # not installed, or built for another torch
            flash_attn_varlen_func = None
        if flash_attn_varlen_func is not None:
            # The workloads' keys are contiguous per segment (kv_start == cu_seqlens_k[:-1]), so
            # flash-attn's packed layout sees the same keys as the kernel's cache path.
            out["flash_attn"] = lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)
        try:  # torch's own varlen attention (torch >= 2.9, CUDA only)
            from torch.nn.attention.varlen import varlen_attn
        except Exception:
            varlen_attn = None
        if varlen_attn is not None:
            out["torch_varlen"] = lambda: varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)
    return out


def time_ms(fn, on_gpu: bool, quick: bool) -> float:
    return median_ms(fn, torch.device("cuda" if on_gpu else "cpu"), warmup=1, repeat=3 if quick else 7, quick=quick)


def run_config(w: Workload, head_dim: int, dtype, on_gpu: bool, quick: bool, env: dict) -> dict:
    device = "cuda" if on_gpu else "cpu"
    heads = HEADS[head_dim]
    g = torch.Generator().manual_seed(SEED + head_dim)
    q, k, v, cu_q, cu_k, kv_start, scales = make_inputs(w, heads, head_dim, dtype, device, g)
    max_q, max_k = max(w.len_q), max(w.len_k)
    # 8-bit caches: the quantise-then-dequantise reference (float64 on the dequantised values).
    kd, vd = (k, v) if scales else (k.double(), v.double())
    reference = varlen_attention_reference(q.double(), kd, vd, cu_q, cu_k, max_q, max_k, kv_start=kv_start, **scales)
    baseline = varlen_attention_reference(q, k, v, cu_q, cu_k, max_q, max_k, kv_start=kv_start, **scales)
    flops = attention_flops(w, heads, head_dim)
    results = {}
    for name, spec in methods(w, q, k, v, cu_q, cu_k, kv_start, scales, on_gpu).items():
        fn, to_packed = spec if isinstance(spec, tuple) else (spec, lambda o: o)
        entry = dict(ms=None, tflops=None, correct=False, error=None)
        try:
            assert_close(to_packed(fn()), reference, baseline, what=name)  # correctness first
            if name == "triton" and dispatch.last_path.get("varlen_attention") != "triton":
                raise RuntimeError(f"the launcher fell back to the reference: {dispatch.fallbacks[-1:]}")
            entry["correct"] = True
        except AssertionError as exc:
            entry["error"] = str(exc)
        except Exception as exc:  # a method that cannot run this shape
            entry["error"] = f"{type(exc).__name__}: {exc}"
        if entry["correct"]:
            entry["ms"] = time_ms(fn, on_gpu, quick)
            entry["tflops"] = flops / (entry["ms"] * 1e-3) / 1e12
        results[name] = entry
    speedup = {}
    kernel = results.get("triton")
    if kernel is not None:
        for name, entry in results.items():
            if name != "triton":
                # None unless both the kernel and the other method passed their checks.
                ok = kernel["correct"] and entry["correct"]
                speedup[name] = entry["ms"] / kernel["ms"] if ok else None
    return dict(
        workload=w.name,
        streams=len(w.len_q),
        heads=heads,
        head_dim=head_dim,
        dtype=str(dtype).removeprefix("torch."),
        total_q=sum(w.len_q),
        total_k=sum(w.len_k),
        max_q=max_q,
        max_k=max_k,
        gflop=flops / 1e9,
        kv_dtype="int8" if w.kv_int8 else str(dtype).removeprefix("torch."),
        kernel_schedule=[(lo, hi, cfg) for lo, hi, cfg in launch_schedule(max_q, head_dim, dtype,
                         kv_dtype=torch.int8 if w.kv_int8 else dtype)] if on_gpu else None,
        methods=results,
        speedup=speedup,
        **env,
    )


def fmt_time(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if not entry["correct"]:
        return "FAILED check"
    return f"{entry['ms']:.3f} ({entry['tflops']:.2f})"


def table(records: list[dict], on_gpu: bool) -> str:
    names = ["triton", "sdpa_padded", "sdpa_per_segment", "flash_attn"] if on_gpu else ["reference", "sdpa_padded", "sdpa_per_segment"]
    head = ["workload", "d", "H", "Tq / Tk", "GFLOP"] + [f"{n} ms (TFLOP/s)" for n in names]
    if on_gpu:
        head += [f"x {n}" for n in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        row = [r["workload"], str(r["head_dim"]), str(r["heads"]), f"{r['total_q']} / {r['total_k']}", f"{r['gflop']:.2f}"]
        row += [fmt_time(r["methods"].get(n)) for n in names]
        if on_gpu:
            for n in names[1:]:
                ratio = r["speedup"].get(n)
                row.append("-" if n not in r["methods"] else ("n/a" if ratio is None else f"{ratio:.2f}x"))
        lines.append("| " + " | ".join(row) + " |")
    env = records[0] if records else {}
    notes = [
        f"device: {env.get('device')}, dtype: {env.get('dtype')}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"commit {env.get('commit')}, {env.get('time')}",
        "times are medians in ms, TFLOP/s in brackets; `x name` = name's time / the kernel's time; "
        "n/a = no speedup reported because a correctness check failed; sdpa_padded excludes the padding copies.",
    ]
    if not on_gpu:
        notes.append(
            "NO KERNEL TIMING: this machine has no CUDA GPU, and the Triton interpreter would time Python, "
            "not the kernel. Only the PyTorch paths (fp32) were timed."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke run (one ragged mix, one long segment, few tokens): checks the script runs")
    add_out_argument(parser)
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    dtype = torch.float16 if on_gpu else torch.float32
    head_dims = (64,) if (args.quick and not on_gpu) else (64, 72, 80)
    env = environment(torch.device("cuda" if on_gpu else "cpu"))
    if not on_gpu:
        print("No CUDA GPU: timing only the PyTorch reference and SDPA paths in fp32; no kernel timing exists here.")
    records = []
    work = workloads(on_gpu, args.quick)
    if args.tiny:
        args.quick, head_dims = True, (64,)
        work = [Workload("active-64", [5, 17, 3, 30], [5, 17, 3, 30], False), Workload("long-64", [64], [64], False)]
    for w in work:
        for head_dim in head_dims:
            record = run_config(w, head_dim, dtype, on_gpu, args.quick, env)
            records.append(record)
            kernel = record["methods"].get("triton")
            if kernel is not None and not kernel["correct"]:
                print(f"{w.name} d{head_dim}: kernel FAILED its correctness check; no speedup reported: {kernel['error']}")
            print(f"done {w.name} d{head_dim}", flush=True)
    text = table(records, on_gpu)
    write_results("varlen_attention", records, text, args.out, header="# varlen attention microbenchmark")
    print(text)
    failed = [r for r in records if "triton" in r["methods"] and not r["methods"]["triton"]["correct"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
