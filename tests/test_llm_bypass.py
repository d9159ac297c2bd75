"""The language-model bypass (neuroflow.llm) on tiny random-weight Llama and Phi-3 models, CPU only.

Random weights are for correctness only: drift, bypass rates and perplexities measured on them say
nothing about real checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from neuroflow.cli import main as neuroflow_main
from neuroflow.llm import (
    DEFAULT_PROMPTS,
    attach_bypass,
    cache_lengths,
    greedy_decode,
    run_ablation_on_model,
    teacher_forced_nll,
    token_drift,
)
from neuroflow.llm.ablation import _cache_kwarg, new_cache, one_pass_nll
from neuroflow.tooling.testing import assert_close

VOCAB = 160
FAMILIES = ("llama", "phi3")


def make_lm(family: str, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny eval-mode causal LM: hidden 64, 4 heads of 16 (2 key/value heads), vocab 160."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Phi3ForCausalLM(Phi3Config(**common))
    return model.eval()


def random_batch(batch: int = 2, length: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` token ids and a mask with left padding on every row but the last."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch - 1):
        mask[row, : row + 1] = 0
        ids[row, : row + 1] = 0
    return ids, mask


@torch.inference_mode()
def forced_logits(model, ids: torch.Tensor, mask: torch.Tensor, prefill: int):
    """Prefill ``ids[:, :prefill]``, then feed the remaining columns one per forward (teacher forcing).

    Returns ``([steps, B, V]`` float32 logits of the fed steps, the cache).
    """
    cache = new_cache(model)
    by_name = {_cache_kwarg(model): cache}  # ``cache`` (transformers 5.24) or ``past_key_values`` (5.17)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    padded = not bool(mask.all())
    model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill] if padded else None,
          position_ids=positions[:, :prefill], use_cache=True, **by_name)
    logits = []
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1] if padded else None,
                    position_ids=positions[:, t : t + 1], use_cache=True, **by_name)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits), cache


# ----------------------------------------------------------------------------------------------
# Exactness with a gate that never opens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["kv-consistent", "skip-all"])
def test_threshold_above_one_reproduces_dense_bitwise(family, mode):
    model = make_lm(family)
    ids, mask = random_batch(batch=3)
    dense = greedy_decode(model, ids, mask, steps=12, return_logits=True)
    tokens = torch.arange(3, 40)
    dense_nll = teacher_forced_nll(model, tokens)
    with attach_bypass(model, gate_layer=1, cache_layers=(2, 3), threshold=math.inf, mode=mode) as handle:
        gated = greedy_decode(model, ids, mask, steps=12, return_logits=True)
        assert handle.stats.gated_steps == 11 and handle.stats.decisions == 33
        assert handle.stats.bypassed == 0
        # The gate still measured every step's similarity.
        assert handle.stats.similarities().numel() == 33
        gated_nll = teacher_forced_nll(model, tokens)
    assert torch.equal(dense.tokens, gated.tokens)
    for a, b in zip(dense.logits, gated.logits):
        assert torch.equal(a, b)
    assert torch.equal(dense_nll, gated_nll)
    assert len(set(cache_lengths(gated.cache))) == 1


# ----------------------------------------------------------------------------------------------
# Cache bookkeeping of the two modes


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_consistent_keeps_caches_aligned_and_writes_dense_keys_values(family):
    model = make_lm(family)
    ids, mask = random_batch(batch=2, length=14)
    dense_logits, dense_cache = forced_logits(model, ids, mask, prefill=5)
    cache_layer = 2
    with attach_bypass(model, gate_layer=0, cache_layers=cache_layer, threshold=-1.0, mode="kv-consistent") as handle:
        bypass_logits, bypass_cache = forced_logits(model, ids, mask, prefill=5)
        stats = handle.stats
    # threshold -1: every decode step bypasses.
    assert stats.gated_steps == 9 and stats.all_bypass_steps == 9 and stats.bypass_rate == 1.0
    lengths = cache_lengths(bypass_cache)
    assert lengths == [14] * 4
    # Layers up to C never see C's output and layer C's input does not depend on it, so with the same
    # tokens their keys and values are bit-for-bit the dense ones: layer C still wrote its own.
    for layer in range(cache_layer + 1):
        assert torch.equal(bypass_cache.layers[layer].keys, dense_cache.layers[layer].keys), layer
        assert torch.equal(bypass_cache.layers[layer].values, dense_cache.layers[layer].values), layer
    # ...while the layers after C and the logits did change: the bypass was active.
    assert not torch.equal(bypass_cache.layers[3].keys, dense_cache.layers[3].keys)
    assert not torch.equal(bypass_logits, dense_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_all_leaves_a_detectable_cache_hole(family):
    model = make_lm(family)
    ids, _ = random_batch(batch=1, length=5)
    with attach_bypass(model, gate_layer=1, cache_layers=(2, 3), threshold=-1.0, mode="skip-all") as handle:
        result = greedy_decode(model, ids, None, steps=9)
        assert handle.missing_positions(2) == handle.missing_positions(3) == 8
        assert handle.masked_positions(2).tolist() == [0]
    # Prefill 5 + 8 decode steps at layers 0 and 1; the cache layers kept only the prefill.
    assert cache_lengths(result.cache) == [13, 13, 5, 5]
    with attach_bypass(model, gate_layer=1, cache_layers=(2, 3), threshold=-1.0, mode="kv-consistent") as handle:
        result = greedy_decode(model, ids, None, steps=9)
        assert handle.missing_positions(2) == 0
    assert cache_lengths(result.cache) == [13] * 4


# ----------------------------------------------------------------------------------------------
# A constructed case: the gate's similarities are known, so the counts and the per-sequence
# decisions are too.

GATE, CACHE = 0, (1, 2)
PAD = 0
BASIS = list(range(10, 16))  # tokens with orthonormal embeddings
OPPOSITE = 16  # embedding = -embedding(10)


def constructed_model(dtype=torch.float32, attn_implementation="sdpa"):
    """Tiny Llama whose layer-0 attention output is its input (the current token's normalised
    embedding), so the gate's cosine between consecutive tokens is 1 for a repeated token, 0 for
    two different basis tokens and -1 for token 10 next to token 16. The real attention still runs
    (and writes layer 0's cache); only its output is replaced."""
    model = make_lm("llama", layers=3, seed=3).to(dtype)
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        q, _ = torch.linalg.qr(torch.randn(emb.shape[1], len(BASIS), generator=torch.Generator().manual_seed(5)))
        for i, token in enumerate(BASIS):
            emb[token] = 8.0 * q[:, i].to(dtype)
        emb[OPPOSITE] = -emb[BASIS[0]]
    attn = model.model.layers[GATE].self_attn
    real = attn.forward

    def identity_attention(hidden_states, **kwargs):
        real(hidden_states=hidden_states, **kwargs)
        return hidden_states, None

    attn.forward = identity_attention
    return model


# Sequence 1 mixes repeats (bypass) and changes (compute); it is one token shorter than the others
# and left-padded in a batch. Sequence 2 alternates opposite embeddings (cosine -1: never bypasses).
# Sequence 3 is sequence 1 with one more token in front: the same decisions, so a batch of 1 and 3
# bypasses as a whole (skip-all: a physical hole under a padded mask).
SEQ1_PREFILL, SEQ1_FED = [10, 11, 11], [12, 12, 12, 13, 14, 14, 10]
SEQ1_DECISIONS = [False, True, True, False, False, True, False]
SEQ1 = [PAD] + SEQ1_PREFILL + SEQ1_FED
SEQ2 = [10, 16, 10, 16, 10, 16, 10, 16, 10, 16, 10]
SEQ3 = [13] + SEQ1_PREFILL + SEQ1_FED
PREFILL = 1 + len(SEQ1_PREFILL)
STEPS = len(SEQ1_FED)
BYPASSES = sum(SEQ1_DECISIONS)


def constructed_batch(second: list[int]):
    """``[2, 11]`` ids (sequence 1 and ``second``) and the mask hiding sequence 1's padding."""
    ids = torch.tensor([SEQ1, second])
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    return ids, mask


def forced_alone(model, seq: list[int]):
    """Teacher-forced logits ``[STEPS, 1, V]`` of one sequence on its own (padding dropped)."""
    ids = torch.tensor([[t for t in seq if t != PAD]])
    return forced_logits(model, ids, torch.ones_like(ids), ids.shape[1] - STEPS)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["kv-consistent", "skip-all"])
