"""NeuroFlow: EMA-gated sparse Vision Transformer inference for video streams.

    decode -> preprocess -> gate (neuroflow.ops.gate) -> encoder (neuroflow.models.encoder)
    -> cache (neuroflow.engine.architectures, neuroflow.engine.streams) -> readout (neuroflow.models.families)
"""

from . import _source_kernels  # noqa: F401  (first: neuroflow.kernels in an uninstalled checkout)
from .ops import library as _library  # noqa: F401  (registers torch.ops.neuroflow.*)
from .engine.compat import NeuroFlowSiglipVisionArchA, NeuroFlowSiglipVisionArchB, NeuroFlowSiglipVisionArchC
from .engine.engine import NeuroFlow, NeuroFlowOutput
from .models.hf_attention import ATTENTION_NAME, packed_segments
from .models.hf_attention import register as register_attention
from .models.families import UnsupportedModelError, VisionAdapter

__version__ = "0.1.0"

# attn_implementation="neuroflow_varlen" works as soon as neuroflow is imported.
register_attention()

__all__ = [
    "ATTENTION_NAME",
    "NeuroFlow",
    "NeuroFlowOutput",
    "NeuroFlowSiglipVisionArchA",
    "NeuroFlowSiglipVisionArchB",
    "NeuroFlowSiglipVisionArchC",
    "UnsupportedModelError",
    "VisionAdapter",
    "packed_segments",
    "register_attention",
    "__version__",
]
