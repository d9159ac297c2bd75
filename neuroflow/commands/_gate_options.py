"""The gate and architecture options of ``neuroflow run``, ``demo`` and ``serve``, in one place.

:func:`add_gate_arguments` adds ``--preset`` and one option per engine setting; every option
defaults to "not given", so what the user leaves out comes from the preset
(:data:`neuroflow.engine.presets.DEFAULT_PRESET` unless ``--preset`` names another), exactly as for
``NeuroFlow(model)``. :func:`gate_kwargs` turns the parsed options into ``NeuroFlow`` keyword
arguments holding only what was given (so only those can warn about having no effect).
"""

from __future__ import annotations

import argparse

from ..engine.architectures import ARCHITECTURES
from ..reference.gate_settings import SIGNALS
from ..engine.presets import DEFAULT_PRESET, PRESETS

_NONE = "none"
GATE_OPTIONS = ("threshold", "ema_decay", "floor_tokens", "reference", "max_staleness", "budget", "motion_norm",
                "scene_cut", "kv_layers", "cls_readout", "skip_below", "keyframe_every", "keyframe_drift",
                "batch_budget", "probe_layers", "signal", "layer_threshold", "ranker")
"""The ``NeuroFlow`` keyword arguments (and ``args`` attributes) these options set, besides
``preset`` and ``arch``."""


def _or_none(parse):
    def convert(text: str):
        return None if text.strip().lower() == _NONE else parse(text)

    convert.__name__ = parse.__name__
    return convert


