"""The video command line: ``neuroflow demo`` and ``neuroflow run`` run as real subprocesses on
tiny random checkpoints (saved with ``save_pretrained``) and clips of a few frames written here
with PyAV; plus the decode and preprocessing API they are built on.

Every command costs a few seconds of imports, so the module fixture starts them all at once
(four at a time, one thread each) and each test checks its own command's exit code, messages
and files.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("matplotlib")

from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from neuroflow.video.overlay import VideoWriter  # noqa: E402
from neuroflow.video.synthetic import static_camera_video  # noqa: E402
from neuroflow.models.preprocess import Preprocessor  # noqa: E402
from neuroflow.video.decode import VideoError, open_video, read_frames  # noqa: E402

TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)
# Distinctive preprocessing, so the tests can tell the checkpoint's settings from the defaults.
SIGLIP_PREPROCESSOR = {
    "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
    "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3],
}
WORDS = ["[PAD]", "[UNK]", "a", "photo", "of", "car", "person", "dog", "."]
CLIPS = {"a.mp4": 6, "b.mp4": 4}  # name -> frames, 48x40 at 10 fps
ERROR_PREFIX = "neuroflow run: error: "


# -- test data -------------------------------------------------------------------------------------

def clip_frames(num_frames: int, seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 frames of the synthetic static-camera generator."""
    frames = static_camera_video(num_frames, height, width, seed=seed).frames
    return (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def write_h264(path: Path, frames: np.ndarray, fps: float = 10.0) -> Path:
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps, crf=18) as writer:
        for f in frames:
            writer.write(f)
    return path


def write_png_mov(path: Path, frames: np.ndarray, corrupt_frame: int) -> Path:
    """A PNG-coded .mov whose frame ``corrupt_frame`` has its PNG signature zeroed: FFmpeg decodes
    the frames before it and fails on that one."""
    container = av.open(str(path), "w")
    stream = container.add_stream("png", rate=10)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
    for f in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    data = bytearray(path.read_bytes())
    signature = b"\x89PNG\r\n\x1a\n"
    starts = [i for i in range(len(data)) if data.startswith(signature, i)]
    assert len(starts) == len(frames), starts
    data[starts[corrupt_frame] : starts[corrupt_frame] + len(signature)] = bytes(len(signature))
    path.write_bytes(bytes(data))
    return path