def test_bypass_counts_on_a_constructed_case(mode, attn_implementation):
    model = constructed_model(attn_implementation=attn_implementation)
    settings = dict(gate_layer=GATE, cache_layers=CACHE, threshold=0.5, mode=mode)
    hole = BYPASSES if mode == "skip-all" else 0
    with attach_bypass(model, **settings) as handle:
        # Mixed batch: sequence 1 bypasses on its own schedule, sequence 2 never.
        mixed, mixed_cache = forced_logits(model, *constructed_batch(SEQ2), PREFILL)
        stats = handle.stats
        expected = torch.tensor([[d, False] for d in SEQ1_DECISIONS])
        assert torch.equal(stats.decisions_per_step(), expected)
        assert (stats.gated_steps, stats.decisions, stats.bypassed) == (STEPS, 2 * STEPS, BYPASSES)
        assert (stats.all_bypass_steps, stats.mixed_steps) == (0, BYPASSES)
        sims = torch.stack(stats.similarity_log)
        repeated = torch.tensor(SEQ1_DECISIONS)
        assert torch.allclose(sims[repeated, 0], torch.ones(()), atol=1e-5)
        assert torch.allclose(sims[~repeated, 0], torch.zeros(()), atol=1e-5)
        assert torch.allclose(sims[:, 1], -torch.ones(()), atol=1e-5)
        # In a mixed batch the keys/values are written for every sequence (one tensor per layer);
        # skip-all hides the bypassed positions from the sequence that bypassed them.
        assert cache_lengths(mixed_cache) == [len(SEQ1)] * 3
        assert handle.masked_positions(CACHE[0]).tolist() == [hole, 0]

        # Aligned batch: both sequences bypass together, so skip-all leaves a physical hole.
        handle.reset_stats()
        aligned, aligned_cache = forced_logits(model, *constructed_batch(SEQ3), PREFILL)
        assert (handle.stats.all_bypass_steps, handle.stats.mixed_steps) == (BYPASSES, 0)
        assert handle.missing_positions(CACHE[0]) == hole
        assert cache_lengths(aligned_cache) == [len(SEQ1)] + [len(SEQ1) - hole] * 2

        handle.reset_stats()
        alone = {name: forced_alone(model, seq)[0] for name, seq in [("1", SEQ1), ("2", SEQ2), ("3", SEQ3)]}
        assert handle.stats.bypassed == 2 * BYPASSES

    # Each sequence of a batch gets what it gets alone (per-sequence gating, holes included),
    # under the project's tolerance policy: error against a float64 run at most twice the float32
    # single run's.
    reference = constructed_model(torch.float64, attn_implementation)
    with attach_bypass(reference, **settings):
        ref = {name: forced_alone(reference, seq)[0] for name, seq in [("1", SEQ1), ("2", SEQ2), ("3", SEQ3)]}
    for batch, (first, second) in [(mixed, ("1", "2")), (aligned, ("1", "3"))]:
        assert_close(batch[:, 0], ref[first][:, 0], alone[first][:, 0], what=f"sequence {first} in a batch")
        assert_close(batch[:, 1], ref[second][:, 0], alone[second][:, 0], what=f"sequence {second} in a batch")
    # ...and sequence 2, which never bypasses, is the dense model.
    dense2, _ = forced_alone(model, SEQ2)
    assert torch.equal(dense2, alone["2"])


