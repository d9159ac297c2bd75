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


def test_gate_benchmark_option_configurations(tmp_path):
    records = run_script("bench_gate.py", "--sizes", "64", "--streams", "2", "--device", "cpu",
                         "--options", "paper", "budget_only10pct", "all", out=tmp_path)
    assert [r["options"] for r in records] == ["paper", "budget_only10pct", "all"]
    assert records[1]["settings"]["threshold"] is None and records[1]["settings"]["budget"] == 0.1
    # The budget alone computes exactly 10% of the 16 patches per stream: 2 of 16.
    assert records[1]["sparsity"] == 1 - 2 / 16


def test_varlen_attention_benchmark_writes_records(tmp_path):
    records = run_script("bench_varlen_attention.py", "--quick", out=tmp_path)
    assert records and all({"device", "torch", "commit", "time"} <= r.keys() for r in records)
    assert (tmp_path / "varlen_attention.md").is_file()


def test_e2e_benchmark_quick_matrix_on_tiny_models(tmp_path):
    """The whole --quick matrix, tiny random models in place of the base geometries."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                patch_size=16)
    SiglipVisionModel(SiglipVisionConfig(**tiny)).save_pretrained(tmp_path / "siglip")
    CLIPVisionModel(CLIPVisionConfig(**tiny)).save_pretrained(tmp_path / "clip")
    out = tmp_path / "out"
    records = run_script("bench_e2e.py", "--quick", "--device", "cpu", "--model", str(tmp_path / "siglip"),
                         str(tmp_path / "clip"), out=out)
    contenders = {r["contender"] for r in records}
    assert {"dense", "A", "B", "C", "KV", "random", "pixel-diff", "C no head cache", "C separate calls"} <= contenders
    for r in records:
        assert r["p50_ms"] > 0 and 0 <= r["sparsity"] <= 1 and -1 <= r["fidelity"] <= 1.0001
    assert all(r["speedup"] == 1.0 for r in records if r["contender"] == "dense")
    page = (out / "RESULTS.md").read_text()
    assert "## cpu" in page and "quick matrix" in page and "All configurations" in page
    assert len(list(out.glob("e2e_*.png"))) == 4
