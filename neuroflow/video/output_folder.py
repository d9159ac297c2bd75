"""The folder a run writes into: created and checked for writing before any work starts, so a
bad ``--out`` fails in a second rather than after a long run."""

from __future__ import annotations

import tempfile
from pathlib import Path


class OutputFolderError(OSError):
    """An output folder that cannot be used; one line naming it and why."""


def prepare_output_folder(path: str | Path) -> Path:
    """Create ``path`` (and parents) and check that a file can be written in it.

    Raises:
        OutputFolderError: ``path`` is a file, or the folder cannot be created or written.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"output folder {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".neuroflow-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
        raise OutputFolderError(f"output folder {folder}: cannot be written ({reason})") from exc
    return folder
