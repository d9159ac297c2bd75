"""Triton device code of NeuroFlow, installed as ``neuroflow.kernels``.

This folder holds only ``@triton.jit`` kernels and their launch configurations; launchers,
dispatch and the PyTorch references live in ``neuroflow/``. It is never importable as a top-level
``kernels`` package: that name belongs to the Hugging Face package that transformers imports.

No kernel has landed yet (see "Not built yet" in README.md): the engine runs its PyTorch
reference path everywhere.
"""
