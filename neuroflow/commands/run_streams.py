"""Scheduling for ``neuroflow run``: which video files are streams now, one frame from each per call.

Up to ``batch`` files are open streams at a time; a stream whose file ends (or fails to decode)
closes its outputs and leaves, the engines forget it, and the next file takes its place.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..models.loading import one_line
from ..video.overlay import OverlayVideo, Series
from ..video.decode import Frame, VideoError, VideoInfo, read_frames
from .run_outputs import EmbeddingFiles


@dataclass
class Source:
    """One input video: ``name`` is its stream id (the file name, made unique), ``stem`` the base
    name of its output files."""

    name: str
    stem: str
    path: Path
    info: VideoInfo


class Stream:
    """A source being decoded, with its per-video outputs (embeddings, overlay video, sparsity
    series) and the count of frames written."""

    def __init__(self, source: Source, out: Path, stride: int, max_frames: int | None, overlay: bool,
                 formats: tuple[str, ...], save_tokens: bool):
        self.source = source
        self.frames: Iterator[Frame] = read_frames(source.path, stride, max_frames)
        fps = source.info.fps / stride if source.info.fps else 25.0
        self.overlay = OverlayVideo(out / "overlay" / f"{source.stem}.mp4", fps) if overlay else None
        self.embeddings = EmbeddingFiles(out / "embeddings", source.stem, formats, save_tokens)
        self.series = Series(source.name)
        self.count = 0
        self.error: str | None = None

    @property
    def name(self) -> str:
        return self.source.name

    def close(self) -> list[Path]:
        """Finish its files; returns the paths written."""
        written = self.embeddings.close()
        if self.overlay is not None and self.overlay.frames:
            self.overlay.close()
            written.append(self.overlay.path)
        return written


def expected_frames(info: VideoInfo, stride: int, max_frames: int | None) -> int | None:
    """Frames a run will take from a video, when the container knows its frame count."""
    if info.frame_count is None:
        return max_frames
    n = math.ceil(info.frame_count / stride)
    return n if max_frames is None else min(n, max_frames)


class StreamScheduler:
    """Yields batches ``[(stream, frame), ...]``: one frame from each open stream.

    Args:
        sources: the videos, in order.
        batch: most streams open at once.
        open_stream: ``source -> Stream``.
        forget: called with a stream id when its stream leaves (the engines reset it).
        emit_error: prints a decode failure (one line); the other streams go on.
    Attributes:
        active: open streams; ``done``: closed ones; ``failures``: one dict per failed video;
        ``written``: the files the closed streams wrote.
    """

    def __init__(self, sources: Sequence[Source], batch: int, open_stream: Callable[[Source], Stream],
                 forget: Callable[[str], None], emit_error: Callable[[str], None]):
        self.sources = list(sources)
        self.batch = batch
        self._open, self._forget, self._emit_error = open_stream, forget, emit_error
        self.pending: deque[Source] = deque(sources)
        self.active: list[Stream] = []
        self.done: list[Stream] = []
        self.failures: list[dict] = []
        self.written: list[Path] = []

    def batches(self) -> Iterator[list[tuple[Stream, Frame]]]:
        while self.pending or self.active:
            while self.pending and len(self.active) < self.batch:
                self.active.append(self._open(self.pending.popleft()))
            taken = self._next_frames()
            if taken:
                yield taken

    def _next_frames(self) -> list[tuple[Stream, Frame]]:
        taken = []
        for stream in list(self.active):  # finish() removes from `active`
            try:
                taken.append((stream, next(stream.frames)))
            except StopIteration:
                self.finish(stream)
            except VideoError as exc:
                stream.error = one_line(exc, limit=1000)
                self.failures.append({"video": stream.name, "path": str(stream.source.path),
                                      "error": stream.error, "frames_written": stream.count})
                self._emit_error(f"{stream.error} ({stream.count} frame(s) before it were written)")
                self.finish(stream)
        return taken

    def finish(self, stream: Stream) -> None:
        self.active.remove(stream)
        self.done.append(stream)
        self._forget(stream.name)
        self.written.extend(stream.close())

    def close_all(self) -> None:
        """Close every open stream (end of the run, an error or an interrupt)."""
        for stream in list(self.active):
            self.finish(stream)

    def done_in_source_order(self) -> list[Stream]:
        order = {id(src): k for k, src in enumerate(self.sources)}
        return sorted(self.done, key=lambda st: order[id(st.source)])