def write_empty_avi(path: Path) -> Path:
    """A video stream with no frame (AVI writes its header without any packet)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
    container.start_encoding()
    container.close()
    return path


def write_audio_only(path: Path) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in [*stream.encode(frame), *stream.encode()]:
        container.mux(packet)
    container.close()
    return path


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-data")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY)).save_pretrained(root / "siglip")
    (root / "siglip" / "preprocessor_config.json").write_text(json.dumps(SIGLIP_PREPROCESSOR))
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=None, eos_token_id=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=24)).save_pretrained(root / "clip")
    tiny_tokenizer().save_pretrained(root / "clip")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50)).save_pretrained(root / "bert")
    for seed, (name, n) in enumerate(CLIPS.items()):
        write_h264(root / name, clip_frames(n, seed))
    (root / "day2").mkdir()
    write_h264(root / "day2" / "a.mp4", clip_frames(3, 5))  # the same file name as a.mp4, other content
    write_png_mov(root / "corrupt.mov", clip_frames(6, 2), corrupt_frame=3)
    write_empty_avi(root / "empty.avi")
    write_audio_only(root / "audio.wav")
    (root / "text.mp4").write_text("not a video\n")
    (root / "a-file").write_text("a file where a folder should be\n")
    return root


# -- running the command ---------------------------------------------------------------------------

def neuroflow_command() -> list[str]:
    """The installed console script next to this interpreter (``python -m neuroflow.cli`` when the
    package was installed without scripts)."""
    script = Path(sys.executable).with_name("neuroflow")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "neuroflow.cli"]


def neuroflow(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # One thread per process: the commands run side by side, and oversubscribed OpenMP threads
    # spin for tens of milliseconds per op.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    return subprocess.run([*neuroflow_command(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def command_lines(data: Path, out: Path) -> dict[str, list[str]]:
    siglip, clip = str(data / "siglip"), str(data / "clip")
    a, b = str(data / "a.mp4"), str(data / "b.mp4")
    return {  # slowest first
        "demo": ["demo", "--frames", "3", "--size", "32", "--arch", "C", "KV", "--out", str(out / "demo")],
        "main": ["run", a, b, "--model", siglip, "--compare-dense", "--save-tokens", "--format", "both",
                 "--out", str(out / "main")],
        "labels": ["run", a, b, "--model", clip, "--labels", "car, person,dog", "--label-window", "0", "--top-k", "2",
                   "--out", str(out / "labels")],
        "corrupt": ["run", a, str(data / "corrupt.mov"), "--model", siglip, "--out", str(out / "corrupt")],
        "stride": ["run", a, "--model", siglip, "--stride", "2", "--max-frames", "2", "--batch", "1", "--arch", "KV",
                   "--no-overlay", "--quiet", "--out", str(out / "stride")],
        # --ema-decay has no effect under the default preset (reference computed): it warns
        "duplicates": ["run", a, str(data / "day2" / "a.mp4"), "--model", siglip, "--ema-decay", "0.5",
                       "--no-overlay", "--out", str(out / "duplicates")],
        "paper": ["run", a, "--model", siglip, "--preset", "paper", "--max-frames", "3", "--no-overlay", "--quiet",
                  "--out", str(out / "paper")],
        "bad_videos": ["run", str(data / "missing.mp4"), str(data / "text.mp4"), str(data / "audio.wav"),
                       str(data / "empty.avi"), a, "--model", siglip, "--out", str(out / "bad_videos")],
        "bad_model": ["run", a, "--model", str(data / "bert"), "--out", str(out / "bad_model")],
        "bad_out": ["run", a, "--model", siglip, "--out", str(data / "a-file" / "out")],
        "no_text_tower": ["run", a, "--model", siglip, "--labels", "car", "--out", str(out / "no_text_tower")],
        "bad_resolution": ["run", a, "--model", siglip, "--resolution", "30", "--out", str(out / "bad_resolution")],
    }


class Runs:
    """The commands of :func:`command_lines`, started together; ``runs[name]`` waits for one."""

    def __init__(self, commands: dict[str, list[str]], cwd: Path):
        self.cwd = cwd
        self._pool = ThreadPoolExecutor(max_workers=4)
        self._futures = {name: self._pool.submit(neuroflow, args, cwd) for name, args in commands.items()}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        return self._futures[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-out")


@pytest.fixture(scope="module")
def runs(data, out):
    r = Runs(command_lines(data, out), cwd=out)
    yield r
    r.close()


def error_lines(done: subprocess.CompletedProcess, prefix: str = ERROR_PREFIX) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith(prefix)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


# -- help ------------------------------------------------------------------------------------------

def help_text(argv: list[str], capsys) -> str:
    """``neuroflow ARGV --help`` through the console command's own entry point (in this process:
    the subprocess runs below already start the installed script)."""
    from neuroflow.cli import main

    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_lists_the_subcommands_and_each_has_its_own(capsys):
    top = help_text([], capsys)
    assert "demo" in top and "run" in top
    demo = help_text(["demo"], capsys)
    assert "--frames" in demo and "random" in demo
    run = help_text(["run"], capsys)
    gate = ("--preset", "--arch", "--threshold", "--ema-decay", "--decay", "--floor-tokens", "--floor", "--reference",
            "--max-staleness", "--budget", "--motion-norm", "--scene-cut", "--kv-layers", "--cls-readout")
    for option in gate + ("--model", "--resolution", "--device", "--dtype", "--batch", "--stride", "--max-frames",
                          "--compare-dense", "--labels", "--quiet", "--format"):
        assert option in run, option
    for option in gate:
        assert option in demo, option
    flat = " ".join(run.split())
    assert "cam.mp4#2" in flat and "warning" in flat  # duplicate file names are documented
    assert "default measured" in flat


# -- neuroflow run ---------------------------------------------------------------------------------

def test_run_writes_every_output_for_two_streams(runs, out, data):
    done = runs["main"]
    assert done.returncode == 0, done.stderr
    folder = out / "main"
    rows = read_jsonl(folder / "frames.jsonl")
    assert [(r["video"], r["frame"]) for r in rows if r["video"] == "a.mp4"] == [("a.mp4", i) for i in range(6)]
    assert [(r["video"], r["frame"]) for r in rows if r["video"] == "b.mp4"] == [("b.mp4", i) for i in range(4)]
    assert len(rows) == 10
    for r in rows:
        assert r["time"] == pytest.approx(r["frame"] / 10, abs=1e-3)
        assert r["first_frame"] == (r["frame"] == 0)
        assert 0.0 <= r["sparsity"] <= 1.0 and r["latency_ms"] > 0 and r["dense_latency_ms"] > 0
        assert r["active_patches"] == round((1 - r["sparsity"]) * 16) and r["patches"] == 16
        assert -1.0 <= r["fidelity"] <= 1.0 + 1e-6
        if r["first_frame"]:
            assert r["sparsity"] == 0.0 and r["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert any(r["sparsity"] > 0 for r in rows), "the gate skipped no patch on a static-camera clip"
    # streams drop out: b.mp4 ends after 4 calls, a.mp4 runs the last 2 alone
    assert [r["batch_size"] for r in rows if r["video"] == "a.mp4"] == [2, 2, 2, 2, 1, 1]
    with open(folder / "frames.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and {"video", "frame", "time", "sparsity", "latency_ms", "fidelity"} <= set(table[0])

    emb = folder / "embeddings"
    pooled = np.load(emb / "a.pooled.npy")
    assert pooled.shape == (6, 48) and pooled.dtype == np.float32 and np.isfinite(pooled).all()
    assert np.load(emb / "a.frames.npy").tolist() == list(range(6))
    assert np.load(emb / "a.tokens.npy").shape == (6, 16, 48)
    assert np.load(emb / "b.pooled.npy").shape == (4, 48)
    from safetensors.numpy import load_file

    st = load_file(str(emb / "a.safetensors"))
    assert set(st) == {"pooled", "frame_index", "tokens", "time"}
    np.testing.assert_array_equal(st["pooled"], pooled)
    np.testing.assert_allclose(st["time"], np.arange(6) / 10, atol=1e-3)

    # The first frame is dense by design: its pooled embedding is the dense model's on the frame
    # as decoded and preprocessed with the checkpoint's preprocessor_config.json.
    model = SiglipVisionModel.from_pretrained(data / "siglip").eval()
    pre = Preprocessor.from_pretrained(data / "siglip", "siglip")
    assert pre.mean == (0.4, 0.5, 0.6) and pre.size == 32
    first = next(read_frames(data / "a.mp4")).rgb
    with torch.inference_mode():
        expected = model(pre([first]), interpolate_pos_encoding=True).pooler_output[0].numpy()
    np.testing.assert_allclose(pooled[0], expected, rtol=1e-4, atol=1e-5)

    assert decoded_frames(folder / "overlay" / "a.mp4") == 6
    assert decoded_frames(folder / "overlay" / "b.mp4") == 4
    png = (folder / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["frames"] == 10 and summary["calls"] == 6 and summary["failures"] == []
    assert summary["preprocessing"].endswith("preprocessor_config.json")
    assert summary["archs"][0]["speedup"] > 0 and 0 < summary["archs"][0]["fidelity"] <= 1 + 1e-6
    assert "random weights" not in done.stdout  # a checkpoint folder is not labelled as random
    for word in ("sparsity", "frames/s", "speedup", "fidelity", str(folder)):
        assert word in done.stdout, word
    # the progress bar goes to stderr: frames done, rate, current sparsity
    assert "10/10" in done.stderr and "frame/s" in done.stderr and "sparsity" in done.stderr


def test_run_defaults_to_the_api_default_preset(runs, out):
    from neuroflow import NeuroFlow
    from neuroflow.engine.presets import DEFAULT_PRESET, PRESETS

    done = runs["main"]
    assert done.returncode == 0, done.stderr
    settings = json.loads((out / "main" / "summary.json").read_text())["settings"]
    api = NeuroFlow(SiglipVisionModel(SiglipVisionConfig(**TINY)))
    assert settings["preset"] == DEFAULT_PRESET == api.preset and settings["given"] == []
    for name, value in PRESETS[DEFAULT_PRESET].items():
        assert settings[name] == value == getattr(api, name), name
    assert f"preset '{DEFAULT_PRESET}' (the default)" in done.stdout
    assert "warning" not in done.stderr  # the preset's own values never warn


def test_run_preset_paper_gives_the_papers_rule(runs, out):
    from neuroflow.engine.presets import PRESETS

    done = runs["paper"]
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    settings = json.loads((out / "paper" / "summary.json").read_text())["settings"]
    assert settings["preset"] == "paper" and settings["given"] == []
    assert {k: settings[k] for k in PRESETS["paper"]} == PRESETS["paper"]


def test_run_warns_about_renamed_duplicates_and_ineffective_options(runs, out, data):
    done = runs["duplicates"]
    assert done.returncode == 0, done.stderr
    warned = error_lines(done, "neuroflow run: warning: ")
    assert len(warned) == 2, done.stderr
    renamed = next(line for line in warned if "renamed" in line)
    assert "'a.mp4#2'" in renamed and str(data / "day2" / "a.mp4") in renamed and "a-2" in renamed
    assert "'a.mp4'" not in renamed  # only the renamed id is named as renamed
    decay = next(line for line in warned if "ema_decay" in line)
    assert "no effect" in decay and "reference='computed'" in decay
    rows = read_jsonl(out / "duplicates" / "frames.jsonl")
    assert {r["video"] for r in rows} == {"a.mp4", "a.mp4#2"}
    assert np.load(out / "duplicates" / "embeddings" / "a-2.pooled.npy").shape == (3, 48)
    summary = json.loads((out / "duplicates" / "summary.json").read_text())
    assert summary["settings"]["given"] == ["ema_decay"] and summary["settings"]["ema_decay"] == 0.5


def test_run_stride_max_frames_and_quiet(runs, out):
    done = runs["stride"]
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    rows = read_jsonl(out / "stride" / "frames.jsonl")
    assert [(r["frame"], r["batch_size"]) for r in rows] == [(0, 1), (2, 1)]
    assert rows[1]["time"] == pytest.approx(0.2, abs=1e-3)
    assert not (out / "stride" / "overlay").exists()
    assert json.loads((out / "stride" / "summary.json").read_text())["settings"]["arch"] == "KV"


def test_run_zero_shot_labels_use_the_text_tower(runs, out):
    done = runs["labels"]
    assert done.returncode == 0, done.stderr
    windows = read_jsonl(out / "labels" / "labels.jsonl")
    assert len(windows) == 10  # --label-window 0: one per frame
    for w in windows:
        assert w["frames"] == 1 and len(w["labels"]) == 2
        names = [name for name, _ in w["labels"]]
        assert set(names) <= {"car", "person", "dog"} and len(set(names)) == 2
        assert w["labels"][0][1] >= w["labels"][1][1]
        # CLIP: a softmax over the three labels
        assert 0 < w["labels"][0][1] + w["labels"][1][1] < 1
    printed = [line for line in done.stdout.splitlines() if line.startswith(("a.mp4 ", "b.mp4 "))]
    assert len(printed) == 10
    rows = read_jsonl(out / "labels" / "frames.jsonl")
    assert all(r["top_label"] in {"car", "person", "dog"} for r in rows)


def test_corrupt_frame_mid_file_fails_after_flushing_what_was_computed(runs, out):
    done = runs["corrupt"]
    assert done.returncode == 1
    errors = error_lines(done)
    assert len(errors) == 1, done.stderr
    assert "corrupt.mov" in errors[0] and "frame 3" in errors[0]
    folder = out / "corrupt"
    rows = read_jsonl(folder / "frames.jsonl")
    assert [r["frame"] for r in rows if r["video"] == "corrupt.mov"] == [0, 1, 2]
    assert [r["frame"] for r in rows if r["video"] == "a.mp4"] == list(range(6))  # the other stream went on
    assert np.load(folder / "embeddings" / "corrupt.pooled.npy").shape == (3, 48)
    assert decoded_frames(folder / "overlay" / "corrupt.mp4") == 3
    summary = json.loads((folder / "summary.json").read_text())
    assert [f["video"] for f in summary["failures"]] == ["corrupt.mov"]
    assert "FAILED" in done.stdout


def test_unusable_videos_are_each_named_before_any_work(runs, out):
    done = runs["bad_videos"]
    assert done.returncode == 1
    errors = error_lines(done)
    assert len(errors) == 4, done.stderr
    expected = {"missing.mp4": "no such file", "text.mp4": "cannot read as a video file",
                "audio.wav": "no video stream", "empty.avi": "no frames"}
    for line, (name, problem) in zip(errors, expected.items(), strict=True):
        assert name in line and problem in line, line
    assert "Traceback" not in done.stderr
    assert not (out / "bad_videos" / "frames.jsonl").exists()


@pytest.mark.parametrize(("name", "folder", "problem"), [
    ("bad_model", "bert", "not a supported vision model"),
    ("no_text_tower", "siglip", "text tower"),
])
def test_unusable_checkpoints_give_one_line_naming_the_folder(runs, data, name, folder, problem):
    done = runs[name]
    assert done.returncode == 1
    errors = error_lines(done)
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(data / folder) in errors[0] and problem in errors[0]


def test_unwritable_output_folder(runs, data):
    done = runs["bad_out"]
    assert done.returncode == 1
    errors = error_lines(done)
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(data / "a-file" / "out") in errors[0] and "cannot be written" in errors[0]


def test_bad_option_value_exits_2(runs):
    done = runs["bad_resolution"]
    assert done.returncode == 2
    assert error_lines(done) == [ERROR_PREFIX + "--resolution 30 is not a multiple of the patch size 8 (e.g. 32)"]


# -- neuroflow demo --------------------------------------------------------------------------------

def test_demo_runs_random_siglip_base_on_synthetic_streams(runs, out):
    done = runs["demo"]
    assert done.returncode == 0, done.stderr
    folder = out / "demo"
    lines = done.stdout.splitlines()
    for key in ("sparsity", "fidelity"):
        line = next(line for line in lines if line.startswith(key))
        assert "[random weights]" in line, line
    assert any(line.startswith("| C |") for line in lines) and any(line.startswith("| KV |") for line in lines)
    assert "speedup" in done.stdout and str(folder) in done.stdout
    for name in ("input/cam-0.mp4", "input/cam-1.mp4", "overlay/cam-0.mp4", "overlay/cam-1.mp4", "timeline.png",
                 "frames.jsonl", "frames.csv", "summary.json", "embeddings/cam-0.pooled.npy"):
        assert (folder / name).is_file(), name
    assert decoded_frames(folder / "input" / "cam-0.mp4") == 3
    rows = read_jsonl(folder / "frames.jsonl")
    assert len(rows) == 6 and {r["video"] for r in rows} == {"cam-0.mp4", "cam-1.mp4"}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["random_weights"] and [a["arch"] for a in summary["archs"]] == ["C", "KV"]
    assert summary["settings"]["preset"] == "measured" and summary["settings"]["given"] == ["arch"]
    assert "settings    preset 'measured' (the default)" in done.stdout
    assert np.load(folder / "embeddings" / "cam-0.pooled.npy").shape == (3, 768)


def test_demo_real_weights_line_names_the_preset():
    from neuroflow.commands.demo import real_weights_line

    default = real_weights_line("DINOv2-S", {"preset": "measured", "given": []})
    assert "the default setting (preset 'measured'" in default
    paper = real_weights_line("DINOv2-S", {"preset": "paper", "given": []})
    assert "preset 'paper' (not the default 'measured')" in paper
    mixed = real_weights_line("DINOv2-S", {"preset": "measured", "given": ["threshold", "max_staleness"]})
    assert "preset 'measured' with --threshold, --max-staleness given" in mixed and "default setting" not in mixed


def test_demo_clip_backgrounds():
    from neuroflow.commands.demo import demo_clip

    texture, what = demo_clip(4, 32, seed=0, background="texture")
    assert texture.shape == (4, 32, 32, 3) and texture.dtype == np.uint8 and what == "synthetic texture"
    assert np.abs(texture[1].astype(int) - texture[0].astype(int)).mean() > 0  # objects move, noise
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return
    photo, what = demo_clip(4, 32, seed=1, background="photo")
    assert photo.shape == (4, 32, 32, 3) and "rocket" in what


# -- the decode and preprocessing API --------------------------------------------------------------

def test_open_video_and_read_frames(data):
    info = open_video(data / "a.mp4")
    assert (info.width, info.height, info.frame_count) == (48, 40, 6)
    assert info.fps == pytest.approx(10.0) and info.codec == "h264"
    frames = list(read_frames(data / "a.mp4", stride=2, max_frames=2))
    assert [f.index for f in frames] == [0, 2]
    assert [f.time for f in frames] == pytest.approx([0.0, 0.2], abs=1e-3)
    assert frames[0].rgb.shape == (40, 48, 3) and frames[0].rgb.dtype == np.uint8
    # the decoded frame is the one written: H.264 keeps 8x8 block colours (4:2:0 chroma drops the
    # texture's finest colour detail, so single pixels may differ more)
    def blocks(rgb):
        return rgb.astype(np.float64).reshape(5, 8, 6, 8, 3).mean(axis=(1, 3))

    assert np.abs(blocks(frames[0].rgb) - blocks(clip_frames(6, 0)[0])).mean() < 3
    assert np.abs(blocks(frames[0].rgb) - blocks(clip_frames(6, 1)[0])).mean() > 10  # another clip


def test_read_frames_raises_on_the_corrupt_frame_after_the_good_ones(data):
    got = []
    with pytest.raises(VideoError, match=r"corrupt\.mov: frame 3 cannot be decoded"):
        for frame in read_frames(data / "corrupt.mov"):
            got.append(frame.index)
    assert got == [0, 1, 2]


@pytest.mark.parametrize(("name", "problem"), [
    ("missing.mp4", "no such file"), ("text.mp4", "cannot read as a video file"), ("audio.wav", "no video stream"),
])
def test_open_video_errors_name_the_file(data, name, problem):
    with pytest.raises(VideoError) as err:
        open_video(data / name)
    message = str(err.value)
    assert str(data / name) in message and problem in message and "\n" not in message


def test_read_frames_rejects_a_video_stream_without_frames(data):
    assert open_video(data / "empty.avi").frame_count is None
    with pytest.raises(VideoError, match="empty.avi: the video stream holds no frames"):
        list(read_frames(data / "empty.avi"))


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_preprocessor_matches_the_model_image_processor(family, tmp_path):
    """Against transformers' own (PIL) image processor: resize, crop, rescale, normalise."""
    try:
        if family == "siglip":
            from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as Processor
        else:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        pytest.skip("this transformers has no PIL image processor class for the family")
    frames = [clip_frames(1, 3, height=120, width=160)[0], clip_frames(1, 4, height=90, width=60)[0]]
    hf = Processor()
    hf.save_pretrained(tmp_path)
    pre = Preprocessor.from_pretrained(tmp_path, family)
    expected = hf(images=frames, return_tensors="pt")["pixel_values"]
    got = pre(frames)
    assert got.shape == expected.shape == (2, 3, 224, 224)
    # PIL and torch's antialiased bicubic kernels differ by at most a couple of 8-bit levels
    level = 1 / 255 / min(pre.std)
    assert (got - expected).abs().max() <= 3 * level
    assert (got - expected).abs().mean() <= 0.05 * level
    # the centre crop shows the model the middle of a landscape frame
    top, left, bottom, right = pre.view_box(120, 160)
    if family == "clip":
        assert (top, bottom) == (0, 120) and left == pytest.approx(20, abs=1) and right == pytest.approx(140, abs=1)
    else:
        assert (top, left, bottom, right) == (0, 0, 120, 160)


