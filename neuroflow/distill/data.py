"""Training data: find the videos, cut them into clips, decide each epoch's clip order, decode clips.

A clip is ``clip_length`` frames taken every ``frame_stride`` frames, so it spans
``(clip_length - 1) * frame_stride + 1`` frames of its video. Each epoch every video is cut into
its non-overlapping windows of that span, shifted together by a random offset (so that, over
epochs, every frame can start a clip), optionally capped per video, and the clips of all videos
are shuffled. Every random choice comes from the generator the trainer passes in (its state is
checkpointed), so the order is reproducible and resumable.

Decoding goes through :mod:`neuroflow.video.decode` (PyAV); it starts at the beginning of the file, so a
clip deep inside a long video costs the decode of every frame before it (cut long videos into
shorter files for speed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..video.decode import VideoError, check_decodable, read_frames
from .config import DistillError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".flv",
                    ".wmv", ".3gp", ".ogv", ".y4m")
"""File endings searched for inside folders (case-insensitive); files named directly are taken as they are."""


@dataclass(frozen=True)
class VideoEntry:
    """One usable video.

    Attributes:
        path: the file (resolved).
        frames: number of frames (the container's count, else its packets counted).
        width, height: frame size in pixels.
    """

    path: Path
    frames: int
    width: int
    height: int


@dataclass(frozen=True)
class ClipShape:
    """``length`` frames taken every ``stride`` frames."""

    length: int
    stride: int

    @property
    def span(self) -> int:
        """Frames of the video one clip covers."""
        return (self.length - 1) * self.stride + 1

    def describe(self) -> str:
        return f"a clip of {self.length} frames at stride {self.stride} spans {self.span} frames"


def find_videos(paths: Sequence[Path], what: str = "training") -> list[Path]:
    """Files as given plus the video files inside folders (recursive, sorted), without repeats.

    Raises:
        DistillError: a path that does not exist, or no video file at all.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DistillError(f"{p}: no such file or folder ({what} videos)")
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
        else:
            inside = [p]
        for f in inside:
            r = f.resolve()
            if r not in seen:
                seen.add(r)
                found.append(r)
    if not found:
        names = ", ".join(str(p) for p in paths)
        raise DistillError(f"no video files found in {names} ({what} videos; folders are searched for "
                           f"{' '.join(VIDEO_EXTENSIONS)})")
    return found


def count_frames(path: Path) -> int:
    """Frames in the first video stream: the container's count when it stores one, else the
    stream's non-empty packets counted (demuxing only, no decoding).

    Raises:
        VideoError: the container cannot be read.
    """
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: cannot count its frames ({' '.join(str(exc).split()) or type(exc).__name__})") from exc


def probe_videos(paths: Sequence[Path]) -> list[VideoEntry]:
    """Open every file, count its frames and decode its first frame, so an unreadable file fails
    before any training.

    Raises:
        DistillError: one line per bad file (the message names each).
    """
    entries, errors = [], []
    for path in paths:
        try:
            info = check_decodable(path)
            frames = count_frames(path)
        except VideoError as exc:
            errors.append(" ".join(str(exc).split()))
            continue
        entries.append(VideoEntry(Path(path), frames, info.width, info.height))
    if errors:
        raise DistillError("\n".join(errors))
    return entries


def usable_videos(entries: list[VideoEntry], shape: ClipShape, what: str = "training") -> tuple[list[VideoEntry], list[VideoEntry]]:
    """Split into (videos holding at least one clip, videos too short).

    Raises:
        DistillError: no video holds a clip.
    """
    ok = [e for e in entries if e.frames >= shape.span]
    short = [e for e in entries if e.frames < shape.span]
    if not ok:
        longest = max(entries, key=lambda e: e.frames)
        raise DistillError(f"{shape.describe()}, longer than every {what} video (longest: {longest.path}, "
                           f"{longest.frames} frames); use a shorter --clip-length or --stride")
    return ok, short


def clips_per_epoch(entries: Sequence[VideoEntry], shape: ClipShape, max_per_video: int | None) -> int:
    """Clips one epoch holds (the same every epoch)."""
    return sum(min(e.frames // shape.span, max_per_video or math.inf) for e in entries)


def draw_epoch(entries: Sequence[VideoEntry], shape: ClipShape, max_per_video: int | None,
               generator: torch.Generator) -> torch.Tensor:
    """One epoch's clips in training order: ``[K, 2]`` int64 rows ``(video index, first frame)``.

    Per video: its ``frames // span`` non-overlapping windows, all shifted by one offset drawn in
    ``0 .. frames - windows * span``; a random ``max_per_video`` of them when capped. Then every
    clip of every video is shuffled.
    """
    rows = []
    for i, e in enumerate(entries):
        k = e.frames // shape.span
        slack = e.frames - k * shape.span
        offset = int(torch.randint(slack + 1, (1,), generator=generator))
        starts = offset + torch.arange(k, dtype=torch.int64) * shape.span
        if max_per_video is not None and k > max_per_video:
            starts = starts[torch.randperm(k, generator=generator)[:max_per_video].sort().values]
        rows.append(torch.stack([torch.full_like(starts, i), starts], dim=1))
    clips = torch.cat(rows)
    return clips[torch.randperm(clips.shape[0], generator=generator)]


def eval_windows(entries: Sequence[VideoEntry], shape: ClipShape, count: int) -> list[tuple[int, int]]:
    """A fixed set of up to ``count`` clips ``(video index, first frame)``: the videos' windows
    from the start, taken round-robin over the videos (no randomness)."""
    per_video = [[(i, j * shape.span) for j in range(e.frames // shape.span)] for i, e in enumerate(entries)]
    out: list[tuple[int, int]] = []
    depth = 0
    while len(out) < count and any(depth < len(w) for w in per_video):
        out.extend(w[depth] for w in per_video if depth < len(w))
        depth += 1
    return out[:count]


def read_clip(entry: VideoEntry, start: int, shape: ClipShape) -> list[np.ndarray]:
    """Decode one clip: ``shape.length`` RGB frames ``[H, W, 3]`` uint8, frames
    ``start, start + stride, ...`` of the file.

    Raises:
        DistillError: the file cannot be decoded, or ends before the clip does.
    """
    # Only frames at multiples of gcd(start, stride) are converted to RGB while decoding up to the clip.
    step = math.gcd(start, shape.stride)
    end = start + shape.span  # one past the clip's last frame
    wanted = set(range(start, end, shape.stride))
    frames: list[np.ndarray] = []
    try:
        for frame in read_frames(entry.path, stride=step, max_frames=(end - 1) // step + 1):
            if frame.index in wanted:
                frames.append(frame.rgb)
    except VideoError as exc:
        raise DistillError(" ".join(str(exc).split())) from exc
    if len(frames) < shape.length:
        raise DistillError(f"{entry.path}: ended after {len(frames)} of the {shape.length} frames of the clip "
                           f"starting at frame {start} (the container reported {entry.frames} frames)")
    return frames


class ClipLoader:
    """Decodes batches of clips, the next batch in background threads while a step runs.

    Args:
        entries: the videos the clip rows index.
        shape: clip length and stride.
        workers: decoding threads (0: decode when asked, in the caller's thread).
    """

    def __init__(self, entries: Sequence[VideoEntry], shape: ClipShape, workers: int):
        self.entries, self.shape = list(entries), shape
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="neuroflow-decode") if workers else None
        self._pending: tuple[tuple, list[Future]] | None = None

    def _key(self, rows: torch.Tensor) -> tuple:
        return tuple(map(tuple, rows.tolist()))

    def prefetch(self, rows: torch.Tensor) -> None:
        """Start decoding the clips ``rows`` ``[B, 2]`` (no-op without workers)."""
        if self._pool is None:
            return
        key = self._key(rows)
        futures = [self._pool.submit(read_clip, self.entries[i], s, self.shape) for i, s in key]
        self._pending = (key, futures)

    def get(self, rows: torch.Tensor) -> list[list[np.ndarray]]:
        """The clips ``rows`` ``[B, 2]``: B lists of ``length`` RGB frames."""
        key = self._key(rows)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == key:
            return [f.result() for f in pending[1]]
        if pending is not None:
            for f in pending[1]:
                f.cancel()
        return [read_clip(self.entries[i], s, self.shape) for i, s in key]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