def test_bypass_changes_the_layers_output_only_where_it_reuses():
    """Sequence 1 alone, dense vs bypass: identical logits up to the first bypassed step."""
    model = constructed_model()
    dense, _ = forced_alone(model, SEQ1)
    with attach_bypass(model, gate_layer=GATE, cache_layers=CACHE, threshold=0.5):
        gated, _ = forced_alone(model, SEQ1)
    first = SEQ1_DECISIONS.index(True)
    assert torch.equal(dense[:first], gated[:first])
    assert not torch.equal(dense[first], gated[first])


# ----------------------------------------------------------------------------------------------
# Attach / detach


def test_detach_restores_the_original_forward():
    model = make_lm("llama")
    attn = [layer.self_attn for layer in model.model.layers]
    ids, mask = random_batch()
    before = greedy_decode(model, ids, mask, steps=6, return_logits=True)
    handle = attach_bypass(model, gate_layer=0, cache_layers=[2, 3], threshold=0.3)
    assert all("forward" in attn[i].__dict__ for i in (0, 2, 3)) and "forward" not in attn[1].__dict__
    with pytest.raises(RuntimeError, match="already attached"):
        attach_bypass(model, gate_layer=0, cache_layers=1, threshold=0.3)
    handle.detach()
    handle.detach()  # idempotent
    for module in attn:
        assert "forward" not in module.__dict__
        assert module.forward == type(module).forward.__get__(module)
    after = greedy_decode(model, ids, mask, steps=6, return_logits=True)
    assert torch.equal(before.tokens, after.tokens)
    assert all(torch.equal(a, b) for a, b in zip(before.logits, after.logits))
    # A second bypass can be attached once the first is gone.
    attach_bypass(model, gate_layer=1, cache_layers=2, threshold=0.3).detach()


