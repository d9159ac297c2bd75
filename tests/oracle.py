"""An independent, deliberately plain implementation of the method, one stream at a time.

Written from ``../shared/method.md`` with the model's own Hugging Face modules (whole layers,
heads, norms) and Python loops where they make the rule obvious. It shares no code with the
package, so agreement means the package implements the method, not that it agrees with itself.
"""

from __future__ import annotations

import inspect

import torch

EPS = 1e-8


def num_prefix(model) -> int:
    name = type(model).__name__
    if name.startswith("Siglip"):
        return 0
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def layers_of(model):
    for path in ("encoder.layers", "encoder.layer", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return list(obj)
    raise AssertionError("no layers")


def embed(model, x):
    if "Dinov2" in type(model).__name__:
        return model.embeddings(x)
    return model.embeddings(x, interpolate_pos_encoding=True)


def encoder_input(model, h):
    return model.pre_layrnorm(h) if hasattr(model, "pre_layrnorm") else h


def _forward_params(layer):
    return inspect.signature(layer.forward).parameters


def takes_packing_kwargs(layer) -> bool:
    """Whether the layer passes transformers' keyword arguments on to its attention (DINOv2 layers
    of transformers 5.17 take the hidden states alone; 5.24's take ``**kwargs``)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _forward_params(layer).values())


def run_layer(layer, h, **kwargs):
    args = (h, None) if "attention_mask" in _forward_params(layer) else (h,)
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def key_of(layer, h):
    """The layer's attention keys of ``h`` ``[1, T, D]`` (its first norm, then its key projection)."""
    norm = next(getattr(layer, n) for n in ("norm1", "layer_norm1", "layernorm_before") if hasattr(layer, n))
    key = next(m for name, m in layer.named_modules() if name.endswith(("k_proj", ".key")))
    return key(norm(h))


def readout(model, z):
    """``z [1, T, D]`` final-layer outputs -> (last_hidden_state, pooler_output) as the model defines them."""
    name = type(model).__name__
    if name.startswith("Siglip"):
        seq = model.post_layernorm(z)
        return seq, model.head(seq)
    if name.startswith("CLIP"):
        return z, model.post_layernorm(z[:, 0])
    seq = model.layernorm(z)
    if name.startswith("ViT"):
        return seq, model.pooler(seq) if model.pooler is not None else None
    return seq, seq[:, 0]


def gate_step(patches, ema, threshold, ema_decay, floor_tokens):
    """One later frame of one stream: (active [N] bool, new ema). Literal rules, Python loops."""
    h = patches.to(ema.dtype)
    n = h.shape[0]
    surprise = []
    for i in range(n):
        dot = torch.dot(h[i], ema[i])
        den = max(h[i].norm().item(), EPS) * max(ema[i].norm().item(), EPS)
        surprise.append(1.0 - dot.item() / den)
    active = torch.tensor([s > threshold for s in surprise])
    if int(active.sum()) < floor_tokens:
        ranked = sorted(range(n), key=lambda i: (-surprise[i], i))
        active = torch.zeros(n, dtype=torch.bool)
        active[ranked[: min(floor_tokens, n)]] = True
    new_ema = (1.0 - ema_decay) * ema + ema_decay * h
    return active, new_ema


# -- the gate options (issue #12), one later frame of one stream, written from their rules ------

def f32(x: float) -> float:
    """x rounded to float32, as the gate reports surprises."""
    return torch.tensor(x, dtype=torch.float32).item()


def start_ages(n, max_staleness):
    """Ages on a stream's (re)start: patch i is i mod (K + 1) frames old, so refreshes spread."""
    return [i % (max_staleness + 1) for i in range(n)]


def options_step(patches, ref, ages, threshold, ema_decay, floor_tokens, reference="ema", max_staleness=None,
                 budget=None, motion_norm=False, scene_cut=None, replay=None):
    """One later frame with the gate options: (active [N] bool, new reference, new ages (list or
    None), surprise list as reported, scene cut bool). ``ref`` is the stored reference (EMA, or
    last computed embeddings); ``ages`` a list of ints or None. ``replay`` = (active, cut) takes
    that decision instead of deciding (a float64 run following a float32 one)."""
    h = patches.to(ref.dtype)
    n = h.shape[0]
    raw = []
    for i in range(n):
        dot = torch.dot(h[i], ref[i]).item()
        den = max(h[i].norm().item(), EPS) * max(ref[i].norm().item(), EPS)
        raw.append(1.0 - dot / den)
    # A scene cut counts the patches over the threshold before any normalisation.
    cut = False
    if scene_cut is not None:
        passing = sum(1 for i in range(n) if f32(raw[i]) > threshold)
        cut = passing > scene_cut * n
    if motion_norm:
        mean = sum(raw) / n
        score = [raw[i] - mean for i in range(n)]
    else:
        score = list(raw)
    score = [f32(x) for x in score]
    if replay is not None:
        active, cut = [bool(a) for a in replay[0]], bool(replay[1])
    elif cut:
        active = [True] * n
    else:
        stale = [max_staleness is not None and ages[i] >= max_staleness for i in range(n)]
        if threshold is None:
            candidates = n
        else:
            candidates = sum(1 for i in range(n) if stale[i] or score[i] > threshold)
        k = max(candidates, min(floor_tokens, n))
        if budget is not None:
            cap = budget if isinstance(budget, int) else max(1, int(budget * n + 0.5))
            k = min(k, cap, n)
        # Stale patches first (older first), then the most surprising, then the lowest index.
        ranked = sorted(range(n), key=lambda i: (0 if stale[i] else 1, -ages[i] if stale[i] else 0, -score[i], i))
        active = [False] * n
        for i in ranked[:k]:
            active[i] = True
    new_ref = ref.clone()
    for i in range(n):
        if cut or (reference == "computed" and active[i]):
            new_ref[i] = h[i]
        elif reference == "ema":
            new_ref[i] = (1.0 - ema_decay) * ref[i] + ema_decay * h[i]
    new_ages = None
    if max_staleness is not None:
        new_ages = start_ages(n, max_staleness) if cut else [0 if active[i] else ages[i] + 1 for i in range(n)]
    return torch.tensor(active), new_ref, new_ages, score, cut


def gate_stream(embeddings, threshold, ema_decay, floor_tokens, **options):
    """The gate alone over one stream's layer-0 patch embeddings ``[F, N, D]``: one dict per frame
    with active, ref, ages, surprise (None on the first frame) and cut."""
    out = []
    ref = ages = None
    for t in range(embeddings.shape[0]):
        h = embeddings[t]
        if ref is None:
            ref = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32).clone()
            n = h.shape[0]
            ages = start_ages(n, options["max_staleness"]) if options.get("max_staleness") else None
            out.append({"active": torch.ones(n, dtype=torch.bool), "ref": ref.clone(), "ages": ages,
                        "surprise": None, "cut": False})
            continue
        active, ref, ages, surprise, cut = options_step(h, ref, ages, threshold, ema_decay, floor_tokens, **options)
        out.append({"active": active, "ref": ref.clone(), "ages": ages, "surprise": surprise, "cut": cut})
    return out


