"""The language-model ablation's measurements: token drift, perplexity, latency, gate similarities.

Every measurement runs the model twice through the *same* loop, once dense (nothing attached) and
once with :func:`neuroflow.llm.bypass.attach_bypass`, so the two are comparable:

- **Token drift**: greedy decoding for ``steps`` tokens per prompt (batch 1, no stop at EOS so both
  runs have exactly ``steps`` tokens); the share of positions whose tokens differ and the first
  differing step (0-based index into the generated tokens).
- **Perplexity**: teacher-forced over a text file's tokens, one token per forward with the cache
  (each token fed exactly once, the first one included), so the bypass acts token by token as in
  decoding. ``exp(mean NLL)`` over the ``T - 1`` predicted tokens. A one-pass dense forward over the
  same tokens is reported next to it as a check of the loop.
- **Latency**: median wall-clock milliseconds per decode step (= per generated token of each
  sequence) at each batch size, for dense, gate-only (bypass attached with ``threshold=inf``: the
  gate's cost without any reuse) and bypass, alternated over rounds on the same inputs. Prefill and
  warm-up steps are not timed. On a GPU each step is synchronised before the clock is read.
- **Gate similarity**: P10/P50/P90 of the gate's cosine over every gated step of the drift runs.

:func:`run_ablation` loads a local checkpoint; :func:`run_ablation_on_model` takes a model and
tokenizer already in memory. Both return a JSON-ready dict; :func:`format_report` renders it.
"""

from __future__ import annotations

import inspect
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.loading import DTYPES, default_device, resolve_dtype
from .bypass import MODES, attach_bypass, attention_modules, validate_bypass_parameters

DEFAULT_PROMPTS: dict[str, str] = {
    "code": (
        "def merge_sorted(a, b):\n"
        '    """Merge two sorted lists into one sorted list."""\n'
        "    result = []\n"
        "    i = j = 0\n"
        "    while i < len(a) and j < len(b):\n"
    ),
    "json": (
        '{"sensor": "cam-07", "site": "north gate", "readings": [\n'
        '  {"t": "2024-05-01T08:00:00Z", "vehicles": 14, "speed_kmh": 41.5},\n'
        '  {"t": "2024-05-01T08:05:00Z", "vehicles": 17, "speed_kmh": 38.2},\n'
    ),
    "prose": (
        "The old lighthouse keeper climbed the spiral stairs every evening at dusk. "
        "He had done it for forty years, and on the night the storm came"
    ),
}
"""The three default prompt kinds of the paper: code, structured (JSON) and prose."""



# ----------------------------------------------------------------------------------------------
# Loading and inputs


def load_model(model_path: str | Path, device: str | torch.device, dtype: str | torch.dtype):
    """A causal LM and its tokenizer from a local folder (never the hub), in eval mode.

    Raises:
        FileNotFoundError: ``model_path`` is not a folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a folder (only local checkpoints are loaded)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=resolve_dtype(dtype))
    return model.to(device).eval(), tokenizer


def read_prompts_file(path: str | Path) -> dict[str, str]:
    """Prompts from a file: a JSON list of strings or a JSON object ``{name: prompt}``; any other
    content is read as one prompt per non-empty line."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line for line in text.splitlines() if line.strip()]
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        prompts = {str(k): v for k, v in data.items()}
    elif isinstance(data, list) and all(isinstance(v, str) for v in data):
        prompts = {f"prompt-{i + 1}": v for i, v in enumerate(data)}
    else:
        raise ValueError(f"{path}: expected a JSON list of strings, a JSON object of strings, or plain lines")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _named_prompts(prompts: Sequence[str] | dict[str, str] | None) -> dict[str, str]:
    if prompts is None:
        return dict(DEFAULT_PROMPTS)
    if isinstance(prompts, dict):
        named = dict(prompts)
    else:
        named = {f"prompt-{i + 1}": p for i, p in enumerate(prompts)}
    if not named:
        raise ValueError("no prompts given")
    return named


