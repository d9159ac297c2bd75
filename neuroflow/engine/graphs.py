"""CUDA graphs for the engine's steady-state step (``NeuroFlow(..., cuda_graphs=True)``).

A step is captured once per **key** and replayed afterwards. The key holds everything the host
bakes into the launches: batch size, patch grid, capacity (:mod:`neuroflow.engine.capacity`), the gate
settings (threshold, decay, floor) and the addresses of the stream pools the step reads and
writes (a pool that grows or moves is a new key). Stream ids are *not* in the key: the batch's
slot indices are a graph input (copied into a static tensor before each replay), so any B streams
of a pool share a graph.

Eager instead of a graph: calls with first frames (new, reset or moved streams: their capacity and
state writes differ), calls with ``active=``, calls that need gradients, the CPU, an active
:class:`neuroflow.engine.profiling.StageTimer` (it synchronises), and the first call of each key (the
warm-up: Triton compiles, cuBLAS initialises, the bucket settles). Overflow is handled on the
device by the capacity cut, so a replay never needs a different shape; a grown bucket is a new key.

Constraints: the frames are copied into a static buffer (``pixel_values`` may live anywhere on
the model's GPU); the outputs are copied out of the graph's static tensors (so each call returns
tensors of its own); every graph keeps its own memory pool (at most :data:`MAX_GRAPHS` graphs, the
least recently used is dropped). The state writes' undo log (rollback, deferred finiteness check)
is part of the graph: its gathers run in each replay into static buffers, and the replaying call
gets the captured undo closures, which read those buffers. After a replay the next call's counts
(:mod:`neuroflow.engine.capacity`) are copied once the whole replay has run, so the next call waits for
this replay to finish (eager steps start the copy right after the gate).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

MAX_GRAPHS = 16


@dataclass
class _Entry:
    graph: "torch.cuda.CUDAGraph"
    pixels: torch.Tensor
    slot: torch.Tensor
    first: torch.Tensor
    result: tuple
    undo: list


class StepGraphs:
    """Captured steps by key (see module doc)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS):
        self.max_graphs = max_graphs
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._warm: set[tuple] = set()
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._warm.clear()

    def run(self, key: tuple, pixel_values: torch.Tensor, batch, step: Callable[[torch.Tensor], tuple]) -> tuple | None:
        """Run ``step(pixels)`` for ``batch`` through the graph of ``key``; None on the key's
        first call (the caller runs the eager warm-up then). ``step`` returns a tuple of tensors
        (or None) and writes state only through ``batch``."""
        entry = self._entries.get(key)
        if entry is None:
            if key not in self._warm:
                self._warm.add(key)
                return None
            entry = self._capture(key, pixel_values, batch, step)
        else:
            self._entries.move_to_end(key)
            entry.pixels.copy_(pixel_values)
            entry.slot.copy_(batch.slot)
            entry.first.copy_(batch.first)
            batch._undo.extend(entry.undo)
        entry.graph.replay()
        self.replays += 1
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in entry.result)

    def _capture(self, key, pixel_values, batch, step) -> _Entry:
        pixels = pixel_values.clone()
        slot, first = batch.slot.clone(), batch.first.clone()
        real_slot, real_first = batch.slot, batch.first
        batch.slot, batch.first = slot, first
        undo_from = len(batch._undo)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph captures on a side stream after a device sync (capture time only);
        # the captured work runs at the replay.
        try:
            with torch.cuda.graph(graph):
                result = step(pixels)
        finally:
            batch.slot, batch.first = real_slot, real_first
        entry = _Entry(graph, pixels, slot, first, result, list(batch._undo[undo_from:]))
        self._entries[key] = entry
        self.captures += 1
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)
        return entry
