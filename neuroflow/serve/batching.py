"""Micro-batching inside a shard: frames of different streams that arrive within a short window
go into one engine call.

Rules (the engine takes one frame per stream per call, all of one size):

- a batch holds at most ``max_batch`` frames, at most one per stream, all of the first frame's
  shape; a stream's later frames stay queued, in order, for the next batches;
- a batch is cut as soon as ``max_batch`` frames are eligible, or ``max_wait_s`` after the
  *oldest* queued frame arrived (a frame held back by its own stream's earlier frame does not
  wait a second window).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Pending:
    """One queued frame.

    Attributes:
        stream_id: its stream.
        seq: its sequence number.
        pixels: ``[C, S, S]`` model input (any array type; the batcher only reads ``.shape``).
        future: resolved with the frame's result (or exception) by whoever runs the batch.
        enqueued: ``time.perf_counter()`` when it was queued.
        prev_seq: the stream's last accepted sequence number before this frame (None: none), so
            a failed batch can give the sequence number back.
    """

    stream_id: Hashable
    seq: int
    pixels: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    prev_seq: int | None = None


class FrameBatcher:
    """An asyncio queue of :class:`Pending` frames cut into batches (see the module docstring).

    Args:
        max_batch: most frames per batch (>= 1).
        max_wait_s: batching window in seconds (>= 0).
    """

    def __init__(self, max_batch: int, max_wait_s: float):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        self.max_batch = max_batch
        self.max_wait_s = float(max_wait_s)
        self._queue: list[Pending] = []
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def drain(self) -> list[Pending]:
        """Remove and return every queued frame (for a shard that closes)."""
        items, self._queue = self._queue, []
        return items

    def put(self, item: Pending) -> None:
        self._queue.append(item)
        self._changed.set()

    def _eligible(self) -> list[int]:
        """Queue positions of the next batch: FIFO, one per stream, the first frame's shape."""
        if not self._queue:
            return []
        shape = tuple(self._queue[0].pixels.shape)
        seen: set = set()
        picked: list[int] = []
        for i, item in enumerate(self._queue):
            if item.stream_id in seen:
                continue
            seen.add(item.stream_id)  # a stream's later frames wait even if this one has another shape
            if tuple(item.pixels.shape) == shape:
                picked.append(i)
                if len(picked) == self.max_batch:
                    break
        return picked

    async def next_batch(self) -> list[Pending]:
        """Wait for frames, then return the next batch (removed from the queue; never empty)."""
        while not self._queue:
            self._changed.clear()
            await self._changed.wait()
        deadline = self._queue[0].enqueued + self.max_wait_s
        while len(self._eligible()) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                break
        picked = self._eligible()
        batch = [self._queue[i] for i in picked]
        keep = set(picked)
        self._queue = [item for i, item in enumerate(self._queue) if i not in keep]
        return batch
