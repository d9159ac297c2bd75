"""Which of the student's parameters train: all of the vision tower, its head, or head + last K layers.

The *head* is what reads the encoder's output: the final norm and the pooling (SigLIP's MAP head,
ViT's pooler). Encoder layers are found by their parameter names (``...layers.<i>.`` in SigLIP and
CLIP, ``...layer.<i>.`` in ViT and DINOv2). Parameters outside the vision tower (a full
SiglipModel's or CLIPModel's text tower) never train.
"""

from __future__ import annotations

import re

from torch import nn

from ..models.families import VisionAdapter
from .config import DistillError, parse_train

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Encoder layer index of a vision-tower parameter name, None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def select_trainable(model: nn.Module, adapter: VisionAdapter, spec: str) -> list[tuple[str, nn.Parameter]]:
    """Freeze every parameter of ``model``, then unfreeze the ones ``spec`` names.

    Args:
        model: the whole student (a vision model, or a full model whose vision tower is
            ``adapter.model``).
        adapter: the student's adapter.
        spec: ``"all"``, ``"head"`` or ``"head+K"``.
    Returns:
        ``(name, parameter)`` of the trainable ones, names relative to the vision tower, in
        the tower's parameter order.
    Raises:
        DistillError: K larger than the layer count, or layer names this module cannot read.
    """
    kind, last = parse_train(spec)
    vision = adapter.model
    num_layers = len(adapter.layers)
    named = list(vision.named_parameters())
    found = {layer_of(n) for n, _ in named} - {None}
    if found != set(range(num_layers)):
        raise DistillError(f"cannot tell the encoder layers of {type(vision).__name__} apart by parameter name "
                           f"(found layer indices {sorted(found)}, expected 0..{num_layers - 1})")
    if last > num_layers:
        raise DistillError(f"train 'head+{last}': the model has only {num_layers} encoder layers")
    head_ids = set()
    for module in (adapter.final_norm, adapter.head, adapter.pooler):
        if module is not None:
            head_ids.update(id(p) for p in module.parameters())
    chosen = []
    for name, p in named:
        layer = layer_of(name)
        if kind == "all" or id(p) in head_ids or (layer is not None and layer >= num_layers - last):
            chosen.append((name, p))
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in chosen:
        p.requires_grad_(True)
    return chosen
