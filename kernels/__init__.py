"""Triton device code of NeuroFlow, installed as ``neuroflow.kernels``.

This folder holds only ``@triton.jit`` kernels and their launch configurations; launchers,
dispatch and the PyTorch references live in ``neuroflow/``. It is never importable as a top-level
``kernels`` package: that name belongs to the Hugging Face package that transformers imports.

One module per op, named as its launcher (``neuroflow/ops/<op>.py``), its reference
(``neuroflow/reference/<op>.py``), its tests and its benchmark: ``gate``, ``cache_scatter``,
``varlen_attention``.
"""
