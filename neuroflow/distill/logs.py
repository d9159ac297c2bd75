"""What a run records: per-step and per-evaluation rows (CSV and JSON lines) and the curves PNG.

Files in the output folder:

- ``train_log.csv``: one row per optimiser step (:data:`TRAIN_COLUMNS`).
- ``eval_log.csv``: one row per evaluation and resolution (:data:`EVAL_COLUMNS`).
- ``log.jsonl``: every train and eval row plus events (resume, guard), one JSON object per line
  with a ``"kind"`` key.
- ``curves.png``: loss, fidelities and sparsity over the steps.

The rows also travel in every checkpoint; a resumed run rewrites the files from them, so rows a
crashed invocation wrote after its last checkpoint never appear twice.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

TRAIN_COLUMNS = ("step", "epoch", "loss", "loss_per_frame", "lr", "grad_norm", "sparsity", "threshold_mean",
                 "decay_mean", "resolution", "streams", "seconds")
"""``loss``: mean over the step's clips of the clip loss (summed over its frames);
``sparsity``: mean over clips and frames after the first; ``seconds``: wall time of the step."""

EVAL_COLUMNS = ("step", "resolution", "sparse_fidelity", "dense_fidelity", "sparsity", "clips", "frames", "source")
"""``sparse_fidelity``: cosine of the student under Architecture B to the teacher's dense pooled
output; ``dense_fidelity``: cosine of the student run densely to the teacher (the model's own
drift); both and ``sparsity`` are means over frames after each clip's first (its dense one).
``source``: ``held-out`` or ``train`` (no held-out videos were given)."""


def _cell(v):
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return v


class RunLog:
    """Rows of one run, mirrored to the files above as they arrive.

    Args:
        folder: the output folder.
        state: what :meth:`state` returned in a checkpoint (resume), or None for a new run.
    """

    def __init__(self, folder: Path, state: dict | None = None):
        self.folder = Path(folder)
        state = state or {}
        self.train: list[dict] = list(state.get("train", []))
        self.eval: list[dict] = list(state.get("eval", []))
        self.events: list[dict] = list(state.get("events", []))
        self._files = {}
        self._open()

    def _open(self) -> None:
        self.close()
        # Open for the whole run (closed by close()): rows are appended and flushed as they come.
        self._files["train"] = open(self.folder / "train_log.csv", "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._files["eval"] = open(self.folder / "eval_log.csv", "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._files["jsonl"] = open(self.folder / "log.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self._csv = {
            "train": csv.DictWriter(self._files["train"], fieldnames=TRAIN_COLUMNS, extrasaction="ignore"),
            "eval": csv.DictWriter(self._files["eval"], fieldnames=EVAL_COLUMNS, extrasaction="ignore"),
        }
        for w in self._csv.values():
            w.writeheader()
        # Replay in step order: what the files held when the checkpoint was written.
        records = [("train", r) for r in self.train] + [("eval", r) for r in self.eval] + [("event", r) for r in self.events]
        order = {"train": 0, "eval": 1, "event": 2}  # within a step: trained, evaluated, then events
        for kind, row in sorted(records, key=lambda kr: (kr[1].get("step", 0), order[kr[0]])):
            self._write(kind, row)
        self.flush()

    def _write(self, kind: str, row: dict) -> None:
        if kind in self._csv:
            self._csv[kind].writerow({k: _cell(v) for k, v in row.items()})
        self._files["jsonl"].write(json.dumps({"kind": kind, **row}) + "\n")

    def add_train(self, row: dict) -> None:
        self.train.append(row)
        self._write("train", row)

    def add_eval(self, row: dict) -> None:
        self.eval.append(row)
        self._write("eval", row)

    def add_event(self, row: dict) -> None:
        """An event: ``{"step": ..., "event": "resume" | "guard" | ..., ...}``."""
        self.events.append(row)
        self._write("event", row)

    def flush(self) -> None:
        for f in self._files.values():
            f.flush()

    def state(self) -> dict:
        return {"train": list(self.train), "eval": list(self.eval), "events": list(self.events)}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    @property
    def paths(self) -> list[Path]:
        return [self.folder / n for n in ("train_log.csv", "eval_log.csv", "log.jsonl")]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(path: Path, train: list[dict], evals: list[dict], floor: float | None, title: str, note: str = "",
                guard_steps: list[int] = ()) -> Path:
    """PNG with three panels over the optimiser steps: the training loss (and a moving average),
    the evaluations' sparse and dense fidelity per resolution (the guard's floor dotted, the
    evaluations that fell below it as vertical lines at ``guard_steps``), and the sparsity of the
    training steps and of the evaluations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_fid, ax_sp = fig.subplots(3, 1, sharex=True)
    outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "borderaxespad": 0}  # legends never hide curves
    steps = [r["step"] for r in train]
    marker = "o" if len(steps) <= 60 else None
    if train:
        loss = [r["loss"] for r in train]
        ax_loss.plot(steps, loss, color="C0", alpha=0.45, linewidth=1, marker=marker, markersize=3, label="loss per step")
        window = max(1, len(loss) // 20)
        if window > 1:
            ax_loss.plot(steps, _smooth(loss, window), color="C0", linewidth=1.8, label=f"moving mean ({window} steps)")
        ax_loss.legend(**outside)
    ax_loss.set_ylabel("distillation loss\n(per clip, summed over frames)")
    ax_loss.grid(alpha=0.3)
    resolutions = sorted({r["resolution"] for r in evals})
    for i, res in enumerate(resolutions):
        rows = [r for r in evals if r["resolution"] == res]
        x = [r["step"] for r in rows]
        ax_fid.plot(x, [r["sparse_fidelity"] for r in rows], color=f"C{(2 * i) % 10}", marker="o", markersize=4,
                    label=f"{res} px: student sparse (B) vs teacher dense")
        ax_fid.plot(x, [r["dense_fidelity"] for r in rows], color=f"C{(2 * i + 1) % 10}", marker="s", markersize=4,
                    linestyle="--", label=f"{res} px: student dense vs teacher dense (drift)")
        ax_sp.plot(x, [100 * r["sparsity"] for r in rows], color=f"C{(2 * i) % 10}", marker="o", markersize=4,
                   linestyle="none", label=f"evaluation, {res} px")
    if floor is not None:
        ax_fid.axhline(floor, color="k", linestyle=":", linewidth=1.2, label=f"guard floor {floor:g}")
    for i, step in enumerate(guard_steps):
        ax_fid.axvline(step, color="C3", linestyle="--", linewidth=0.8, alpha=0.6,
                       label="evaluation below the floor" if i == 0 else None)
    ax_fid.set_ylabel("fidelity (cosine)")
    ax_fid.grid(alpha=0.3)
    if evals or floor is not None:
        ax_fid.legend(**outside)
    if train:
        ax_sp.plot(steps, [100 * r["sparsity"] for r in train], color="0.5", linewidth=1, marker=marker, markersize=2,
                   label="training steps (random gate settings)")
    ax_sp.set_ylabel("sparsity (% patches skipped)")
    ax_sp.set_ylim(-3, 103)
    ax_sp.set_xlabel("optimiser step")
    ax_sp.grid(alpha=0.3)
    if train or evals:
        ax_sp.legend(**outside)
    fig.suptitle(title, fontsize=11)
    if note:
        fig.text(0.01, 0.003, note, fontsize=8, color="0.35", ha="left", va="bottom")
    path = Path(path)
    fig.savefig(path)
    return path
