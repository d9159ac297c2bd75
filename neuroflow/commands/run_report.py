"""The report of ``neuroflow run``: the summary (``summary.json``), its printed lines, the
architecture table and the timeline plot."""

from __future__ import annotations

from pathlib import Path

from ..video.overlay import Calls, plot_timeline
from .run_stats import arch_summary

RANDOM_WEIGHTS_NOTE = "random weights: sparsity and fidelity are correctness signals, not quality figures"


def build_summary(sources, done, loaded, settings, engine, resolution, grid, stats, dense, calls, wall, batch,
                  failures, interrupted, device, dtype) -> dict:
    """What :func:`neuroflow.commands.run.process` returns and writes to ``summary.json``: the
    model, settings (the first engine's, as resolved from its preset and the options given),
    each video's frames and error, and one :func:`arch_summary` row per architecture."""
    frames = sum(s.count for s in done)
    per_video = {s.source.name: s for s in done}
    return {
        "model": loaded.description,
        "family": loaded.family,
        "random_weights": loaded.random_weights,
        "preprocessing": loaded.preprocessor.source,
        "resolution": resolution,
        "patches_per_frame": grid * grid,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "settings": {"preset": engine.preset, "arch": settings.archs[0], **engine.gate_settings.as_dict(),
                     "kv_layers": list(engine.kv_layers) if engine.kv_layers is not None else None,
                     "probe_layers": engine.probe_layers, "layer_threshold": engine.layer_threshold,
                     "given": list(settings.given), "batch": batch,
                     "stride": settings.stride, "max_frames": settings.max_frames},
        "videos": [{"video": s.name, "path": str(s.path),
                    "frames": per_video[s.name].count if s.name in per_video else 0,
                    "error": per_video[s.name].error if s.name in per_video else None} for s in sources],
        "frames": frames,
        "calls": calls,
        "end_to_end_fps": frames / wall if wall > 0 else None,
        "archs": [arch_summary(st, dense) for st in stats],
        "failures": failures,
        "interrupted": interrupted,
    }


def summary_lines(summary: dict) -> list[str]:
    """The human-readable summary of :func:`process`'s result."""
    rw = " [random weights]" if summary["random_weights"] else ""
    main = summary["archs"][0]
    n_videos = len(summary["videos"])
    side = summary["resolution"]
    lines = [
        (f"model       {summary['model']} ({summary['family']}), input {side}x{side} "
         f"= {summary['patches_per_frame']} patches, {summary['dtype']} on {summary['device']}"),
        (f"frames      {summary['frames']} from {n_videos} video(s) in {summary['calls']} call(s) of up to "
         f"{summary['settings']['batch']} stream(s)"),
    ]
    lines.append(f"settings    {settings_line(summary['settings'])}")
    if main["sparsity"] is not None:
        lines.append(f"sparsity    {main['sparsity']:.1%} of patches skipped (arch {main['arch']}, mean over frames "
                     f"after each stream's first, which is dense){rw}")
    if main["fps"] is not None:
        speed = f"speed       {main['fps']:.1f} frames/s NeuroFlow"
        if main.get("dense_fps"):
            speed += f", {main['dense_fps']:.1f} frames/s dense: {main['speedup']:.2f}x speedup"
        lines.append(speed + f" ({main['timing_basis']})")
    if main.get("fidelity") is not None:
        lines.append(f"fidelity    {main['fidelity']:.4f} mean cosine of pooled embeddings to dense "
                     f"(min {main['fidelity_min']:.4f}){rw}")
    if summary["end_to_end_fps"]:
        lines.append(f"end-to-end  {summary['end_to_end_fps']:.1f} frames/s with decoding, preprocessing and writing")
    if len(summary["archs"]) > 1:
        lines += [""] + arch_table(summary)
    if summary["random_weights"]:
        lines.append(RANDOM_WEIGHTS_NOTE)
    for f in summary["failures"]:
        lines.append(f"FAILED      {f['video']}: {f['error']} ({f['frames_written']} frame(s) before it written)")
    if summary["interrupted"]:
        lines.append("INTERRUPTED the outputs hold the frames processed before the interrupt")
    lines.append(f"outputs     {summary['outputs']['folder']}")
    lines += [f"  {name}" for name in summary["outputs"]["files"]]
    return lines


def settings_line(settings: dict) -> str:
    """``preset 'measured' (default): arch KV, threshold 0.1, ..., keyframe_every 8; given: threshold``."""
    from ..engine.presets import DEFAULT_PRESET

    preset = settings["preset"]
    shown = ["arch", "threshold", "reference", "max_staleness", "floor_tokens"]
    if settings["reference"] == "ema":
        shown.insert(3, "ema_decay")
    shown += [k for k in ("keyframe_every", "skip_below", "keyframe_drift", "batch_budget", "budget", "motion_norm",
                          "scene_cut", "kv_layers", "probe_layers", "layer_threshold", "signal")
              if settings.get(k) not in (None, False, 0, "embedding")]
    text = (f"preset {preset!r}{' (the default)' if preset == DEFAULT_PRESET else ''}: "
            + ", ".join(f"{k} {settings[k]}" for k in shown))
    given = settings.get("given") or []
    return text + (f"; given: {', '.join(given)}" if given else "; nothing overridden")


def arch_table(summary: dict) -> list[str]:
    """A markdown table comparing the architectures of one run."""
    rw = " (random weights)" if summary["random_weights"] else ""
    lines = [f"| arch | mean sparsity{rw} | ms/call p50 | dense ms/call p50 | speedup | fidelity (cos to dense){rw} |",
             "|---|---|---|---|---|---|"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in summary["archs"]:
        lines.append(f"| {r['arch']} | {fmt(r['sparsity'], '.1%')} | {fmt(r['ms_per_call_p50'], '.1f')} | "
                     f"{fmt(r.get('dense_ms_per_call_p50'), '.1f')} | {fmt(r.get('speedup'), '.2f')}x | "
                     f"{fmt(r.get('fidelity'), '.4f')} |")
    return lines


def write_timeline(out: Path, streams, calls: Calls, arch: str, family: str, resolution: int, grid: int,
                   random_weights: bool) -> Path | None:
    """``out/timeline.png``: sparsity per stream over video time, latency per call; None when no
    stream wrote a frame."""
    series = [s.series for s in streams if s.series.time]
    if not series:
        return None
    title = (f"NeuroFlow arch {arch}: {len(series)} stream(s), {family}, "
             f"{resolution}x{resolution} px ({grid * grid} patches)")
    return plot_timeline(out / "timeline.png", series, calls, title, note=RANDOM_WEIGHTS_NOTE if random_weights else "")
