"""Language-model ablation: does "skip what did not change" transfer to autoregressive decoding?

    attach_bypass(model, gate_layer=G, cache_layers=C, threshold=theta, mode=...)   (neuroflow.llm.bypass)
    run_ablation(model_path, ...) / run_ablation_on_model(model, tokenizer, ...)    (neuroflow.llm.ablation)
    neuroflow llm-ablation --model PATH ...                                         (neuroflow.llm.cli)

During greedy decoding a gate at layer G compares its attention output with the previous step's
(cosine); where it is at least theta, each cache layer C reuses its cached attention output.
"""

from .ablation import (
    DEFAULT_PROMPTS,
    format_report,
    greedy_decode,
    run_ablation,
    run_ablation_on_model,
    teacher_forced_nll,
    token_drift,
)
from .bypass import MODES, BypassHandle, BypassStats, attach_bypass, cache_lengths, gate_similarity

__all__ = [
    "DEFAULT_PROMPTS",
    "MODES",
    "BypassHandle",
    "BypassStats",
    "attach_bypass",
    "cache_lengths",
    "format_report",
    "gate_similarity",
    "greedy_decode",
    "run_ablation",
    "run_ablation_on_model",
    "teacher_forced_nll",
    "token_drift",
]
