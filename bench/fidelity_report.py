"""Reading ``bench/results/fidelity.jsonl``: frontiers, the sparsity each method reaches at a
fidelity level, gate-vs-baseline tables, the targets of issue #12 (part 5) for the ``default``
setting and the matched-compute comparison of issue #20 (default vs every-k interpolated at the
default's compute vs oracle / random / pixel-diff at its counts, on the three metrics). Pure
Python (no torch), shared by ``bench_fidelity.py`` and ``results_page.py``.
"""

from __future__ import annotations

from common import markdown_table

FIDELITY_LEVELS = (0.99, 0.98)
DEFAULT = "default"
"""The setting that is ``NeuroFlow(model)`` with no arguments: the engine's defaults."""

# Targets of issue #12 part 5 for the default setting (reported, never asserted). "Mean sparsity"
# is read per clip: the clip's mean over frames must reach it, as must its mean fidelity.
TARGET_FIDELITY, TARGET_SPARSITY = 0.98, 0.65
STATIC_CLIP, STATIC_FIDELITY, STATIC_SPARSITY = "carphone", 0.99, 0.85



def method_key(r: dict) -> str:
    """The curve a record belongs to: ``gate <setting> <arch>``, ``random <arch>``, ``pixel-diff
    <arch>``, ``oracle <arch>`` (pooled over the gate settings they were paired with) or ``every-k``."""
    if r["method"] == "every-k":
        return "every-k"
    if r["method"] == "gate":
        return f"gate {r['setting']} {r['arch']}"
    return f"{r['method']} {r['arch']}"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(sparsity, fidelity) points not beaten on both axes, by rising sparsity, with the dense
    point (0, 1) first (any method computes everything at sparsity 0)."""
    pts = sorted(set(points) | {(0.0, 1.0)}, key=lambda p: (p[0], -p[1]))
    front = []
    for s, f in sorted(pts, key=lambda p: (-p[0], -p[1])):  # from the sparsest down
        if not front or f > front[-1][1]:
            front.append((s, f))
    return front[::-1]


def sparsity_at(front: list[tuple[float, float]], level: float) -> tuple[float | None, str]:
    """Largest sparsity where the piecewise-linear frontier still has fidelity >= ``level``:
    (value, how): ``"interpolated"``, ``"measured"`` (a point sits on it), ``"at least"`` (every
    point is above the level: the sparsest point's sparsity, not extrapolated)."""
    best, how = None, ""
    for (s0, f0), (s1, f1) in zip(front, front[1:]):
        if f0 >= level > f1:
            if f0 == level:
                return s0, "measured"
            return s0 + (s1 - s0) * (f0 - level) / (f0 - f1), "interpolated"
    above = [p for p in front if p[1] >= level]
    if above:
        best = max(above)[0]
        how = "at least" if best == front[-1][0] else "measured"
    return best, how


def frontier_rows(records: list[dict]) -> list[dict]:
    rows = []
    for clip in dict.fromkeys(r["workload"] for r in records):
        recs = [r for r in records if r["workload"] == clip]
        for key in dict.fromkeys(method_key(r) for r in recs):
            pts = [(r["sparsity"], r["fidelity"]) for r in recs if method_key(r) == key]
            front = pareto(pts)
            row = {"workload": clip, "method": key, "points": len(set(pts))}
            for level in FIDELITY_LEVELS:
                value, how = sparsity_at(front, level)
                row[f"at_{level}"] = "none" if value is None else (f">= {value:.3f}" if how == "at least" else f"{value:.3f}")
            rows.append(row)
    return rows


def target_rows(records: list[dict]) -> list[dict]:
    """Issue #12 part 5, for the ``default`` setting, from the measured records."""
    rows = []
    for clip in dict.fromkeys(r["workload"] for r in records):
        gate = [r for r in records if r["workload"] == clip and r["setting"] == DEFAULT and r["method"] == "gate"]
        if not gate:
            continue
        g = gate[0]
        label = f"{clip} (default = arch {g['arch']}, thr {g['engine_settings']['threshold']}, decay {g['engine_settings']['ema_decay']})"
        rnd = [r for r in records if r["workload"] == clip and r["setting"] == DEFAULT and r["method"] == "random"]
        if rnd:
            r = rnd[0]
            rows.append({"target": "default beats random selection (same arch, same per-frame counts)", "clip": label,
                         "measured": f"{g['fidelity']:.4f} vs random {r['fidelity']:.4f} at sparsity {g['sparsity']:.3f}",
                         "met": "yes" if g["fidelity"] > r["fidelity"] else "no"})
        rows.append({"target": f"fidelity >= {TARGET_FIDELITY} at mean sparsity >= {TARGET_SPARSITY:.0%}", "clip": label,
                     "measured": f"fidelity {g['fidelity']:.4f} (min {g['fidelity_min']:.4f}) at sparsity {g['sparsity']:.3f}",
                     "met": "yes" if g["fidelity"] >= TARGET_FIDELITY and g["sparsity"] >= TARGET_SPARSITY else "no"})
        if clip == STATIC_CLIP:
            rows.append({"target": f"static camera: fidelity >= {STATIC_FIDELITY} at sparsity >= {STATIC_SPARSITY:.0%}",
                         "clip": label,
                         "measured": f"fidelity {g['fidelity']:.4f} at sparsity {g['sparsity']:.3f}",
                         "met": "yes" if g["fidelity"] >= STATIC_FIDELITY and g["sparsity"] >= STATIC_SPARSITY else "no"})
    return rows


def comparison_rows(records: list[dict]) -> list[dict]:
    """One row per gate run of C/KV: gate vs random vs pixel-diff at the same counts, and every-k
    at the nearest sparsity."""
    rows = []
    for g in records:
        if g["method"] != "gate":
            continue
        same = [r for r in records if r["workload"] == g["workload"] and r["method"] in ("random", "pixel-diff", "oracle")
                and r["paired_setting"] == g["setting"] and r["kwargs"] == g["kwargs"]]
        ek = [r for r in records if r["workload"] == g["workload"] and r["method"] == "every-k"]
        row = {"workload": g["workload"], "setting": g["setting"], "arch": g["arch"],
               "value": _swept(g), "sparsity": g["sparsity"], "gate": _pair(g)}
        row["compute"] = f"{g['compute']:.3f}" if "compute" in g else ""
        for m in ("random", "pixel-diff", "oracle"):
            hit = [r for r in same if r["method"] == m]
            row[m] = _pair(hit[0]) if hit else ""
        if ek:
            near = min(ek, key=lambda r: abs(r["sparsity"] - g["sparsity"]))
            row["every-k"] = f"{_pair(near)} (k={near['k']}, {near['sparsity']:.2f})"
        if same:
            best = max([g] + [r for r in same if r["method"] != "oracle"], key=lambda r: r["fidelity"])
            row["best"] = best["method"]
        rows.append(row)
    return rows


def _swept(r: dict) -> str:
    if r["setting"] == DEFAULT:
        return f"thr {r['engine_settings']['threshold']}"
    return ", ".join(f"{k} {v}" for k, v in (r.get("swept") or {}).items())


def _pair(r: dict) -> str:
    sd = f" (sd {r['fidelity_sd']:.4f}, {len(r['seeds'])} seeds)" if "fidelity_sd" in r and r.get("seeds") else ""
    return f"{r['fidelity']:.4f} / {r['fidelity_min']:.4f}{sd}"


COMPARISON_COLUMNS = [("workload", "clip"), ("setting", "setting"), ("arch", "arch"), ("value", "swept"),
                      ("sparsity", "sparsity"), ("compute", "compute"), ("gate", "gate mean / min"),
                      ("random", "random mean / min"), ("pixel-diff", "pixel-diff mean / min"),
                      ("oracle", "oracle mean / min"), ("every-k", "every-k (nearest sparsity)"),
                      ("best", "best deployable at same counts")]
FRONTIER_COLUMNS = [("workload", "clip"), ("method", "method"), ("points", "runs"),
                    ("at_0.99", "sparsity at fidelity 0.99"), ("at_0.98", "sparsity at fidelity 0.98")]
TARGET_COLUMNS = [("target", "target"), ("clip", "clip"), ("measured", "measured"), ("met", "met")]



FRONTIER_NOTE = ("Per method, its runs' (mean sparsity, mean fidelity) points plus the dense point (0, 1); the Pareto "
                 "frontier is interpolated linearly to the largest sparsity whose fidelity is still at the level. "
                 "`>= x`: every run is above the level (the sparsest run's value, not extrapolated); `none`: the "
                 "frontier falls below the level right after the dense point. random / pixel-diff pool the runs "
                 "paired with every gate setting of that architecture.")
COMPARISON_NOTE = ("Fidelity = cosine of the pooled output to dense, mean / min over frames (the first, dense frame "
                   "excluded); random: mean over its seeds. random, pixel-diff and oracle (upper bound, not deployable) compute exactly the gate run's per-frame patch counts in the same "
                   "architecture and settings (through `active=`); every-k is the dense model every k-th frame, the "
                   "k whose share of skipped frames is nearest the gate's sparsity.")




# -- matched compute (issue #20) -------------------------------------------------------------------

METRIC_NAMES = (("fidelity", "pooled"), ("patch_fidelity", "patch-token"), ("moving_fidelity", "moving-patch"))


def interpolate_at(points: list[tuple[float, float]], c: float, upper: bool = True) -> float | None:
    """Value at compute ``c`` along a method's points ``(compute, value)``, linear between the two that
    bracket it. ``upper``: only the frontier (each point better than every cheaper one; the dense point
    (1, 1) included), for a fidelity; else every point (a wall time). None below the cheapest point."""
    pts = sorted(set(points) | ({(1.0, 1.0)} if upper else set()))
    if upper:
        front = []
        for x, y in pts:
            if not front or y > front[-1][1]:
                front.append((x, y))
        pts = front
    if not pts or c < pts[0][0] - 1e-12:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= c <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (c - x0) / (x1 - x0)
    return pts[-1][1] if c >= pts[-1][0] and not upper else None  # a wall time past the dearest point: its value


def matched_rows(records: list[dict]) -> list[dict]:
    """Per clip, at the ``default`` gate run's compute (computed token-layers / dense): the default, every-k
    interpolated along its frontier, and the oracle, random (mean +- sd over seeds) and pixel-diff at the
    default's own per-frame counts: the three metrics and wall time per frame."""
    rows = []
    for g in records:
        if g["method"] != "gate" or g["setting"] != DEFAULT or "compute" not in g:
            continue
        clip, c = g["workload"], g["compute"]
        row0 = {"workload": clip, "compute": f"{c:.3f}"}
        rows.append({**row0, "method": f"default gate ({g['arch']}, thr {g['engine_settings']['threshold']})",
                     **_metric_cells(g), "ms": f"{g['ms_per_frame']:.1f}"})
        ek = [r for r in records if r["workload"] == clip and r["method"] == "every-k" and "compute" in r]
        if ek:
            cells = {}
            for m, _ in METRIC_NAMES:
                v = interpolate_at([(r["compute"], r[m]) for r in ek], c)
                cells[m] = "below k range" if v is None else f"{v:.4f}"
            ms = interpolate_at([(r["compute"], r["ms_per_frame"]) for r in ek] + [(1.0, g.get("dense_ms_per_frame", 0.0))],
                                c, upper=False)
            ks = sorted(r["k"] for r in ek)
            rows.append({**row0, "method": f"every-k, interpolated (k {ks[0]}..{ks[-1]})", **cells,
                         "ms": "" if ms is None else f"{ms:.1f}"})
        for method, label in (("oracle", "oracle, same counts (upper bound)"), ("random", "random, same counts"),
                              ("pixel-diff", "pixel-diff, same counts")):
            hit = [r for r in records if r["workload"] == clip and r["method"] == method and r.get("paired_setting") == DEFAULT
                   and r["kwargs"] == g["kwargs"]]
            if hit:
                r = hit[0]
                seeds = f" ({len(r['seeds'])} seeds, mean +- sd)" if r.get("seeds") else ""
                rows.append({**row0, "compute": f"{r['compute']:.3f}", "method": label + seeds, **_metric_cells(r),
                             "ms": f"{r['ms_per_frame']:.1f}"})
        rows.append({**row0, "compute": "1.000", "method": "dense", "fidelity": "1", "patch_fidelity": "1",
                     "moving_fidelity": "1", "ms": f"{g['dense_ms_per_frame']:.1f}" if "dense_ms_per_frame" in g else ""})
    return rows


def _metric_cells(r: dict) -> dict:
    out = {}
    for m, _ in METRIC_NAMES:
        sd = r.get(f"{m}_sd")
        out[m] = f"{r[m]:.4f}" + (f" +- {sd:.4f}" if sd is not None else "") + f" (min {r[f'{m}_min']:.4f})"
    return out


def matched_verdicts(records: list[dict]) -> list[str]:
    """Issue #20 part 6's first target, read from the measured numbers: at the default's compute, the default
    against every-k (patch-token and moving-patch higher; pooled no lower than every-k - 0.001)."""
    lines = []
    for g in records:
        if g["method"] != "gate" or g["setting"] != DEFAULT or "compute" not in g:
            continue
        ek = [r for r in records if r["workload"] == g["workload"] and r["method"] == "every-k" and "compute" in r]
        parts = []
        for m, name in METRIC_NAMES:
            v = interpolate_at([(r["compute"], r[m]) for r in ek], g["compute"]) if ek else None
            if v is None:
                parts.append(f"{name}: no every-k point at this compute")
                continue
            ok = g[m] >= v - 0.001 if m == "fidelity" else g[m] > v
            parts.append(f"{name} {g[m]:.4f} vs every-k {v:.4f} ({'met' if ok else 'NOT met'})")
        lines.append(f"- {g['workload']} at compute {g['compute']:.3f}: " + "; ".join(parts))
    return lines


MATCHED_COLUMNS = [("workload", "clip"), ("method", "method"), ("compute", "compute"), ("fidelity", "pooled cosine"),
                   ("patch_fidelity", "patch-token cosine"), ("moving_fidelity", "moving-patch cosine"),
                   ("ms", "ms / frame (CPU)")]
MATCHED_NOTE = ("Compute = computed token-layers / dense token-layers over the frames after the first (gate: each frame's "
                "computed tokens, prefix included, x layers run, from `NeuroFlowOutput.token_layers` where the engine "
                "reports it, else counted from `active_mask`; every-k: the share of dense frames). Every-k's values are "
                "interpolated linearly along its frontier (k values and the dense point) at the default's compute; "
                "oracle, random and pixel-diff compute exactly the default's per-frame counts in the same architecture "
                "(forced through `active=`). Cosines: mean over frames (min over frames in brackets); patch-token: mean "
                "over patch tokens of `last_hidden_state`; moving-patch: over the 20% of patches whose dense final "
                "feature changed most from the previous frame. ms / frame: the engine call's wall time, mean over the "
                "frames after the first (every-k: the dense forward on its dense frames, 0 on reused ones), on a shared "
                "CPU: read ratios within one clip, not absolute times.")


def target_summary(rows: list[dict]) -> list[str]:
    """One line per target over all clips: met on every clip or not (and where not)."""
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows):
        hits = [r for r in rows if r["target"] == target]
        missed = [r["clip"].split(" ")[0] for r in hits if r["met"] != "yes"]
        verdict = "met on every clip" if not missed else f"NOT met ({', '.join(missed)})"
        lines.append(f"- {target}: {verdict} ({len(hits) - len(missed)} of {len(hits)} clips)")
    return lines


