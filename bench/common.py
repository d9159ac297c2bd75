"""What every benchmark script shares: run metadata, timing, the results folder option and
writing results.

Results go to ``<out>/<name>.jsonl`` (one JSON record per configuration, appended, each with
device, dtype, versions, commit and time stamp) and ``<out>/<name>.md`` (the readable table of the
latest run, overwritten). ``<out>`` is ``bench/out/`` by default, which git ignores, so trying a
benchmark never rewrites tracked files; ``--out bench/results`` records a run in the tracked
results (and ``bench_e2e.py`` then regenerates ``bench/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
"""The tracked results (``--out bench/results``), read by ``bench/RESULTS.md``."""
DEFAULT_OUT = ROOT / "bench" / "out"
"""Where a run writes without ``--out``: git-ignored, so a trial run changes no tracked file."""


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out FOLDER`` with the shared default (:data:`DEFAULT_OUT`); every script takes it."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FOLDER",
                        help="results folder (default bench/out/, git-ignored); --out bench/results records the "
                             "run in the tracked results")


def git_commit() -> str | None:
    """What ``git rev-parse HEAD`` prints, read from the repository's files (no git process, so it
    also works where git is not installed), or None; ``NEUROFLOW_GIT_COMMIT`` overrides it."""
    if os.environ.get("NEUROFLOW_GIT_COMMIT"):
        return os.environ["NEUROFLOW_GIT_COMMIT"]
    git = ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (ROOT / git.read_text().split(":", 1)[1].strip()).resolve()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        pass
    return None


def environment(device: torch.device) -> dict:
    """Device name and software versions, for labelling every record."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    commit = git_commit()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
        "commit": commit,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def median_ms(fn, device: torch.device, warmup: int = 2, repeat: int = 10, quick: bool = False) -> float:
    """Median wall time of ``fn()`` in ms: ``triton.testing.do_bench`` on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                             return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (record key, header). Floats are shown with 3 significant digits."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, records: list[dict], table: str, out: Path = DEFAULT_OUT, header: str = "") -> None:
    """Append ``records`` to ``out/<name>.jsonl``, write ``table`` (with ``header``) to
    ``out/<name>.md`` and print where they went."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / f"{name}.md").write_text(f"{header}\n\n{table}\n" if header else table + "\n")
    print(f"results: {out / f'{name}.jsonl'} (appended), {out / f'{name}.md'}", flush=True)