def encode_batch(tokenizer, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise and left-pad prompts.

    Returns:
        ``input_ids`` ``[B, T]`` long and ``attention_mask`` ``[B, T]`` long (0 on padding), on ``device``.
    """
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens")
    width = max(len(ids) for ids in encoded)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


# ----------------------------------------------------------------------------------------------
# The decode loops


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its cache under (``cache`` from transformers 5.2x on,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@dataclass
class DecodeResult:
    tokens: torch.Tensor
    """``[B, steps]`` long: the greedy tokens (the first from the prefill)."""
    step_seconds: list[float]
    """Wall-clock seconds of each decode step after the prefill (``steps - 1`` entries)."""
    logits: list[torch.Tensor] | None
    """If requested: ``steps`` tensors ``[B, V]``, the logits each token was chosen from."""
    cache: object
    """The cache after the last step."""


@torch.inference_mode()
def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    steps: int,
    *,
    return_logits: bool = False,
) -> DecodeResult:
    """Greedy decoding for exactly ``steps`` tokens (no stop at EOS), one token per forward after
    the prefill, with a ``DynamicCache`` and left-padding-aware position ids.

    Args:
        input_ids: ``[B, T]`` long; attention_mask: ``[B, T]`` (0 on left padding) or None.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = input_ids.device
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Pass a mask only when there is padding: without it the model may take its mask-free path,
    # the same for dense and bypass.
    padded = not bool(attention_mask.all())
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = new_cache(model)
    key = _cache_kwarg(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask if padded else None,
        position_ids=positions,
        use_cache=True,
        **{key: cache},
        **extra,
    )
    logits = out.logits[:, -1, :]
    token = logits.argmax(-1)
    tokens, kept_logits, seconds = [token], [logits.float().cpu()] if return_logits else None, []
    mask = attention_mask
    position = positions[:, -1:]
    ones = mask.new_ones(batch, 1)
    for _ in range(steps - 1):
        mask = torch.cat([mask, ones], dim=1)
        position = position + 1
        _sync(device)
        start = time.perf_counter()
        out = model(
            input_ids=token[:, None],
            attention_mask=mask if padded else None,
            position_ids=position,
            use_cache=True,
            **{key: cache},
        )
        logits = out.logits[:, -1, :]
        token = logits.argmax(-1)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        tokens.append(token)
        if return_logits:
            kept_logits.append(logits.float().cpu())
    return DecodeResult(torch.stack(tokens, dim=1), seconds, kept_logits, cache)


@torch.inference_mode()
def teacher_forced_nll(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token, feeding the tokens one forward at a time.

    Each token is fed exactly once (token 0 alone first, on an empty cache), so a bypass attached
    to the model acts at every step from the second on, as in decoding.

    Args:
        token_ids: ``[T]`` long, T >= 2.

    Returns:
        ``[T - 1]`` float64: ``-log p(token[t + 1] | token[: t + 1])``.
    """
    if token_ids.dim() != 1 or token_ids.numel() < 2:
        raise ValueError(f"token_ids must be 1-D with at least 2 tokens, got shape {tuple(token_ids.shape)}")
    device = _model_device(model)
    ids = token_ids.to(device)[None]
    cache = new_cache(model)
    key = _cache_kwarg(model)
    nll = []
    for t in range(ids.shape[1] - 1):
        out = model(
            input_ids=ids[:, t : t + 1],
            position_ids=torch.tensor([[t]], device=device),
            use_cache=True,
            **{key: cache},
        )
        log_probs = out.logits[0, -1].float().log_softmax(-1)
        nll.append(-log_probs[ids[0, t + 1]])
    return torch.stack(nll).double().cpu()


@torch.inference_mode()
def one_pass_nll(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """The same NLL as :func:`teacher_forced_nll` from one dense forward over all tokens (``[T - 1]``
    float64): the reference the token-by-token loop is checked against."""
    device = _model_device(model)
    ids = token_ids.to(device)[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return (-logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]).double().cpu()


# ----------------------------------------------------------------------------------------------
# Metrics


def token_drift(dense: torch.Tensor, bypass: torch.Tensor) -> dict:
    """Aligned comparison of two greedy token sequences of the same length.

    Args:
        dense, bypass: ``[steps]`` long.

    Returns:
        ``steps``, ``differing`` (count), ``differing_share`` (0..1) and ``first_divergence`` (index of
        the first differing step, None if identical).
    """
    if dense.shape != bypass.shape or dense.dim() != 1:
        raise ValueError(f"expected two 1-D token sequences of equal length, got {tuple(dense.shape)} and {tuple(bypass.shape)}")
    differs = (dense.cpu() != bypass.cpu())
    first = int(differs.nonzero()[0, 0]) if differs.any() else None
    n = differs.numel()
    return {
        "steps": n,
        "differing": int(differs.sum()),
        "differing_share": int(differs.sum()) / n if n else 0.0,
        "first_divergence": first,
    }


def similarity_percentiles(values: torch.Tensor) -> dict:
    """``{"count", "p10", "p50", "p90"}`` of a 1-D tensor (linear interpolation); None values if empty."""
    values = values.reshape(-1).double()
    if values.numel() == 0:
        return {"count": 0, "p10": None, "p50": None, "p90": None}
    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"count": values.numel(), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2])}


# ----------------------------------------------------------------------------------------------
# The three measurements


def _bypass_settings(settings: dict, threshold: float | None = None) -> dict:
    s = {k: settings[k] for k in ("gate_layer", "cache_layers", "threshold", "mode")}
    if threshold is not None:
        s["threshold"] = threshold
    return s


def measure_drift(model, tokenizer, prompts: dict[str, str], steps: int, settings: dict) -> dict:
    """Per prompt at batch 1: dense and bypass greedy tokens, drift, bypass rate and similarities."""
    device = _model_device(model)
    rows, all_sims, bypassed, decided = [], [], 0, 0
    for name, prompt in prompts.items():
        input_ids, mask = encode_batch(tokenizer, [prompt], device)
        dense = greedy_decode(model, input_ids, mask, steps)
        with attach_bypass(model, **_bypass_settings(settings)) as handle:
            gated = greedy_decode(model, input_ids, mask, steps)
            stats = handle.stats
        sims = stats.similarities()
        all_sims.append(sims)
        bypassed += stats.bypassed
        decided += stats.decisions
        rows.append({
            "name": name,
            "prompt_tokens": int(input_ids.shape[1]),
            **token_drift(dense.tokens[0], gated.tokens[0]),
            "gated_steps": stats.gated_steps,
            "bypassed": stats.bypassed,
            "bypass_rate": stats.bypass_rate,
            "similarity": similarity_percentiles(sims),
            "dense_text": tokenizer.decode(dense.tokens[0].tolist()),
            "bypass_text": tokenizer.decode(gated.tokens[0].tolist()),
        })
    return {
        "steps": steps,
        "prompts": rows,
        "bypass_rate": bypassed / decided if decided else None,
        "similarity": similarity_percentiles(torch.cat(all_sims) if all_sims else torch.empty(0)),
    }


def measure_perplexity(model, tokenizer, text: str, source: str, max_tokens: int, settings: dict) -> dict:
    """Teacher-forced perplexity, dense and with the bypass, over the first ``max_tokens`` tokens."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{source}: needs at least 2 tokens for perplexity, got {len(ids)}")
    token_ids = torch.tensor(ids, dtype=torch.long)
    dense_nll = teacher_forced_nll(model, token_ids)
    with attach_bypass(model, **_bypass_settings(settings)) as handle:
        bypass_nll = teacher_forced_nll(model, token_ids)
        stats = handle.stats
    dense_ppl = math.exp(dense_nll.mean().item())
    bypass_ppl = math.exp(bypass_nll.mean().item())
    return {
        "source": source,
        "tokens": len(ids),
        "predictions": len(ids) - 1,
        "dense_ppl": dense_ppl,
        "bypass_ppl": bypass_ppl,
        "delta_ppl": bypass_ppl - dense_ppl,
        "dense_ppl_one_pass": math.exp(one_pass_nll(model, token_ids).mean().item()),
        "bypass_rate": stats.bypass_rate,
        "similarity": similarity_percentiles(stats.similarities()),
    }


def _quantile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def measure_latency(
    model, tokenizer, prompts: dict[str, str], batch_sizes: Sequence[int], steps: int, warmup: int, rounds: int,
    settings: dict,
) -> dict:
    """Per-step decode latency at each batch size: dense, gate-only and bypass.

    A batch of B cycles through the prompts (left-padded). Each round runs the three configurations
    once on the same inputs, in an order rotated from round to round so that a slow drift of the
    machine does not favour one of them. Only decode steps after ``warmup`` are timed; the median and
    the P10/P90 spread (milliseconds) are over all timed steps of all rounds. The bypass rate and the
    share of all-bypass steps are over the bypass runs' timed steps.
    """
    device = _model_device(model)
    texts = list(prompts.values())
    kinds = ["dense", "gate_only", "bypass"]
    rows = []
    for batch in batch_sizes:
        if batch < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch}")
        input_ids, mask = encode_batch(tokenizer, [texts[i % len(texts)] for i in range(batch)], device)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        decisions = []
        for r in range(rounds):
            for kind in kinds[r % 3:] + kinds[: r % 3]:
                if kind == "dense":
                    result = greedy_decode(model, input_ids, mask, warmup + steps + 1)
                else:
                    threshold = math.inf if kind == "gate_only" else None
                    with attach_bypass(model, **_bypass_settings(settings, threshold)) as handle:
                        result = greedy_decode(model, input_ids, mask, warmup + steps + 1)
                        if kind == "bypass":
                            decisions.append(handle.stats.decisions_per_step()[warmup:])
                times[kind].extend(result.step_seconds[warmup:])
        timed = torch.cat(decisions) if decisions else torch.empty(0, batch, dtype=torch.bool)
        ms = {k: 1000.0 * statistics.median(v) for k, v in times.items()}
        row = {"batch_size": batch}
        for kind in kinds:
            row[f"{kind}_ms"] = ms[kind]
            row[f"{kind}_ms_p10"] = 1000.0 * _quantile(times[kind], 0.1)
            row[f"{kind}_ms_p90"] = 1000.0 * _quantile(times[kind], 0.9)
        row.update({
            "dense_over_bypass": ms["dense"] / ms["bypass"],
            "dense_tokens_per_s": 1000.0 * batch / ms["dense"],
            "bypass_tokens_per_s": 1000.0 * batch / ms["bypass"],
            "bypass_rate": float(timed.float().mean()) if timed.numel() else None,
            "all_bypass_share": float(timed.all(dim=1).float().mean()) if timed.numel() else None,
        })
        rows.append(row)
    return {"timed_steps": steps, "warmup_steps": warmup, "rounds": rounds, "batches": rows}