def test_detach_restores_an_existing_instance_forward_and_refuses_to_clobber():
    model = constructed_model()
    attn = model.model.layers[GATE].self_attn
    scripted = attn.__dict__["forward"]
    handle = attach_bypass(model, gate_layer=GATE, cache_layers=CACHE, threshold=0.5)
    assert attn.forward is not scripted
    handle.detach()
    assert attn.__dict__["forward"] is scripted

    handle = attach_bypass(model, gate_layer=GATE, cache_layers=CACHE, threshold=0.5)
    cache_attn = model.model.layers[CACHE[0]].self_attn
    foreign = cache_attn.forward
    cache_attn.forward = lambda *a, **k: foreign(*a, **k)
    with pytest.raises(RuntimeError, match="replaced after the bypass was attached"):
        handle.detach()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gate_layer=4, cache_layers=2), "gate_layer 4 is out of range"),
        (dict(gate_layer=-1, cache_layers=2), "gate_layer -1 is out of range"),
        (dict(gate_layer=0, cache_layers=4), "cache_layer 4 is out of range"),
        (dict(gate_layer=1, cache_layers=1), "equals the gate layer"),
        (dict(gate_layer=2, cache_layers=1), "comes before gate layer"),
        (dict(gate_layer=0, cache_layers=[2, 2]), "distinct"),
        (dict(gate_layer=0, cache_layers=[]), "at least one cache layer"),
        (dict(gate_layer=0, cache_layers=2, threshold=1.5), "outside \\[-1, 1\\]"),
        (dict(gate_layer=0, cache_layers=2, threshold=-1.01), "outside \\[-1, 1\\]"),
        (dict(gate_layer=0, cache_layers=2, threshold=math.nan), "outside \\[-1, 1\\]"),
        (dict(gate_layer=0, cache_layers=2, mode="skip-kv"), "mode must be one of"),
        (dict(gate_layer=0.0, cache_layers=2), "gate_layer must be an int"),
        (dict(gate_layer=0, cache_layers=[True]), "cache_layer must be an int"),
        (dict(gate_layer=0, cache_layers=2, threshold="0.5"), "threshold must be a number"),
    ],
)
def test_bad_parameters_are_rejected_before_attaching(kwargs, message):
    model = make_lm("llama")
    kwargs = {"threshold": 0.5, **kwargs}
    expected = TypeError if "must be an int" in message or "must be a number" in message else ValueError
    with pytest.raises(expected, match=message):
        attach_bypass(model, **kwargs)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    handle = attach_bypass(model, gate_layer=0, cache_layers=3, threshold=0.5)  # nothing was left attached
    with pytest.raises(ValueError, match="outside \\[-1, 1\\]"):
        handle.threshold = 2.0
    assert handle.threshold == 0.5
    handle.threshold = -0.25
    assert handle.threshold == -0.25
    handle.detach()


# ----------------------------------------------------------------------------------------------
# The measurement loops


def test_greedy_loop_matches_generate_dense_and_with_bypass():
    model = make_lm("llama")
    ids, _ = random_batch(batch=1, length=5)
    steps = 10
    # No EOS: generate would stop (or, with min_new_tokens, suppress it) where our loop does not.
    kwargs = dict(generation_config=GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0))
    dense = greedy_decode(model, ids, None, steps)
    assert torch.equal(model.generate(ids, **kwargs)[:, 5:], dense.tokens)
    # A threshold at the dense run's median similarity gives a schedule of both decisions.
    with attach_bypass(model, gate_layer=1, cache_layers=3, threshold=math.inf) as handle:
        greedy_decode(model, ids, None, steps)
        threshold = handle.stats.similarities().median().item()
    with attach_bypass(model, gate_layer=1, cache_layers=3, threshold=threshold) as handle:
        ours = greedy_decode(model, ids, None, steps)
        ours_decisions = handle.stats.decisions_per_step()
        handle.reset_stats()
        theirs = model.generate(ids, **kwargs)[:, 5:]
        assert torch.equal(handle.stats.decisions_per_step(), ours_decisions)
    assert 0 < ours_decisions.sum() < ours_decisions.numel()  # a mixed schedule, not a trivial one
    assert torch.equal(theirs, ours.tokens)


def test_teacher_forced_loop_feeds_each_token_once():
    model = make_lm("phi3")
    tokens = torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(2))
    looped = teacher_forced_nll(model, tokens)
    assert looped.shape == (23,)
    reference = one_pass_nll(copy.deepcopy(model).double(), tokens)
    assert_close(looped, reference, one_pass_nll(model, tokens), what="token-by-token NLL")