def run_stream(model, frames, arch, threshold, ema_decay, floor_tokens, cls_context=True, masks=None, cuts=None,
               kv_layers=None, probe_layers=0, layer_threshold=None, keyframes=(), layer_keeps=None, **options):
    """Run one stream's frames ``[F, 3, H, W]``; returns one dict per frame.

    ``options`` are the gate options (reference, max_staleness, budget, motion_norm, scene_cut);
    with any of them the frame's gate is :func:`options_step` (``cuts``: the replayed scene cuts).
    ``kv_layers`` (KV only): indices of the layers that see every token; the others see the
    computed tokens only (None: every layer).
    ``probe_layers`` (KV only): the first l layers run on every token of every frame and the gate
    decides on their output's patch rows (the input to layer l); the KV rule then applies from
    layer l on (its layers below l are the dense ones).
    ``layer_threshold`` (KV only): at each layer that sees every token, a computed patch goes on
    only while its key moved by more than this (``1 - cos`` against its key when that layer last
    computed it); prefix tokens, first frames and the frames in ``keyframes`` always go on.
    ``layer_keeps`` replays given per-layer decisions (a float64 run following a float32 one).

    ``masks`` (list of ``[N]`` bool) replays given gate decisions instead of deciding, so a
    float64 run can follow exactly the decisions of a float32 run.
    """
    p = num_prefix(model)
    layers = layers_of(model)
    ema_dtype = torch.float64 if frames.dtype == torch.float64 else torch.float32
    ema = cache = context = anchors = inputs = ages = None
    results = []
    for t in range(frames.shape[0]):
        emb = embed(model, frames[t : t + 1])[0]  # [T, D]
        probed = encoder_input(model, emb[None])
        for layer in layers[:probe_layers]:
            probed = run_layer(layer, probed)  # the dense probe: every token, no cache
        patches = probed[0, p:] if probe_layers else emb[p:]
        cut = False
        if ema is None:
            active = torch.ones(patches.shape[0], dtype=torch.bool)
            ema = patches.to(ema_dtype).clone()
            if options.get("max_staleness"):
                ages = start_ages(patches.shape[0], options["max_staleness"])
        elif options:
            replay = None if masks is None else (masks[t], cuts[t] if cuts is not None else False)
            active, ema, ages, _, cut = options_step(patches, ema, ages, threshold, ema_decay, floor_tokens,
                                                     replay=replay, **options)
        else:
            active, ema = gate_step(patches, ema, threshold, ema_decay, floor_tokens)
        if masks is not None:
            active = masks[t]
        idx = list(range(p)) + [p + i for i in range(patches.shape[0]) if active[i]]
        x = probed if probe_layers else encoder_input(model, emb[None])  # [1, T, D]
        if arch == "B":
            sub = x[:, idx]
            for layer in layers:
                sub = run_layer(layer, sub)
            seq, pooled = readout(model, sub)
        elif arch == "KV":
            # Every layer sees every token, inactive ones frozen at the input they had when last
            # active: the unmodified layer on the whole cached input, keeping the computed rows.
            cache = torch.zeros_like(x) if cache is None else cache
            inputs = [torch.zeros_like(x) for _ in layers] if inputs is None else inputs
            sub = x[:, idx]
            keeps = {}
            token_layers = x.shape[1] * probe_layers
            for l, (layer, layer_inputs) in enumerate(zip(layers, inputs)):
                if l < probe_layers:
                    continue  # x holds their output already
                token_layers += len(idx)  # tokens entering the layer (a dropped one computed its key)
                if kv_layers is not None and l not in kv_layers:
                    sub = run_layer(layer, sub)  # this layer keeps no context: computed tokens only
                    continue
                if layer_threshold is not None:
                    if layer_keeps is not None:
                        keep = layer_keeps[t][l]
                    else:
                        new, old = key_of(layer, sub)[0], key_of(layer, layer_inputs[:, idx])[0]
                        moved = [1 - float(torch.dot(a, b) / (a.norm().clamp_min(EPS) * b.norm().clamp_min(EPS)))
                                 for a, b in zip(new, old)]
                        dense_frame = t == 0 or t in keyframes
                        keep = [dense_frame or i < p or m > layer_threshold for i, m in zip(idx, moved)]
                    keeps[l] = keep
                    idx = [i for i, k in zip(idx, keep) if k]
                    sub = sub[:, [j for j, k in enumerate(keep) if k]]
                layer_inputs[:, idx] = sub
                sub = run_layer(layer, layer_inputs)[:, idx]
            cache[:, idx] = sub
            seq, pooled = readout(model, cache)
        elif arch == "C":
            cache = torch.zeros_like(x) if cache is None else cache
            sub = x[:, idx]
            if p > 0 and cls_context:
                for layer in layers[:-1]:
                    sub = run_layer(layer, sub)
                context = torch.zeros_like(x) if context is None else context
                context[:, idx] = sub
                # Running the unmodified last layer on every token and keeping the computed ones
                # is exactly "their queries attend to every token's cached input".
                sub = run_layer(layers[-1], context)[:, idx]
            else:
                for layer in layers:
                    sub = run_layer(layer, sub)
            cache[:, idx] = sub
            seq, pooled = readout(model, cache)
        else:  # A: SigLIP/CLIP layer layout
            anchors = [torch.zeros_like(x[0]) for _ in layers] if anchors is None else anchors
            h = x[0]
            for l, layer in enumerate(layers):
                a = h + layer.self_attn(layer.layer_norm1(h[None]))[0][0]
                out = anchors[l].clone()
                for i in idx:
                    out[i] = a[i] + layer.mlp(layer.layer_norm2(a[i]))
                anchors[l] = out
                h = out
            seq, pooled = readout(model, h[None])
        results.append({"cut": cut, "ages": ages, "active": active, "ema": ema.clone(), "pooled": pooled[0].clone(),
                        "seq": seq[0].clone(), "idx": idx, "probed": probed.clone(),
                        "layer_keeps": keeps if arch == "KV" else None,
                        "token_layers": token_layers if arch == "KV" else None})
    return results
