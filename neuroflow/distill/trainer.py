"""The distillation loop: setup, steps, evaluations and the forgetting guard, checkpoints, resume, outputs.

One optimiser step takes S clips (``streams``) as S parallel streams. Each clip gets its own gate
threshold and EMA decay, drawn uniformly from the configured ranges; the gate starts fresh on each
clip (its first frame is dense). Frame by frame, the frozen teacher's dense pooled output (no
gradient) is the target of the student's Architecture B pooled output
(:class:`neuroflow.distill.sparse.SparseClips`); the frame's loss is backpropagated at once (frames
are independent in the graph, so this is the gradient of the clip loss summed over frames, with
one frame's activations alive at a time), then clipped, and AdamW steps.

Reproducibility: the epoch plans and per-step draws come from one seeded ``torch.Generator``
(checkpointed with the global torch/CUDA/numpy/python RNG states, the optimiser, the scheduler, the
gradient scaler, the step, epoch and position in the epoch's plan), and evaluation draws nothing,
so a run resumed from a checkpoint reaches the same weights as one that never stopped (bitwise on
the CPU).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..models.loading import DeviceError, ModelLoadError, default_device, load_model, pick_device, quiet_transformers
from ..models.families import VisionAdapter
from ..video.output_folder import OutputFolderError, prepare_output_folder
from ..models.pooling import dense_forward
from .checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .config import DistillConfig, DistillError, trajectory_differences
from .data import (
    ClipLoader,
    ClipShape,
    clips_per_epoch,
    draw_epoch,
    eval_windows,
    find_videos,
    probe_videos,
    read_clip,
    usable_videos,
)
from .evaluate import Evaluator
from .logs import RunLog, plot_curves
from .losses import frame_loss
from .params import select_trainable
from .sparse import SparseClips, check_distillable

STUDENT_FOLDER = "student"
PROVENANCE_FILE = "neuroflow_distill.json"
# Files of a checkpoint folder that describe its inputs rather than its weights: copied next to
# the student's weights so the folder is a drop-in replacement for the teacher's.
COPIED_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
                "vocab.json", "vocab.txt", "merges.txt")

COMPLETED, STOPPED, PAUSED, INTERRUPTED = "completed", "stopped_by_guard", "paused", "interrupted"


@dataclass
class DistillResult:
    """What a run (one invocation) ended with.

    Attributes:
        status: ``"completed"``, ``"stopped_by_guard"`` (the dense fidelity fell below the floor
            with ``on_drift="stop"``), ``"paused"`` (``stop_after`` reached; resume later) or
            ``"interrupted"`` (Ctrl-C; a checkpoint was written).
        step, total_steps: optimiser steps done / planned.
        student_folder: the Hugging Face checkpoint folder of the student (completed or stopped
            runs), else None.
        checkpoint: the checkpoint written last.
        train, eval: the log rows (``neuroflow.distill.logs``).
        summary: what ``summary.json`` holds.
    """

    status: str
    step: int
    total_steps: int
    student_folder: Path | None
    checkpoint: Path | None
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def lr_factor(warmup: int, total: int, schedule: str):
    """``step -> lr multiplier`` for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up over
    ``warmup`` steps (the first step already at ``1 / warmup``), then ``constant``, or ``cosine`` /
    ``linear`` decay reaching zero one step after the last."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)
    return factor


def _resolved(config: DistillConfig) -> DistillConfig:
    """Absolute paths, so a resumed run started from another folder finds the same files."""
    return replace(config, teacher=config.teacher.resolve(), videos=[p.resolve() for p in config.videos],
                   val_videos=[p.resolve() for p in config.val_videos])


