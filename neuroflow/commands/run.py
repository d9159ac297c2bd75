"""Run video files through NeuroFlow as parallel streams; write embeddings, statistics, overlays and a plot.

Each file is one stream (stream id: its file name). Every call takes one frame from each of up
to --batch streams; a stream that ends drops out and the next file takes its place. Frames are
decoded with PyAV and resized/normalised with the checkpoint's own preprocessing settings
(preprocessor_config.json, else the model family's defaults). The model is loaded from a local
folder only (never downloaded).

Duplicate file names: two inputs with the same file name (e.g. day1/cam.mp4 and day2/cam.mp4)
become streams cam.mp4 and cam.mp4#2, with output files cam.* and cam-2.*; a warning on stderr
names every renamed stream id and its path.

Settings: what is not given comes from --preset (by default the same preset as NeuroFlow(model),
default measured; --preset paper for the paper's gate; the values of both are listed under
--preset). An option that has no effect under the others (e.g. --ema-decay with reference
computed) prints a warning.

Writes into --out (default neuroflow_run_out/<date>-<time>):
  frames.jsonl, frames.csv  one row per frame: video, frame index, time, sparsity, latency, ...
  embeddings/               pooled embedding per frame (.npy and/or .safetensors; --save-tokens:
                            the token grid too), rows in the order of the video's rows above
  overlay/<video>.mp4       the frames with the patches the gate computed marked
  timeline.png              sparsity over video time, latency per call
  summary.json              the printed summary; labels.jsonl with --labels

Exit status: 0 done; 1 a video, the model or the output folder cannot be used (a one-line error
names it; what was computed before a failure mid-file is written); 2 bad options.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.engine import NeuroFlow
from ..engine.architectures import ARCHITECTURES
from ..video.overlay import Calls
from ..models.pooling import pooled_output
from ..video.decode import Frame, VideoError, check_decodable
from ._common import (
    DTYPES,
    CommandError,
    LoadedModel,
    Progress,
    ZeroShotTagger,
    add_gate_arguments,
    chosen_archs,
    default_device,
    gate_kwargs,
    load_model,
    one_line,
    parse_labels,
    pick_device,
    prepare_output_folder,
    print_error,
    print_warning,
    quiet_transformers,
)
from .run_outputs import FrameTable, LabelWindows, NpyRows
from .run_report import RANDOM_WEIGHTS_NOTE, arch_table, build_summary, summary_lines, write_timeline
from .run_stats import ArchStats, CallResult, run_contenders, score
from .run_streams import Source, Stream, StreamScheduler, expected_frames

__all__ = [  # what neuroflow demo, the tests and scripts take from here
    "RANDOM_WEIGHTS_NOTE", "EMBEDDING_FORMATS", "NpyRows", "Settings", "Source", "add_arguments",
    "add_engine_arguments", "arch_table", "default_out", "open_sources", "process", "report", "run", "summary_lines",
]

EMBEDDING_FORMATS = {"npy": ("npy",), "safetensors": ("safetensors",), "both": ("npy", "safetensors")}


# -- options ---------------------------------------------------------------------------------------

def add_engine_arguments(p: argparse.ArgumentParser, several_archs: bool = False, resolution: bool = True) -> None:
    """Options shared with ``neuroflow demo``: ``--preset``, architecture and gate settings
    (:func:`neuroflow.commands._common.add_gate_arguments`: what is not given comes from the
    preset, as for ``NeuroFlow(model)``), (``resolution``) model input side, device, dtype, output
    folder, overlay and quiet switches."""
    add_gate_arguments(p.add_argument_group("gate and architecture (not given: from --preset)"),
                       several_archs=several_archs)
    if resolution:
        p.add_argument("--resolution", type=int, default=None, metavar="PIXELS",
                       help="side of the square model input, a multiple of the patch size (default: the "
                            "checkpoint's preprocessing size)")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    p.add_argument("--out", type=Path, default=None, metavar="FOLDER", help="output folder (created)")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay videos")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary (errors still go to stderr)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="+", type=Path, metavar="VIDEO", help="video files (any format FFmpeg reads)")
    p.add_argument("--model", required=True, type=Path, metavar="PATH",
                   help="local checkpoint folder: SigLIP, CLIP (vision or full model), ViT or DINOv2")
    add_engine_arguments(p)
    p.add_argument("--batch", type=int, default=None, metavar="STREAMS",
                   help="streams per call (default: all videos at once)")
    p.add_argument("--stride", type=int, default=1, help="use every N-th frame (default 1)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N",
                   help="at most N frames per video (after --stride)")
    p.add_argument("--compare-dense", action="store_true",
                   help="also run the dense model on every batch: fidelity (cosine of pooled embeddings) and speedup")
    p.add_argument("--format", choices=sorted(EMBEDDING_FORMATS), default="npy",
                   help="embedding files: npy (default), safetensors or both")
    p.add_argument("--save-tokens", action="store_true",
                   help="also save every frame's token grid (last_hidden_state, [frames, tokens, D])")
    p.add_argument("--labels", default=None, metavar="L1,L2,...",
                   help="zero-shot tagging with the checkpoint's text tower (full SigLIP/CLIP folder with tokenizer)")
    p.add_argument("--label-template", default="a photo of a {}.", metavar="TEXT",
                   help="with --labels: the text embedded for each label, {} standing for the label (default "
                        "'a photo of a {}.', so --labels car embeds 'a photo of a car.')")
    p.add_argument("--label-window", type=float, default=1.0, metavar="SECONDS",
                   help="print and save top labels per window of video time (0: per frame; default 1)")
    p.add_argument("--top-k", type=int, default=3, help="labels printed per frame or window (default 3)")


@dataclass
class Settings:
    """Everything a run needs besides the model and the videos (see ``add_arguments``)."""

    archs: list[str]
    engine: dict = field(default_factory=dict)
    """``NeuroFlow`` keyword arguments besides ``arch`` (``preset`` and the options given)."""
    given: tuple[str, ...] = ()
    """The engine options the user gave (``--arch`` included), for the summary."""
    resolution: int | None = None
    batch: int | None = None
    stride: int = 1
    max_frames: int | None = None
    compare_dense: bool = False
    formats: tuple[str, ...] = ("npy",)
    save_tokens: bool = False
    overlay: bool = True
    tagger: ZeroShotTagger | None = None
    label_window: float = 1.0
    top_k: int = 3
    quiet: bool = False




# -- one run ---------------------------------------------------------------------------------------

def process(sources: list[Source], loaded: LoadedModel, settings: Settings, out: Path,
            device: torch.device, dtype: torch.dtype, command: str = "run") -> dict:
    """Run every source through NeuroFlow (and the dense model with ``compare_dense``), write the
    outputs into ``out`` and return the summary (also written to ``out/summary.json``).

    Outputs computed before any failure (a corrupt frame, an interrupt) are written: the loop's
    files are closed in a ``finally``. A video that fails mid-file drops out (its error is in
    ``summary["failures"]``); the others go on. ``command`` names the command in error lines.
    """
    resolution, grid = model_input_side(settings, loaded)
    engines = make_engines(loaded, settings, command)
    stats, dense = [ArchStats(a) for a in settings.archs], ArchStats("dense")
    writer = RunWriter(out, settings, sources)
    scheduler = StreamScheduler(
        sources, settings.batch or len(sources), lambda source: open_stream(source, settings, out),
        forget=lambda name: forget_stream(engines, name),
        emit_error=lambda line: writer.progress.write(f"neuroflow {command}: error: {line}", file=sys.stderr))
    started, interrupted = time.perf_counter(), False
    try:
        with torch.inference_mode():
            for taken in scheduler.batches():
                x = loaded.preprocessor([f.rgb for _, f in taken], resolution).to(device=device, dtype=dtype)
                ids = [stream.name for stream, _ in taken]
                result = run_contenders(engines, loaded.adapter, x, ids, settings.compare_dense, device)
                score(stats, dense, result)
                writer.write(taken, result, grid)
                if settings.overlay:
                    draw_overlays(taken, result, loaded.preprocessor, resolution, grid)
                writer.end_call(taken, result, streams_open=len(scheduler.active))
    except KeyboardInterrupt:
        interrupted = True
    except torch.OutOfMemoryError as exc:
        raise CommandError(f"out of memory on {device} ({one_line(exc)}); lower --batch or --resolution") from exc
    except OSError as exc:
        raise CommandError(f"cannot write the outputs in {out}: {exc.strerror or one_line(exc)}") from exc
    finally:
        writer.progress.close()
        wall = time.perf_counter() - started
        scheduler.close_all()
        summary = build_summary(sources, scheduler.done, loaded, settings, engines[0], resolution, grid, stats,
                                dense, writer.calls, wall, scheduler.batch, scheduler.failures, interrupted, device, dtype)
        writer.finish(summary, scheduler, loaded, settings.archs[0], resolution, grid)
    return summary


def model_input_side(settings: Settings, loaded: LoadedModel) -> tuple[int, int]:
    """``(side in pixels, patches per side)``: ``--resolution`` or the preprocessing size.

    Raises:
        CommandError: (exit status 2) the side is not a multiple of the patch size.
    """
    resolution = settings.resolution or loaded.preprocessor.size
    patch = loaded.patch_size
    if resolution < patch or resolution % patch:
        raise CommandError(f"--resolution {resolution} is not a multiple of the patch size {patch} "
                           f"(e.g. {max(1, round(resolution / patch)) * patch})", code=2)
    return resolution, resolution // patch


def make_engines(loaded: LoadedModel, settings: Settings, command: str = "run") -> list[NeuroFlow]:
    """One engine per architecture, all on the same model, each with ``settings.engine`` (the
    preset and the options given); bad settings exit with status 2. In a comparison of several
    architectures ``kv_layers``, ``probe_layers`` and ``layer_threshold`` go to the KV engine only (the
    others reject them)."""
    engines = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for a in settings.archs:
                kwargs = dict(settings.engine)
                if len(settings.archs) > 1 and a != "KV":
                    kwargs.pop("kv_layers", None)
                    kwargs.pop("probe_layers", None)
                    kwargs.pop("layer_threshold", None)
                engines.append(NeuroFlow(loaded.model, arch=a, **kwargs))
    except ValueError as exc:
        raise CommandError(one_line(exc), code=2) from exc
    for w in caught:
        if not issubclass(w.category, UserWarning):  # not the engine's own: as Python would show it
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        print_warning(command, message)  # once each, not once per engine
    return engines


def open_stream(source: Source, settings: Settings, out: Path) -> Stream:
    return Stream(source, out, settings.stride, settings.max_frames, settings.overlay, settings.formats,
                  settings.save_tokens)


def forget_stream(engines: list[NeuroFlow], name: str) -> None:
    """A stream that left: its state is dropped from every engine."""
    for nf in engines:
        if name in nf.stream_ids:
            nf.reset([name])


def draw_overlays(taken: list[tuple[Stream, Frame]], result: CallResult, pre, resolution: int, grid: int) -> None:
    """Each frame as the model saw it, with the patches the first architecture computed outlined."""
    out = result.main
    active = out.active_mask.cpu().numpy()
    sparsity = out.sparsity.float().cpu().tolist()
    for i, (stream, frame) in enumerate(taken):
        if stream.overlay is None:
            continue
        box = pre.view_box(frame.rgb.shape[0], frame.rgb.shape[1], resolution)
        caption = (f"{stream.name}  #{frame.index}  {frame.time:.2f}s  "
                   f"{int(active[i].sum())}/{grid * grid} patches  sparsity {sparsity[i]:.0%}")
        stream.overlay.add(frame.rgb, box, active[i].reshape(grid, grid), caption)


class RunWriter:
    """The run-wide outputs: the frame table, label windows, progress bar and per-call timeline,
    and at the end the plot and ``summary.json``. Per-video files belong to each :class:`Stream`."""

    def __init__(self, out: Path, settings: Settings, sources: list[Source]):
        self.out, self.settings = out, settings
        self.tagger = settings.tagger
        columns = ["video", "frame", "time", "sparsity", "active_patches", "patches", "first_frame", "batch_size",
                   "latency_ms"]
        if settings.compare_dense:
            columns += ["dense_latency_ms", "fidelity"]
        if self.tagger is not None:
            columns += ["top_label", "top_score"]
        totals = [expected_frames(s.info, settings.stride, settings.max_frames) for s in sources]
        self.progress = Progress(None if None in totals else sum(totals), settings.quiet)
        self.table = FrameTable(out, columns)
        self.windows = None
        if self.tagger is not None:
            emit = self.progress.write if not settings.quiet else (lambda line: None)
            self.windows = LabelWindows(out / "labels.jsonl", self.tagger.labels, settings.label_window,
                                        settings.top_k, emit)
        self.timeline = Calls()
        self.calls = 0

    def write(self, taken: list[tuple[Stream, Frame]], result: CallResult, grid: int) -> None:
        """One row per frame, its embeddings and its point of the sparsity series."""
        out = result.main
        pooled = pooled_output(out)
        pooled_np = pooled.float().cpu().numpy()
        tokens_np = out.last_hidden_state.float().cpu().numpy() if self.settings.save_tokens else None
        active = out.active_mask.cpu().numpy()
        sparsity = out.sparsity.float().cpu().tolist()
        first = out.first_frame.cpu().tolist()
        fidelity = result.fidelity()
        scores = self.tagger.scores(pooled).cpu().numpy() if self.tagger is not None else None
        for i, (stream, frame) in enumerate(taken):
            row = {"video": stream.name, "frame": frame.index, "time": round(frame.time, 6),
                   "sparsity": round(sparsity[i], 6), "active_patches": int(active[i].sum()), "patches": grid * grid,
                   "first_frame": bool(first[i]), "batch_size": len(taken), "latency_ms": round(result.call_ms[0], 3)}
            if fidelity is not None:
                row["dense_latency_ms"] = round(result.dense_ms, 3)
                row["fidelity"] = round(fidelity[i], 6)
            if scores is not None:
                top = self.windows.top(scores[i])
                row["top_label"], row["top_score"] = top[0]
                row["labels"] = top
                self.windows.add(stream.name, frame.time, scores[i])
            self.table.add(row)
            tokens = tokens_np[i] if tokens_np is not None else None
            stream.embeddings.add(frame.index, frame.time, pooled_np[i], tokens)
            stream.series.time.append(frame.time)
            stream.series.sparsity.append(sparsity[i])
            stream.count += 1

    def end_call(self, taken: list[tuple[Stream, Frame]], result: CallResult, streams_open: int) -> None:
        """Timeline point, files flushed (a failure later keeps this call's rows), progress bar."""
        self.calls += 1
        self.timeline.latency_ms.append(result.call_ms[0])
        self.timeline.streams.append(len(taken))
        if result.dense_ms is not None:
            self.timeline.dense_ms.append(result.dense_ms)
        self.table.flush()
        for stream, _ in taken:
            stream.embeddings.sync()
        out = result.main
        later = [v for v, f in zip(out.sparsity.float().cpu().tolist(), out.first_frame.cpu().tolist(), strict=True)
                 if not f]
        self.progress.update(len(taken), statistics.mean(later) if later else None, streams_open)

    def finish(self, summary: dict, scheduler: StreamScheduler, loaded: LoadedModel, arch: str, resolution: int,
               grid: int) -> None:
        """Close the run-wide files, draw the plot and write ``summary.json`` (its ``outputs``
        entry lists every file written)."""
        self.table.close()
        if self.windows is not None:
            self.windows.close()
        plot = write_timeline(self.out, scheduler.done_in_source_order(), self.timeline, arch, loaded.family,
                              resolution, grid, loaded.random_weights)
        files = [self.table.jsonl_path, self.table.csv_path, *scheduler.written]
        if self.windows is not None:
            files.append(self.windows.path)
        if plot is not None:
            files.append(plot)
        summary["outputs"] = {"folder": str(self.out),
                              "files": [str(p.relative_to(self.out)) for p in files] + ["summary.json"]}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


# -- the command -----------------------------------------------------------------------------------

def default_out(command: str) -> Path:
    """``neuroflow_<command>_out/<date>-<time>`` in the current folder."""
    return Path(f"neuroflow_{command}_out") / time.strftime("%Y%m%d-%H%M%S")


def check_options(args: argparse.Namespace) -> None:
    """Range checks argparse cannot express (exit code 2)."""
    for name, low in (("batch", 1), ("stride", 1), ("max_frames", 1), ("top_k", 1), ("resolution", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise CommandError(f"--{name.replace('_', '-')} must be >= {low}, got {value}", code=2)
    if getattr(args, "label_window", 0) < 0:
        raise CommandError(f"--label-window must be >= 0 seconds, got {args.label_window}", code=2)


def given_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The engine settings given on the command line (``arch`` included), sorted."""
    return tuple(sorted({k for k in gate_kwargs(args) if k != "preset"} | ({"arch"} if hasattr(args, "arch") else set())))


def open_sources(paths: Sequence[Path], command: str = "run") -> list[Source]:
    """Probe every video and decode its first frame, so a missing, unreadable or empty file
    fails before any model work. Raises one CommandError listing every bad file (one per line).

    Stream ids are file names; a name already taken gets ``#2``, ``#3``, ... (its output files
    ``-2``, ``-3``, ...), and a warning on stderr names every renamed id with its path."""
    sources, errors = [], []
    names: set[str] = set()
    stems: set[str] = set()
    for path in paths:
        try:
            info = check_decodable(path)
        except VideoError as exc:
            errors.append(one_line(exc, limit=1000))
            continue
        name, stem = _unique(path.name, names, "#"), _unique(path.stem, stems, "-")
        sources.append(Source(name, stem, path, info))
    if errors:
        raise CommandError("\n".join(errors))
    renamed = [s for s in sources if s.name != s.path.name]
    if renamed:
        print_warning(command, "inputs share a file name, so these were renamed: " + "; ".join(
            f"{s.path} is stream {s.name!r} (outputs {s.stem}.*)" for s in renamed)
            + "; rename the files for ids of your choice")
    return sources


def _unique(base: str, taken: set[str], sep: str) -> str:
    name, k = base, 2
    while name in taken:
        name, k = f"{base}{sep}{k}", k + 1
    taken.add(name)
    return name


def report(command: str, exc: CommandError) -> int:
    """Print a CommandError (each of its lines as one error line) and return its exit code."""
    for line in str(exc).splitlines() or [""]:
        print_error(command, line)
    return exc.code


def run(args: argparse.Namespace) -> int:
    with quiet_transformers() if args.quiet else nullcontext():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        check_options(args)
        sources = open_sources(args.videos)
        device = pick_device(args.device)
        dtype = DTYPES[args.dtype]
        out = prepare_output_folder(args.out or default_out("run"))
        loaded = load_model(args.model, dtype, device)
        tagger = None
        if args.labels is not None:
            tagger = ZeroShotTagger(loaded, parse_labels(args.labels), args.label_template)
        engine = gate_kwargs(args)
        engine.pop("arch", None)
        settings = Settings(
            archs=chosen_archs(args), engine=engine, given=given_options(args), resolution=args.resolution, batch=args.batch, stride=args.stride, max_frames=args.max_frames,
            compare_dense=args.compare_dense, formats=EMBEDDING_FORMATS[args.format], save_tokens=args.save_tokens,
            overlay=not args.no_overlay, tagger=tagger, label_window=args.label_window, top_k=args.top_k,
            quiet=args.quiet,
        )
        summary = process(sources, loaded, settings, out, device, dtype)
    except CommandError as exc:
        return report("run", exc)
    if not args.quiet:
        print("\n".join(summary_lines(summary)))
    if summary["interrupted"]:
        return 130
    return 1 if summary["failures"] else 0
