"""The GPU suite's dry run (every step at tiny sizes on the CPU) keeps working, so the prepared
GPU command cannot rot between the sessions that have a GPU."""

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fingerprint(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_gpu_suite_dry_run_runs_every_step_and_writes_only_to_a_temporary_folder():
    results, page = ROOT / "bench" / "results", ROOT / "bench" / "RESULTS.md"
    before = (_fingerprint(results) if results.is_dir() else {}, page.read_bytes() if page.is_file() else None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for step in ("== tests", "== gate", "== cache_scatter", "== varlen_attention", "== e2e"):
        assert step in out, out[-4000:]
    assert out.count("e2e tiny") == 3
    assert "FAILED" not in out
    for target in ("gate >= 70% of copy bandwidth", "flash-attn 2 on long segments", "padded SDPA on ragged",
                   "so400m 1792 px", "floor with CUDA graphs"):
        assert f"not measured" in out.split(target)[0].splitlines()[-1], out[-2000:]
    after = (_fingerprint(results) if results.is_dir() else {}, page.read_bytes() if page.is_file() else None)
    assert before == after
    wrote = [line for line in out.splitlines() if line.startswith("wrote ")][-1]
    folder = Path(wrote.split()[1].rstrip(",")).parent
    assert not folder.exists()  # the temporary folder is gone
