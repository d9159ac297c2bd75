"""Language-model ablation: similarity-gated attention bypass on a local causal LM (drift, perplexity, latency).

Loads a causal LM and its tokenizer from a local folder (never the hub), attaches the bypass (gate at
layer G, cached attention reused at layer(s) C when the gate's step-to-step cosine is >= threshold)
and reports, dense against bypass: bypass rate, greedy token drift per prompt, teacher-forced
perplexity on a text file, median per-token decode latency at several batch sizes, and the gate
similarity's P10/P50/P90. Prints tables (unless --quiet) and writes JSON with --out.

example:
  neuroflow llm-ablation --model ./Phi-3-mini-4k-instruct --gate-layer 1 --cache-layer 24 \\
      --threshold 0.65 --ppl-file wiki.test.txt --dtype float16 --device cuda --out ablation.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext

from ..models.loading import DTYPES, quiet_transformers


def _threshold(text: str) -> float:
    value = float(text)
    if math.isnan(value):
        raise argparse.ArgumentTypeError("threshold must be a number in [-1, 1] or inf")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH", help="local model folder (with its tokenizer)")
    parser.add_argument("--gate-layer", type=int, required=True, metavar="G", help="gate layer index")
    parser.add_argument("--cache-layer", type=int, nargs="+", required=True, metavar="C",
                        help="cache layer index (one or more, each after G)")
    parser.add_argument("--threshold", type=_threshold, required=True, metavar="THETA",
                        help="bypass when the gate's cosine >= THETA; in [-1, 1], or inf to never bypass")
    parser.add_argument("--mode", choices=["kv-consistent", "skip-all"], default="kv-consistent",
                        help="kv-consistent (default): layer C still writes its keys/values; skip-all: the "
                             "released code's behaviour, leaving a hole in layer C's cache")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", nargs="+", metavar="TEXT", help="prompts (default: code, JSON and prose prompts)")
    prompts.add_argument("--prompts-file", metavar="FILE",
                         help="JSON list or {name: prompt} object, or one prompt per non-empty line")
    parser.add_argument("--steps", type=int, default=128, help="greedy tokens per prompt for the drift (default 128)")
    parser.add_argument("--ppl-file", metavar="FILE", help="text file for teacher-forced perplexity (skipped without)")
    parser.add_argument("--ppl-max-tokens", type=int, default=2000, help="use the first N tokens of --ppl-file (2000)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16], metavar="B",
                        help="latency batch sizes (default 1 4 16; none: skip latency)")
    parser.add_argument("--latency-steps", type=int, default=32, help="timed decode steps per run (default 32)")
    parser.add_argument("--latency-warmup", type=int, default=4, help="untimed decode steps first (default 4)")
    parser.add_argument("--latency-rounds", type=int, default=3, help="dense/gate-only/bypass alternations (default 3)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="model dtype (default float32)")
    parser.add_argument("--out", metavar="JSON", help="write the report as JSON here")
    parser.add_argument("--quiet", action="store_true", help="print nothing (errors still go to stderr)")


def run(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[llm-ablation] {message}", file=sys.stderr, flush=True)

    with quiet_transformers() if args.quiet else nullcontext():
        return _run(args, progress)


def _run(args: argparse.Namespace, progress) -> int:
    from .ablation import format_report, read_prompts_file, run_ablation

    try:
        prompts = read_prompts_file(args.prompts_file) if args.prompts_file else args.prompts
        progress(f"loading {args.model}")
        report = run_ablation(
            args.model,
            gate_layer=args.gate_layer,
            cache_layers=args.cache_layer,
            threshold=args.threshold,
            mode=args.mode,
            device=args.device,
            dtype=args.dtype,
            prompts=prompts,
            steps=args.steps,
            ppl_file=args.ppl_file,
            ppl_max_tokens=args.ppl_max_tokens,
            batch_sizes=args.batch_sizes,
            latency_steps=args.latency_steps,
            latency_warmup=args.latency_warmup,
            latency_rounds=args.latency_rounds,
            progress=progress,
        )
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"neuroflow llm-ablation: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        progress(f"wrote {args.out}")
    if not args.quiet:
        print(format_report(report))
    return 0
