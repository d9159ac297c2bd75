"""Issue #20 part 6's third target: the share of the gap between the default of the day the issue was
filed and the oracle that the default closes, at equal compute, over several windows of each clip.

    python bench/bench_gap_closure.py [--frames 40] [--offsets 0 20 40 60 80] [--resolution 224]
                                      [--clips ...] [--settings NAME=JSON ...] [--thresholds T ...]
                                      [--model DIR] [--out DIR] [--report-only]

The issue's baseline is the default when it was filed (:data:`ISSUE_DEFAULT`, the ``measured`` preset
before commit 9bd46c5): Architecture KV, the surprise against the embedding as last computed, every
patch recomputed at least every 5th frame (``max_staleness=4``), threshold 0.05, no keyframes. Its
rule runs at the thresholds of ``--thresholds`` (cheapest first, stopping once a run costs more than
every contender) and is read along its frontier at each contender's compute (``interpolate_at``:
linear between the two frontier points that bracket it, the dense point included), so it is judged
at exactly the contender's compute, not at its own threshold 0.05.

The oracle (``OracleMasks``: the patches whose dense final feature differs most from what the engine
holds) is read two ways, since "the oracle at the same compute" depends on whose per-frame counts
it copies:

* ``oracle (issue counts)``: at the issue-day rule's counts, run at the two thresholds that bracket
  the contender's compute and interpolated between them: the gap as it stood when the issue was
  filed (the issue's table: "best possible choice of the same counts" as the default);
* ``oracle (own counts)``: at the contender's own per-frame counts, keyframes included: what a
  perfect choice would do with the contender's schedule.

Closure, per metric (pooled, patch-token, moving-patch cosine to dense; ``bench_fidelity.py``'s
definitions): ``(contender - issue default) / (oracle - issue default)``, i.e. the share of the
issue default's error in excess of the oracle's that the contender removes (1: as good as the
oracle; above 1: better than it; negative: worse than the issue default). Per clip the summary
divides the window means (a ratio of means, steadier than a mean of ratios); a gap below
:data:`GAP_FLOOR` is reported, not divided. The target is a closure of at least 0.5.

Every window is a fresh stream (its first frame dense, excluded from every statistic). Writes
``<out>/gap_closure.jsonl`` (one record per clip, window and setting, appended as measured) and
``<out>/gap_closure.md``; ``gap_closure_<px>.*`` at another resolution than 224. ``--report-only``
rewrites the Markdown from the latest record of each clip, window and setting in ``<out>`` (runs of several
invocations, e.g. one window each, or a run stopped part way; the header names every commit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_fidelity import METRICS, OracleMasks, dense_reference, forced_kwargs, run_engine, stats
from bench_frame_skipping import OFFSETS, add_window_arguments, window_setup, windows
from common import environment, markdown_table
from fidelity_report import METRIC_NAMES, interpolate_at

ISSUE_DEFAULT = {"arch": "KV", "reference": "computed", "max_staleness": 4, "keyframe_every": None,
                 "keyframe_drift": None}
"""The ``measured`` preset when issue #20 was filed, less its threshold (0.05), which is swept."""
THRESHOLDS = (0.4, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.0)
"""The issue-day rule's sweep, cheapest first (0.0: every patch whose embedding moved at all)."""
TARGET = 0.5
GAP_FLOOR = 0.0005
"""A gap (oracle - issue default, in cosine) below this is reported, not divided: noise would decide the ratio."""
ORACLES = (("oracle_issue", "oracle (issue counts)"), ("oracle_own", "oracle (own counts)"))


def closure(value: float, base: float | None, oracle: float | None) -> float | None:
    """Share of the gap ``oracle - base`` that ``value`` closes; None when a side is missing or the gap is
    below :data:`GAP_FLOOR`."""
    if base is None or oracle is None or oracle - base < GAP_FLOOR:
        return None
    return (value - base) / (oracle - base)