def _budget(text: str) -> int | float:
    """``"12"`` -> 12 patches; ``"0.25"`` -> a quarter of the patches."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _kv_layers(text: str) -> int | tuple[int, ...]:
    """``"4"`` -> the last 4 layers; ``"1,3,5"`` -> those layer indices."""
    parts = [p for p in text.split(",") if p.strip()]
    if "," not in text:
        return int(text)
    return tuple(int(p) for p in parts)


def _show(value) -> str:
    return "none" if value is None else str(value)


def add_gate_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, several_archs: bool = False,
                       ranker: bool = True) -> None:
    """Add ``--preset``, ``--arch`` and the gate options to ``p`` (a parser or an argument group).

    An option not given leaves no attribute in the parsed namespace (``argparse.SUPPRESS``):
    its value comes from the preset (or is the engine's default, for the settings no preset
    decides), and ``--threshold none`` stays distinguishable from "not given". ``several_archs``: ``--arch`` takes one or more
    architectures (a list), else exactly one. ``ranker``: offer ``--ranker FILE`` (serving does not: a
    shard would need the file).
    """
    measured, paper = PRESETS["measured"], PRESETS["paper"]

    def both(name):
        return f"measured {_show(measured[name])}, paper {_show(paper[name])}"

    p.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET,
                   help=f"where the settings not given come from (default {DEFAULT_PRESET}, as NeuroFlow(model)): "
                        f"measured = arch {measured['arch']}, a keyframe every {measured['keyframe_every']} frames "
                        f"or once the summed motion (mean surprise over texture) passes {measured['keyframe_drift']}, "
                        f"threshold {measured['threshold']}, reference {measured['reference']}, max staleness "
                        f"{_show(measured['max_staleness'])} (best measured on real weights against frame skipping); "
                        f"paper = arch {paper['arch']}, threshold {paper['threshold']}, EMA reference with "
                        f"decay {paper['ema_decay']}, no staleness bound, no keyframes")
    if several_archs:
        p.add_argument("--arch", nargs="+", default=argparse.SUPPRESS, choices=ARCHITECTURES, metavar="ARCH",
                       help=f"architecture(s) A, B, C, KV ({both('arch')}); with several, the first one's results "
                            "are written and a table compares them all")
    else:
        p.add_argument("--arch", default=argparse.SUPPRESS, choices=ARCHITECTURES,
                       help=f"A (MLP gating), B (elimination), C (dual memory), KV (cached context) ({both('arch')})")
    p.add_argument("--threshold", type=_or_none(float), default=argparse.SUPPRESS, metavar="T",
                   help=f"a patch is computed when its surprise 1 - cos is above this; 'none' with --budget: the "
                        f"budget alone decides ({both('threshold')})")
    p.add_argument("--ema-decay", "--decay", dest="ema_decay", type=float, default=argparse.SUPPRESS, metavar="D",
                   help="weight of the new frame in each patch's EMA (used with --reference ema only; "
                        f"{both('ema_decay')})")
    p.add_argument("--floor-tokens", "--floor", dest="floor_tokens", type=int, default=argparse.SUPPRESS, metavar="N",
                   help=f"at least this many patches are computed per later frame ({both('floor_tokens')})")
    p.add_argument("--reference", choices=("ema", "computed"), default=argparse.SUPPRESS,
                   help="what the surprise compares a patch with: the EMA of every frame, or its embedding as "
                        f"last computed ({both('reference')})")
    p.add_argument("--signal", choices=SIGNALS, default=argparse.SUPPRESS,
                   help="what the surprise compares: the layer-0 embedding (embedding: patch + position "
                        "embedding) or the patch embedding alone (patch: without the position embedding, a change "
                        "of content alone) (default embedding)")
    p.add_argument("--max-staleness", type=_or_none(int), default=argparse.SUPPRESS, metavar="K",
                   help="a patch not computed for K frames in a row is computed on the next; 'none': no bound "
                        f"({both('max_staleness')})")
    p.add_argument("--budget", type=_budget, default=argparse.SUPPRESS, metavar="B",
                   help="at most B patches per later frame: an int (patches) or a fraction in (0, 1] (default none)")
    p.add_argument("--motion-norm", action="store_true", default=argparse.SUPPRESS,
                   help="subtract the frame's mean surprise before the threshold (default off)")
    p.add_argument("--scene-cut", type=float, default=argparse.SUPPRESS, metavar="F",
                   help="a frame where more than this fraction of the patches pass the threshold is a keyframe: "
                        "every patch computed, the reference restarted (default off)")
    p.add_argument("--kv-layers", type=_kv_layers, default=argparse.SUPPRESS, metavar="K|I,J,...",
                   help="architecture KV: cache the last K layers, or the listed layer indices (default every "
                        "layer); in a comparison of several --arch it applies to the KV engine")
    p.add_argument("--probe-layers", type=int, default=argparse.SUPPRESS, metavar="L",
                   help="architecture KV: run the first L layers densely on every token and let the gate decide "
                        "on their output (reference computed only; the probe counts in the compute); 0: decide on "
                        "the layer-0 embedding (default 0); in a comparison of several --arch it applies to the "
                        "KV engine")
    p.add_argument("--layer-threshold", type=_or_none(float), default=argparse.SUPPRESS, metavar="T",
                   help="architecture KV: the per-layer gate; at every cached layer a computed patch whose key moved "
                        "by at most T (1 - cos against its cached key) drops out, its deeper caches and output kept "
                        "(default none: off); in a comparison of several --arch it applies to the KV engine")
    p.add_argument("--skip-below", type=float, default=argparse.SUPPRESS, metavar="F",
                   help="frame policy: a later frame where at most this fraction of the patches pass the threshold "
                        "is skipped (the stream's last outputs are reused, no encoder work); 1.0 with "
                        "--keyframe-every K is frame skipping, dense every K-th frame (default off)")
    p.add_argument("--keyframe-every", type=_or_none(int), default=argparse.SUPPRESS, metavar="K",
                   help="frame policy: a keyframe (dense, reference and caches refreshed) at least every K frames "
                        f"of a stream; 'none': off ({both('keyframe_every')})")
    p.add_argument("--keyframe-drift", type=_or_none(float), default=argparse.SUPPRESS, metavar="D",
                   help="frame policy: a keyframe once the frames' motion summed since the last keyframe exceeds D "
                        "(each frame's mean surprise over its reference's texture, the mean 1 - cos between "
                        "neighbouring patches, less dependent on the resolution than the surprise); 'none': off "
                        f"({both('keyframe_drift')})")
    p.add_argument("--batch-budget", type=float, default=argparse.SUPPRESS, metavar="F",
                   help="one call computes at most this fraction of the non-keyframe frames' patches, shared "
                        "across streams by the gate's ranking (default off)")
    if ranker:
        p.add_argument("--ranker", default=argparse.SUPPRESS, metavar="FILE",
                       help="a learned patch ranking trained by `neuroflow distill-gate`: partial frames compute as "
                            "many patches as without it, chosen by its predicted output error (default none: the "
                            "deterministic gate)")
    p.add_argument("--cls-readout", choices=("context", "active"), default=argparse.SUPPRESS,
                   help="architecture C on CLS-pooling models (CLIP, ViT, DINOv2): the last layer attends to "
                        "every token's cached input (context, default) or to the computed tokens only (active)")


def gate_kwargs(args: argparse.Namespace) -> dict:
    """``NeuroFlow`` keyword arguments from options added by :func:`add_gate_arguments`:
    ``preset``, ``arch`` when one architecture was given (a str; with ``several_archs`` see
    :func:`chosen_archs`), and every gate option that was given (``--threshold none`` and
    ``--max-staleness none`` give None)."""
    kwargs = {"preset": getattr(args, "preset", DEFAULT_PRESET)}
    arch = getattr(args, "arch", None)
    if isinstance(arch, str):
        kwargs["arch"] = arch
    for name in GATE_OPTIONS:
        if hasattr(args, name):
            kwargs[name] = getattr(args, name)
    return kwargs


def chosen_archs(args: argparse.Namespace) -> list[str]:
    """The ``--arch`` values in order without repeats, or the preset's architecture."""
    arch = getattr(args, "arch", None)
    if arch is None:
        return [PRESETS[getattr(args, "preset", DEFAULT_PRESET)]["arch"]]
    return list(dict.fromkeys([arch] if isinstance(arch, str) else arch))