def test_preprocessor_family_defaults_follow_the_model_size():
    dino = Preprocessor.for_family("dinov2", image_size=448)
    assert dino.size == 448 and dino.resize == 512 and dino.keep_aspect
    x = dino([clip_frames(1, 0, height=60, width=80)[0]], size=56)
    assert x.shape == (1, 3, 56, 56) and x.dtype == torch.float32
    assert Preprocessor.from_pretrained(None, "siglip", image_size=32).size == 32
    with pytest.raises(ValueError, match="uint8"):
        dino([np.zeros((8, 8, 3), np.float32)])


def test_checkpoint_folder_errors_name_the_folder(tmp_path):
    from neuroflow.commands._common import CommandError, load_model

    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    cases = {"missing": "does not exist", "empty": "no config.json", "weights.safetensors": "not a file"}
    for name, problem in cases.items():
        with pytest.raises(CommandError) as err:
            load_model(tmp_path / name, torch.float32, torch.device("cpu"))
        assert str(tmp_path / name) in str(err.value) and problem in str(err.value), str(err.value)
        assert "\n" not in str(err.value) and err.value.code == 1


def test_npy_rows_file_reads_back_after_every_sync(tmp_path):
    from neuroflow.commands.run import NpyRows

    rows = NpyRows(tmp_path / "x.npy", (2, 3))
    assert np.load(tmp_path / "x.npy").shape == (0, 2, 3)
    data = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    rows.append(data[0])
    rows.sync()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), data[:1])  # a run that dies here keeps row 0
    rows.append(data[1])
    rows.close()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), data)
    other = NpyRows(tmp_path / "y.npy", (3,))
    with pytest.raises(ValueError, match="shape"):
        other.append(np.zeros(4))
    other.close()


