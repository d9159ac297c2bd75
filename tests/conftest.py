"""Tiny random-weight models of every supported family, and frames to feed them.

Random weights are for correctness only: sparsity and fidelity measured on them say nothing
about quality on real checkpoints.
"""

from __future__ import annotations

import os

# Triton binds a kernel to its interpreter when the kernel's module is imported, so the
# interpreter is switched on before anything can import one. Which path each call takes is
# decided per call from the same variable (neuroflow.ops.dispatch): the `triton_path` fixture turns
# the kernels on, every other test runs the PyTorch reference path.
os.environ["TRITON_INTERPRET"] = "1"

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from neuroflow.ops import dispatch  # noqa: E402
from neuroflow.video.synthetic import static_camera_video  # noqa: E402

PATCH = 8
FAMILIES = ("siglip", "clip", "vit", "dinov2", "dinov2_registers")


def make_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2):
    """A tiny eval-mode vision model: D=48 (2 heads of 24: padded inside the kernels), 8-px patches,
    native 32x32 (4x4 grid)."""
    torch.manual_seed(seed)
    common = dict(hidden_size=48, num_hidden_layers=layers, num_attention_heads=2, image_size=32, patch_size=PATCH)
    if family == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(intermediate_size=96, **common))
    elif family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(intermediate_size=96, **common))
    elif family == "vit":
        model = ViTModel(ViTConfig(intermediate_size=96, **common))
    elif family == "dinov2":
        model = Dinov2Model(Dinov2Config(**common))
    elif family == "dinov2_registers":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **common))
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def dense(model, pixel_values):
    """The unmodified model on full frames (position embeddings interpolated as NeuroFlow does)."""
    if "Dinov2" in type(model).__name__:
        return model(pixel_values)
    return model(pixel_values, interpolate_pos_encoding=True)


def as_double(model):
    return copy.deepcopy(model).double()


def video(num_frames: int = 6, height: int = 40, width: int = 48, seed: int = 0, **kw) -> torch.Tensor:
    """``[F, 3, H, W]`` float32 normalised frames of a synthetic static-camera clip.

    Defaults give a non-square 5x6 patch grid (N = 30, not a power of two).
    """
    return static_camera_video(num_frames, height, width, seed=seed, **kw).normalized()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; bench/gpu_suite.py runs them)")


def pytest_collection_modifyitems(config, items):
    # Every test skipped for want of a GPU is a CUDA test: `pytest -m cuda` selects them all.
    for item in items:
        for mark in item.iter_markers("skipif"):
            if "cuda" in str(mark.kwargs.get("reason", "")).lower() or "gpu" in str(mark.kwargs.get("reason", "")).lower():
                item.add_marker(pytest.mark.cuda)
                break


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(autouse=True)
def _reference_path_by_default(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(dispatch.STRICT_ENV, raising=False)
    dispatch.clear()


@pytest.fixture
def triton_path(monkeypatch):
    """Route CPU tensors through the Triton kernels (interpreter)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.clear()
