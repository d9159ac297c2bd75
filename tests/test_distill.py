"""Sparse manifold distillation (``neuroflow.distill``, ``neuroflow distill``) on tiny random models
and short synthetic clips written with PyAV.

Random weights: losses, fidelities and sparsities here are correctness signals, not quality figures.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, SiglipVisionConfig, SiglipVisionModel

from conftest import make_model, video
from helpers import PaperFlow
from neuroflow import NeuroFlow, cli
from neuroflow.distill import DistillConfig, DistillError, Trainer, distill
from neuroflow.distill.checkpoint import list_checkpoints, load_checkpoint
from neuroflow.distill.data import ClipShape, VideoEntry, draw_epoch, read_clip
from neuroflow.distill.losses import frame_loss
from neuroflow.distill.params import select_trainable
from neuroflow.distill.sparse import SparseClips
from neuroflow.models.families import VisionAdapter
from neuroflow.video.overlay import VideoWriter
from neuroflow.video.synthetic import static_camera_video
from neuroflow.video.decode import read_frames

# -- fixtures: a tiny SigLIP teacher and a few clips ---------------------------------------------------


def write_clip(path: Path, frames: int, seed: int, height: int = 40, width: int = 48) -> Path:
    """A synthetic static-camera clip as an H.264 mp4 (moving boxes on a textured background)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clip = static_camera_video(frames, height, width, seed=seed)
    with VideoWriter(path, width, height, fps=25) as w:
        for f in clip.frames:
            w.write((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return path


def tiny_siglip(**kw) -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8, **kw)
    return SiglipVisionModel(config).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill")
    tiny_siglip().save_pretrained(root / "teacher")
    # 14 frames: 3 clips of 4 frames each plus 2 frames of slack, so the epoch offsets vary.
    write_clip(root / "train" / "a.mp4", 14, seed=0)
    write_clip(root / "train" / "nested" / "b.mp4", 14, seed=1)
    (root / "train" / "notes.txt").write_text("not a video")
    write_clip(root / "val" / "c.mp4", 8, seed=2)
    write_clip(root / "fixed" / "one.mp4", 6, seed=3)  # exactly one 6-frame clip
    return {"root": root, "teacher": root / "teacher", "train": root / "train", "val": root / "val",
            "fixed": root / "fixed" / "one.mp4"}


def config(data, out: Path, **kw) -> DistillConfig:
    """Tiny, fast settings: 4-frame clips, 2 streams, no background decoding, quiet."""
    base = {"teacher": data["teacher"], "videos": [data["train"]], "out": out, "clip_length": 4, "frame_stride": 1,
            "streams": 2, "resolutions": [32], "lr": 1e-3, "eval_every": 0, "eval_clips": 2,
            "min_dense_fidelity": None, "workers": 0, "quiet": True}
    return DistillConfig(**{**base, **kw})


def files_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- the differentiable Architecture B forward ---------------------------------------------------------


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_sparse_forward_is_the_engines_architecture_b_with_gradients(family):
    model = make_model(family)
    adapter = VisionAdapter(model)
    clips = torch.stack([video(5, 32, 40, seed=s) for s in range(3)])  # [S=3, F=5, 3, 32, 40]
    thresholds, decays = [0.02, 0.1, 0.3], [0.05, 0.01, 0.1]
    run = SparseClips(adapter, clips, torch.tensor(thresholds), torch.tensor(decays), floor_tokens=4)
    outs = [run.frame(t) for t in range(5)]
    assert not run.ema.requires_grad
    assert all(o.pooled.requires_grad for o in outs)
    assert float(torch.stack([o.sparsity for o in outs[1:]]).mean()) > 0.3  # the gate really drops tokens
    # Each stream alone through the engine at its own (scalar) settings gives the same outputs.
    for s in range(3):
        nf = PaperFlow(model, arch="B", threshold=thresholds[s], ema_decay=decays[s], floor_tokens=4)
        with torch.no_grad():
            for t in range(5):
                ref = nf(clips[s : s + 1, t])
                assert torch.equal(ref.active_mask[0], outs[t].active[s])
                torch.testing.assert_close(outs[t].pooled[s : s + 1].detach(), ref.pooler_output, rtol=1e-5, atol=1e-6)
    sum(o.pooled.square().sum() for o in outs).backward()
    # Gradients reach every parameter: patch/position/CLS embeddings, every layer, the readout.
    names = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == [], f"no gradient reached {names}"


def test_frames_must_run_in_order():
    adapter = VisionAdapter(make_model("siglip"))
    run = SparseClips(adapter, video(3, 32, 32)[None], torch.tensor([0.1]), torch.tensor([0.1]), 4)
    with pytest.raises(ValueError, match="in order"):
        run.frame(1)


def test_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    raw = ((s - t) ** 2).mean() + 0.5 * (1 - cos).mean()
    torch.testing.assert_close(frame_loss(s, t, "raw", 1.0, 0.5), raw)
    sn, tn = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(frame_loss(s, t, "normalized", 1.0, 1.0), ((sn - tn) ** 2).mean() + (1 - cos).mean())
    # The paper's loss ignores the embeddings' scale, the script's does not.
    torch.testing.assert_close(frame_loss(3 * s, t, "normalized", 1.0, 1.0), frame_loss(s, t, "normalized", 1.0, 1.0))
    assert frame_loss(3 * s, t, "raw", 1.0, 0.5) != frame_loss(s, t, "raw", 1.0, 0.5)


def test_trainable_selection():
    for family, head in (("siglip", ("post_layernorm.", "head.")), ("vit", ("layernorm.", "pooler.")),
                         ("clip", ("post_layernorm.",))):
        model = make_model(family)
        adapter = VisionAdapter(model)
        names = [n for n, _ in select_trainable(model, adapter, "head")]
        assert names and all(n.startswith(head) for n in names), (family, names)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
        last = {n for n, _ in select_trainable(model, adapter, "head+1")}
        assert set(names) < last and any(".1." in n for n in last) and not any(".0." in n for n in last)
        assert len(select_trainable(model, adapter, "all")) == len(list(model.parameters()))
        with pytest.raises(DistillError, match="only 2 encoder layers"):
            select_trainable(model, adapter, "head+3")


# -- data ----------------------------------------------------------------------------------------------


def test_clips_are_the_frames_they_name(data):
    path = data["train"] / "a.mp4"
    every = [f.rgb for f in read_frames(path)]
    entry = VideoEntry(path, len(every), 48, 40)
    clip = read_clip(entry, 5, ClipShape(length=3, stride=2))
    assert len(clip) == 3 and all(np.array_equal(c, every[i]) for c, i in zip(clip, (5, 7, 9)))
    with pytest.raises(DistillError, match="a.mp4: ended after 2 of the 3 frames"):
        read_clip(entry, 10, ClipShape(length=3, stride=2))


def test_epoch_plans_cover_the_windows_and_follow_the_seed():
    entries = [VideoEntry(Path("a"), 14, 8, 8), VideoEntry(Path("b"), 9, 8, 8)]
    shape = ClipShape(4, 1)
    plan = draw_epoch(entries, shape, None, torch.Generator().manual_seed(1))
    assert sorted(plan[:, 0].tolist()) == [0, 0, 0, 1, 1]
    for video_index, start in plan.tolist():
        assert 0 <= start and start + shape.span <= entries[video_index].frames
    again = draw_epoch(entries, shape, None, torch.Generator().manual_seed(1))
    assert torch.equal(plan, again)
    capped = draw_epoch(entries, shape, 1, torch.Generator().manual_seed(1))
    assert sorted(capped[:, 0].tolist()) == [0, 1]


# -- training ------------------------------------------------------------------------------------------


def test_loss_falls_on_a_fixed_batch(data, tmp_path):
    # One 6-frame clip, fixed gate settings: every step sees the same batch, so the loss must fall.
    cfg = config(data, tmp_path / "out", videos=[data["fixed"]], clip_length=6, streams=1, epochs=8,
                 threshold_range=(0.05, 0.05), decay_range=(0.05, 0.05), lr=2e-3)
    result = distill(cfg)
    losses = [r["loss"] for r in result.train]
    assert result.status == "completed" and len(losses) == 8
    assert min(r["sparsity"] for r in result.train) >= 0.5  # most tokens really were dropped
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.5 * first, f"loss did not fall: {losses}"


def test_resumed_run_reaches_the_same_weights(data, tmp_path):
    # 2 videos x 3 clips = 6 clips, 2 streams: 3 steps per epoch; 3 epochs capped at 8 steps.
    # The interruption after step 4 falls inside the second epoch, with a prefetching decoder.
    cfg = config(data, tmp_path / "straight", epochs=3, max_steps=8, resolutions=[32, 48], eval_every=3,
                 workers=1, checkpoint_every=2, threshold_range=(0.0001, 0.35))
    straight = distill(cfg)
    first = distill(replace(cfg, out=tmp_path / "resumed", stop_after=4))
    assert (first.status, first.step, first.student_folder) == ("paused", 4, None)
    resumed = distill(replace(cfg, out=tmp_path / "resumed", resume=True))
    assert (straight.status, resumed.status, resumed.step) == ("completed", "completed", 8)
    a = load_file(straight.student_folder / "model.safetensors")
    b = load_file(resumed.student_folder / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert [r["loss"] for r in resumed.train] == [r["loss"] for r in straight.train]
    assert [r["resolution"] for r in resumed.train] == [r["resolution"] for r in straight.train]
    assert len({r["resolution"] for r in straight.train}) == 2
    assert [(r["step"], r["sparse_fidelity"]) for r in resumed.eval] == [(r["step"], r["sparse_fidelity"]) for r in straight.eval]
    # The checkpoint holds everything a resume needs.
    state = load_checkpoint(list_checkpoints(tmp_path / "resumed")[-1])
    for key in ("student", "optimizer", "scheduler", "scaler", "sampler", "rng", "plan", "epoch", "batch", "log"):
        assert key in state
    assert len(list_checkpoints(tmp_path / "straight")) == cfg.keep_checkpoints


def test_teacher_never_changes_and_the_student_is_a_neuroflow_b_model(data, tmp_path):
    before_files = files_digest(data["teacher"])
    trainer = Trainer(config(data, tmp_path / "out", epochs=1, lr=1e-2, val_videos=[data["val"]], eval_every=1))
    teacher = trainer.teacher.model
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = trainer.run()
    assert all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, original[k]), f"teacher {k} changed"
    assert files_digest(data["teacher"]) == before_files
    on_disk = SiglipVisionModel.from_pretrained(data["teacher"])
    assert all(torch.equal(v, original[k]) for k, v in on_disk.state_dict().items())
    # The student moved away from the teacher, and what was saved is the student.
    student = SiglipVisionModel.from_pretrained(result.student_folder).eval()
    assert any(not torch.equal(v, original[k]) for k, v in student.state_dict().items())
    for k, v in student.state_dict().items():
        assert torch.equal(v, trainer.student_model.state_dict()[k])
    nf = PaperFlow(student, arch="B")
    with torch.inference_mode():
        for t, frame in enumerate(video(3, 32, 32)):
            out = nf(frame[None])
            assert out.pooler_output.shape == (1, 48) and torch.isfinite(out.pooler_output).all()
    provenance = json.loads((result.student_folder / "neuroflow_distill.json").read_text())
    assert provenance["steps"] == result.step == 3
    # Held-out evaluations before training, after every step; the guard's three numbers each time.
    assert [r["step"] for r in result.eval] == [0, 1, 2, 3]
    assert all(r["source"] == "held-out" for r in result.eval)
    assert result.eval[0]["dense_fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert result.eval[-1]["dense_fidelity"] < 1.0 and 0 < result.eval[-1]["sparsity"] < 1


def test_head_and_last_layer_training_leaves_the_rest(data, tmp_path):
    result = distill(config(data, tmp_path / "out", epochs=1, train="head+1"))
    teacher = load_file(data["teacher"] / "model.safetensors")
    student = load_file(result.student_folder / "model.safetensors")
    for name, value in teacher.items():
        trains = name.startswith(("post_layernorm.", "head.", "encoder.layers.1."))
        changed = not torch.equal(value, student[name])
        if not trains:
            assert not changed, f"{name} is frozen but changed"
    assert all(not torch.equal(teacher[n], student[n]) for n in ("head.probe", "encoder.layers.1.mlp.fc1.weight"))


def test_bf16_mixed_precision_trains_on_cpu(data, tmp_path):
    result = distill(config(data, tmp_path / "out", epochs=1, amp="bf16"))
    assert result.status == "completed" and all(np.isfinite(r["loss"]) for r in result.train)
    student = load_file(result.student_folder / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in student.values())  # master weights stay float32
    with pytest.raises(DistillError, match="fp16 needs a CUDA device"):
        Trainer(config(data, tmp_path / "fp16", amp="fp16", device="cpu"))


# -- the forgetting guard -----------------------------------------------------------------------------


def test_guard_stops_and_keeps_the_last_weights_above_the_floor(data, tmp_path):
    result = distill(config(data, tmp_path / "out", epochs=2, lr=3e-2, eval_every=1, min_dense_fidelity=0.999))
    assert result.status == "stopped_by_guard" and result.step == 1
    assert result.summary["guard"]["crossings"][0]["step"] == 1
    # The student folder holds the step-0 weights (the teacher's), the checkpoint the drifted ones.
    teacher = load_file(data["teacher"] / "model.safetensors")
    student = load_file(result.student_folder / "model.safetensors")
    assert all(torch.equal(teacher[k], student[k]) for k in teacher)
    drifted = load_checkpoint(result.checkpoint)["student"]
    assert any(not torch.equal(teacher[k], drifted[k]) for k in teacher)
    events = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "event" and e["event"] == "guard" for e in events)


def test_guard_warns_and_goes_on(data, tmp_path):
    with pytest.warns(UserWarning, match="forgetting guard"):
        result = distill(config(data, tmp_path / "out", epochs=1, lr=3e-2, eval_every=1, min_dense_fidelity=0.999,
                                on_drift="warn"))
    assert result.status == "completed" and result.step == 3


# -- bad input -----------------------------------------------------------------------------------------


def test_bad_input_is_rejected_with_a_clear_message(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no videos here")
    with pytest.raises(DistillError, match="no video files found in .*empty"):
        Trainer(config(data, tmp_path / "o1", videos=[empty]))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00 this is not a video " * 50)
    with pytest.raises(DistillError, match=r"bad\.mp4: cannot read as a video file"):
        Trainer(config(data, tmp_path / "o2", videos=[data["train"], bad]))
    with pytest.raises(DistillError, match="no such file or folder"):
        Trainer(config(data, tmp_path / "o3", videos=[tmp_path / "missing.mp4"]))
    with pytest.raises(DistillError, match=r"a clip of 20 frames at stride 1 spans 20 frames, longer than every training video"):
        Trainer(config(data, tmp_path / "o4", clip_length=20))
    with pytest.raises(DistillError, match="longer than every held-out video"):
        Trainer(config(data, tmp_path / "o5", clip_length=10, val_videos=[data["val"]]))
    with pytest.raises(DistillError, match="not a multiple of the teacher's patch size 8"):
        Trainer(config(data, tmp_path / "o6", resolutions=[36]))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))  # nothing written for bad input


