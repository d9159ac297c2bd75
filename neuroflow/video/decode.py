"""Decode: the first step of decode -> preprocess -> gate -> encoder -> readout.

- :func:`open_video` probes a file (PyAV): size, frame rate, frame count when the container knows it.
- :func:`read_frames` decodes it lazily, one RGB uint8 :class:`Frame` at a time.

The next step, :class:`neuroflow.models.preprocess.Preprocessor`, is the model's: its settings come from
the checkpoint or the model family, so it sits with the models, above this module.

Every problem with a file raises :class:`VideoError` whose one-line message names the file (and
the frame for a frame that cannot be decoded), so a command can print it as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VideoError(Exception):
    """A video file cannot be used; the message is one line naming the file (and frame)."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a file's first video stream.

    Attributes:
        path: the file.
        width, height: frame size in pixels.
        fps: average frame rate, None when the container gives none.
        frame_count: number of frames, None when unknown (many containers do not store it).
        duration: seconds, None when unknown.
        codec: decoder name, e.g. ``"h264"``.
    """

    path: Path
    width: int
    height: int
    fps: float | None
    frame_count: int | None
    duration: float | None
    codec: str


@dataclass(frozen=True)
class Frame:
    """One decoded frame.

    Attributes:
        index: position in the file's decoded sequence (0-based, counting every frame, also those
            a ``stride`` skips).
        time: presentation time in seconds from the stream's start.
        rgb: ``[H, W, 3]`` uint8 RGB.
    """

    index: int
    time: float
    rgb: np.ndarray


def _av():
    try:
        import av
    except ImportError as exc:  # the "video" extra is not installed
        raise VideoError("decoding video needs PyAV: pip install 'neuroflow[video]' (or pip install av)") from exc
    return av


def _reason(exc: BaseException) -> str:
    """The useful part of an FFmpeg/OS error, on one line."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def _open_container(path: Path):
    av = _av()
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if path.is_dir():
        raise VideoError(f"{path}: is a folder, not a video file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoError(f"{path}: cannot read as a video file ({_reason(exc)})") from exc
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise VideoError(f"{path}: no video stream (holds {', '.join(kinds)})")
    return container


def open_video(path: str | Path) -> VideoInfo:
    """Probe ``path`` without decoding a frame.

    Raises:
        VideoError: missing file, a folder, unreadable or not a media file, no video stream.
    """
    path = Path(path)
    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000  # container duration is in AV_TIME_BASE units
        return VideoInfo(
            path=path,
            width=int(ctx.width),
            height=int(ctx.height),
            fps=float(rate) if rate else None,
            # 0 means "not stored" in most containers, so it is reported as unknown.
            frame_count=int(stream.frames) or None,
            duration=duration,
            codec=ctx.name,
        )
    finally:
        container.close()


def check_decodable(path: str | Path) -> VideoInfo:
    """:func:`open_video`, then decode the first frame, so that a file that cannot be used fails
    before any model work. Raises :class:`VideoError` (the message names the file)."""
    info = open_video(path)
    first = read_frames(path, max_frames=1)
    try:
        next(first)
    finally:
        first.close()
    return info


def read_frames(path: str | Path, stride: int = 1, max_frames: int | None = None) -> Iterator[Frame]:
    """Decode ``path``'s first video stream lazily.

    Args:
        stride: keep every ``stride``-th frame (indices 0, stride, 2 stride, ...).
        max_frames: stop after this many kept frames (None: until the end).
    Yields:
        :class:`Frame` in presentation order.
    Raises:
        VideoError: as :func:`open_video`; a frame that cannot be decoded (the message names the
            frame index; frames before it have been yielded); a file with no decodable frame.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    av = _av()
    path = Path(path)
    if max_frames == 0:
        return
    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        # Frame-parallel decoding: several times faster for H.264/HEVC on a multi-core CPU.
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        start = stream.start_time or 0
        index = kept = 0
        decoded = container.decode(stream)
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                break
            except (av.FFmpegError, OSError) as exc:
                raise VideoError(f"{path}: frame {index} cannot be decoded ({_reason(exc)})") from exc
            if index % stride == 0:
                if frame.pts is not None and stream.time_base is not None:
                    time = float((frame.pts - start) * stream.time_base)
                else:
                    time = index / fps if fps else float(index)
                try:
                    rgb = frame.to_ndarray(format="rgb24")
                except (av.FFmpegError, ValueError) as exc:
                    raise VideoError(f"{path}: frame {index} cannot be converted to RGB ({_reason(exc)})") from exc
                yield Frame(index=index, time=time, rgb=rgb)
                kept += 1
                if max_frames is not None and kept >= max_frames:
                    return
            index += 1
        if index == 0:
            raise VideoError(f"{path}: the video stream holds no frames")
    finally:
        container.close()
