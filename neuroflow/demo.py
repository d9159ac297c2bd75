"""``python -m neuroflow.demo``: a few synthetic static-camera streams through SigLIP-base.

Runs on a fresh machine with no download and no GPU: the model is SigLIP-base-patch16-224's
geometry with random weights (or a local checkpoint with ``--model PATH``), the video is
generated on the spot. Prints, per architecture, the gate's sparsity, time per frame against the
dense model measured in the same run, and fidelity (cosine of pooled embeddings to dense).

With random weights, sparsity and fidelity are correctness signals only: they say nothing about
quality on real pretrained weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import dispatch
from .engine import NeuroFlow
from .synthetic import static_camera_video


def _load_model(path: str | None, dtype: torch.dtype):
    if path is None:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        torch.manual_seed(0)
        return SiglipVisionModel(SiglipVisionConfig()).to(dtype).eval(), "SigLIP-base-patch16-224 geometry, random weights"
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    if hasattr(model, "vision_model"):
        model = model.vision_model
    return model.eval(), f"{config.model_type} from {path}"


def _dense(model, x):
    if "Dinov2" in type(model).__name__:
        return model(x)
    return model(x, interpolate_pos_encoding=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, label = _load_model(args.model, dtype)
    model.to(device)
    clips = [
        static_camera_video(args.frames, args.size, args.size, seed=s).normalized() for s in range(args.streams)
    ]
    frames = torch.stack(clips, dim=1).to(device=device, dtype=dtype)  # [F, S, 3, H, W]
    patch = model.config.patch_size
    print(f"model: {label}")
    print(f"video: {args.streams} synthetic static-camera stream(s), {args.frames} frames, {args.size}x{args.size} px, "
          f"{(args.size // patch) ** 2} patches/frame; {device.type}, {args.dtype}")
    print("random weights: sparsity and fidelity below are correctness signals, not quality figures"
          if args.model is None else "")

    with torch.inference_mode():
        dense_pooled, dense_ms = [], []
        for t in range(args.frames):
            _sync(device)
            start = time.perf_counter()
            dense_pooled.append(_dense(model, frames[t]).pooler_output)
            _sync(device)
            dense_ms.append(1e3 * (time.perf_counter() - start))
        rows = []
        for arch in args.arch:
            nf = NeuroFlow(model, arch=arch, threshold=args.threshold, ema_decay=args.ema_decay,
                           floor_tokens=args.floor_tokens)
            ms, sparsity, cosine = [], [], []
            for t in range(args.frames):
                _sync(device)
                start = time.perf_counter()
                out = nf(frames[t])
                _sync(device)
                ms.append(1e3 * (time.perf_counter() - start))
                if t:  # the first frame is dense by design
                    sparsity.append(out.sparsity.mean().item())
                    cosine.append(torch.nn.functional.cosine_similarity(
                        out.pooler_output.float(), dense_pooled[t].float()).mean().item())
            p50, d50 = statistics.median(ms[1:]), statistics.median(dense_ms[1:])
            rows.append({"arch": arch, "sparsity": statistics.mean(sparsity), "ms": p50, "dense_ms": d50,
                         "speedup": d50 / p50, "fidelity": statistics.mean(cosine)})
    print()
    print("| arch | mean sparsity | ms/batch p50 | dense ms/batch p50 | speedup | fidelity (cos to dense) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['sparsity']:.1%} | {r['ms']:.1f} | {r['dense_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['fidelity']:.4f} |")
    paths = ", ".join(f"{op}: {path}" for op, path in sorted(dispatch.last_path.items()))
    print(f"\n(first frame excluded; one batch = {args.streams} stream(s); paths taken: {paths})")
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m neuroflow.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local Hugging Face checkpoint folder (default: random-weight SigLIP-base)")
    p.add_argument("--arch", nargs="+", default=["A", "B", "C", "KV"], choices=["A", "B", "C", "KV"])
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (multiple of the patch size)")
    p.add_argument("--threshold", type=float, default=0.35)
    p.add_argument("--ema-decay", type=float, default=0.01)
    p.add_argument("--floor-tokens", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.frames < 2:
        print("--frames must be at least 2 (the first frame is dense)", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
