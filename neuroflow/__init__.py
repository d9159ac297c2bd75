"""NeuroFlow: EMA-gated sparse Vision Transformer inference for video streams.

    decode -> preprocess -> gate (neuroflow.gate) -> encoder (neuroflow.encoder)
    -> cache (neuroflow.architectures, neuroflow.streams) -> readout (neuroflow.models)
"""

from .compat import NeuroFlowSiglipVisionArchA, NeuroFlowSiglipVisionArchB, NeuroFlowSiglipVisionArchC
from .engine import NeuroFlow, NeuroFlowOutput
from .models import UnsupportedModelError, VisionAdapter

__version__ = "0.1.0"

__all__ = [
    "NeuroFlow",
    "NeuroFlowOutput",
    "NeuroFlowSiglipVisionArchA",
    "NeuroFlowSiglipVisionArchB",
    "NeuroFlowSiglipVisionArchC",
    "UnsupportedModelError",
    "VisionAdapter",
    "__version__",
]
