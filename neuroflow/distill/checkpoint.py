"""Training checkpoints: where they live, writing them atomically, reading them back, RNG states.

A checkpoint is one ``torch.save`` file ``<out>/checkpoints/step-<8 digits>.pt`` holding plain
data only (tensors, numbers, strings, lists, dicts), so it loads with ``weights_only=True``:

    format, kind, config (DistillConfig.to_dict()), step, epoch, batch, plan, total_steps,
    dataset [(path, frames)], student (state_dict of the whole student), optimizer, scheduler,
    scaler, sampler (generator state), rng (torch, CUDA, numpy, python), log (rows so far),
    guard (last step above the floor and, when the guard stops runs, those trainable weights)
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from .config import DistillError

FORMAT = 1
KIND = "neuroflow-distill"
_NAME = re.compile(r"step-(\d{8})\.pt")


def checkpoint_folder(out: Path) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_path(out: Path, step: int) -> Path:
    return checkpoint_folder(out) / f"step-{step:08d}.pt"


def list_checkpoints(out: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = checkpoint_folder(out)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.fullmatch(p.name)), key=lambda p: p.name)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_checkpoint(state: dict, out: Path, step: int, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` (via a temporary file, so a crash never leaves
    a half-written checkpoint under the final name), then delete all but the ``keep`` newest."""
    path = checkpoint_path(out, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "kind": KIND, **state}, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU).

    Raises:
        DistillError: missing file, not a checkpoint of this tool, or another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DistillError(f"{path}: cannot read as a checkpoint ({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise DistillError(f"{path}: not a neuroflow distill checkpoint")
    if state.get("format") != FORMAT:
        raise DistillError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {FORMAT}")
    return state


def read_config(path: Path) -> dict:
    """Only the run settings of a checkpoint (memory-mapped: the weights are not read).

    Raises:
        DistillError: as :func:`load_checkpoint`.
    """
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise DistillError(f"{path}: cannot read as a checkpoint ({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(state, dict) or state.get("kind") != KIND or not isinstance(state.get("config"), dict):
        raise DistillError(f"{path}: not a neuroflow distill checkpoint")
    return state["config"]


# -- random number generators ---------------------------------------------------------------------

def rng_state() -> dict:
    """The global torch (CPU and every CUDA device), numpy and python RNG states, as plain data."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where as many devices exist)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
