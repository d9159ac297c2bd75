"""Run video files through NeuroFlow as parallel streams; write embeddings, statistics, overlays and a plot.

Each file is one stream (stream id: its file name). Every call takes one frame from each of up
to --batch streams; a stream that ends drops out and the next file takes its place. Frames are
decoded with PyAV and resized/normalised with the checkpoint's own preprocessing settings
(preprocessor_config.json, else the model family's defaults). The model is loaded from a local
folder only (never downloaded).

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
import csv
import json
import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine import NeuroFlow
from ..overlay import Calls, OverlayVideo, Series, plot_timeline
from ..architectures import ARCHITECTURES
from ..video import Frame, VideoError, VideoInfo, check_decodable, read_frames
from ._common import (
    DTYPES,
    CommandError,
    LoadedModel,
    Progress,
    ZeroShotTagger,
    default_device,
    dense_forward,
    load_model,
    one_line,
    parse_labels,
    pick_device,
    prepare_output_folder,
    print_error,
    quiet_transformers,
    synchronize,
)

EMBEDDING_FORMATS = {"npy": ("npy",), "safetensors": ("safetensors",), "both": ("npy", "safetensors")}
RANDOM_WEIGHTS_NOTE = "random weights: sparsity and fidelity are correctness signals, not quality figures"


# -- options ---------------------------------------------------------------------------------------

def add_engine_arguments(p: argparse.ArgumentParser, several_archs: bool = False, resolution: bool = True) -> None:
    """Options shared with ``neuroflow demo``: architecture and gate settings, (``resolution``)
    model input side, device, dtype, output folder, overlay and quiet switches."""
    if several_archs:
        p.add_argument("--arch", nargs="+", default=["C"], choices=ARCHITECTURES, metavar="ARCH",
                       help="architecture(s) A, B, C, KV (default C); with several, the first one's results are "
                            "written and a table compares them all")
    else:
        p.add_argument("--arch", default="C", choices=ARCHITECTURES,
                       help="A (MLP gating), B (elimination), C (dual memory, default), KV (cached context)")
    p.add_argument("--threshold", type=float, default=0.35, metavar="T",
                   help="a patch is computed when its surprise 1 - cos(h, EMA) is above this (default 0.35)")
    p.add_argument("--decay", "--ema-decay", dest="ema_decay", type=float, default=0.01, metavar="D",
                   help="weight of the new frame in each patch's EMA (default 0.01)")
    p.add_argument("--floor", "--floor-tokens", dest="floor_tokens", type=int, default=4, metavar="N",
                   help="at least this many patches are computed per frame (default 4)")
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
    p.add_argument("--label-template", default="a photo of a {}.",
                   help="prompt for each label (default 'a photo of a {}.')")
    p.add_argument("--label-window", type=float, default=1.0, metavar="SECONDS",
                   help="print and save top labels per window of video time (0: per frame; default 1)")
    p.add_argument("--top-k", type=int, default=3, help="labels printed per frame or window (default 3)")


# -- what a run writes -----------------------------------------------------------------------------

class NpyRows:
    """An ``.npy`` file written row by row.

    The header is a fixed 128 bytes rewritten with the row count on every :meth:`sync`, so after a
    failure the file holds (and ``numpy.load`` reads) every row written before it.

    Args:
        path: output file.
        row_shape: shape of one row, e.g. ``(D,)`` or ``(T, D)``.
        dtype: numpy dtype of the rows.
    """

    HEADER_BYTES = 128

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype=np.float32):
        self.path = path
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._file = open(path, "wb")
        self._write_header()

    def _write_header(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, *self.row_shape)}
        text = repr(header).encode("latin1")
        # magic (6) + version (2) + header length (2) + header padded with spaces, ending in "\n".
        length = self.HEADER_BYTES - 10
        if len(text) + 1 > length:
            raise ValueError(f"{self.path}: shape {header['shape']} does not fit the fixed npy header")
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + length.to_bytes(2, "little") + text.ljust(length - 1) + b"\n")
        self._file.seek(0, 2)

    def append(self, row: np.ndarray) -> None:
        row = np.asarray(row, dtype=self.dtype)
        if row.shape != self.row_shape:
            raise ValueError(f"{self.path}: row of shape {row.shape}, expected {self.row_shape}")
        self._file.write(row.tobytes())
        self.rows += 1

    def sync(self) -> None:
        """Rewrite the header with the current row count and flush to the OS."""
        self._write_header()
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


class EmbeddingFiles:
    """One video's embeddings: ``embeddings/<stem>.pooled.npy`` ``[F, D]`` float32,
    ``<stem>.frames.npy`` ``[F]`` int64 frame indices, ``<stem>.tokens.npy`` ``[F, T, D]`` float32
    (``--save-tokens``); ``--format safetensors`` puts the same arrays (plus ``time`` ``[F]``
    float64 seconds) in ``<stem>.safetensors`` instead (``both``: both). Opened on the first frame."""

    def __init__(self, folder: Path, stem: str, formats: tuple[str, ...], save_tokens: bool):
        self.folder, self.stem, self.formats, self.save_tokens = folder, stem, formats, save_tokens
        self._arrays: dict[str, NpyRows] = {}
        self._times: list[float] = []

    def add(self, index: int, time_s: float, pooled: np.ndarray, tokens: np.ndarray | None) -> None:
        if not self._arrays:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._arrays["pooled"] = NpyRows(self.folder / f"{self.stem}.pooled.npy", pooled.shape)
            self._arrays["frames"] = NpyRows(self.folder / f"{self.stem}.frames.npy", (), np.int64)
            if self.save_tokens and tokens is not None:
                self._arrays["tokens"] = NpyRows(self.folder / f"{self.stem}.tokens.npy", tokens.shape)
        self._arrays["pooled"].append(pooled)
        self._arrays["frames"].append(np.asarray(index, dtype=np.int64))
        if "tokens" in self._arrays:
            self._arrays["tokens"].append(tokens)
        self._times.append(time_s)

    def sync(self) -> None:
        for a in self._arrays.values():
            a.sync()

    def close(self) -> list[Path]:
        """Finish the files; returns the paths written."""
        if not self._arrays:
            return []
        for a in self._arrays.values():
            a.close()
        written = []
        if "safetensors" in self.formats:
            from safetensors.numpy import save_file

            tensors = {"frame_index" if k == "frames" else k: np.load(a.path) for k, a in self._arrays.items()}
            tensors["time"] = np.asarray(self._times, dtype=np.float64)
            path = self.folder / f"{self.stem}.safetensors"
            save_file(tensors, str(path), metadata={"stem": self.stem, "rows": str(len(self._times))})
            written.append(path)
        for a in self._arrays.values():
            if "npy" in self.formats:
                written.append(a.path)
            else:
                a.path.unlink()
        self._arrays = {}
        return written


class FrameTable:
    """``frames.jsonl`` and ``frames.csv``: one row per frame, flushed after every call."""

    def __init__(self, folder: Path, columns: Sequence[str]):
        self.columns = list(columns)
        self.jsonl_path, self.csv_path = folder / "frames.jsonl", folder / "frames.csv"
        self._jsonl = open(self.jsonl_path, "w", encoding="utf-8")
        self._csv_file = open(self.csv_path, "w", encoding="utf-8", newline="")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(self.columns)
        self.rows = 0

    def add(self, row: dict) -> None:
        self._jsonl.write(json.dumps(row) + "\n")
        self._csv.writerow([_csv_cell(row.get(c)) for c in self.columns])
        self.rows += 1

    def flush(self) -> None:
        self._jsonl.flush()
        self._csv_file.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()


def _csv_cell(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


class LabelWindows:
    """Top labels per window of video time (per frame with ``window == 0``), printed and saved to
    ``labels.jsonl``: one row per window with the mean score of each of the top-k labels."""

    def __init__(self, path: Path, labels: list[str], window: float, top_k: int, emit):
        self.labels, self.window, self.top_k, self.emit = labels, window, top_k, emit
        self.path = path
        self._file = open(path, "w", encoding="utf-8")
        self._open: dict[str, dict] = {}

    def add(self, video: str, t: float, scores: np.ndarray) -> None:
        w = self._open.get(video)
        if w is not None and self.window > 0 and t >= w["start"] + self.window:
            self._close_window(video)
            w = None
        if w is None:
            w = self._open[video] = {"start": t, "end": t, "sum": np.zeros_like(scores, dtype=np.float64), "frames": 0}
        w["sum"] += scores
        w["end"] = t
        w["frames"] += 1
        if self.window == 0:
            self._close_window(video)

    def top(self, scores: np.ndarray) -> list[tuple[str, float]]:
        order = np.argsort(-scores, kind="stable")[: self.top_k]
        return [(self.labels[i], round(float(scores[i]), 4)) for i in order]

    def _close_window(self, video: str) -> None:
        w = self._open.pop(video)
        top = self.top(w["sum"] / w["frames"])
        self._file.write(json.dumps({"video": video, "start": round(w["start"], 4), "end": round(w["end"], 4),
                                     "frames": w["frames"], "labels": top}) + "\n")
        self._file.flush()
        span = f"{w['start']:.2f}s" if w["frames"] == 1 else f"{w['start']:.2f}-{w['end']:.2f}s"
        self.emit(f"{video} {span}: " + ", ".join(f"{name} {score:.2f}" for name, score in top))

    def close(self) -> None:
        for video in list(self._open):
            self._close_window(video)
        self._file.close()


# -- the stream loop -------------------------------------------------------------------------------

@dataclass
class Source:
    """One input video: ``name`` is its stream id (the file name, made unique), ``stem`` the base
    name of its output files."""

    name: str
    stem: str
    path: Path
    info: VideoInfo


@dataclass
class Settings:
    """Everything a run needs besides the model and the videos (see ``add_arguments``)."""

    archs: list[str]
    threshold: float = 0.35
    ema_decay: float = 0.01
    floor_tokens: int = 4
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


@dataclass
class ArchStats:
    """Per-architecture measurements; ``steady_*``: calls in which no stream had its first frame."""

    arch: str
    call_ms: list[float] = field(default_factory=list)
    steady_ms: list[float] = field(default_factory=list)
    frames: int = 0
    steady_frames: int = 0
    sparsity: list[float] = field(default_factory=list)  # frames after each stream's first
    fidelity: list[float] = field(default_factory=list)  # frames after each stream's first


class _Stream:
    """A source being decoded, with its per-video outputs."""

    def __init__(self, source: Source, settings: Settings, out: Path):
        self.source = source
        self.frames: Iterator[Frame] = read_frames(source.path, settings.stride, settings.max_frames)
        fps = source.info.fps / settings.stride if source.info.fps else 25.0
        self.overlay = OverlayVideo(out / "overlay" / f"{source.stem}.mp4", fps) if settings.overlay else None
        self.embeddings = EmbeddingFiles(out / "embeddings", source.stem, settings.formats, settings.save_tokens)
        self.series = Series(source.name)
        self.count = 0
        self.error: str | None = None

    def close(self) -> list[Path]:
        written = self.embeddings.close()
        if self.overlay is not None and self.overlay.frames:
            self.overlay.close()
            written.append(self.overlay.path)
        return written


def expected_frames(info: VideoInfo, stride: int, max_frames: int | None) -> int | None:
    """Frames a run will take from a video, when the container knows its frame count."""
    if info.frame_count is None:
        return max_frames
    n = math.ceil(info.frame_count / stride)
    return n if max_frames is None else min(n, max_frames)


def process(sources: list[Source], loaded: LoadedModel, settings: Settings, out: Path,
            device: torch.device, dtype: torch.dtype, command: str = "run") -> dict:
    """Run every source through NeuroFlow (and the dense model with ``compare_dense``), write the
    outputs into ``out`` and return the summary (also written to ``out/summary.json``).

    Outputs computed before any failure (a corrupt frame, an interrupt) are written: the loop's
    files are closed in a ``finally``. A video that fails mid-file drops out (its error is in
    ``summary["failures"]``); the others go on. ``command`` names the command in error lines.
    """
    resolution = settings.resolution or loaded.preprocessor.size
    patch = loaded.patch_size
    if resolution < patch or resolution % patch:
        raise CommandError(f"--resolution {resolution} is not a multiple of the patch size {patch} "
                           f"(e.g. {max(1, round(resolution / patch)) * patch})", code=2)
    grid = resolution // patch
    try:
        engines = [NeuroFlow(loaded.model, arch=a, threshold=settings.threshold, ema_decay=settings.ema_decay,
                             floor_tokens=settings.floor_tokens) for a in settings.archs]
    except ValueError as exc:
        raise CommandError(one_line(exc), code=2) from exc
    stats = [ArchStats(a) for a in settings.archs]
    dense = ArchStats("dense")
    pre = loaded.preprocessor
    batch = settings.batch or len(sources)
    tagger = settings.tagger
    columns = ["video", "frame", "time", "sparsity", "active_patches", "patches", "first_frame", "batch_size",
               "latency_ms"]
    if settings.compare_dense:
        columns += ["dense_latency_ms", "fidelity"]
    if tagger is not None:
        columns += ["top_label", "top_score"]

    totals = [expected_frames(s.info, settings.stride, settings.max_frames) for s in sources]
    progress = Progress(None if None in totals else sum(totals), settings.quiet)
    table = FrameTable(out, columns)
    windows = (LabelWindows(out / "labels.jsonl", tagger.labels, settings.label_window, settings.top_k,
                            progress.write if not settings.quiet else (lambda line: None))
               if tagger is not None else None)
    pending, active, done = deque(sources), [], []
    written: list[Path] = []
    failures: list[dict] = []
    calls = 0
    timeline = Calls()
    started = time.perf_counter()
    interrupted = False

    def finish(stream: _Stream) -> None:
        active.remove(stream)
        done.append(stream)
        for nf in engines:
            if stream.source.name in nf.stream_ids:
                nf.reset([stream.source.name])
        written.extend(stream.close())

    try:
        with torch.inference_mode():
            while pending or active:
                while pending and len(active) < batch:
                    active.append(_Stream(pending.popleft(), settings, out))
                taken: list[tuple[_Stream, Frame]] = []
                for stream in list(active):  # finish() removes from `active`
                    try:
                        taken.append((stream, next(stream.frames)))
                    except StopIteration:
                        finish(stream)
                    except VideoError as exc:
                        stream.error = one_line(exc, limit=1000)
                        failures.append({"video": stream.source.name, "path": str(stream.source.path),
                                         "error": stream.error, "frames_written": stream.count})
                        progress.write(f"neuroflow {command}: error: {stream.error} "
                                       f"({stream.count} frame(s) before it were written)", file=sys.stderr)
                        finish(stream)
                if not taken:
                    continue
                ids = [s.source.name for s, _ in taken]
                x = pre([f.rgb for _, f in taken], resolution).to(device=device, dtype=dtype)

                dense_pooled = None
                if settings.compare_dense:
                    synchronize(device)
                    t0 = time.perf_counter()
                    dense_pooled = dense_forward(loaded.adapter, x)
                    synchronize(device)
                    dense_ms = 1e3 * (time.perf_counter() - t0)
                outs, call_ms = [], []
                for nf in engines:
                    synchronize(device)
                    t0 = time.perf_counter()
                    outs.append(nf(x, stream_ids=ids))
                    synchronize(device)
                    call_ms.append(1e3 * (time.perf_counter() - t0))
                calls += 1
                steady = not bool(outs[0].first_frame.any())
                later = ~outs[0].first_frame.cpu()
                for st, out_k, ms in zip(stats, outs, call_ms, strict=True):
                    _record(st, out_k, ms, steady, later, dense_pooled)
                if settings.compare_dense:
                    _record_dense(dense, dense_ms, steady, len(ids))

                out0 = outs[0]
                pooled = _pooled(out0)
                pooled_np = pooled.float().cpu().numpy()
                tokens_np = out0.last_hidden_state.float().cpu().numpy() if settings.save_tokens else None
                active_np = out0.active_mask.cpu().numpy()
                sparsity = out0.sparsity.float().cpu().tolist()
                first = out0.first_frame.cpu().tolist()
                fidelity = None
                if dense_pooled is not None:
                    fidelity = torch.nn.functional.cosine_similarity(pooled.float(), dense_pooled.float(), dim=-1)
                    fidelity = fidelity.cpu().tolist()
                scores = tagger.scores(pooled).cpu().numpy() if tagger is not None else None
                for i, (stream, frame) in enumerate(taken):
                    name = stream.source.name
                    n_active = int(active_np[i].sum())
                    row = {"video": name, "frame": frame.index, "time": round(frame.time, 6),
                           "sparsity": round(sparsity[i], 6), "active_patches": n_active, "patches": grid * grid,
                           "first_frame": bool(first[i]), "batch_size": len(taken), "latency_ms": round(call_ms[0], 3)}
                    if fidelity is not None:
                        row["dense_latency_ms"] = round(dense_ms, 3)
                        row["fidelity"] = round(fidelity[i], 6)
                    if scores is not None:
                        top = windows.top(scores[i])
                        row["top_label"], row["top_score"] = top[0]
                        row["labels"] = top
                        windows.add(name, frame.time, scores[i])
                    table.add(row)
                    stream.embeddings.add(frame.index, frame.time, pooled_np[i],
                                          tokens_np[i] if tokens_np is not None else None)
                    if stream.overlay is not None:
                        box = pre.view_box(frame.rgb.shape[0], frame.rgb.shape[1], resolution)
                        caption = (f"{name}  #{frame.index}  {frame.time:.2f}s  "
                                   f"{n_active}/{grid * grid} patches  sparsity {sparsity[i]:.0%}")
                        stream.overlay.add(frame.rgb, box, active_np[i].reshape(grid, grid), caption)
                    stream.series.time.append(frame.time)
                    stream.series.sparsity.append(sparsity[i])
                    stream.count += 1
                timeline.latency_ms.append(call_ms[0])
                timeline.streams.append(len(taken))
                if settings.compare_dense:
                    timeline.dense_ms.append(dense_ms)
                table.flush()
                for stream, _ in taken:
                    stream.embeddings.sync()
                later_sparsity = [v for v, f in zip(sparsity, first, strict=True) if not f]
                progress.update(len(taken), statistics.mean(later_sparsity) if later_sparsity else None, len(active))
    except KeyboardInterrupt:
        interrupted = True
    except torch.OutOfMemoryError as exc:
        raise CommandError(f"out of memory on {device} ({one_line(exc)}); lower --batch or --resolution") from exc
    except OSError as exc:
        raise CommandError(f"cannot write the outputs in {out}: {exc.strerror or one_line(exc)}") from exc
    finally:
        progress.close()
        wall = time.perf_counter() - started
        for stream in list(active):
            finish(stream)
        table.close()
        if windows is not None:
            windows.close()
        order = {id(src): k for k, src in enumerate(sources)}
        series = [s.series for s in sorted(done, key=lambda st: order[id(st.source)]) if s.series.time]
        plot_path = None
        if series:
            plot_path = out / "timeline.png"
            title = (f"NeuroFlow arch {settings.archs[0]}: {len(series)} stream(s), {loaded.family}, "
                     f"{resolution}x{resolution} px ({grid * grid} patches)")
            plot_timeline(plot_path, series, timeline, title, note=RANDOM_WEIGHTS_NOTE if loaded.random_weights else "")
        summary = _summary(sources, done, loaded, settings, resolution, grid, stats, dense, calls, wall, batch,
                           failures, interrupted, device, dtype)
        files = [table.jsonl_path, table.csv_path, *written]
        if windows is not None:
            files.append(windows.path)
        if plot_path is not None:
            files.append(plot_path)
        summary["outputs"] = {"folder": str(out), "files": [str(p.relative_to(out)) for p in files] + ["summary.json"]}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _pooled(out) -> torch.Tensor:
    """``pooler_output``, or the first token where the model has no pooling (as :func:`dense_forward`)."""
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]


def _record(st: ArchStats, out, ms: float, steady: bool, later: torch.Tensor, dense_pooled) -> None:
    b = out.sparsity.shape[0]
    st.call_ms.append(ms)
    st.frames += b
    if steady:
        st.steady_ms.append(ms)
        st.steady_frames += b
    st.sparsity.extend(out.sparsity.float().cpu()[later].tolist())
    if dense_pooled is not None:
        cos = torch.nn.functional.cosine_similarity(_pooled(out).float(), dense_pooled.float(), dim=-1).cpu()
        st.fidelity.extend(cos[later].tolist())


def _record_dense(dense: ArchStats, ms: float, steady: bool, b: int) -> None:
    dense.call_ms.append(ms)
    dense.frames += b
    if steady:
        dense.steady_ms.append(ms)
        dense.steady_frames += b


def _arch_summary(st: ArchStats, dense: ArchStats) -> dict:
    use_steady = bool(st.steady_ms)
    ms = st.steady_ms if use_steady else st.call_ms
    frames = st.steady_frames if use_steady else st.frames
    row = {
        "arch": st.arch,
        "frames": st.frames,
        "sparsity": statistics.mean(st.sparsity) if st.sparsity else None,
        "fps": 1e3 * frames / sum(ms) if ms and sum(ms) > 0 else None,
        "ms_per_call_p50": statistics.median(ms) if ms else None,
        "timing_basis": "calls without a first frame" if use_steady else "all calls",
    }
    if dense.call_ms:
        dms = dense.steady_ms if use_steady else dense.call_ms
        row["dense_fps"] = 1e3 * frames / sum(dms) if sum(dms) > 0 else None
        row["dense_ms_per_call_p50"] = statistics.median(dms)
        row["speedup"] = sum(dms) / sum(ms) if sum(ms) > 0 else None
        row["fidelity"] = statistics.mean(st.fidelity) if st.fidelity else None
        row["fidelity_min"] = min(st.fidelity) if st.fidelity else None
    return row


def _summary(sources, done, loaded, settings, resolution, grid, stats, dense, calls, wall, batch, failures,
             interrupted, device, dtype) -> dict:
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
        "settings": {"arch": settings.archs[0], "threshold": settings.threshold, "ema_decay": settings.ema_decay,
                     "floor_tokens": settings.floor_tokens, "batch": batch, "stride": settings.stride,
                     "max_frames": settings.max_frames},
        "videos": [{"video": s.name, "path": str(s.path),
                    "frames": per_video[s.name].count if s.name in per_video else 0,
                    "error": per_video[s.name].error if s.name in per_video else None} for s in sources],
        "frames": frames,
        "calls": calls,
        "end_to_end_fps": frames / wall if wall > 0 else None,
        "archs": [_arch_summary(st, dense) for st in stats],
        "failures": failures,
        "interrupted": interrupted,
    }


# -- printing --------------------------------------------------------------------------------------

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


def open_sources(paths: Sequence[Path]) -> list[Source]:
    """Probe every video and decode its first frame, so a missing, unreadable or empty file
    fails before any model work. Raises one CommandError listing every bad file (one per line)."""
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
    if args.quiet:
        quiet_transformers()
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
        settings = Settings(
            archs=[args.arch], threshold=args.threshold, ema_decay=args.ema_decay, floor_tokens=args.floor_tokens,
            resolution=args.resolution, batch=args.batch, stride=args.stride, max_frames=args.max_frames,
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
