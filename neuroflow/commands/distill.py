"""Distil a model for Architecture B: fine-tune it against its frozen dense self while the gate drops tokens.

The student starts as a copy of the teacher (a local checkpoint folder, never downloaded). Each
step takes --streams clips of --clip-length frames (every --stride-th frame) as parallel streams;
per clip the gate's threshold and EMA decay are drawn from --threshold-range and --decay-range and
the gate starts fresh (first frame dense). The student's Architecture B pooled output (encoder and
head on the kept tokens only) is pulled towards the teacher's dense output on the same frames,
summed over the clip's frames. The forgetting guard evaluates held-out clips (--val; else training
clips) before training, every --eval-every steps and at the end: the student's sparse fidelity to
the teacher, its own dense fidelity to the teacher (drift) and the sparsity; a dense fidelity
below --min-dense-fidelity stops the run (--on-drift stop: the student folder then holds the
weights of the last evaluation above it) or warns. The paper advises lr <= 5e-6 and <= 3 epochs
on broad data: narrow data destroyed zero-shot accuracy (UCF-101 top-1 77.40% -> 2.40%).

Writes into --out:
  student/               the distilled model (from_pretrained; use with NeuroFlow(model, arch="B")),
                         with the teacher's preprocessing/tokenizer files and neuroflow_distill.json
  checkpoints/           step-NNNNNNNN.pt: weights, optimiser, scheduler, data position, RNG states
  train_log.csv          one row per step: loss, lr, gradient norm, sparsity, gate settings, ...
  eval_log.csv           one row per evaluation and resolution: sparse/dense fidelity, sparsity
  log.jsonl              both, plus resume and guard events
  curves.png             loss, fidelities and sparsity over the steps
  summary.json           the printed summary

Resume with --resume (newest checkpoint in --out) or --resume FILE: the settings come from the
checkpoint; options that decide the weights may be repeated but not changed. --stop-after N ends
this invocation after step N (checkpoint written) so that a later --resume goes on.

Exit status: 0 done (or paused by --stop-after); 1 the teacher, a video, a checkpoint or the output
folder cannot be used (a one-line error names it); 2 bad options; 3 stopped by the forgetting
guard; 130 interrupted (a checkpoint was written).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import fields, replace
from pathlib import Path

from ..distill import DistillConfig, DistillError, distill
from ..distill.checkpoint import latest_checkpoint, read_config
from ..distill.config import AMP_MODES, DRIFT_ACTIONS, LOSSES, SCHEDULES
from ._common import default_device, print_error

EXIT_CODES = {"completed": 0, "paused": 0, "stopped_by_guard": 3, "interrupted": 130}


class OptionError(DistillError):
    """Options that cannot make a run (exit status 2)."""


def _floor(text: str) -> float | str:
    if text.lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine in [-1, 1] or 'none', got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None here and come from DistillConfig, so that --resume can tell the options
    # given on the command line from the ones saved in the checkpoint.
    d = DistillConfig.__dataclass_fields__
    default = {name: f.default for name, f in d.items()}
    p.add_argument("videos", nargs="*", type=Path, metavar="VIDEO_OR_FOLDER",
                   help="training videos, or folders searched recursively for video files")
    p.add_argument("--teacher", type=Path, metavar="PATH",
                   help="local checkpoint folder (SigLIP, CLIP, ViT, DINOv2); the student starts as a copy")
    p.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="output folder (created)")
    p.add_argument("--val", dest="val_videos", nargs="+", type=Path, metavar="VIDEO_OR_FOLDER",
                   help="held-out videos for the forgetting guard (default: a fixed set of training clips)")
    g = p.add_argument_group("clips")
    g.add_argument("--clip-length", dest="clip_length", type=int, metavar="FRAMES",
                   help=f"frames per clip; the gate resets per clip (default {default['clip_length']})")
    g.add_argument("--stride", dest="frame_stride", type=int, metavar="N",
                   help=f"take every N-th frame of the video (default {default['frame_stride']})")
    g.add_argument("--max-clips-per-video", dest="max_clips_per_video", type=int, metavar="N",
                   help="at most N clips of one video per epoch (default: every non-overlapping clip)")
    g.add_argument("--resolution", dest="resolutions", type=int, nargs="+", metavar="PIXELS",
                   help="input side(s), multiples of the patch size; each step draws one "
                        "(default: the checkpoint's preprocessing size)")
    g.add_argument("--streams", type=int, metavar="S", help=f"clips per step, run as parallel streams (default {default['streams']})")
    g = p.add_argument_group("gate")
    g.add_argument("--threshold-range", dest="threshold_range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="per clip, threshold ~ U(LO, HI) (default 0.0001 0.35: from nearly dense to the "
                        "high-sparsity regime)")
    g.add_argument("--decay-range", dest="decay_range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="per clip, EMA decay ~ U(LO, HI) (default 0.001 0.1)")
    g.add_argument("--floor", dest="floor_tokens", type=int, metavar="N",
                   help=f"at least N patches computed per frame (default {default['floor_tokens']})")
    g = p.add_argument_group("training")
    g.add_argument("--train", metavar="WHICH",
                   help="parameters that train: all (vision tower), head (final norm + pooling) or head+K "
                        "(head and the last K encoder layers); default all")
    g.add_argument("--loss", choices=LOSSES,
                   help="raw: MSE + 0.5 * (1 - cos) on raw pooled embeddings (released script, default); "
                        "normalized: (1 - cos) + MSE on L2-normalised ones (paper)")
    g.add_argument("--mse-weight", dest="mse_weight", type=float, metavar="W", help="weight of the MSE term")
    g.add_argument("--cos-weight", dest="cos_weight", type=float, metavar="W", help="weight of the 1 - cos term")
    g.add_argument("--lr", type=float, metavar="X", help=f"AdamW learning rate (default {default['lr']:g}; the paper advises <= 5e-6)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, metavar="X", help=f"AdamW weight decay (default {default['weight_decay']:g})")
    g.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="AdamW betas (default 0.9 0.999)")
    g.add_argument("--warmup-steps", dest="warmup_steps", type=int, metavar="N", help="linear warm-up steps (default 0)")
    g.add_argument("--schedule", choices=SCHEDULES, help="learning rate after warm-up (default constant)")
    g.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, metavar="X",
                   help=f"clip the gradient norm (default {default['max_grad_norm']:g}; 0: no clipping)")
    g.add_argument("--epochs", type=int, metavar="N", help=f"passes over the clips (default {default['epochs']}; the paper advises <= 3)")
    g.add_argument("--max-steps", dest="max_steps", type=int, metavar="N", help="stop after N steps if the epochs last longer")
    g.add_argument("--seed", type=int, metavar="N", help=f"seed of the data order, gate settings and RNGs (default {default['seed']})")
    g.add_argument("--device", metavar="DEVICE", help=f"cpu, cuda or cuda:N (default {default_device()})")
    g.add_argument("--amp", choices=AMP_MODES,
                   help="mixed precision of the training forward: none (default), bf16, fp16 (CUDA; with a "
                        "gradient scaler); weights stay float32, evaluation runs in float32")
    g.add_argument("--workers", type=int, metavar="N",
                   help=f"clips decoded in background threads while a step runs (default {default['workers']}; 0: none)")
    g = p.add_argument_group("forgetting guard")
    g.add_argument("--eval-every", dest="eval_every", type=int, metavar="STEPS",
                   help=f"evaluate every N steps (default {default['eval_every']}; 0: only before and after training)")
    g.add_argument("--eval-clips", dest="eval_clips", type=int, metavar="N",
                   help=f"clips per evaluation (default {default['eval_clips']})")
    g.add_argument("--eval-threshold", dest="eval_threshold", type=float, metavar="T",
                   help=f"gate threshold of the evaluation (default {default['eval_threshold']:g})")
    g.add_argument("--eval-decay", dest="eval_decay", type=float, metavar="D",
                   help=f"gate EMA decay of the evaluation (default {default['eval_decay']:g})")
    g.add_argument("--min-dense-fidelity", dest="min_dense_fidelity", type=_floor, metavar="COS",
                   help=f"floor on the student's dense cosine to the teacher (default {default['min_dense_fidelity']:g}; "
                        "'none': no floor)")
    g.add_argument("--on-drift", dest="on_drift", choices=DRIFT_ACTIONS,
                   help="below the floor: stop (default; student/ gets the last weights above it) or warn")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, metavar="STEPS",
                   help=f"checkpoint every N steps (default {default['checkpoint_every']}; 0: only at the end)")
    g.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, metavar="N",
                   help=f"keep the N newest checkpoints (default {default['keep_checkpoints']})")
    g.add_argument("--resume", nargs="?", const=True, type=Path, metavar="CHECKPOINT",
                   help="continue the run in --out from its newest checkpoint (or from CHECKPOINT)")
    g.add_argument("--stop-after", dest="stop_after", type=int, metavar="STEP",
                   help="end this invocation after step STEP (checkpoint written; --resume goes on)")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar and no summary")


def build_config(args: argparse.Namespace) -> DistillConfig:
    """The run's settings: the options given, on top of the checkpoint's settings with --resume.

    Raises:
        OptionError: a new run without teacher or videos.
        DistillError: no checkpoint to resume, or an unreadable one.
    """
    names = {f.name for f in fields(DistillConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None and k != "resume"}
    if given.get("videos") == []:
        del given["videos"]
    if given.get("min_dense_fidelity") == "none":
        given["min_dense_fidelity"] = None
    if given.get("max_grad_norm") == 0:
        given["max_grad_norm"] = None
    if args.resume is None:
        missing = [opt for opt, key in (("--teacher", "teacher"), ("VIDEO_OR_FOLDER", "videos")) if key not in given]
        if missing:
            raise OptionError(f"a new run needs {' and '.join(missing)} (or --resume to continue the run in {args.out})")
        return DistillConfig(**given)
    if args.resume is True:
        checkpoint = latest_checkpoint(args.out)
        if checkpoint is None:
            raise DistillError(f"--resume: no checkpoint in {args.out / 'checkpoints'}")
    else:
        checkpoint = args.resume
    saved = read_config(checkpoint)
    saved.update({"resume": False, "stop_after": None, "quiet": False})  # invocation settings are not inherited
    return replace(DistillConfig.from_dict(saved), **given, resume=checkpoint)


def summary_lines(s: dict) -> list[str]:
    """The printed summary of a run (``summary.json``)."""
    data, ev, guard, out = s["data"], s["evaluation"], s["guard"], s["outputs"]
    model = s["model"]
    lines = [
        f"status        {s['status']} at step {s['step']} of {s['total_steps']}",
        (f"teacher       {s['teacher']} ({model['class']}, {model['layers']} layers, D={model['hidden_size']}, "
         f"patch {model['patch_size']})"),
        (f"training      {s['trainable_parameters']:,} parameters ({s['config']['train']}), {data['videos']} video(s), "
         f"{data['clips_per_epoch']} clips of {data['clip_length']} frames (stride {data['frame_stride']}) per epoch, "
         f"{data['streams']} streams per step, {', '.join(map(str, data['resolutions']))} px"),
    ]
    if data["too_short"]:
        lines.append(f"skipped       {len(data['too_short'])} video(s) shorter than one clip: {', '.join(data['too_short'])}")
    loss = s["loss"]
    if loss["first_steps_mean"] is not None:
        k = loss["steps_averaged"]
        steps = f"{k} steps" if k > 1 else "step"
        lines.append(f"loss          {loss['first_steps_mean']:.4g} (first {steps}) -> {loss['last_steps_mean']:.4g} "
                     f"(last {steps}), per clip summed over its frames")
    first = {r["resolution"]: r for r in s["first_evaluation"]}
    for r in s["last_evaluation"]:
        f0 = first.get(r["resolution"])
        before = (f"step {f0['step']}: sparse {f0['sparse_fidelity']:.4f}, dense {f0['dense_fidelity']:.4f}, "
                  f"sparsity {f0['sparsity']:.1%}  ->  ") if f0 and f0["step"] != r["step"] else ""
        lines.append(f"eval {r['resolution']:>4} px {before}step {r['step']}: sparse {r['sparse_fidelity']:.4f}, "
                     f"dense {r['dense_fidelity']:.4f}, sparsity {r['sparsity']:.1%} "
                     f"({ev['clips']} {ev['source']} clip{'s' if ev['clips'] > 1 else ''}, "
                     f"threshold {ev['threshold']:g}, decay {ev['decay']:g})")
    if guard["floor"] is None:
        lines.append("guard         no floor on the dense fidelity")
    else:
        crossed = ", ".join(f"step {c['step']} ({c['dense_fidelity']:.4f})" for c in guard["crossings"]) or "never"
        lines.append(f"guard         dense fidelity floor {guard['floor']:g} ({guard['action']}): below it {crossed}")
    if out["student"]:
        lines.append(f"student       {out['student']} (weights of step {guard['student_weights_from_step']}; "
                     "from_pretrained, then NeuroFlow(model, arch='B'))")
    lines.append(f"checkpoint    {out['checkpoint']}")
    lines.append(f"logs          {', '.join(Path(p).name for p in out['logs'])}, {Path(out['plot']).name} in {Path(out['plot']).parent}")
    lines.append(f"time          {s['seconds']:.1f} s on {s['device']}")
    if s["status"] == "paused":
        lines.append("continue with --resume")
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
        try:
            config.check()
        except DistillError as exc:
            raise OptionError(str(exc)) from exc
    except DistillError as exc:
        print_error("distill", str(exc))
        return 2 if isinstance(exc, OptionError) else 1
    try:
        with warnings.catch_warnings():
            # The guard's warnings (--on-drift warn) as one line each, like the errors.
            warnings.showwarning = lambda message, *_args, **_kw: print(
                f"neuroflow distill: warning: {message}", file=sys.stderr, flush=True)
            result = distill(config)
    except DistillError as exc:
        for line in str(exc).splitlines() or [""]:
            print_error("distill", line)
        return 1
    if not config.quiet:
        print("\n".join(summary_lines(result.summary)))
    return EXIT_CODES[result.status]