def best_gate_lines(records: list[dict]) -> list[str]:
    """Per clip, the sparsest gate run of any setting and architecture at each fidelity level: what
    the measured settings allow, next to what the default does."""
    lines = []
    for clip in dict.fromkeys(r["workload"] for r in records):
        gates = [r for r in records if r["workload"] == clip and r["method"] == "gate" and not r.get("same_run_as")]
        parts = []
        for level in (TARGET_FIDELITY, STATIC_FIDELITY):
            ok = [r for r in gates if r["fidelity"] >= level]
            if ok:
                b = max(ok, key=lambda r: r["sparsity"])
                parts.append(f"fidelity >= {level}: {b['setting']} {b['arch']} {_swept(b)} at sparsity {b['sparsity']:.3f} "
                             f"(fidelity {b['fidelity']:.4f}, min {b['fidelity_min']:.4f})")
            else:
                parts.append(f"fidelity >= {level}: no gate run")
        lines.append(f"- {clip}: " + "; ".join(parts))
    return lines


def tables(records: list[dict]) -> str:
    """The readable report of one run: targets, sparsity at the fidelity levels, comparisons."""
    targets = target_rows(records)
    return "\n\n".join([
        "## Targets (issue #12 part 5, default setting)",
        "\n".join(target_summary(targets)) or "No `default` run in this record set.",
        markdown_table(targets, TARGET_COLUMNS),
        "Sparsest gate run of any measured setting at the target fidelities (for comparison with the default):",
        "\n".join(best_gate_lines(records)),
        "## Matched compute: default vs every-k vs oracle vs random (issue #20)", MATCHED_NOTE,
        markdown_table(matched_rows(records), MATCHED_COLUMNS) if matched_rows(records) else "No default run with compute.",
        "Default vs every-k at the default's compute (patch-token and moving-patch must be higher, pooled no lower "
        "than every-k - 0.001):",
        "\n".join(matched_verdicts(records)) or "No default run with compute.",
        "## Sparsity reached at fidelity 0.99 / 0.98", FRONTIER_NOTE,
        markdown_table(frontier_rows(records), FRONTIER_COLUMNS),
        "## Gate vs baselines at the same per-frame counts", COMPARISON_NOTE,
        markdown_table(comparison_rows(records), COMPARISON_COLUMNS),
    ])


