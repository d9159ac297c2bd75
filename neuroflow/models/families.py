"""What NeuroFlow needs from a Hugging Face vision transformer, found once per model.

A :class:`VisionAdapter` wraps a SigLIP / SigLIP 2 (FixRes), CLIP, ViT or DINOv2 vision model and
exposes the pieces of its forward pass as separate steps, so the engine can run them on token
subsets:

    embed (patch embedding + position embedding, prefix tokens)  ->  encoder_input (CLIP's pre-LN)
    -> layers (each split into :class:`LayerParts`)  ->  readout (final norm + pooling)

The adapter never copies or changes a weight: every step calls the model's own modules.
Sub-module names differ between model families and between transformers releases, so each part
is looked up among a short list of known names; a model with none of them is rejected with a
clear error instead of being run wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedModelError(TypeError):
    """The module is not a vision transformer NeuroFlow knows how to split."""


def _first_attr(module: nn.Module, names: tuple[str, ...]):
    for name in names:
        obj = module
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _require_attr(module: nn.Module, names: tuple[str, ...], what: str):
    obj = _first_attr(module, names)
    if obj is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no {what} (looked for {', '.join(names)}); "
            "NeuroFlow supports pre-LN ViT encoder layers of SigLIP, CLIP, ViT and DINOv2."
        )
    return obj


@dataclass
class LayerParts:
    """The modules of one pre-LN encoder layer.

    The layer computes ``x = x + scale1(o(attn(q(n1 x), k(n1 x), v(n1 x))))`` followed by
    ``x = x + scale2(mlp(n2 x))``; ``scale1/2`` are DINOv2's layer scales (identity elsewhere).
    Dropout and drop-path are identities in eval mode, which is the only mode the engine runs.
    """

    norm1: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    scale: float
    norm2: nn.Module
    mlp: nn.Module
    scale1: Callable[[torch.Tensor], torch.Tensor]
    scale2: Callable[[torch.Tensor], torch.Tensor]

    @property
    def head_dim(self) -> int:
        return self.q.out_features // self.num_heads


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _layer_parts(layer: nn.Module) -> LayerParts:
    attn = _require_attr(layer, ("self_attn", "attention"), "attention module")
    q = _require_attr(attn, ("q_proj", "query", "attention.query"), "query projection")
    num_heads = _first_attr(attn, ("num_heads", "num_attention_heads", "attention.num_attention_heads"))
    if num_heads is None:
        raise UnsupportedModelError(f"cannot find the head count of {type(attn).__name__}")
    head_dim = q.out_features // num_heads
    scale = _first_attr(attn, ("scale", "scaling", "attention.scaling"))
    ls1 = getattr(layer, "layer_scale1", None)
    ls2 = getattr(layer, "layer_scale2", None)
    return LayerParts(
        norm1=_require_attr(layer, ("layer_norm1", "layernorm_before", "norm1"), "first layer norm"),
        q=q,
        k=_require_attr(attn, ("k_proj", "key", "attention.key"), "key projection"),
        v=_require_attr(attn, ("v_proj", "value", "attention.value"), "value projection"),
        o=_require_attr(attn, ("out_proj", "o_proj", "output.dense"), "attention output projection"),
        num_heads=int(num_heads),
        scale=float(scale) if scale is not None else head_dim**-0.5,
        norm2=_require_attr(layer, ("layer_norm2", "layernorm_after", "norm2"), "second layer norm"),
        mlp=_require_attr(layer, ("mlp",), "MLP"),
        scale1=ls1 if ls1 is not None else _identity,
        scale2=ls2 if ls2 is not None else _identity,
    )


# Families differ only in their prefix tokens, the norm before the encoder and the readout: one
# row each in FAMILIES, and nothing else in the package branches on the family.
SIGLIP, CLIP, VIT, DINOV2 = "siglip", "clip", "vit", "dinov2"


@dataclass(frozen=True)
class Family:
    """What distinguishes one model family.

    Attributes:
        name: the family's name.
        classes: transformers class names of its vision models.
        cls_embedding: attribute of ``model.embeddings`` holding the CLS token (None: no CLS).
        pre_norm: attribute of the model applied before the first layer (CLIP's pre-LN), or None.
        final_norm: attribute of the model holding the final norm.
        interpolates_by_flag: ``embeddings(x)`` needs ``interpolate_pos_encoding=True`` for other
            grids (DINOv2 always interpolates).
        pooling: ``"map"`` (SigLIP's attention-pooling head over normalised tokens), ``"norm_cls"``
            (CLIP: tokens stay un-normalised, the pooled output is the normalised CLS token),
            ``"pooler"`` (ViT's pooler on the normalised CLS token) or ``"cls"`` (DINOv2: the
            normalised CLS token).
        preprocess: what the family's published checkpoints ship in ``preprocessor_config.json``
            (used by :class:`neuroflow.models.preprocess.Preprocessor` when a checkpoint has none):
            ``mean_std``, ``resize``, ``keep_aspect``, ``crop``, ``resample``.
        sigmoid_scores: zero-shot label scores are independent sigmoids (SigLIP's training loss;
            its text tower also expects ``max_length`` padding), else a softmax over the labels.
    """

    name: str
    classes: tuple[str, ...]
    cls_embedding: str | None
    pre_norm: str | None
    final_norm: str
    interpolates_by_flag: bool
    pooling: str
    preprocess: dict
    sigmoid_scores: bool = False


_IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

# Preprocessing: transformers' SiglipImageProcessor, CLIPImageProcessor, ViTImageProcessor; DINOv2
# checkpoints use BitImageProcessor with ImageNet statistics and a 256 -> 224 crop.
FAMILIES = (
    Family(SIGLIP, ("SiglipVisionModel", "SiglipVisionTransformer"), None, None, "post_layernorm", True, "map",
           dict(mean_std=_IMAGENET_STANDARD, resize=224, keep_aspect=False, crop=224, resample="bicubic"),
           sigmoid_scores=True),
    Family(CLIP, ("CLIPVisionModel", "CLIPVisionTransformer"), "class_embedding", "pre_layrnorm", "post_layernorm",
           True, "norm_cls", dict(mean_std=_OPENAI_CLIP, resize=224, keep_aspect=True, crop=224, resample="bicubic")),
    Family(VIT, ("ViTModel",), "cls_token", None, "layernorm", True, "pooler",
           dict(mean_std=_IMAGENET_STANDARD, resize=224, keep_aspect=False, crop=224, resample="bilinear")),
    Family(DINOV2, ("Dinov2Model", "Dinov2WithRegistersModel"), "cls_token", None, "layernorm", False, "cls",
           dict(mean_std=_IMAGENET_DEFAULT, resize=256, keep_aspect=True, crop=224, resample="bicubic")),
)

FAMILY_BY_NAME = {fam.name: fam for fam in FAMILIES}
_FAMILY_BY_CLASS = {cls: fam for fam in FAMILIES for cls in fam.classes}


def _unwrap_vision_tower(model: nn.Module) -> nn.Module:
    """SiglipModel / CLIPModel / CLIPVisionModelWithProjection -> their vision model."""
    seen = 0
    while type(model).__name__ not in _FAMILY_BY_CLASS and hasattr(model, "vision_model") and seen < 3:
        model = model.vision_model
        seen += 1
    return model


class VisionAdapter:
    """Step-by-step access to one Hugging Face vision transformer.

    Attributes:
        model: the vision module whose modules are called (not copied).
        family: one of ``"siglip"``, ``"clip"``, ``"vit"``, ``"dinov2"`` (``spec``: its
            :class:`Family` row).
        patch_size: pixels per patch side.
        num_prefix: tokens before the patch tokens that are always active (CLS and registers;
            0 for SigLIP).
        hidden_size: D.
        layers: one :class:`LayerParts` per encoder layer.
    """

    def __init__(self, model: nn.Module):
        model = _unwrap_vision_tower(model)
        name = type(model).__name__
        if name == "Siglip2VisionModel":
            raise UnsupportedModelError(
                "Siglip2VisionModel (NaFlex) takes pre-cut patches and is not supported yet; "
                "SigLIP 2 FixRes checkpoints load as SiglipVisionModel and are supported."
            )
        if name not in _FAMILY_BY_CLASS:
            raise UnsupportedModelError(
                f"{name} is not a supported vision model; expected one of "
                f"{', '.join(sorted(_FAMILY_BY_CLASS))} (or a SiglipModel/CLIPModel whose "
                "vision tower is one of them)."
            )
        self.model = model
        self.spec = _FAMILY_BY_CLASS[name]
        self.family = self.spec.name
        config = model.config
        patch = config.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.hidden_size = int(config.hidden_size)
        self.num_channels = int(getattr(config, "num_channels", 3))
        self.num_registers = int(getattr(config, "num_register_tokens", 0) or 0)
        has_cls = self.spec.cls_embedding is not None
        self.num_prefix = int(has_cls) + self.num_registers
        layers = _require_attr(model, ("encoder.layers", "encoder.layer", "layers"), "encoder layer list")
        self.layers = [_layer_parts(layer) for layer in layers]
        self.embeddings = model.embeddings
        self.patch_conv = _require_attr(
            model.embeddings, ("patch_embedding", "patch_embeddings.projection"), "patch-embedding convolution"
        )
        self.pre_norm = getattr(model, self.spec.pre_norm, None) if self.spec.pre_norm else None
        self.final_norm = getattr(model, self.spec.final_norm)
        self.head = getattr(model, "head", None) if getattr(model, "use_head", True) else None
        self.pooler = getattr(model, "pooler", None)

    @property
    def has_map_head(self) -> bool:
        """The model pools with SigLIP's attention-pooling (MAP) head (whose keys/values can be
        cached per token)."""
        return self.spec.pooling == "map" and self.head is not None

    @property
    def pools_cls_token(self) -> bool:
        """The pooled output is read from a CLS token (CLIP, ViT, DINOv2)."""
        return self.spec.cls_embedding is not None

    # -- embed ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_conv.weight.device

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Layer-0 embeddings, exactly as the model computes them.

        Args:
            pixel_values: ``[B, C, H, W]`` in the model dtype; H and W multiples of the patch size.
        Returns:
            ``[B, P + N, D]`` model dtype: P prefix tokens (CLS, then registers) followed by the
            N = (H/p)(W/p) patch tokens in row-major order, position embeddings added
            (interpolated as the model does for grids other than its native one).
        """
        if self.spec.interpolates_by_flag:
            return self.embeddings(pixel_values, interpolate_pos_encoding=True)
        return self.embeddings(pixel_values)

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings of the patch tokens for a ``(gh, gw)`` grid: ``[N, D]`` model dtype.

        Calls the model's own ``interpolate_pos_encoding`` (which only reads the shape of its first
        argument), so they are exactly what :meth:`embed` adds.
        """
        gh, gw = grid
        cls_row = int(self.pools_cls_token)  # the table holds the CLS token's row first
        shape_only = torch.empty(1, gh * gw + cls_row, self.hidden_size, dtype=self.dtype, device=self.device)
        pe = self.embeddings.interpolate_pos_encoding(shape_only, gh * self.patch_size, gw * self.patch_size)
        return pe.reshape(-1, self.hidden_size)[cls_row:]

    def prefix_tokens(self, grid: tuple[int, int]) -> torch.Tensor:
        """Layer-0 embeddings of the prefix tokens: ``[P, D]`` model dtype (CLS + its position
        embedding, then registers, which carry none); ``[0, D]`` for SigLIP."""
        if not self.pools_cls_token:
            return self.patch_conv.weight.new_zeros(0, self.hidden_size)
        gh, gw = grid
        shape_only = torch.empty(1, gh * gw + 1, self.hidden_size, dtype=self.dtype, device=self.device)
        pe_cls = self.embeddings.interpolate_pos_encoding(shape_only, gh * self.patch_size, gw * self.patch_size)
        pe_cls = pe_cls.reshape(-1, self.hidden_size)[0]
        cls = getattr(self.embeddings, self.spec.cls_embedding).reshape(-1)
        tokens = [(cls + pe_cls)[None]]
        if self.num_registers:
            tokens.append(self.embeddings.register_tokens.reshape(self.num_registers, self.hidden_size))
        return torch.cat(tokens).to(self.dtype)

    def encoder_input(self, h: torch.Tensor) -> torch.Tensor:
        """Per-token transform between the embeddings and the first layer (CLIP's pre-LN)."""
        return self.pre_norm(h) if self.pre_norm is not None else h

    # -- readout -------------------------------------------------------------------------------
    def readout(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final norm and pooling, with the meaning of the model's own outputs.

        Args:
            z: ``[B, T, D]`` last encoder layer outputs (before the final norm), prefix first.
        Returns:
            ``(last_hidden_state [B, T, D], pooler_output [B, D_out] or None)`` like the model:
            SigLIP normalises every token and pools with its MAP head; CLIP returns the
            un-normalised tokens and normalises the CLS token; ViT and DINOv2 normalise every
            token and pool the CLS token (ViT through its pooler when it has one).
        """
        pooling = self.spec.pooling
        if pooling == "norm_cls":
            return z, self.final_norm(z[:, 0])
        seq = self.final_norm(z)
        if pooling == "map":
            return seq, self.head(seq) if self.head is not None else None
        if pooling == "pooler":
            return seq, self.pooler(seq) if self.pooler is not None else None
        return seq, seq[:, 0]

    def readout_packed(self, z: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`readout` for B streams whose tokens are packed: ``z`` ``[T, D]`` in segments
        ``cu_seqlens`` (int32 ``[B + 1]``, prefix tokens first in each). Returns ``(tokens [T, D],
        pooler_output [B, D_out] or None)``; SigLIP's head attends within each segment only.
        An empty segment (a frame the frame policy skipped) gets an unspecified pooled row."""
        # Clamped: an empty last segment starts at the row count (its pooled row is discarded).
        first = cu_seqlens[:-1].long().clamp_max(max(z.shape[0] - 1, 0))
        pooling = self.spec.pooling
        if pooling == "norm_cls":
            return z, self.final_norm(z[first])
        seq = self.final_norm(z)
        if pooling == "map":
            return seq, self._map_head_packed(seq, cu_seqlens, max_seqlen) if self.head is not None else None
        if pooling == "pooler":
            return seq, self.pooler(seq[first][:, None]) if self.pooler is not None else None
        return seq, seq[first]

    def _map_head_packed(self, seq: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """SigLIP's attention-pooling head (one learned probe query per stream) on packed tokens."""
        k, v = self.head_kv(seq)
        return self._map_head_attend(k, v, cu_seqlens, max_seqlen, None)

    def head_kv(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of SigLIP's pooling head for normalised tokens ``[T, D]`` -> 2 x ``[T, D]``.
        Token-wise, so they can be cached per token and recomputed only for fresh tokens."""
        mha = self.head.attention
        d = self.hidden_size
        _, wk, wv = mha.in_proj_weight.split(d)
        _, bk, bv = mha.in_proj_bias.split(d) if mha.in_proj_bias is not None else (None, None, None)
        return F.linear(seq, wk, bk), F.linear(seq, wv, bv)

    def map_head_cached(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """SigLIP's pooling head over every token of B streams from cached keys/values.

        Args:
            k_cache, v_cache: ``[S, T, D]`` head keys/values of every token (see :meth:`head_kv`).
            slot: ``[B]`` int64 rows of the streams.
        Returns: ``[B, D]``.
        """
        t = k_cache.shape[1]
        b = slot.shape[0]
        cu_k = torch.arange(b + 1, dtype=torch.int32, device=slot.device) * t
        return self._map_head_attend(k_cache.view(-1, self.hidden_size), v_cache.view(-1, self.hidden_size),
                                     cu_k, t, slot * t)

    def _map_head_attend(self, k, v, cu_k, max_k, kv_start) -> torch.Tensor:
        from ..ops.varlen_attention import varlen_attention

        head = self.head
        mha = head.attention
        d, h = self.hidden_size, mha.num_heads
        b = cu_k.shape[0] - 1
        wq = mha.in_proj_weight[:d]
        bq = mha.in_proj_bias[:d] if mha.in_proj_bias is not None else None
        q = F.linear(head.probe.reshape(1, d), wq, bq).expand(b, d).reshape(b, h, d // h).contiguous()
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=k.device)
        o = varlen_attention(q, k.view(-1, h, d // h), v.view(-1, h, d // h), cu_q, cu_k, 1, max_k,
                             kv_start=kv_start)
        pooled = mha.out_proj(o.to(k.dtype).reshape(b, d))
        return pooled + head.mlp(head.layernorm(pooled))


# -- the two halves of a pre-LN layer on dense [B, T, D] batches (Architecture A) ------------------

def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def attention_block(parts: LayerParts, x: torch.Tensor) -> torch.Tensor:
    """``x + scale1(attention(norm1 x))`` over all tokens of each batch row: ``[B, T, D] -> [B, T, D]``."""
    nx = parts.norm1(x)
    q, k, v = (_heads(proj(nx), parts.num_heads) for proj in (parts.q, parts.k, parts.v))
    o = F.scaled_dot_product_attention(q, k, v, scale=parts.scale).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return x + parts.scale1(parts.o(o))


def mlp_block(parts: LayerParts, x: torch.Tensor) -> torch.Tensor:
    """``x + scale2(mlp(norm2 x))`` for ``x`` ``[..., D]`` (token-wise, any subset)."""
    return x + parts.scale2(parts.mlp(parts.norm2(x)))
