"""Sync-free packing: the encoder's row count comes from a host-known capacity, never from a read
of the device's token count.

The gate packs a batch's computed tokens into a ``[B * (P + N), D]`` buffer and leaves the real
count ``T = cu_seqlens[-1]`` on the device. Reading ``T`` on the host to size the encoder would
wait for the gate to finish (a host synchronisation per call). Instead the engine runs the encoder
on a **capacity** ``C`` of rows that the host knows without waiting:

* **first frames** (new, reset or moved streams; known on the host) always count as dense:
  ``P + N`` rows each, and so do the keyframes that ``keyframe_every`` schedules (the host keeps
  the schedule: :mod:`neuroflow.engine.keyframes`; a scene cut or ``keyframe_drift`` makes
  keyframes data-dependent, and ``"auto"`` then reads the count);
* the **other frames** get a bucket: the smallest power of two >= ``headroom x`` the rows those
  frames needed in the previous call with the same batch size and grid (``"auto"``), or a fixed
  number of rows (``capacity=int``), capped at their dense size. A key seen for the first time has
  no history: its bucket is the dense size.

The previous call's count reaches the host through a non-blocking copy into pinned memory with an
event (:class:`HostCount`): at the start of the next call the host waits on that event, which was
recorded right after the previous call's gate, so it never waits for the current call's work (and
only for the previous call's gate, long done once the host has queued that call's encoder). On the
CPU the copy is synchronous and the read is free.

**Overflow** (the frames need more rows than their bucket, e.g. after a scene cut): detected on the
device and resolved there, without a sync: :func:`fit_to_capacity` keeps, per frame, its prefix
tokens and its most surprising active patches, filling the capacity round-robin across frames (a
frame's r-th most surprising patch before any frame's (r+1)-th; first frames are never cut). The
patches cut are treated exactly like patches the gate left inactive (their cache keeps its last
values; ``active_mask`` and ``sparsity`` report what was really computed). The engine learns of it
at the next call (the same host count), counts the frames in ``NeuroFlow.overflowed_frames``, warns
(:class:`CapacityWarning`) and the bucket grows for the following calls. ``capacity="exact"``
instead reads ``T`` on the host every call (one synchronisation per call; never cuts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.encoder import Packed
from ..reference.gate import PackedFrames

HEADROOM = 1.25
"""Bucket = next power of two of the previous need times this."""


class CapacityWarning(RuntimeWarning):
    """Frames needed more packed rows than their capacity bucket: their least surprising active
    patches were not computed (see :mod:`neuroflow.engine.capacity`)."""


def bucket(need: int, dense: int, minimum: int) -> int:
    """Rows for frames that needed ``need`` rows last time: the smallest power of two >=
    ``HEADROOM * need``, within ``[minimum, dense]``."""
    if need <= 0:
        return min(dense, max(minimum, 1))
    return min(dense, max(minimum, 1 << max(0, math.ceil(HEADROOM * need) - 1).bit_length()))


class HostCount:
    """A few device integers copied to the host without a sync (pinned memory + event on CUDA).

    ``ready()`` never blocks; ``wait()`` blocks until the copy is done (the event was recorded
    right after the values were produced). ``values()`` reads the host copy (no device access).
    """

    def __init__(self, values: torch.Tensor):
        values = values.detach().to(torch.int64).reshape(-1)
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=torch.int64, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values.clone()
            self._event = None
        # The sync-free test recognises this host copy: reading it never touches a device.
        self._host._neuroflow_host_copy = True

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def values(self) -> list[int]:
        return self._host.tolist()


@dataclass
class Fitted:
    """The packed encoder input at capacity: ``x`` ``[C, D]`` (rows past the real count are zero),
    where its rows belong (:class:`~neuroflow.models.encoder.Packed`), the patches really computed
    ``active`` ``[B, N]`` bool, and on the device: ``need`` (rows the non-first frames needed
    before any cut) and ``cut`` (frames that lost patches), int64 scalars."""

    tokens: torch.Tensor
    packed: Packed
    active: torch.Tensor
    need: torch.Tensor
    cut: torch.Tensor


def fit_to_capacity(gate: PackedFrames, first: torch.Tensor, capacity: int) -> Fitted:
    """Repack the gate's output into ``capacity`` rows, without a host sync (see module doc).

    Args:
        gate: the gate's output (``packed`` ``[B * (P + N), D]``, ``cu_seqlens`` ``[B + 1]``).
        first: ``[B]`` bool, frames dense by rule that the capacity reserved for: first frames
            and, with ``keyframe_every``, scheduled keyframes (never cut; not in ``need``).
        capacity: host int >= ``B * P + (those frames) * N``.
    """
    active, cu, p = gate.active, gate.cu_seqlens, gate.num_prefix
    b, n = active.shape
    dev = active.device
    full = b * (p + n)
    counts = (cu[1:] - cu[:-1]).to(torch.int64)
    need = torch.where(first, 0, counts).sum()
    if capacity >= full:
        # Nothing can be cut: the gate's buffer is used as it is (rows past T are never read).
        packed = Packed(cu, gate.index[:full], num_frames=b, tokens=p + n, capacity=full, max_seqlen=p + n)
        return Fitted(gate.packed[:full], packed, active, need, torch.zeros((), dtype=torch.int64, device=dev))
    budget = capacity - b * p
    # Rank of each active patch within its frame, most surprising first; then interleave frames.
    score = torch.where(active, gate.surprise, -math.inf)
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=dev).expand(b, n).contiguous())
    key = rank * b + torch.arange(b, device=dev)[:, None]
    key = torch.where(first[:, None], -1, key)
    key = torch.where(active, key, torch.iinfo(torch.int64).max)
    if budget > 0:
        threshold = key.flatten().sort().values[min(budget, b * n) - 1]
        keep = active & (key <= threshold)
    else:
        keep = torch.zeros_like(active)
    cut = (keep.sum(dim=1) != active.sum(dim=1)).sum()
    # A skipped frame (frame policy) packed nothing, not even its prefix: it gets no rows.
    new_counts = keep.sum(dim=1).to(torch.int32) + p * (counts > 0).to(torch.int32)
    new_cu = torch.zeros(b + 1, dtype=torch.int32, device=dev)
    new_cu[1:] = torch.cumsum(new_counts, 0)
    # Old row r -> its frame, position; kept rows move to their rank among kept rows.
    r = torch.arange(full, device=dev)
    frame = torch.searchsorted(cu[1:].to(torch.int64), r, right=True).clamp_max(b - 1)
    pos = gate.index[:full].to(torch.int64)
    valid = r < cu[-1]
    patch = (pos - p).clamp(0, n - 1)
    kept_row = valid & ((pos < p) | keep[frame, patch])
    dest = torch.where(kept_row, torch.cumsum(kept_row, 0) - 1, capacity)
    source = torch.zeros(capacity + 1, dtype=torch.int64, device=dev)
    source.index_copy_(0, dest, r)  # duplicates only at the dump row `capacity`
    source = source[:capacity]
    live = torch.arange(capacity, device=dev) < new_cu[-1]
    tokens = torch.where(live[:, None], gate.packed[source], 0)
    index = torch.where(live, gate.index[source], 0)
    # One segment holds at most what the capacity leaves after the other frames' prefixes.
    bound = min(p + n, capacity - (b - 1) * p)
    packed = Packed(new_cu, index, num_frames=b, tokens=p + n, capacity=capacity, max_seqlen=bound)
    return Fitted(tokens, packed, keep, need, cut)


class CapacityPlanner:
    """Chooses each call's capacity from host knowledge only (see module doc).

    Args:
        mode: ``"auto"`` (buckets from the previous call's need), ``"exact"`` (read the count:
            one sync per call), or an int: fixed rows for the frames of a call that are not dense
            by rule (first frames, scheduled keyframes).
    """

    def __init__(self, mode="auto"):
        if not (mode in ("auto", "exact") or (isinstance(mode, int) and not isinstance(mode, bool) and mode >= 1)):
            raise ValueError(f"capacity must be 'auto', 'exact' or an int >= 1, got {mode!r}")
        self.mode = mode
        self._need: dict[tuple, float] = {}
        """key -> rows per non-first frame the last call with that key needed."""

    def capacity(self, key: tuple, num_frames: int, num_first: int, prefix: int, patches: int, floor: int,
                 most: int | None = None) -> int:
        """Rows for a call with ``num_frames`` frames of which ``num_first`` are dense by rule
        (first frames, scheduled keyframes).

        ``most``: a static bound on the patches a non-first frame computes, when the gate settings
        give one (a ``budget``: see :func:`static_patch_bound`); the bucket
        never exceeds it, so such calls cannot overflow."""
        rest = num_frames - num_first
        per_frame = patches if most is None else min(patches, most)
        dense_rest = rest * (prefix + per_frame)
        least = rest * (prefix + min(floor, per_frame))
        if self.mode == "auto":
            last = self._need.get(key)
            rows = dense_rest if last is None else bucket(math.ceil(last * rest), dense_rest, least)
        else:
            rows = min(dense_rest, max(self.mode, least))
        return num_first * (prefix + patches) + rows

    def observe(self, key: tuple, need: int, rest: int) -> None:
        """The non-first frames (``rest`` of them) of a call with ``key`` needed ``need`` rows."""
        if rest > 0:
            self._need[key] = need / rest


def static_patch_bound(settings, patches: int, scheduled: bool = False) -> int | None:
    """The most patches a gated frame (not dense by rule) can compute under gate ``settings``
    (:class:`~neuroflow.reference.gate_settings.GateSettings`) for frames of ``patches`` patches, or None
    when only the data decides. A budget caps every gated frame (stale patches and the floor
    included), not a keyframe, which is dense. ``scheduled``: the host knows this call's
    keyframes (``keyframe_every`` alone; :mod:`neuroflow.engine.keyframes`) and reserves their rows
    apart, so the bound holds for the rest; otherwise any keyframe option (scene cut,
    ``keyframe_every``, ``keyframe_drift``) leaves no static bound."""
    if settings.keyframe_triggers and not scheduled:
        return None
    bounds = []
    if settings.budget is not None:
        bounds.append(settings.budget_count(patches))
    if getattr(settings, "batch_budget", None) is not None:
        # The batch's non-keyframe frames share floor(M * f * N) <= M * ceil(f * N) patches.
        bounds.append(min(patches, math.ceil(settings.batch_budget * patches)))
    return min(bounds) if bounds else None