# -- neuroflow distill-gate ------------------------------------------------------------------------

def test_distill_gate_trains_a_ranker_that_run_loads(data, tmp_path):
    """``neuroflow distill-gate`` writes a ranker trained on the clips' partial frames; ``neuroflow run
    --ranker`` runs with it (its summary names it); bad options exit 2 with one line."""
    from neuroflow.reference.patch_ranker import PatchRanker

    siglip, a, b = str(data / "siglip"), str(data / "a.mp4"), str(data / "b.mp4")
    ranker = tmp_path / "ranker.pt"
    done = neuroflow(["distill-gate", a, b, "--model", siglip, "--out", str(ranker), "--steps", "30",
                      "--threshold", "0.01"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "partial frames of 2 video(s)" in done.stdout and str(ranker) in done.stdout
    loaded = PatchRanker.load(ranker)
    assert loaded.meta["samples"] > 0 and loaded.meta["settings"]["threshold"] == 0.01
    assert loaded.meta["videos"] == [a, b] and "train_r2" in loaded.meta
    ran = neuroflow(["run", a, "--model", siglip, "--ranker", str(ranker), "--no-overlay", "--out",
                     str(tmp_path / "run")], cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["ranker"] == "PatchRanker(8 -> 16 -> 1)"
    bad = neuroflow(["distill-gate", a, "--model", siglip, "--out", str(tmp_path / "r2.pt"), "--ranker",
                     str(ranker)], cwd=tmp_path)
    assert bad.returncode == 2 and "unrecognized arguments: --ranker" in bad.stderr  # no --ranker to train with
    assert not (tmp_path / "r2.pt").exists()
    wrong = neuroflow(["run", a, "--model", siglip, "--ranker", str(data / "a.mp4"), "--out",
                       str(tmp_path / "run2")], cwd=tmp_path)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr  # a bad option value
    assert len(errors := error_lines(wrong)) == 1 and "cannot be read" in errors[0], wrong.stderr
