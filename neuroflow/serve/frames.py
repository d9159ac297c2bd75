"""Frames as clients send them -> model input, checked one frame at a time.

Accepted frames (HTTP body or handle argument):

- an encoded image, PNG or JPEG bytes: decoded to RGB, then resized and normalised with the
  model's preprocessing (:class:`neuroflow.models.preprocess.Preprocessor`);
- a uint8 ``[H, W, 3]`` RGB array (or ``.npy`` bytes of one): resized and normalised the same way;
- a float ``[C, S, S]`` array of pixel values already preprocessed (or ``.npy`` bytes of one),
  where ``S`` is the served input side and ``C`` the model's channels: used as it is.

Anything else raises :class:`~neuroflow.serve.errors.BadFrame` naming the problem: bytes that
are neither PNG, JPEG nor ``.npy``, an image that does not decode, a uint8 array that is not
``[H, W, 3]``, a pixel array of another size or channel count (the "wrong-size frame"), NaN/Inf,
an image with a side above ``max_side`` or below 1. Checks run per frame, before a frame joins a
batch, so a bad frame never reaches the engine and never fails other streams' frames.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from ..models.preprocess import Preprocessor
from .errors import BadFrame

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"


def payload_kind(body: bytes, content_type: str | None = None) -> str:
    """``"png"``, ``"jpeg"`` or ``"npy"`` from the bytes' signature (the content type is only
    used in the error message: the signature decides)."""
    if body.startswith(PNG_MAGIC):
        return "png"
    if body.startswith(JPEG_MAGIC):
        return "jpeg"
    if body.startswith(NPY_MAGIC):
        return "npy"
    said = f" (content type {content_type!r})" if content_type else ""
    if not body:
        raise BadFrame("empty request body: send a PNG or JPEG image or .npy array bytes")
    raise BadFrame(f"the body{said} is not a PNG or JPEG image nor .npy array bytes "
                   f"(first bytes {body[:8]!r})")


def decode_bytes(body: bytes, content_type: str | None = None, max_side: int = 4096) -> np.ndarray:
    """Encoded image or ``.npy`` bytes -> array (uint8 ``[H, W, 3]`` for images)."""
    kind = payload_kind(body, content_type)
    if kind == "npy":
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as exc:  # ValueError (bad header), EOFError (truncated), ...
            raise BadFrame(f"cannot read the .npy array: {exc}") from exc
    from PIL import Image

    try:
        with Image.open(io.BytesIO(body), formats=["PNG" if kind == "png" else "JPEG"]) as img:
            w, h = img.size
            if max(w, h) > max_side:
                raise BadFrame(f"image is {w}x{h}; the largest side accepted is {max_side} px")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except BadFrame:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated), DecompressionBombError
        raise BadFrame(f"cannot decode the {kind.upper()} image: {exc}") from exc


class FrameChecker:
    """Turns one client frame into model input ``[C, S, S]`` float32 (numpy, for transport).

    Args:
        preprocessor: the model's resize/normalise settings.
        image_size: ``S``, the served input side.
        channels: ``C``, the model's input channels.
        max_side: largest accepted image side in pixels.
    """

    def __init__(self, preprocessor: Preprocessor, image_size: int, channels: int, max_side: int = 4096):
        self.preprocessor = preprocessor
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.max_side = int(max_side)

    def __call__(self, frame, content_type: str | None = None) -> np.ndarray:
        """``frame``: bytes, a numpy array or a torch tensor (see the module docstring)."""
        if isinstance(frame, (bytes, bytearray, memoryview)):
            frame = decode_bytes(bytes(frame), content_type, self.max_side)
        elif isinstance(frame, torch.Tensor):
            frame = frame.detach().cpu().numpy() if frame.dtype != torch.bfloat16 else frame.float().numpy()
        if not isinstance(frame, np.ndarray):
            raise BadFrame(f"a frame must be image bytes, .npy bytes or an array, got {type(frame).__name__}")
        if frame.dtype == np.uint8:
            return self._image(frame)
        if np.issubdtype(frame.dtype, np.floating):
            return self._pixels(frame)
        raise BadFrame(f"frame dtype {frame.dtype} is not supported: send uint8 [H, W, 3] RGB or float "
                       f"[{self.channels}, {self.image_size}, {self.image_size}] pixel values")

    def _image(self, rgb: np.ndarray) -> np.ndarray:
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise BadFrame(f"a uint8 frame must be RGB [H, W, 3], got shape {list(rgb.shape)}")
        h, w = rgb.shape[:2]
        if h < 1 or w < 1 or max(h, w) > self.max_side:
            raise BadFrame(f"frame is {w}x{h}; sides must be between 1 and {self.max_side} px")
        return self.preprocessor([np.ascontiguousarray(rgb)], size=self.image_size)[0].numpy()

    def _pixels(self, x: np.ndarray) -> np.ndarray:
        want = (self.channels, self.image_size, self.image_size)
        if x.shape != want:
            raise BadFrame(f"pixel-value frame has shape {list(x.shape)}; this model is served at "
                           f"{list(want)} ([C, S, S]; send images or uint8 [H, W, 3] arrays to have them resized)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise BadFrame("pixel-value frame contains NaN or Inf")
        return x