def latest_runs(records: list[dict]) -> dict[tuple[str, bool], list[dict]]:
    """(device, quick) -> the records of its most recent run (a run's records share one time
    stamp); quick runs are kept apart so they do not hide the last full one."""
    by_run: dict[tuple, list[dict]] = {}
    for r in records:
        by_run.setdefault((r["device"], bool(r.get("quick")), r["time"]), []).append(r)
    latest: dict[tuple[str, bool], tuple] = {}
    for key in by_run:
        short = key[:2]
        if short not in latest or key[2] > latest[short][2]:
            latest[short] = key
    return {short: by_run[key] for short, key in latest.items()}


def page_section(records: list[dict], figure_dir: str) -> list[str]:
    """The results page's "Real weights" section (markdown lines)."""
    lines = ["## Real weights", "",
             "Regenerated from `bench/results/fidelity.jsonl` (`python bench/bench_fidelity.py`, see `bench/README.md`).",
             "Fidelity = cosine of the pooled output to the dense model's on the same frame (patch-token and",
             "moving-patch cosines in the matched-compute table and the figures); random (mean over seeds), pixel-diff",
             "and oracle (upper bound) run inside the same architecture with the same caches, at the gate's own",
             "per-frame patch counts; every-k is the dense model every k-th frame with its output reused in between.",
             "Figures: pooled, patch-token and moving-patch cosine against compute (computed token-layers / dense).", ""]
    if not records:
        return lines + ["No fidelity run has been recorded yet.", ""]
    for (device, quick), recs in sorted(latest_runs(records).items()):
        r0 = recs[0]
        clips = list(dict.fromkeys(r["workload"] for r in recs))
        lines += [f"### {r0['model']}: {device}, {'quick' if quick else 'full'} run", "",
                  f"{'Real weights' if r0.get('real_weights') else '**Not real weights**'}; {r0['dtype']}, "
                  f"torch {r0['torch']}, transformers {r0['transformers']}, commit {r0['commit']}, {r0['time']}; "
                  f"{r0['size']} px, {r0['frames']} frames per clip, one stream; clips {', '.join(clips)}."
                  + (f" Settings skipped (engine lacks their arguments): {', '.join(r0['skipped_settings'])}."
                     if r0.get("skipped_settings") else ""), "",
                  tables(recs).replace("\n## ", "\n#### ").replace("## ", "#### ", 1), ""]
        lines += [f"![fidelity_{c}]({figure_dir}fidelity_{c}.png)" for c in clips] + [""]
    return lines