class IssueRule:
    """The issue-day rule on one window: its threshold runs (cheapest first, made as needed) and the oracle at
    the counts of the runs that bracket a compute."""

    def __init__(self, model, frames, dense, thresholds):
        self.model, self.frames, self.dense = model, frames, dense
        self.todo = list(thresholds)
        self.runs: dict[float, tuple[dict, list]] = {}  # threshold -> (stats, per-frame counts)
        self.oracles: dict[float, dict] = {}  # threshold -> the oracle's stats at that run's counts

    def _run(self, thr: float) -> None:
        run = run_engine(self.model, self.frames, self.dense, {**ISSUE_DEFAULT, "threshold": thr})
        self.runs[thr] = (stats(run), run.counts)

    def cover(self, c: float) -> None:
        """Runs thresholds until one costs at least ``c`` (or the sweep is spent)."""
        while self.todo and all(s["compute"] < c for s, _ in self.runs.values()):
            self._run(self.todo.pop(0))

    def bracket(self, c: float) -> list[float]:
        """The thresholds of the dearest run at or below ``c`` and the cheapest at or above it."""
        below = [t for t, (s, _) in self.runs.items() if s["compute"] <= c]
        above = [t for t, (s, _) in self.runs.items() if s["compute"] >= c]
        picks = []
        if below:
            picks.append(max(below, key=lambda t: self.runs[t][0]["compute"]))
        if above:
            picks.append(min(above, key=lambda t: self.runs[t][0]["compute"]))
        return list(dict.fromkeys(picks))

    def at(self, c: float) -> dict:
        """The rule's metrics at compute ``c`` along its frontier, and the oracle's at its bracketing counts."""
        self.cover(c)
        out = {"issue_points": {str(t): {k: s[k] for k in ("compute", *METRICS)} for t, (s, _) in self.runs.items()}}
        for thr in self.bracket(c):
            if thr not in self.oracles:
                counts = self.runs[thr][1]
                kwargs = forced_kwargs({**ISSUE_DEFAULT, "threshold": thr})
                self.oracles[thr] = stats(run_engine(self.model, self.frames, self.dense, kwargs,
                                                     masks=OracleMasks(self.dense, counts)))
        picked = {t: self.oracles[t] for t in self.bracket(c)}
        out["oracle_issue_points"] = {str(t): {k: s[k] for k in ("compute", *METRICS)} for t, s in picked.items()}
        for m in METRICS:
            out[f"{m}_issue"] = interpolate_at([(s["compute"], s[m]) for s, _ in self.runs.values()], c)
            out[f"{m}_oracle_issue"] = interpolate_at([(s["compute"], s[m]) for s in picked.values()], c)
        return out


def window_record(clip: str, offset: int, setting: str, kwargs: dict, model, frames, dense, rule: IssueRule) -> dict:
    """One window and setting: the setting's run, the oracle at its counts, the issue-day rule and its oracle
    at the run's compute, and the closures."""
    run = run_engine(model, frames, dense, kwargs)
    gate = stats(run)
    own = stats(run_engine(model, frames, dense, forced_kwargs(kwargs), masks=OracleMasks(dense, run.counts)))
    rec = {"workload": clip, "offset": offset, "setting": setting, "kwargs": kwargs, "compute": gate["compute"],
           "oracle_own_compute": own["compute"], **rule.at(gate["compute"])}
    for m in METRICS:
        rec[m], rec[f"{m}_oracle_own"] = gate[m], own[m]
        for key, _ in ORACLES:
            rec[f"{m}_closure_{key}"] = closure(gate[m], rec[f"{m}_issue"], rec[f"{m}_{key}"])
    return rec


def _cell(value: float, base, oracle, ratio) -> str:
    if base is None or oracle is None:
        return "issue rule out of range"
    gap = f"{ratio:.0%}" if ratio is not None else f"gap {oracle - base:+.4f}"
    return f"{value:.4f} / {base:.4f} / {oracle:.4f} ({gap})"


def summary_rows(records: list[dict]) -> list[dict]:
    """Per clip, setting and oracle: each metric's window means (contender / issue default / oracle) and the
    closure of those means, with the windows that reach the target."""
    rows = []
    for key in dict.fromkeys((r["workload"], r["setting"]) for r in records):
        recs = [r for r in records if (r["workload"], r["setting"]) == key]
        for okey, oname in ORACLES:
            row = {"workload": key[0], "setting": key[1], "oracle": oname, "windows": len(recs),
                   "compute": f"{statistics.mean(r['compute'] for r in recs):.3f}"}
            for m, _ in METRIC_NAMES:
                usable = [r for r in recs if r[f"{m}_issue"] is not None and r[f"{m}_{okey}"] is not None]
                if not usable:
                    row[m] = "issue rule out of range"
                    continue
                means = [statistics.mean(r[k] for r in usable) for k in (m, f"{m}_issue", f"{m}_{okey}")]
                ratio = closure(*means)
                gaps = [r[f"{m}_closure_{okey}"] for r in usable if r[f"{m}_closure_{okey}"] is not None]
                row[m] = f"{_cell(*means, ratio)}; {sum(c >= TARGET for c in gaps)}/{len(gaps)} windows"
                row[f"{m}_closure"] = ratio
            rows.append(row)
    return rows


def window_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        for okey, oname in ORACLES:
            row = {"workload": r["workload"], "setting": r["setting"], "offset": r["offset"], "oracle": oname,
                   "compute": f"{r['compute']:.3f}"}
            for m, _ in METRIC_NAMES:
                row[m] = _cell(r[m], r[f"{m}_issue"], r[f"{m}_{okey}"], r[f"{m}_closure_{okey}"])
            rows.append(row)
    return rows