def test_incompatible_teachers_are_rejected(data, tmp_path):
    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    with pytest.raises(DistillError, match="model type 'bert' is not a supported vision model"):
        Trainer(config(data, tmp_path / "o1", teacher=bert))
    headless = tmp_path / "headless"
    tiny_siglip(vision_use_head=False).save_pretrained(headless)
    with pytest.raises(DistillError, match="no pooling head"):
        Trainer(config(data, tmp_path / "o2", teacher=headless))
    not_a_checkpoint = tmp_path / "plain"
    not_a_checkpoint.mkdir()
    with pytest.raises(DistillError, match=r"teacher: model folder .*plain: .*(config\.json|checkpoint)"):
        Trainer(config(data, tmp_path / "o3", teacher=not_a_checkpoint))


def test_runs_are_not_overwritten_and_resume_checks_the_settings(data, tmp_path):
    cfg = config(data, tmp_path / "out", epochs=1, stop_after=1)
    distill(cfg)
    with pytest.raises(DistillError, match="already holds checkpoints"):
        Trainer(replace(cfg, stop_after=None))
    with pytest.raises(DistillError, match=r"settings that decide the weights differ \(lr: 0.001 in the checkpoint, 0.002 now"):
        Trainer(replace(cfg, lr=2e-3, resume=True))
    with pytest.raises(DistillError, match="nothing to resume"):
        Trainer(replace(cfg, out=tmp_path / "other", resume=True))


