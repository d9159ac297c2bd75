"""Microbenchmark: the cache-scatter kernel against its PyTorch reference.

    python bench/bench_cache_scatter.py [--quick] [--sizes 224 448 ...] [--streams 1 8 ...] [--out bench/results]

Workload: the gate's survivors on frames of a synthetic static-camera video (SigLIP-base geometry,
patch 16, D = 768, threshold 0.35, EMA warmed on the previous frame, as ``bench/bench_gate.py``)
scattered into a ``[S, N, D]`` cache, as Architecture C does after the encoder. The kernel's result
is checked equal to the reference's before it is timed; a configuration whose check fails reports
no speedup. Effective bandwidth = survivor rows read + written / time. On the CPU only the
reference runs (no kernel timing exists without a GPU).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench_gate import DIM, make_case
from common import add_out_argument, environment, markdown_table, median_ms, write_results
from neuroflow.ops import dispatch
from neuroflow.ops.cache_scatter import cache_scatter
from neuroflow.reference.cache_scatter import cache_scatter_reference
from neuroflow.reference.gate import gate_reference


def run(sizes, stream_counts, device: torch.device, dtype: torch.dtype) -> list[dict]:
    env = environment(device)
    records = []
    for size in sizes:
        for streams in stream_counts:
            frames, weight, bias, pos, prefix, ema, slot, first = make_case(size, streams, dtype, device)
            gated = gate_reference(frames, weight, bias, pos, prefix, ema, slot, first, 0.35, 0.01, 4)
            survivors = int(gated.cu_seqlens[-1])
            cache = torch.zeros(streams, pos.shape[0], DIM, device=device, dtype=dtype)
            args = (cache, slot, gated.packed[:survivors], gated.cu_seqlens, gated.index)
            bytes_moved = 2 * survivors * DIM * cache.element_size()
            rec = {**env, "bench": "cache_scatter", "dtype": str(dtype).removeprefix("torch."), "size": size,
                   "streams": streams, "rows": survivors, "bytes": bytes_moved}
            rec["reference_ms"] = median_ms(lambda: cache_scatter_reference(*args), device)
            if device.type == "cuda":
                check = cache.clone()
                cache_scatter(check, *args[1:])
                cache_scatter_reference(cache, *args[1:])
                ok = dispatch.last_path["cache_scatter"] == dispatch.TRITON and torch.equal(check, cache)
                rec["check"] = "ok" if ok else "FAILED"
                if ok:
                    rec["kernel_ms"] = median_ms(lambda: cache_scatter(*args), device)
                    rec["kernel_gbs"] = bytes_moved / (rec["kernel_ms"] * 1e-3) / 1e9
                    rec["speedup"] = rec["reference_ms"] / rec["kernel_ms"]
            records.append(rec)
            print(f"{size:5d} px x {streams:2d} streams, {survivors} rows: reference {rec['reference_ms']:.3f} ms"
                  + (f", kernel {rec['kernel_ms']:.3f} ms ({rec['speedup']:.1f}x)" if "kernel_ms" in rec else ""),
                  flush=True)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="224/448 px, 1 and 8 streams")
    p.add_argument("--sizes", type=int, nargs="+", help="frame sides in pixels")
    p.add_argument("--streams", type=int, nargs="+", help="stream counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_out_argument(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    sizes = args.sizes or ([224, 448] if args.quick or not on_gpu else [224, 448, 896, 1792])
    streams = args.streams or ([1, 8] if args.quick or not on_gpu else [1, 8, 32])
    records = run(sizes, streams, device, dtype)
    columns = [("size", "px"), ("streams", "streams"), ("rows", "rows"), ("reference_ms", "reference ms"),
               ("kernel_ms", "kernel ms"), ("kernel_gbs", "kernel GB/s"), ("speedup", "speedup"), ("check", "check")]
    table = markdown_table(records, columns)
    env = records[0]
    header = (f"# Cache-scatter microbenchmark\n\n{env['device']}, {env['dtype']}, torch {env['torch']}, "
              f"triton {env['triton']}, commit {env['commit']}, {env['time']}"
              + ("" if on_gpu else "\n\nCPU: only the PyTorch reference runs; no kernel timing exists without a GPU."))
    print("\n" + header + "\n\n" + table)
    write_results("cache_scatter", records, table, args.out, header=header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