class Trainer:
    """One distillation run (see the module docstring); :meth:`run` trains.

    Setup checks everything that can be checked before training and raises :class:`DistillError`
    with a one-line message on bad input: the teacher folder, every video (missing, unreadable,
    too short for a clip), the output folder, a checkpoint to resume (and that it belongs to a run
    with the same trajectory settings and data).

    Attributes:
        teacher: the frozen teacher's adapter (its model never changes).
        student_model: the student (same class as the teacher's checkpoint).
        student: the student's adapter.
        trainable: ``(name, parameter)`` of the parameters that train.
    """

    def __init__(self, config: DistillConfig):
        config.check()
        if importlib.util.find_spec("matplotlib") is None:  # fail now, not after training, at the plot
            raise DistillError("distillation writes curves.png with matplotlib: pip install 'neuroflow[video]'")
        self.config = config = _resolved(config)
        self.started = time.perf_counter()
        self.device = self._device(config)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
        resume_from = self._checkpoint_to_resume()

        # -- models: the teacher as loaded, frozen; the student a copy whose chosen parameters train.
        try:
            with quiet_transformers():
                self.loaded = load_model(config.teacher, torch.float32, self.device)
        except ModelLoadError as exc:
            raise DistillError(f"teacher: {exc}") from exc
        teacher_model = self.loaded.model.eval()
        teacher_model.requires_grad_(False)
        self.teacher = self.loaded.adapter
        check_distillable(self.teacher, config.floor_tokens, f"teacher {config.teacher}")
        patch = self.teacher.patch_size
        self.resolutions = list(config.resolutions) or [self.loaded.preprocessor.size]
        for r in self.resolutions:
            if r % patch:
                raise DistillError(f"resolution {r} px is not a multiple of the teacher's patch size {patch}")
        self.student_model = copy.deepcopy(teacher_model)
        self.student = VisionAdapter(self.student_model)
        self.trainable = select_trainable(self.student_model, self.student, config.train)
        if not self.trainable:
            raise DistillError(f"train {config.train!r} selects no parameter of {type(self.student.model).__name__}")

        # -- data
        self.shape = ClipShape(config.clip_length, config.frame_stride)
        entries = probe_videos(find_videos(config.videos, "training"))
        self.videos, self.short_videos = usable_videos(entries, self.shape, "training")
        self.clips_per_epoch = clips_per_epoch(self.videos, self.shape, config.max_clips_per_video)
        self.steps_per_epoch = math.ceil(self.clips_per_epoch / config.streams)
        planned = config.epochs * self.steps_per_epoch
        self.total_steps = planned if config.max_steps is None else min(config.max_steps, planned)
        self.evaluator = self._evaluator()
        # Created only once the teacher and every video passed their checks (no empty folder for bad input).
        try:
            self.out = prepare_output_folder(config.out)
        except OutputFolderError as exc:
            raise DistillError(str(exc)) from exc
        self.loader = ClipLoader(self.videos, self.shape, config.workers)

        # -- optimisation
        params = [p for _, p in self.trainable]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(config.warmup_steps, self.total_steps, config.schedule))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.sampler = torch.Generator().manual_seed(config.seed)
        seed_everything(config.seed)

        # -- position: the epoch's clip plan [K, 2] and the next batch in it (plan None: draw one)
        self.step, self.epoch, self.batch = 0, 0, 0
        self.plan: torch.Tensor | None = None
        self.last_good: tuple[int, dict[str, torch.Tensor]] | None = None
        self.guard_crossings: list[dict] = []
        self.last_checkpoint: Path | None = None
        if resume_from is not None:
            self._restore(resume_from)
        else:
            self.log = RunLog(self.out)

    # -- setup helpers -----------------------------------------------------------------------------
    @staticmethod
    def _device(config: DistillConfig) -> torch.device:
        try:
            device = pick_device(default_device() if config.device == "auto" else config.device)
        except DeviceError as exc:
            raise DistillError(str(exc)) from exc
        if config.amp == "fp16" and device.type != "cuda":
            raise DistillError(f"amp fp16 needs a CUDA device (device is {device}); use bf16 or none")
        return device

    def _checkpoint_to_resume(self) -> Path | None:
        c = self.config
        existing = latest_checkpoint(c.out)
        if c.resume is False:
            if existing is not None:
                raise DistillError(f"{c.out} already holds checkpoints of a run ({existing.name}): resume it "
                                   "(--resume) or choose another output folder")
            return None
        if c.resume is True:
            if existing is None:
                raise DistillError(f"nothing to resume: no checkpoint in {c.out / 'checkpoints'}")
            return existing
        return Path(c.resume)

    def _evaluator(self) -> Evaluator:
        c = self.config
        if c.val_videos:
            entries = probe_videos(find_videos(c.val_videos, "held-out"))
            entries, _ = usable_videos(entries, self.shape, "held-out")
            source = "held-out"
        else:
            entries, source = self.videos, "train"
        windows = eval_windows(entries, self.shape, c.eval_clips)
        clips = [read_clip(entries[i], start, self.shape) for i, start in windows]
        self.eval_videos = entries
        return Evaluator(clips, source, self.teacher, self.student.model, self.loaded.preprocessor, c.streams,
                         c.eval_threshold, c.eval_decay, c.floor_tokens, self.device)

    # -- checkpoints -------------------------------------------------------------------------------
    def _dataset(self) -> list[list]:
        return [[str(e.path), e.frames] for e in self.videos]

    def _state(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "step": self.step, "epoch": self.epoch, "batch": self.batch, "plan": self.plan,
            "total_steps": self.total_steps,
            "dataset": self._dataset(),
            "student": self.student_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.get_state(),
            "rng": rng_state(),
            "log": self.log.state(),
            "guard": {
                "last_good_step": None if self.last_good is None else self.last_good[0],
                "last_good": None if self.last_good is None else self.last_good[1],
                "crossings": self.guard_crossings,
            },
        }

    def save_checkpoint(self) -> Path:
        self.last_checkpoint = save_checkpoint(self._state(), self.out, self.step, self.config.keep_checkpoints)
        return self.last_checkpoint

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        diffs = trajectory_differences(state["config"], self.config)
        if diffs:
            listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diffs.items())
            raise DistillError(f"{path}: cannot resume, settings that decide the weights differ ({listed})")
        if state["dataset"] != self._dataset():
            raise DistillError(f"{path}: cannot resume, the training videos changed since the checkpoint "
                               "(files or frame counts differ)")
        if state["total_steps"] != self.total_steps:
            raise DistillError(f"{path}: cannot resume, the run planned {state['total_steps']} steps, now {self.total_steps}")
        try:
            self.student_model.load_state_dict(state["student"])
        except RuntimeError as exc:
            raise DistillError(f"{path}: the student weights do not fit the teacher's model ({str(exc).splitlines()[0]})") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.set_state(state["sampler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.batch, self.plan = state["step"], state["epoch"], state["batch"], state["plan"]
        guard = state["guard"]
        if guard["last_good"] is not None:
            self.last_good = (guard["last_good_step"], guard["last_good"])
        self.guard_crossings = list(guard["crossings"])
        self.log = RunLog(self.out, state["log"])
        self.log.add_event({"step": self.step, "event": "resume", "checkpoint": str(path)})
        self.last_checkpoint = Path(path)

    # -- one step --------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _draw(self, count: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The step's resolution and per-clip ``[S]`` thresholds and decays (float64, CPU)."""
        c = self.config
        res = self.resolutions[0]
        if len(self.resolutions) > 1:
            res = self.resolutions[int(torch.randint(len(self.resolutions), (1,), generator=self.sampler))]
        u = torch.rand(2, count, generator=self.sampler, dtype=torch.float64)
        (t_lo, t_hi), (d_lo, d_hi) = c.threshold_range, c.decay_range
        return res, t_lo + (t_hi - t_lo) * u[0], d_lo + (d_hi - d_lo) * u[1]

    def _frames(self, clips, resolution: int) -> torch.Tensor:
        """Decoded clips -> ``[S, F, C, r, r]`` float32 on the host (frames move to the device one
        at a time, in :class:`SparseClips`)."""
        x = self.loaded.preprocessor([f for clip in clips for f in clip], size=resolution)
        x = x.view(len(clips), len(clips[0]), *x.shape[1:])
        return x.pin_memory() if self.device.type == "cuda" else x

    def train_step(self, x: torch.Tensor, threshold: torch.Tensor, decay: torch.Tensor) -> dict:
        """One optimiser step on clips ``x`` ``[S, F, C, H, W]`` (host or device) with per-clip gate
        settings ``[S]``.

        Returns ``loss`` (mean over clips of the clip loss summed over frames), ``grad_norm``
        (before clipping), ``sparsity`` (mean over clips and frames after the first), ``lr``.
        """
        c = self.config
        mse_w, cos_w = c.loss_weights
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)
        run = SparseClips(self.student, x, threshold, decay, c.floor_tokens)
        total = torch.zeros((), device=self.device)
        sparsity = []
        for t in range(run.num_frames):
            with self._autocast():
                out = run.frame(t)
                with torch.no_grad():
                    target = dense_forward(self.teacher, out.pixels)
                loss = frame_loss(out.pooled, target, c.loss, mse_w, cos_w)
            self.scaler.scale(loss).backward()
            total += loss.detach()
            if t:
                sparsity.append(out.sparsity)
        value = float(total)
        if not math.isfinite(value) and not self.scaler.is_enabled():  # fp16: the scaler skips such steps
            raise DistillError(f"the loss became {value} at step {self.step + 1} (lower the learning rate?)")
        self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.trainable]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm is not None else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"loss": value, "grad_norm": float(grad_norm), "sparsity": float(torch.cat(sparsity).mean()), "lr": lr}

    # -- evaluation and the guard ----------------------------------------------------------------------
    def evaluate(self, say) -> bool:
        """Evaluate, log, apply the guard. Returns True when the guard stops the run."""
        c = self.config
        rows = self.evaluator.run(self.step, self.resolutions)
        for r in rows:
            self.log.add_eval(r)
            say(f"step {self.step}: {r['resolution']} px {r['source']}: sparse fidelity {r['sparse_fidelity']:.4f}, "
                f"dense fidelity {r['dense_fidelity']:.4f}, sparsity {r['sparsity']:.1%}")
        if c.min_dense_fidelity is None:
            return False
        worst = min(r["dense_fidelity"] for r in rows)
        if worst < c.min_dense_fidelity:
            event = {"step": self.step, "event": "guard", "dense_fidelity": worst, "floor": c.min_dense_fidelity,
                     "action": c.on_drift}
            self.guard_crossings.append(event)
            self.log.add_event(event)
            message = (f"forgetting guard: at step {self.step} the student's dense fidelity to the teacher is "
                       f"{worst:.4f}, below the floor {c.min_dense_fidelity:g}")
            if c.on_drift == "warn":
                warnings.warn(message, stacklevel=2)
                return False
            say(message + "; stopping", err=True)
            return True
        if c.on_drift == "stop":
            self.last_good = (self.step, {n: p.detach().to("cpu", copy=True) for n, p in self.trainable})
        return False

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> DistillResult:
        """Train until the run is done, ``stop_after`` is reached, the guard stops it or Ctrl-C;
        write a checkpoint, the logs, the plot, ``summary.json`` and (done or stopped) the student."""
        c = self.config
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc="distill", unit="step", file=sys.stderr,
                   dynamic_ncols=True, disable=c.quiet, mininterval=0.5)

        def say(line: str, err: bool = False) -> None:
            if not c.quiet:
                bar.write(line, file=sys.stderr if err else sys.stdout)

        status = COMPLETED
        try:
            if not self.log.eval:  # the baseline before any training step
                self.evaluate(say)
            while self.step < self.total_steps:
                if c.stop_after is not None and self.step >= c.stop_after:
                    status = PAUSED
                    break
                stop = self._one_step(bar, say)
                if stop:
                    status = STOPPED
                    break
        except KeyboardInterrupt:
            status = INTERRUPTED
            say(f"interrupted at step {self.step}; writing a checkpoint", err=True)
        except BaseException:
            self.log.close()  # what was logged stays on disk; the last periodic checkpoint is the way back
            raise
        finally:
            bar.close()
            self.loader.close()
        return self._finish(status)

    def _one_step(self, bar, say) -> bool:
        c = self.config
        s = c.streams
        # Everything a step changes before its optimiser update, to undo on Ctrl-C: a checkpoint
        # written then must describe the state before the step, or a resumed run would skip draws.
        snapshot = (self.sampler.get_state(), self.epoch, self.batch, self.plan)
        try:
            if self.plan is None:
                self.plan = draw_epoch(self.videos, self.shape, c.max_clips_per_video, self.sampler)
                self.batch = 0
            rows = self.plan[self.batch * s : (self.batch + 1) * s]
            following = self.plan[(self.batch + 1) * s : (self.batch + 2) * s]
            res, thr, dec = self._draw(rows.shape[0])
            began = time.perf_counter()
            clips = self.loader.get(rows)
            if following.shape[0]:
                self.loader.prefetch(following)
            stats = self.train_step(self._frames(clips, res), thr, dec)
        except KeyboardInterrupt:
            self.sampler.set_state(snapshot[0])
            self.epoch, self.batch, self.plan = snapshot[1:]
            raise
        epoch = self.epoch
        self.step += 1
        self.batch += 1
        if self.batch * s >= self.plan.shape[0]:
            self.plan, self.batch, self.epoch = None, 0, self.epoch + 1
        self.log.add_train({
            "step": self.step, "epoch": epoch, "loss": stats["loss"], "loss_per_frame": stats["loss"] / c.clip_length,
            "lr": stats["lr"], "grad_norm": stats["grad_norm"], "sparsity": stats["sparsity"],
            "threshold_mean": float(thr.mean()), "decay_mean": float(dec.mean()), "resolution": res,
            "streams": int(rows.shape[0]), "seconds": time.perf_counter() - began,
        })
        bar.set_postfix_str(f"loss {stats['loss']:.4g}, sparsity {stats['sparsity']:.0%}, lr {stats['lr']:.2g}", refresh=False)
        bar.update(1)
        stop = False
        if (c.eval_every and self.step % c.eval_every == 0) or self.step == self.total_steps:
            stop = self.evaluate(say)
        if c.checkpoint_every and self.step % c.checkpoint_every == 0 and not stop:
            self.save_checkpoint()
        self.log.flush()
        return stop

    # -- outputs -----------------------------------------------------------------------------------
    def _finish(self, status: str) -> DistillResult:
        c = self.config
        if self.last_checkpoint != checkpoint_path(self.out, self.step):
            self.save_checkpoint()
        student_folder = None
        weights_from = self.step
        if status == STOPPED and self.last_good is not None:
            # The checkpoint above keeps the drifted state (resume it with on_drift="warn" to go on);
            # the student folder gets the weights of the last evaluation above the floor.
            weights_from, good = self.last_good
            with torch.no_grad():
                for name, p in self.trainable:
                    p.copy_(good[name].to(p.device))
        if status in (COMPLETED, STOPPED):
            student_folder = self.write_student(self.out / STUDENT_FOLDER, weights_from)
        title = f"neuroflow distill: {type(self.student.model).__name__}, {status} at step {self.step}/{self.total_steps}"
        plot = plot_curves(self.out / "curves.png", self.log.train, self.log.eval, c.min_dense_fidelity, title,
                           guard_steps=[e["step"] for e in self.guard_crossings])
        summary = self._summary(status, student_folder, weights_from, plot)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.log.close()
        return DistillResult(status, self.step, self.total_steps, student_folder, self.last_checkpoint,
                             list(self.log.train), list(self.log.eval), summary)

    def write_student(self, folder: Path, weights_from: int) -> Path:
        """The student as a Hugging Face checkpoint folder (``from_pretrained`` loads it; its class
        is the teacher's), with the teacher's preprocessing and tokenizer files and a provenance
        file."""
        folder.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            self.student_model.save_pretrained(folder)
        for name in COPIED_FILES:
            src = self.config.teacher / name
            if src.is_file():
                shutil.copyfile(src, folder / name)
        provenance = {
            "teacher": str(self.config.teacher),
            "weights_from_step": weights_from,
            "steps": self.step,
            "total_steps": self.total_steps,
            "train": self.config.train,
            "loss": self.config.loss,
            "resolutions": self.resolutions,
            "note": "distilled for NeuroFlow Architecture B: use neuroflow.NeuroFlow(model, arch='B')",
        }
        (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        return folder

    def _summary(self, status: str, student_folder, weights_from: int, plot: Path) -> dict:
        c = self.config
        losses = [r["loss"] for r in self.log.train]
        k = max(1, min(5, len(losses) // 4))  # steps averaged at each end
        eval_steps = sorted({r["step"] for r in self.log.eval})
        def at(step):
            return [r for r in self.log.eval if r["step"] == step]
        return {
            "status": status,
            "step": self.step,
            "total_steps": self.total_steps,
            "teacher": str(c.teacher),
            "model": {"class": type(self.student.model).__name__, "family": self.student.family,
                      "layers": len(self.student.layers), "hidden_size": self.student.hidden_size,
                      "patch_size": self.student.patch_size},
            "trainable_parameters": sum(p.numel() for _, p in self.trainable),
            "data": {
                "videos": len(self.videos),
                "too_short": [str(e.path) for e in self.short_videos],
                "clips_per_epoch": self.clips_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "clip_length": c.clip_length, "frame_stride": c.frame_stride,
                "streams": c.streams, "resolutions": self.resolutions,
            },
            "evaluation": {"source": self.evaluator.source, "videos": len(self.eval_videos),
                           "clips": len(self.evaluator.clips), "threshold": c.eval_threshold, "decay": c.eval_decay},
            "loss": {"first_steps_mean": sum(losses[:k]) / k if losses else None,
                     "last_steps_mean": sum(losses[-k:]) / k if losses else None, "steps_averaged": k},
            "first_evaluation": at(eval_steps[0]) if eval_steps else [],
            "last_evaluation": at(eval_steps[-1]) if eval_steps else [],
            "guard": {"floor": c.min_dense_fidelity, "action": c.on_drift, "crossings": self.guard_crossings,
                      "student_weights_from_step": weights_from if student_folder else None},
            "outputs": {
                "student": str(student_folder) if student_folder else None,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "logs": [str(p) for p in self.log.paths],
                "plot": str(plot),
            },
            "seconds": time.perf_counter() - self.started,
            "device": str(self.device),
            "config": c.to_dict(),
        }