COLUMNS = [("workload", "clip"), ("setting", "setting"), ("oracle", "oracle"), ("compute", "compute"),
           *((m, f"{name}: setting / issue default / oracle (closure)") for m, name in METRIC_NAMES)]
NOTE = ("Compute = computed token-layers / dense token-layers (`NeuroFlowOutput.token_layers`), frames after the "
        "first. Issue default: the `measured` preset when #20 was filed (KV, reference computed, max_staleness 4, no "
        "keyframes), its threshold swept and read along its frontier at the setting's compute. Oracle (issue counts): "
        "the oracle at the issue default's per-frame counts at that compute (interpolated between the two bracketing "
        "thresholds); oracle (own counts): at the setting's own counts. Closure = (setting - issue default) / (oracle - "
        f"issue default); the target is {TARGET:.0%}. Summary cells divide the window means and count the windows "
        f"that reach the target among those with a gap; a gap below {GAP_FLOOR} is shown, not divided.")


def write_report(records: list[dict], path: Path, took: str) -> None:
    """``path`` (Markdown): the per-clip summary and the per-window rows of one run's records."""
    r0 = records[0]
    offsets = ", ".join(map(str, dict.fromkeys(r["offset"] for r in records)))
    commits = ", ".join(dict.fromkeys(str(r["commit"]) for r in records))
    head = (f"# Closing the gap to the oracle (issue #20 part 6)\n\n{r0['model']}"
            f"{'' if r0['real_weights'] else ' (**not real weights**)'}, {r0['size']} px, {r0['frames']}-frame windows "
            f"at offsets {offsets}, {r0['device']}, torch {r0['torch']}, commit {commits}{took}.\n\n{NOTE}")
    table = ("## Per clip\n\n" + markdown_table(summary_rows(records), [*COLUMNS[:3], ("windows", "windows"),
                                                                         *COLUMNS[3:]])
             + "\n\n## Per window\n\n" + markdown_table(window_rows(records), [*COLUMNS[:2], ("offset", "offset"),
                                                                                *COLUMNS[2:]]))
    path.write_text(f"{head}\n\n{table}\n")
    print(f"results: {path}\n\n{table}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_window_arguments(p)
    p.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS), metavar="T",
                   help="the issue-day rule's thresholds, cheapest (highest) first")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite the tables from the latest record of each window in --out")
    args = p.parse_args(argv)
    stem = "gap_closure" if args.resolution == 224 else f"gap_closure_{args.resolution}"
    if args.report_only:
        path = args.out / f"{stem}.jsonl"
        if not path.is_file():
            p.error(f"--report-only: {path} does not exist")
        records = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                         key=lambda r: r["time"])
        latest = {(r["workload"], r["offset"], r["setting"]): r for r in records}  # the latest of each window
        write_report(list(latest.values()), args.out / f"{stem}.md", "")
        return 0
    settings, (model, label, real, n) = window_setup(p, args)
    device = torch.device(args.device)
    base = {**environment(device), "bench": "gap_closure", "dtype": "float32", "model": label, "real_weights": real,
            "size": args.resolution, "frames": args.frames, "streams": 1, "thresholds": args.thresholds}
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    started = time.perf_counter()
    with torch.inference_mode():
        for clip, offset, frames in windows(args, device):
            dense = dense_reference(model, frames, n)
            rule = IssueRule(model, frames, dense, args.thresholds)
            for name, kw in settings.items():
                rec = {**base, **window_record(clip, offset, name, kw, model, frames, dense, rule)}
                records.append(rec)
                with open(args.out / f"{stem}.jsonl", "a") as f:  # per window: a long run keeps what it measured
                    f.write(json.dumps(rec) + "\n")
                cells = "  ".join(
                    f"{short} {rec[m]:.4f} issue {rec[f'{m}_issue'] or float('nan'):.4f} "
                    f"closure {rec[f'{m}_closure_oracle_issue'] or float('nan'):.2f}/"
                    f"{rec[f'{m}_closure_oracle_own'] or float('nan'):.2f}"
                    for m, short in zip(METRICS, ("pooled", "patch", "moving")))
                print(f"{clip:12s} @{offset:<4d} {name:10s} compute {rec['compute']:.3f}  {cells}", flush=True)
    if not records:
        print("nothing ran (no workload installed)", file=sys.stderr)
        return 1
    write_report(records, args.out / f"{stem}.md", f", {time.perf_counter() - started:.0f} s")
    print(f"results: {args.out / f'{stem}.jsonl'} (appended per window)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
