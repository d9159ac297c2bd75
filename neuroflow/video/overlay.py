"""What the video commands draw: H.264 videos with the active patches marked, and timeline plots.

- :class:`VideoWriter` writes RGB frames to an H.264 mp4 with PyAV (libx264).
- :func:`draw_active_patches` renders one frame with the patches the gate sent through the
  encoder at full brightness and outlined, the others dimmed.
- :class:`OverlayVideo` does both for one stream.
- :func:`plot_timeline` plots sparsity and latency over video time to a PNG (matplotlib, Agg).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

# Colour of the outline and tint of active patches (RGB), and how dark inactive patches get.
ACTIVE_RGB = np.array([255, 170, 0], dtype=np.float32)
INACTIVE_GAIN = 0.4


class VideoWriter:
    """RGB frames -> H.264 mp4 (yuv420p) with PyAV.

    Args:
        path: output file (``.mp4``).
        width, height: frame size; must be even (yuv420p halves the chroma planes).
        fps: frame rate (> 0).
        crf: x264 quality (lower is better; 23 is x264's default, 18 is visually lossless).
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float, crf: int = 23):
        import av

        if width % 2 or height % 2 or width < 2 or height < 2:
            raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {width}x{height}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.path = Path(path)
        self.width, self.height = width, height
        # FFmpeg opens the file only when the first packet is muxed, frames later: create it
        # now so that an unwritable path fails here, with Python's error.
        self.path.open("wb").close()
        self._container = av.open(str(self.path), "w")
        # libx264 ships in PyAV's wheels; mpeg4 is the fallback of a PyAV built without it.
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self._stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames = 0
        self._av = av

    def write(self, rgb: np.ndarray) -> None:
        """Append one ``[height, width, 3]`` uint8 frame."""
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected a uint8 [{self.height}, {self.width}, 3] frame, got {rgb.dtype} {rgb.shape}")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (idempotent)."""
        if self._container is None:
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def overlay_size(box_height: float, box_width: float, longest: int = 640, shortest_long: int = 320) -> tuple[int, int]:
    """Even ``(height, width)`` for drawing a ``box_height x box_width`` region: its longer side
    brought into ``[shortest_long, longest]`` (small clips are enlarged so patches stay visible)."""
    long_side = max(box_height, box_width)
    scale = min(max(long_side, shortest_long), longest) / long_side
    h = max(2, round(box_height * scale / 2) * 2)
    w = max(2, round(box_width * scale / 2) * 2)
    return h, w


