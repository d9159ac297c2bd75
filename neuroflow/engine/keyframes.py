"""The host's copy of the keyframe schedule: which frames of a call are dense by ``keyframe_every``.

The frame policy keeps, per stream on the device, ``policy_since``: frames since its last keyframe.
A later frame is a keyframe when ``since + 1 >= keyframe_every`` (or at a scene cut, or past
``keyframe_drift``; see :mod:`neuroflow.reference.gate`). With ``keyframe_every`` alone that is
known before the call from the count, so :class:`KeyframeSchedule` keeps the count on the host too
and the capacity planner (:mod:`neuroflow.engine.capacity`) reserves dense rows for exactly those
frames: a keyframe is never cut and the call needs no host read of the packed row count.

The copy follows the device rule (``since := 0`` on a keyframe or first frame, else ``since + 1``,
skipped frames included) and is updated only when a call commits. Where it cannot follow (after a
state load, an undone call, a call with ``active=`` or with data-dependent keyframes) it forgets
the streams, and the next call that needs them reads their count once from the device.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence

from ..reference.gate_settings import GateSettings
from .streams import StreamBatch


class KeyframeSchedule:
    """Per stream, frames since its last keyframe (the device's ``policy_since``), on the host."""

    def __init__(self):
        self._since: dict[Hashable, int] = {}

    @staticmethod
    def host_known(settings: GateSettings) -> bool:
        """Whether every keyframe of a later frame follows from ``keyframe_every`` alone (no scene
        cut, no drift bound), so the host can tell them before the call."""
        return settings.keyframe_every is not None and settings.scene_cut is None and settings.keyframe_drift is None

    def plan(self, settings: GateSettings, batch: StreamBatch) -> list[bool] | None:
        """Per frame of ``batch``: dense by rule (a first frame or a scheduled keyframe); None
        when keyframes are not host-known. Streams the copy has forgotten are read from the
        device first (one host read for them, then none)."""
        if not self.host_known(settings):
            return None
        lost = [j for j, i in enumerate(batch.ids) if i not in batch.new_slots and i not in self._since]
        if lost:
            counts = batch.rows("policy_since")[lost, 0].tolist()
            self._since.update((batch.ids[j], int(c)) for j, c in zip(lost, counts))
        k = settings.keyframe_every
        return [i in batch.new_slots or self._since[i] + 1 >= k for i in batch.ids]

    def commit(self, ids: Sequence[Hashable], dense: Sequence[bool], known: Collection[Hashable]) -> None:
        """After a committed call: ``since := 0`` where ``dense``, else ``since + 1``. ``known``:
        the streams the engine holds now (the stream store; entries of others are dropped once
        they outnumber it, so the cost per call stays with the call's streams)."""
        for i, d in zip(ids, dense):
            self._since[i] = 0 if d else self._since[i] + 1
        if len(self._since) > 2 * len(known) + 64:  # evicted and reset streams
            self._since = {i: c for i, c in self._since.items() if i in known}

    def forget(self, ids: Sequence[Hashable] | None = None) -> None:
        """Drop the copy for ``ids`` (all when None): it is read again when next needed."""
        if ids is None:
            self._since.clear()
        else:
            for i in ids:
                self._since.pop(i, None)
