"""The one place the engine's defaults come from: named presets and the default preset.

``NeuroFlow``, ``neuroflow run``, ``neuroflow demo`` and ``neuroflow serve`` all read
:data:`DEFAULT_PRESET` and :data:`PRESETS` from here, so the API and the command line cannot
drift apart. A setting the caller leaves out is :data:`FROM_PRESET` (or a :class:`Default`) until
it is resolved; only settings given explicitly are checked for having no effect.
"""

from __future__ import annotations

PRESET_SETTINGS = ("arch", "threshold", "ema_decay", "floor_tokens", "reference", "max_staleness", "keyframe_every",
                   "keyframe_drift")
"""The settings a preset decides."""

PRESETS: dict[str, dict] = {
    # Chosen by measurement on real DINOv2-S weights against frame skipping at equal compute
    # (bench/results/fidelity.md, frame_skipping.md, frame_skipping_448.md; docs/gate.md "Why the
    # default preset"): cached context, a dense keyframe every 8th frame of a stream and sooner once
    # the frames' motion summed since the last keyframe passes 0.6 (each frame's mean surprise over
    # its reference's texture, which depends less on the resolution than the raw surprise: a moving
    # camera refreshes sooner, a static one rarely), the gated frames in between compute the patches
    # whose embedding moved more than 0.1 (1 - cos) from its value when last computed. Fewer
    # keyframes and a lower threshold than the earlier keyframe_every=4, threshold=0.2: the same or
    # better against frame skipping at 224 px, better at 448 px, for less compute. The keyframes
    # bound every cached token's age, so no staleness bound is needed.
    "measured": dict(arch="KV", threshold=0.1, ema_decay=0.01, floor_tokens=4, reference="computed",
                     max_staleness=None, keyframe_every=8, keyframe_drift=0.6),
    # The paper's configuration: Architecture C, the EMA of every frame, threshold 0.35.
    "paper": dict(arch="C", threshold=0.35, ema_decay=0.01, floor_tokens=4, reference="ema", max_staleness=None,
                  keyframe_every=None, keyframe_drift=None),
}
"""Named sets of defaults for ``arch``, ``threshold``, ``ema_decay``, ``floor_tokens``, ``reference``,
``max_staleness``, ``keyframe_every`` and ``keyframe_drift``; a setting given explicitly overrides its preset value."""

DEFAULT_PRESET = "measured"
"""The preset used when none is named: by the API, the command line and serving."""


class _FromPreset:
    """The default of a setting that the ``preset`` decides."""

    def __repr__(self) -> str:
        return "<from preset>"


FROM_PRESET = _FromPreset()


class Default:
    """A fixed default the caller did not give (prints as its value, so signatures read as
    usual); lets the engine tell ``cls_readout="context"`` given explicitly from the default."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def given(value) -> bool:
    """True when ``value`` was passed by the caller (not :data:`FROM_PRESET` or a :class:`Default`)."""
    return value is not FROM_PRESET and not isinstance(value, Default)


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")


def resolve(preset: str, **settings) -> dict:
    """``settings`` (each a value, :data:`FROM_PRESET` or a :class:`Default`) with the preset's
    values and the defaults filled in."""
    check_preset(preset)
    out = {}
    for name, value in settings.items():
        if value is FROM_PRESET:
            value = PRESETS[preset][name]
        elif isinstance(value, Default):
            value = value.value
        out[name] = value
    return out