def draw_active_patches(
    rgb: np.ndarray,
    box: tuple[float, float, float, float],
    active: np.ndarray,
    out_size: tuple[int, int],
    caption: str = "",
) -> np.ndarray:
    """One overlay frame.

    Args:
        rgb: ``[H, W, 3]`` uint8 source frame.
        box: ``(top, left, bottom, right)`` region the model saw (``Preprocessor.view_box``).
        active: ``[gh, gw]`` bool, the patches computed this frame (row-major patch grid).
        out_size: ``(height, width)`` of the result.
        caption: text drawn in the top-left corner.
    Returns:
        ``[height, width, 3]`` uint8: the region resized, inactive patches dimmed, active
        patches tinted and outlined.
    """
    from PIL import Image, ImageDraw

    oh, ow = out_size
    top, left, bottom, right = box
    h, w = rgb.shape[:2]
    # PIL samples the box directly (no intermediate crop); a box reaching outside the frame
    # (a crop that pads) is clipped to it.
    src_box = (max(0.0, left), max(0.0, top), min(float(w), right), min(float(h), bottom))
    view = np.asarray(Image.fromarray(rgb).resize((ow, oh), Image.BILINEAR, box=src_box), dtype=np.float32)
    gh, gw = active.shape
    rows = np.minimum(np.arange(oh) * gh // oh, gh - 1)
    cols = np.minimum(np.arange(ow) * gw // ow, gw - 1)
    mask = np.asarray(active, dtype=bool)[rows][:, cols]  # [oh, ow] patch mask at pixel level
    out = np.where(mask[..., None], 0.8 * view + 0.2 * ACTIVE_RGB, INACTIVE_GAIN * view)
    # Outline: active pixels with an inactive (or out-of-frame) neighbour within 1 px.
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    out[mask & ~inner] = ACTIVE_RGB
    image = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if caption:
        draw = ImageDraw.Draw(image)
        _, _, x1, y1 = draw.textbbox((4, 3), caption)
        draw.rectangle((0, 0, x1 + 4, y1 + 3), fill=(0, 0, 0))
        draw.text((4, 3), caption, fill=(255, 255, 255))
    return np.asarray(image)


class OverlayVideo:
    """One stream's overlay mp4, opened on its first frame (the frame size is known then).

    Args:
        path: output ``.mp4``.
        fps: frame rate of the written frames (the source rate divided by the stride).
    """

    def __init__(self, path: str | Path, fps: float):
        self.path = Path(path)
        self.fps = fps if fps and fps > 0 else 25.0
        self._writer: VideoWriter | None = None
        self._size: tuple[int, int] | None = None

    @property
    def frames(self) -> int:
        return self._writer.frames if self._writer is not None else 0

    def add(self, rgb: np.ndarray, box: tuple[float, float, float, float], active: np.ndarray,
            caption: str = "") -> None:
        """Draw and append one frame (see :func:`draw_active_patches`)."""
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._size = overlay_size(box[2] - box[0], box[3] - box[1])
            self._writer = VideoWriter(self.path, self._size[1], self._size[0], self.fps)
        self._writer.write(draw_active_patches(rgb, box, active, self._size, caption))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@dataclass
class Series:
    """One video's per-frame sparsity for :func:`plot_timeline`.

    Attributes:
        name: legend label.
        time: frame times in seconds.
        sparsity: fraction of patches skipped per frame, in [0, 1].
    """

    name: str
    time: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)


@dataclass
class Calls:
    """Per-call timings for :func:`plot_timeline` (one call = one frame of each stream in the batch).

    Attributes:
        latency_ms: NeuroFlow's time per call.
        dense_ms: the dense model's time on the same batches (empty when not measured).
        streams: frames (streams) in each call.
    """

    latency_ms: list[float] = field(default_factory=list)
    dense_ms: list[float] = field(default_factory=list)
    streams: list[int] = field(default_factory=list)


def plot_timeline(path: str | Path, series: Sequence[Series], calls: Calls, title: str, note: str = "") -> Path:
    """PNG with two panels: sparsity (%) of every video over video time, and latency (ms) per call
    over the run (NeuroFlow, and dense when measured).

    Args:
        path: output ``.png``.
        series: one :class:`Series` per video.
        calls: the run's per-call timings.
        title: figure title.
        note: a line under the title (e.g. "random weights: ...").
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_s, ax_l = fig.subplots(2, 1)
    few = max((len(s.time) for s in series), default=0) <= 60
    for i, s in enumerate(series):
        ax_s.plot(s.time, [100 * v for v in s.sparsity], label=s.name, color=f"C{i % 10}",
                  marker="o" if few else None, markersize=3, linewidth=1.4)
    ax_s.set_ylabel("sparsity (% patches skipped)")
    ax_s.set_xlabel("video time (s)")
    ax_s.set_ylim(-3, 103)
    ax_s.grid(alpha=0.3)
    if len(series) <= 10:
        ax_s.legend(loc="lower right", fontsize=8, ncol=2 if len(series) > 5 else 1)
    if note:
        ax_s.set_title(note, fontsize=8, color="0.35")
    x = list(range(1, len(calls.latency_ms) + 1))
    few = len(x) <= 60
    ax_l.plot(x, calls.latency_ms, color="C0", marker="o" if few else None, markersize=3, linewidth=1.4,
              label="NeuroFlow")
    if calls.dense_ms:
        ax_l.plot(x, calls.dense_ms, color="0.4", linestyle="--", marker="s" if few else None, markersize=2.5,
                  linewidth=1.0, label="dense")
    most = max(calls.streams, default=0)
    ax_l.set_ylabel("latency per call (ms)")
    ax_l.set_xlabel(f"call (one frame of each of up to {most} stream(s); the first frame of a stream is dense)")
    ax_l.set_ylim(bottom=0)
    ax_l.grid(alpha=0.3)
    ax_l.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    fig.savefig(path)
    return path
