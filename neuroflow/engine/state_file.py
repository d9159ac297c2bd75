"""Stream-state files: what ``NeuroFlow.save_state`` writes and ``load_state`` reads back.

A file is ``torch.save`` of one dict::

    {"format": "neuroflow-stream-state", "version": FORMAT_VERSION,
     "fingerprint": {"model": {...}, "settings": {...}}, "state": {...}}

and is read with ``torch.load(weights_only=True)`` (no code runs on load). The fingerprint says
which model made the state (family, hidden size, layer count, patch size and a short digest of the
weights, see :func:`model_fingerprint`) and under which engine settings (those that decide what the
state means, e.g. the architecture), so a state is never continued by another model or under
settings it does not fit: :func:`load_state_file` names every field that differs.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

FORMAT = "neuroflow-stream-state"
FORMAT_VERSION = 1
"""Bumped whenever the layout of ``state`` changes; files of another version are refused."""

class StateFileError(ValueError):
    """A state file that cannot be used; the message names the file and the reason."""


# -- fingerprints ----------------------------------------------------------------------------------

def _digest_bytes(t: torch.Tensor) -> bytes:
    """Every element of ``t`` as bytes: floating point rounded to bfloat16 (so a float32 model and
    its bfloat16 copy agree; the rounding is the same on every device), integers as int64, bools
    as bytes. The conversion runs where the tensor is; only the bfloat16 copy travels to the host."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        t = t.to(torch.bfloat16).view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    else:
        t = t.to(torch.int64)
    return t.contiguous().cpu().numpy().tobytes()


def weights_digest(model: nn.Module) -> str:
    """A short hex digest (16 characters) of a model's weights: SHA-256 over every parameter's
    and buffer's name, shape and every element (floating point rounded to bfloat16, see
    :func:`_digest_bytes`), in ``state_dict`` order.

    Any change of any element that survives bfloat16 rounding changes the digest; a float32
    model and its bfloat16 copy give the same digest, and so does the same checkpoint on another
    device. Cost: one pass over the weights (a ViT-B, 86M parameters, hashes in well under a
    second on one CPU core); it runs when a state file is saved or loaded, never per frame.
    """
    named = list(model.state_dict().items())
    h = hashlib.sha256()
    h.update(str(len(named)).encode())
    for name, t in named:
        h.update(f"{name}:{tuple(t.shape)}:{'f' if t.is_floating_point() else 'i'};".encode())
        h.update(_digest_bytes(t))
    return h.hexdigest()[:16]


def model_fingerprint(adapter) -> dict:
    """The ``"model"`` part of a fingerprint for a :class:`neuroflow.models.families.VisionAdapter`:
    ``{"family", "hidden_size", "layers", "patch_size", "weights"}`` (plain str/int values)."""
    return {
        "family": str(adapter.family),
        "hidden_size": int(adapter.hidden_size),
        "layers": len(adapter.layers),
        "patch_size": int(adapter.patch_size),
        "weights": weights_digest(adapter.model),
    }