# -- the command line ----------------------------------------------------------------------------------


def test_command_line_run_pause_and_resume(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", str(data["train"]), "--teacher", str(data["teacher"]), "--out", str(out), "--val", str(data["val"]),
            "--clip-length", "4", "--stride", "1", "--streams", "2", "--epochs", "2", "--lr", "1e-3", "--eval-every", "2",
            "--eval-clips", "2", "--resolution", "32", "--workers", "0", "--min-dense-fidelity", "none"]
    assert cli.main(args + ["--stop-after", "3"]) == 0
    printed = capsys.readouterr().out
    assert "status        paused at step 3 of 6" in printed and "continue with --resume" in printed
    # Resuming needs only the output folder: the settings come from the checkpoint.
    assert cli.main(["distill", "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "status        completed at step 6 of 6" in printed and "student       " in printed
    with open(out / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    with open(out / "eval_log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 2, 4, 6]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["evaluation"]["source"] == "held-out"
    assert SiglipVisionModel.from_pretrained(out / "student") is not None
    # Changing a setting that decides the weights is refused on resume.
    assert cli.main(["distill", "--out", str(out), "--resume", "--lr", "5e-3"]) == 1
    assert "lr: 0.001 in the checkpoint, 0.005 now" in capsys.readouterr().err


def test_command_line_errors(data, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"garbage" * 100)
    code = cli.main(["distill", str(bad), "--teacher", str(data["teacher"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("neuroflow distill: error: ") and "broken.mp4" in err[0]
    assert cli.main(["distill", str(data["train"]), "--out", str(tmp_path / "o")]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert cli.main(["distill", str(data["train"]), "--teacher", str(data["teacher"]), "--out", str(tmp_path / "o"),
                     "--threshold-range", "0.3", "0.1"]) == 2
    assert "threshold_range must be two numbers low <= high" in capsys.readouterr().err


def test_a_full_siglip_model_trains_only_its_vision_tower(data, tmp_path):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    full = SiglipModel(SiglipConfig(
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16},
    ))
    full.save_pretrained(tmp_path / "full")
    result = distill(config(data, tmp_path / "out", teacher=tmp_path / "full", epochs=1))
    loaded = SiglipModel.from_pretrained(result.student_folder)
    before = full.state_dict()
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("vision_model."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("vision_model."))
    assert PaperFlow(loaded, arch="B").adapter.family == "siglip"


def test_ctrl_c_mid_step_checkpoints_the_state_before_that_step(data, tmp_path, monkeypatch):
    cfg = config(data, tmp_path / "straight", epochs=1, resolutions=[32, 48])
    straight = distill(cfg)
    original = Trainer.train_step
    calls = []

    def interrupted_second_step(self, *args):
        calls.append(1)
        if len(calls) == 2:  # after step 2's plan position, resolution and gate settings were drawn
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupted_second_step)
    stopped = distill(replace(cfg, out=tmp_path / "resumed"))
    assert (stopped.status, stopped.step) == ("interrupted", 1)
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = distill(replace(cfg, out=tmp_path / "resumed", resume=True))
    a = load_file(straight.student_folder / "model.safetensors")
    b = load_file(resumed.student_folder / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed.train] == [r["loss"] for r in straight.train]
