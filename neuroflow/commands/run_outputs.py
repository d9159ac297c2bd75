"""What ``neuroflow run`` writes while it runs: per-frame rows (``frames.jsonl``/``.csv``),
embedding arrays written row by row (``.npy``, ``.safetensors``) and zero-shot label windows.
Every writer flushes after each call, so a run that fails keeps what it computed."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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
