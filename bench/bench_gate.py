"""Microbenchmark: the fused gate against the unfused PyTorch chain.

    python bench/bench_gate.py [--quick] [--sizes 224 448 ...] [--streams 1 8 ...] [--options paper all ...]
                               [--out bench/results]

Workload: SigLIP-base geometry (patch 16, D = 768), frames of a synthetic static-camera video, each
stream's EMA warmed up on the previous frame (so most patches are inactive, as in deployment),
threshold 0.35, decay 0.01, floor 4. Per configuration (resolution x streams):

* ``fused``: ``neuroflow.ops.gate.gate`` through its Triton kernels (GPU only);
* ``unfused``: ``neuroflow.reference.gate.gate_reference``, the PyTorch chain (conv, add, cosine,
  compare, sort, gather, EMA update);
* effective bandwidth = bytes the gate must move (pixels + EMA read + EMA write + packed
  survivors) / time, and, on a GPU, its share of the measured device-to-device copy bandwidth.

``--tiles`` times the fused gate with each named launch configuration of
``neuroflow.kernels.gate.GATE_TILES`` (``all``: every one; default: the default tile only), one
record per tile, so a GPU run shows which D tile wins (the embed kernel re-reads its pixels once
per D tile).

``--options`` adds configurations of the gate options (``OPTION_CONFIGS``: last-computed
reference, staleness bound, budgets with and without a threshold, motion norm, scene cut, all of
them, and the measured preset's gate with and without its drift keyframe, and with a learned
ranking); each runs the fused three-launch path against the reference with the same settings; the
default is the paper's gate alone.

The fused result is checked against the reference (masks equal, offsets equal) before it is
timed; a configuration whose check fails reports no speedup. On the CPU only the unfused chain
is timed (no kernel timing exists without a GPU), in float32; with ``TRITON_INTERPRET=1`` (the GPU
suite's dry run) each tile's fused result is also checked, not timed. The cache scatter that follows the
encoder has its own microbenchmark, ``bench/bench_cache_scatter.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import add_out_argument, environment, markdown_table, median_ms, write_results
from neuroflow.engine.presets import PRESETS
from neuroflow.ops import dispatch
from neuroflow.reference.gate_settings import GateSettings
from neuroflow.kernels.gate import GATE_CONFIG, GATE_CONFIG_FP32, GATE_TILES
from neuroflow.ops.gate import gate
from neuroflow.reference.gate import gate_reference
from neuroflow.reference.patch_ranker import RANKER_FEATURES, PatchRanker
from neuroflow.video.synthetic import static_camera_video

PATCH, DIM = 16, 768

def _timing_ranker(hidden: int = 16) -> PatchRanker:
    g = torch.Generator().manual_seed(0)
    f = len(RANKER_FEATURES)
    return PatchRanker(torch.randn(f, hidden, generator=g), torch.randn(hidden, generator=g),
                       torch.randn(hidden, generator=g), torch.zeros(()), torch.zeros(f), torch.ones(f))


PAPER = GateSettings(threshold=0.35, ema_decay=0.01, floor_tokens=4)
MEASURED = GateSettings(**{k: v for k, v in PRESETS["measured"].items() if k != "arch"})
OPTION_CONFIGS = {
    "paper": PAPER,
    "computed": PAPER.replace(reference="computed"),
    "stale8": PAPER.replace(max_staleness=8),
    "budget10pct": PAPER.replace(budget=0.1),
    "budget_only10pct": PAPER.replace(threshold=None, floor_tokens=0, budget=0.1),
    "motion_norm": PAPER.replace(motion_norm=True),
    "scene_cut": PAPER.replace(scene_cut=0.5),
    "all": PAPER.replace(reference="computed", max_staleness=8, budget=0.1, motion_norm=True, scene_cut=0.5),
    # NeuroFlow(model)'s gate (the measured preset's frame policy), and the same without its drift keyframe:
    # side by side they show what the drift's texture unit (one more pass over the reference rows) costs.
    "measured": MEASURED,
    "measured_no_drift": MEASURED.replace(keyframe_drift=None),
    # ... and with a learned ranking of the default size (untrained, seeded weights: its cost, not its choice).
    "measured_ranker": MEASURED.replace(ranker=_timing_ranker()),
}
"""Gate settings per benchmark configuration (name -> settings)."""


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) for a 1 GiB buffer."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def make_case(size: int, streams: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(size + streams)
    n = (size // PATCH) ** 2
    clip = torch.stack([static_camera_video(2, size, size, seed=s).normalized() for s in range(streams)], dim=1)
    weight = (torch.randn(DIM, 3, PATCH, PATCH, generator=g) * 0.02).to(device, dtype)
    bias = torch.zeros(DIM, device=device, dtype=dtype)
    pos = (torch.randn(n, DIM, generator=g) * 0.02).to(device, dtype)
    prefix = torch.zeros(0, DIM, device=device, dtype=dtype)
    ema = torch.zeros(streams, n, DIM, device=device)
    slot = torch.arange(streams, device=device)
    warm = clip[0].to(device, dtype)
    gate_reference(warm, weight, bias, pos, prefix, ema, slot, torch.ones(streams, dtype=torch.bool, device=device), 0.35, 0.01, 4)
    frames = clip[1].to(device, dtype)
    return frames, weight, bias, pos, prefix, ema, slot, torch.zeros(streams, dtype=torch.bool, device=device)


DEFAULT_TILE = next(name for name, cfg in GATE_TILES.items() if cfg == GATE_CONFIG)
DEFAULT_TILE_FP32 = next(name for name, cfg in GATE_TILES.items() if cfg == GATE_CONFIG_FP32)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def run(sizes, stream_counts, device: torch.device, dtype: torch.dtype, options=("paper",),
        tiles=(DEFAULT_TILE,)) -> list[dict]:
    env = environment(device)
    on_gpu = device.type == "cuda"
    copy_gbs = copy_bandwidth_gbs(device) if on_gpu else None
    records = []
    for size in sizes:
        for streams in stream_counts:
            for name in options:
                records.extend(run_one(size, streams, device, dtype, name, env, copy_gbs, tiles))
    return records


def run_one(size, streams, device, dtype, name, env, copy_gbs, tiles=(DEFAULT_TILE,)) -> list[dict]:
    """One record per tile (on the CPU one record: only the unfused chain runs)."""
    on_gpu = device.type == "cuda"
    st = OPTION_CONFIGS[name]
    if st.ranker is not None:
        st = st.replace(ranker=st.ranker.to(device))
    frames, weight, bias, pos, prefix, ema, slot, first = make_case(size, streams, dtype, device)
    n = pos.shape[0]
    age = policy = None
    if st.max_staleness is not None:
        # Ages as a stream's first frame leaves them (staggered), one frame in.
        age = (torch.arange(n, device=device) % (st.max_staleness + 1) + 1).to(torch.int32).repeat(streams, 1)
    if st.policy:  # one frame after a keyframe, no drift yet
        policy = (torch.ones(streams, 1, dtype=torch.int32, device=device), torch.zeros(streams, 1, device=device))

    def fresh_state():
        """The age and policy pools, fresh for a run (the gate rewrites them in place)."""
        return {"age": None if age is None else age.clone(),
                "policy": None if policy is None else tuple(c.clone() for c in policy)}

    args = lambda e: (frames, weight, bias, pos, prefix, e, slot, first, st)  # noqa: E731
    ref = gate_reference(*args(ema.clone()), **fresh_state())
    survivors = int(ref.cu_seqlens[-1])
    bytes_moved = frames.numel() * frames.element_size() + 2 * ema.numel() * 4 + survivors * DIM * frames.element_size()
    rec = {**env, "bench": "gate", "dtype": str(dtype).removeprefix("torch."), "size": size, "streams": streams,
           "options": name, "settings": st.as_dict(),
           "patches": n, "sparsity": 1 - survivors / (streams * n), "bytes": bytes_moved}
    # Timed calls carry their state from one to the next, as a stream's frames do (a keyframe every
    # keyframe_every calls under the frame policy).
    work, work_state = ema.clone(), fresh_state()
    rec["unfused_ms"] = median_ms(lambda: gate_reference(*args(work), **work_state), device)
    rec["unfused_gbs"] = bytes_moved / (rec["unfused_ms"] * 1e-3) / 1e9
    if not (on_gpu or dispatch.interpreting()):
        print(f"{size:5d} px x {streams:2d} streams, {name}: unfused {rec['unfused_ms']:.2f} ms", flush=True)
        return [rec]
    # Under the interpreter (TRITON_INTERPRET=1, the GPU suite's dry run) each tile is checked, not timed.
    records = []
    for tile in tiles:
        config = GATE_TILES[tile]
        trec = {**rec, "tile": tile, "config": config}
        out = gate(*args(ema.clone()), **fresh_state(), config=config)
        ok = dispatch.last_path["gate"] == dispatch.TRITON and torch.equal(out.active, ref.active) \
            and torch.equal(out.cu_seqlens, ref.cu_seqlens)
        trec["check"] = "ok" if ok else "FAILED"
        if ok and on_gpu:
            work, work_state = ema.clone(), fresh_state()
            trec["fused_ms"] = median_ms(lambda: gate(*args(work), **work_state, config=config), device)
            trec["fused_gbs"] = bytes_moved / (trec["fused_ms"] * 1e-3) / 1e9
            trec["copy_gbs"] = copy_gbs
            trec["share_of_copy_bw"] = trec["fused_gbs"] / copy_gbs
            trec["speedup"] = trec["unfused_ms"] / trec["fused_ms"]
        print(f"{size:5d} px x {streams:2d} streams, {name}, tile {tile}: unfused {trec['unfused_ms']:.2f} ms"
              + (f", fused {trec['fused_ms']:.3f} ms ({trec['speedup']:.1f}x)" if "fused_ms" in trec
                 else f", fused check {trec['check']}"), flush=True)
        records.append(trec)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="224/448 px, 1 and 8 streams")
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--streams", type=int, nargs="+")
    p.add_argument("--options", nargs="+", default=["paper"], choices=[*OPTION_CONFIGS, "all_configs"],
                   help="gate option configurations (all_configs: every one)")
    p.add_argument("--tiles", nargs="+", default=None, choices=[*GATE_TILES, "all"],
                   help=f"launch configurations of the fused gate to time (all: every one; default the dtype's "
                        f"default tile: {DEFAULT_TILE}, in float32 {DEFAULT_TILE_FP32})")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="frame and weight dtype (default float16 on a GPU, float32 on the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_out_argument(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_gpu else torch.float32)
    sizes = args.sizes or ([224, 448] if args.quick or not on_gpu else [224, 448, 896, 1792])
    streams = args.streams or ([1, 8] if args.quick or not on_gpu else [1, 8, 32])
    options = list(OPTION_CONFIGS) if "all_configs" in args.options else args.options
    if args.tiles is None:
        tiles = [DEFAULT_TILE_FP32 if dtype == torch.float32 else DEFAULT_TILE]
    else:
        tiles = list(GATE_TILES) if "all" in args.tiles else args.tiles
    records = run(sizes, streams, device, dtype, options, tiles)
    columns = [("size", "px"), ("streams", "streams"), ("options", "gate options"), ("tile", "tile"), ("sparsity", "sparsity"), ("unfused_ms", "unfused ms"),
               ("unfused_gbs", "unfused GB/s"), ("fused_ms", "fused ms"), ("fused_gbs", "fused GB/s"),
               ("share_of_copy_bw", "share of copy BW"), ("speedup", "fused speedup"), ("check", "check")]
    table = markdown_table(records, columns)
    env = records[0]
    header = (f"# Gate microbenchmark\n\n{env['device']}, {env['dtype']}, torch {env['torch']}, triton {env['triton']}, "
              f"commit {env['commit']}, {env['time']}"
              + ("" if on_gpu else "\n\nCPU: only the unfused PyTorch chain is timed; no kernel timing exists without a GPU "
                 "(under TRITON_INTERPRET=1 each tile's fused result is checked against the chain)."))
    print("\n" + header + "\n\n" + table)
    write_results("gate", records, table, args.out, header=header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
