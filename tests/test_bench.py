"""The benchmark scripts run end to end on a tiny configuration and write their records
(a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for f in out.glob("*.jsonl") for line in f.read_text().splitlines()]


def test_gate_benchmark_writes_records(tmp_path):
    records = run_script("bench_gate.py", "--sizes", "64", "--streams", "2", "--device", "cpu", out=tmp_path)
    assert len(records) == 1
    rec = records[0]
    assert rec["size"] == 64 and rec["streams"] == 2 and rec["unfused_ms"] > 0
    assert {"device", "dtype", "torch", "commit", "time", "bytes"} <= rec.keys()
    assert (tmp_path / "gate.md").read_text().count("| 64 |") == 1


def test_varlen_attention_benchmark_writes_records(tmp_path):
    records = run_script("bench_varlen_attention.py", "--quick", out=tmp_path)
    assert records and all({"device", "torch", "commit", "time"} <= r.keys() for r in records)
    assert (tmp_path / "varlen_attention.md").is_file()