def test_token_drift_compares_aligned_positions():
    a = torch.tensor([5, 6, 7, 8, 9])
    assert token_drift(a, a) == {"steps": 5, "differing": 0, "differing_share": 0.0, "first_divergence": None}
    b = torch.tensor([5, 6, 1, 8, 2])
    assert token_drift(a, b) == {"steps": 5, "differing": 2, "differing_share": 0.4, "first_divergence": 2}


def test_run_ablation_on_model_reports_every_measurement(tmp_path):
    model = make_lm("phi3", layers=3)
    tokenizer = word_tokenizer()
    ppl = tmp_path / "text.txt"
    ppl.write_text(PPL_TEXT, encoding="utf-8")
    report = run_ablation_on_model(
        model, tokenizer, gate_layer=0, cache_layers=[1, 2], threshold=0.5, mode="skip-all", steps=7,
        ppl_file=ppl, ppl_max_tokens=30, batch_sizes=[1, 3], latency_steps=3, latency_warmup=1, latency_rounds=1,
    )
    drift = report["drift"]
    assert [r["name"] for r in drift["prompts"]] == list(DEFAULT_PROMPTS)
    for row in drift["prompts"]:
        assert row["steps"] == 7 and row["gated_steps"] == 6
        assert row["bypass_rate"] == row["bypassed"] / 6
    assert drift["similarity"]["count"] == 18
    assert drift["similarity"]["p10"] <= drift["similarity"]["p50"] <= drift["similarity"]["p90"]
    p = report["perplexity"]
    assert p["tokens"] == 30 and p["predictions"] == 29
    assert math.isclose(p["delta_ppl"], p["bypass_ppl"] - p["dense_ppl"])
    assert [r["batch_size"] for r in report["latency"]["batches"]] == [1, 3]
    assert all(r["dense_ms"] > 0 and r["bypass_ms"] > 0 for r in report["latency"]["batches"])
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    json.dumps(report)  # JSON-ready


# ----------------------------------------------------------------------------------------------
# The command line, end to end

PPL_TEXT = (
    "The river rose slowly through the night and by morning the low fields were under water. "
    "Farmers moved their animals to the high ground while the old bridge held against the current."
)


def word_tokenizer():
    """An offline word-level tokenizer over the default prompts and the perplexity text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = pre_tokenizers.Whitespace().pre_tokenize_str(" ".join([*DEFAULT_PROMPTS.values(), PPL_TEXT]))
    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted({w for w, _ in words}))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def test_cli_end_to_end(tmp_path):
    folder = tmp_path / "tiny-llama"
    make_lm("llama", layers=3).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    ppl = tmp_path / "text.txt"
    ppl.write_text(PPL_TEXT, encoding="utf-8")
    out = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "neuroflow.cli", "llm-ablation", "--model", str(folder), "--gate-layer", "0",
        "--cache-layer", "1", "2", "--threshold", "0.6", "--steps", "6", "--ppl-file", str(ppl),
        "--batch-sizes", "1", "4", "--latency-steps", "2", "--latency-warmup", "1", "--latency-rounds", "1",
        "--device", "cpu", "--out", str(out),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["settings"]["cache_layers"] == [1, 2] and report["settings"]["mode"] == "kv-consistent"
    assert [r["name"] for r in report["drift"]["prompts"]] == ["code", "json", "prose"]
    # The BOS token the tokenizer adds is the first token, fed once.
    n_words = len(PPL_TEXT.replace(".", " .").split())
    assert report["perplexity"]["tokens"] == n_words + 1
    assert report["perplexity"]["predictions"] == n_words
    assert [r["batch_size"] for r in report["latency"]["batches"]] == [1, 4]
    assert report["environment"]["device"] == "cpu" and report["environment"]["dtype"] == "float32"
    for heading in ("Token drift", "Perplexity", "Decode latency", "gate similarity"):
        assert heading in done.stdout


def test_cli_rejects_bad_layers_clearly(tmp_path, capsys):
    folder = tmp_path / "tiny-llama"
    make_lm("llama", layers=3).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    code = neuroflow_main(["llm-ablation", "--model", str(folder), "--gate-layer", "1", "--cache-layer", "5",
                           "--threshold", "0.5", "--quiet"])
    assert code == 2
    assert "cache_layer 5 is out of range: the model has 3 layers" in capsys.readouterr().err
    code = neuroflow_main(["llm-ablation", "--model", str(tmp_path / "missing"), "--gate-layer", "0",
                           "--cache-layer", "1", "--threshold", "0.5", "--quiet"])
    assert code == 2
    assert "is not a folder" in capsys.readouterr().err