# ----------------------------------------------------------------------------------------------
# The API


def _environment(model: nn.Module) -> dict:
    import transformers

    device = _model_device(model)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {
        "device": str(device),
        "device_name": name,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


def _model_summary(model: nn.Module, path: str | None) -> dict:
    config = model.config
    return {
        "path": path,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "layers": len(attention_modules(model)),
        "hidden_size": getattr(config, "hidden_size", None),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run_ablation_on_model(
    model: nn.Module,
    tokenizer,
    *,
    gate_layer: int,
    cache_layers: int | Sequence[int],
    threshold: float,
    mode: str = "kv-consistent",
    prompts: Sequence[str] | dict[str, str] | None = None,
    steps: int = 128,
    ppl_file: str | Path | None = None,
    ppl_max_tokens: int = 2000,
    batch_sizes: Sequence[int] = (1, 4, 16),
    latency_steps: int = 32,
    latency_warmup: int = 4,
    latency_rounds: int = 3,
    model_path: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the whole ablation on a model in memory. See :func:`run_ablation` for the arguments.

    The model must not have a bypass attached; it is attached and detached around each run.
    """
    cache_layers = (cache_layers,) if isinstance(cache_layers, int) else tuple(cache_layers)
    validate_bypass_parameters(len(attention_modules(model)), gate_layer, cache_layers, threshold, mode)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if latency_steps < 1 or latency_warmup < 0 or latency_rounds < 1:
        raise ValueError("latency_steps and latency_rounds must be >= 1 and latency_warmup >= 0")
    if ppl_max_tokens < 2:
        raise ValueError(f"ppl_max_tokens must be >= 2, got {ppl_max_tokens}")
    ppl_text = Path(ppl_file).read_text(encoding="utf-8") if ppl_file is not None else None
    named = _named_prompts(prompts)
    say = progress or (lambda message: None)
    model.eval()
    settings = {"gate_layer": gate_layer, "cache_layers": cache_layers, "threshold": threshold, "mode": mode}

    say(f"token drift: {len(named)} prompt(s) x {steps} steps, dense and bypass")
    drift = measure_drift(model, tokenizer, named, steps, settings)
    perplexity = None
    if ppl_text is not None:
        say(f"perplexity: {ppl_file}, up to {ppl_max_tokens} tokens, dense and bypass")
        perplexity = measure_perplexity(model, tokenizer, ppl_text, str(ppl_file), ppl_max_tokens, settings)
    latency = None
    if batch_sizes:
        say(f"latency: batch sizes {list(batch_sizes)}, {latency_steps} timed steps x {latency_rounds} rounds")
        latency = measure_latency(
            model, tokenizer, named, batch_sizes, latency_steps, latency_warmup, latency_rounds, settings
        )
    return {
        "model": _model_summary(model, model_path),
        "environment": _environment(model),
        "settings": {
            "gate_layer": gate_layer,
            "cache_layers": list(cache_layers),
            "threshold": threshold if math.isfinite(threshold) else "inf",
            "mode": mode,
            "steps": steps,
            "ppl_max_tokens": ppl_max_tokens,
            "batch_sizes": list(batch_sizes),
        },
        "drift": drift,
        "perplexity": perplexity,
        "latency": latency,
    }


def run_ablation(
    model_path: str | Path,
    *,
    gate_layer: int,
    cache_layers: int | Sequence[int],
    threshold: float,
    mode: str = "kv-consistent",
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
    **kwargs,
) -> dict:
    """Load a local causal LM and run the ablation: drift, perplexity, latency, gate similarities.

    Args:
        model_path: local folder with the model and its tokenizer (``local_files_only``).
        gate_layer, cache_layers, threshold, mode: the bypass (see :func:`attach_bypass`).
        device: default ``"cuda"`` if available, else ``"cpu"``. dtype: float32, float16, bfloat16.
        prompts: list of prompts or ``{name: prompt}``; default: code, JSON and prose prompts.
        steps: greedy tokens per prompt for the drift (default 128).
        ppl_file: text file for perplexity (skipped when None); ppl_max_tokens: first N tokens (2000).
        batch_sizes: latency batch sizes (default 1, 4, 16; empty: skip latency);
        latency_steps, latency_warmup, latency_rounds: timed steps, untimed steps, alternations.
        progress: called with one-line progress messages.

    Returns:
        The report dict (JSON-ready; see :func:`format_report`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model, tokenizer = load_model(model_path, device or default_device(), dtype)
    return run_ablation_on_model(
        model, tokenizer, gate_layer=gate_layer, cache_layers=cache_layers, threshold=threshold, mode=mode,
        model_path=str(model_path), **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# Rendering


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The report as plain-text tables."""
    m, env, s = report["model"], report["environment"], report["settings"]
    out = [
        (f"model: {m['path'] or m['model_type']} ({m['model_type']}, {m['layers']} layers, "
         f"hidden {m['hidden_size']}, {m['parameters']:,} parameters)"),
        (f"device: {env['device']} [{env['device_name']}], {env['dtype']}, attention {env['attn_implementation']}, "
         f"torch {env['torch']}, transformers {env['transformers']}"),
        (f"bypass: gate layer {s['gate_layer']}, cache layer(s) {', '.join(map(str, s['cache_layers']))}, "
         f"threshold {s['threshold']}, mode {s['mode']}"),
        "",
    ]
    d = report["drift"]
    out.append(f"Token drift: greedy, {d['steps']} tokens per prompt, batch 1, dense vs bypass")
    out.append(_table(
        ["prompt", "tokens in", "bypass rate", "drift", "first divergence", "sim P10", "sim P50", "sim P90"],
        [[r["name"], str(r["prompt_tokens"]), _pct(r["bypass_rate"]), _pct(r["differing_share"]),
          "-" if r["first_divergence"] is None else f"step {r['first_divergence']}",
          _num(r["similarity"]["p10"]), _num(r["similarity"]["p50"]), _num(r["similarity"]["p90"])]
         for r in d["prompts"]],
    ))
    sim = d["similarity"]
    out.append(
        f"gate similarity, all prompts ({sim['count']} gated sequence-steps): P10 {_num(sim['p10'])}, "
        f"P50 {_num(sim['p50'])}, P90 {_num(sim['p90'])}; bypass rate {_pct(d['bypass_rate'])}"
    )
    out.append("")
    p = report["perplexity"]
    if p is None:
        out.append("Perplexity: skipped (no --ppl-file)")
    else:
        out.append(f"Perplexity: teacher-forced, {p['source']}, {p['tokens']} tokens (each fed once), one token per step")
        out.append(_table(
            ["dense PPL", "bypass PPL", "delta", "bypass rate", "dense PPL (one pass, check)"],
            [[_num(p["dense_ppl"], ".4f"), _num(p["bypass_ppl"], ".4f"), _num(p["delta_ppl"], "+.4f"),
              _pct(p["bypass_rate"]), _num(p["dense_ppl_one_pass"], ".4f")]],
        ))
    out.append("")
    lat = report["latency"]
    if lat is None:
        out.append("Decode latency: skipped (no batch sizes)")
    else:
        out.append(
            f"Decode latency: median ms per decode step (= per token of each sequence), {env['device']} "
            f"[{env['device_name']}], {env['dtype']}; {lat['timed_steps']} timed steps x {lat['rounds']} rounds "
            f"after {lat['warmup_steps']} warm-up, prefill not timed"
        )
        def cell(r, kind):
            return f"{r[kind + '_ms']:.3f} ({r[kind + '_ms_p10']:.3f}-{r[kind + '_ms_p90']:.3f})"

        out.append(_table(
            ["batch", "dense ms (P10-P90)", "gate-only ms (P10-P90)", "bypass ms (P10-P90)", "dense/bypass",
             "bypass rate", "all-bypass steps", "bypass tok/s"],
            [[str(r["batch_size"]), cell(r, "dense"), cell(r, "gate_only"), cell(r, "bypass"),
              _num(r["dense_over_bypass"], ".3f") + "x", _pct(r["bypass_rate"]), _pct(r["all_bypass_share"]),
              _num(r["bypass_tokens_per_s"], ".1f")] for r in lat["batches"]],
        ))
        out.append(
            "gate-only = bypass attached with threshold inf (the gate's cost, no reuse). In a batch, layer C's "
            "work is skipped only on all-bypass steps; on mixed steps it computes for the whole batch. "
            "A wide P10-P90 spread means a noisy machine: compare medians only when the spreads are narrow."
        )
    return "\n".join(out)