def _check_plain(value, where: str) -> None:
    """Fingerprints hold only what ``weights_only`` loading reads back as it was saved."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"fingerprint key {where}.{k!r} must be a str")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"fingerprint field {where} is a {type(value).__name__}; use str, int, float, bool, None, "
                    "lists, tuples or dicts of them")


def fingerprint_differences(saved, expected, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints, one entry per field (nested dicts
    are compared field by field, ``model.family`` style); empty when they match."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for key in list(expected) + [k for k in saved if k not in expected]:
            name = f"{prefix}{key}"
            if key not in saved:
                out.append(f"{name}: missing in the file, {expected[key]!r} here")
            elif key not in expected:
                out.append(f"{name}: {saved[key]!r} in the file, not set here")
            else:
                out += fingerprint_differences(saved[key], expected[key], f"{name}.")
        return out
    if isinstance(saved, (list, tuple)) and isinstance(expected, (list, tuple)):
        same = len(saved) == len(expected) and all(not fingerprint_differences(a, b) for a, b in zip(saved, expected))
    else:
        same = type(saved) is type(expected) and saved == expected
    return [] if same else [f"{prefix.rstrip('.')}: {saved!r} in the file, {expected!r} here"]


# -- files -----------------------------------------------------------------------------------------

def save_state_file(path: str | Path, state: dict, fingerprint: dict) -> Path:
    """Write ``state`` with its ``fingerprint`` to ``path``.

    The file is written next to ``path`` and renamed over it, so an interrupted save leaves the
    previous file whole.

    Args:
        path: the file.
        state: what ``NeuroFlow.stream_state_dict()`` returns: tensors, and str/int/float/bool/
            None, lists, tuples and dicts of them (what ``torch.load(weights_only=True)`` reads).
        fingerprint: ``{"model": model_fingerprint(...), "settings": {...}}`` or any dict of
            plain values (checked here).
    Raises:
        TypeError: ``state`` is not a dict, or the fingerprint holds something other than plain
            values.
        FileNotFoundError: the folder of ``path`` does not exist (the message names ``path``;
            nothing is written); NotADirectoryError when that is a file. IsADirectoryError: ``path`` is a
            folder. OSError: the file
            cannot be written (the temporary file is removed, a previous file stays whole).
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    if not isinstance(fingerprint, dict):
        raise TypeError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    _check_plain(fingerprint, "fingerprint")
    path = Path(path)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint, "state": state}
    folder = path.parent
    # Checked here, so the error names the path the caller gave, not the temporary file.
    if path.is_dir():
        raise IsADirectoryError(f"state file {path}: is a folder; give a file name, e.g. {path / 'streams.pt'}")
    if not folder.is_dir():
        error = NotADirectoryError if folder.exists() else FileNotFoundError
        what = "is not a folder" if folder.exists() else "does not exist"
        raise error(f"state file {path}: cannot be written, its folder {folder} {what} "
                    "(create the folder first); nothing was written")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise type(exc)(exc.errno, f"state file {path}: cannot be written ({exc.strerror}); nothing was written") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state_file(path: str | Path, expected_fingerprint: dict) -> dict:
    """Read a file written by :func:`save_state_file` and return its ``state``.

    Args:
        path: the file.
        expected_fingerprint: the fingerprint of the engine that will continue the state; it
            must equal the file's field for field.
    Returns:
        The ``state`` dict as saved (tensors on the CPU... or where ``torch.load`` maps them: the
        devices they were saved from; the caller moves them).
    Raises:
        FileNotFoundError: no such file. OSError: it cannot be read.
        StateFileError: the file is corrupt, truncated or not a torch file; not a NeuroFlow
            state file; of another format version; or made by another model or under other
            settings (every differing field is named).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"state file {path}: does not exist")
    if path.is_dir():
        raise StateFileError(f"state file {path}: is a folder, not a file")
    data = path.read_bytes()  # a real read failure stays an OSError
    try:
        # From memory, so every error below is about the bytes (a truncated zip makes torch's
        # reader raise OSError EINVAL, which is corruption, not I/O).
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError, OSError,
            AttributeError, ImportError, IndexError, KeyError, struct.error, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise StateFileError(f"state file {path}: cannot be read: corrupt, truncated or not a file written by "
                             f"NeuroFlow.save_state ({type(exc).__name__}: {reason})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StateFileError(f"state file {path}: not a NeuroFlow stream-state file (no {FORMAT!r} marker; "
                             "written by something else, e.g. torch.save of a model)")
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise StateFileError(f"state file {path}: format version {version!r}; this NeuroFlow reads version "
                             f"{FORMAT_VERSION} (the file was written by another NeuroFlow release)")
    state, saved = payload.get("state"), payload.get("fingerprint")
    if not isinstance(state, dict) or not isinstance(saved, dict):
        raise StateFileError(f"state file {path}: damaged (its state or fingerprint is not a dict)")
    differences = fingerprint_differences(saved, expected_fingerprint)
    if differences:
        n_model = sum(d.startswith("model.") for d in differences)
        what = ("made by another model" if n_model == len(differences) else
                "saved under incompatible settings" if n_model == 0 else
                "made by another model under incompatible settings")
        raise StateFileError(f"state file {path}: {what}: " + "; ".join(differences))
    return state
