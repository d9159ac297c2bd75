"""Per-stream state: which streams exist, at which grid, and their tensors in slot-indexed pools.

Every stream lives in the pool of its patch grid ``(gh, gw)``. A pool keeps each state tensor as
one ``[capacity, ...]`` tensor and gives every stream a slot (a row), so a batch of frames reads and
writes its streams' rows with one gather and one scatter per tensor: the layout the kernels take
(``ema[S, N, D]`` plus a per-frame slot index).

State changes in one place. A call opens a :class:`StreamBatch` (:meth:`StreamStore.begin`) for
its streams; the ops read the pools through it and write them only through it, and it keeps what
each write overwrote. :meth:`StreamBatch.commit` makes the call's streams known (and evicts the
least recently seen streams past ``max_streams``); :meth:`StreamBatch.rollback` puts every
overwritten value back and admits no stream, so a failure anywhere in a step leaves every stream's
state exactly as it was.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from ..ops.library import cache_scatter_op

Grid = tuple[int, int]
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class _Pool:
    tensors: dict[str, torch.Tensor]
    owner: list[Hashable | None] = field(default_factory=list)
    reserved: set[int] = field(default_factory=set)
    """Slots handed to an open batch for streams it may admit (not owned until commit)."""

    @property
    def capacity(self) -> int:
        return len(self.owner)

    def free_slots(self) -> list[int]:
        return [s for s, o in enumerate(self.owner) if o is None and s not in self.reserved]

    def grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity, 4)
        # State tensors stay ordinary tensors even when created under inference_mode, so later
        # calls outside it can still write them in place.
        with torch.inference_mode(False):
            for name, t in self.tensors.items():
                grown = t.new_zeros((new_cap, *t.shape[1:]))
                grown[: t.shape[0]] = t
                self.tensors[name] = grown
        self.owner.extend([None] * (new_cap - len(self.owner)))

    def clear_slot(self, s: int) -> None:
        self.owner[s] = None
        with torch.inference_mode(False), torch.no_grad():
            for t in self.tensors.values():
                t[s].zero_()


class StreamStore:
    """All streams' state.

    Args:
        specs_for: state tensor name -> (per-stream shape given the grid, dtype). Called per grid:
            ``specs_for(grid) -> {name: (shape, dtype)}``.
        device: where new pools are allocated.
        max_streams: most streams kept; past it the least recently seen ones are evicted when a
            batch commits (their next frame is dense). None: no limit.
    """

    def __init__(self, specs_for: Callable[[Grid], Specs], device: torch.device, max_streams: int | None = None):
        self._specs_for = specs_for
        self._device = torch.device(device)
        self._pools: dict[Grid, _Pool] = {}
        # stream id -> (grid, slot), least recently seen first.
        self._where: OrderedDict[Hashable, tuple[Grid, int]] = OrderedDict()
        self.max_streams = max_streams
        self.evicted: list[Hashable] = []
        """Ids evicted by the most recent commit (least recently seen first)."""
        self.evictions = 0
        """Streams evicted since this store was made."""
        self._open = False

    # -- queries ---------------------------------------------------------------------------------
    def __contains__(self, stream_id: Hashable) -> bool:
        return stream_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    @property
    def stream_ids(self) -> list[Hashable]:
        """Known streams, least recently seen first."""
        return list(self._where)

    def grid_of(self, stream_id: Hashable) -> Grid | None:
        where = self._where.get(stream_id)
        return where[0] if where else None

    def state_bytes(self) -> int:
        """Bytes held by every pool (capacity included, not only occupied slots)."""
        return sum(t.numel() * t.element_size() for p in self._pools.values() for t in p.tensors.values())

    # -- one batch's state ------------------------------------------------------------------------
    def begin(self, ids: list[Hashable], grid: Grid) -> StreamBatch:
        """Open the state of a batch of streams (one frame each) at ``grid``.

        A stream that is unknown, or known at another grid (its old state is kept until commit),
        gets a zeroed slot and starts over with a dense frame. Nothing is admitted before
        :meth:`StreamBatch.commit`.
        """
        if self._open:
            raise RuntimeError("a batch of this engine is still open (calls must not overlap)")
        pool = self._pool(grid)
        new = [i for i in ids if self._where.get(i, (None,))[0] != grid]
        free = pool.free_slots()
        if len(new) > len(free):
            pool.grow(pool.capacity + len(new) - len(free))
            free = pool.free_slots()
        slots = dict(zip(new, free))
        pool.reserved.update(slots.values())
        slot = [slots[i] if i in slots else self._where[i][1] for i in ids]
        self._open = True
        return StreamBatch(
            self, grid, pool, list(ids), slots,
            torch.tensor(slot, dtype=torch.int64, device=self._device),
            torch.tensor([i in slots for i in ids], dtype=torch.bool, device=self._device),
        )

    def _finish(self, batch: StreamBatch, admit: bool) -> None:
        pool = batch._pool
        pool.reserved.difference_update(batch.new_slots.values())
        self._open = False
        if not admit:
            for s in batch.new_slots.values():
                pool.clear_slot(s)
            self._drop_empty_pool(batch.grid)
            return
        for i, s in batch.new_slots.items():
            if i in self._where:  # known at another grid: its old state goes now
                self._remove(i)
            pool.owner[s] = i
            self._where[i] = (batch.grid, s)
        for i in batch.ids:
            self._where.move_to_end(i)
        self.evicted = []
        if self.max_streams is not None:
            keep = set(batch.ids)
            for i in [i for i in self._where if i not in keep][: max(0, len(self._where) - self.max_streams)]:
                self._remove(i)
                self.evicted.append(i)
            self.evictions += len(self.evicted)

    # -- whole-store changes -----------------------------------------------------------------------
    def remove(self, ids: list[Hashable]) -> None:
        for i in ids:
            self._remove(i)

    def _remove(self, i: Hashable) -> None:
        grid, s = self._where.pop(i)
        self._pools[grid].clear_slot(s)
        self._drop_empty_pool(grid)

    def _drop_empty_pool(self, grid: Grid) -> None:
        pool = self._pools.get(grid)
        if pool is not None and not pool.reserved and all(o is None for o in pool.owner):
            del self._pools[grid]

    def clear(self) -> None:
        self._pools.clear()
        self._where.clear()

    def _pool(self, grid: Grid) -> _Pool:
        pool = self._pools.get(grid)
        if pool is None:
            with torch.inference_mode(False):
                tensors = {
                    name: torch.zeros((0, *shape), dtype=dtype, device=self._device)
                    for name, (shape, dtype) in self._specs_for(grid).items()
                }
            pool = self._pools[grid] = _Pool(tensors)
        return pool

    # -- device / dtype moves and persistence ----------------------------------------------------
    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        """Apply ``fn`` (a ``Module._apply`` function) to every state tensor, then fix each
        tensor's dtype to its spec (the EMA stays float32 under ``.half()``)."""
        self._device = torch.device(device)
        for grid, pool in self._pools.items():
            specs = self._specs_for(grid)
            for name, t in pool.tensors.items():
                with torch.inference_mode(False):
                    pool.tensors[name] = fn(t).to(dtype=specs[name][1])

    def state(self) -> dict:
        """Plain-data snapshot: ``{"pools": [{"grid", "ids", "tensors"}]}`` with occupied rows only,
        ids least recently seen first."""
        pools = []
        for grid, pool in self._pools.items():
            ids = [i for i, (g, _) in self._where.items() if g == grid]
            index = torch.tensor([self._where[i][1] for i in ids], dtype=torch.int64, device=self._device)
            pools.append({
                "grid": list(grid),
                "ids": ids,
                "tensors": {n: t.index_select(0, index).detach().cpu() for n, t in pool.tensors.items()},
            })
        return {"pools": pools}

    def load(self, state: dict) -> None:
        """Replace every stream's state with a :meth:`state` snapshot (validated before any change)."""
        checked = []
        for p in state["pools"]:
            grid = tuple(int(x) for x in p["grid"])
            specs = self._specs_for(grid)
            if set(p["tensors"]) != set(specs):
                raise ValueError(f"saved state holds {sorted(p['tensors'])}, this engine needs {sorted(specs)}")
            for name, (shape, _) in specs.items():
                t = p["tensors"][name]
                if tuple(t.shape) != (len(p["ids"]), *shape):
                    raise ValueError(
                        f"saved state {name!r} at grid {grid} has shape {tuple(t.shape)}, "
                        f"expected {(len(p['ids']), *shape)}"
                    )
            checked.append((grid, list(p["ids"]), p["tensors"]))
        all_ids = [i for _, ids, _ in checked for i in ids]
        if len(set(all_ids)) != len(all_ids):
            raise ValueError("saved state lists a stream twice")
        self.clear()
        for grid, ids, tensors in checked:
            if ids:
                batch = self.begin(ids, grid)
                for name, t in tensors.items():
                    batch.write_rows(name, t.to(self._device))
                batch.commit()


class StreamBatch:
    """The state of one call's streams: the only writer of stream state.

    Attributes:
        grid: the batch's patch grid. ids: its B stream ids, in batch order.
        slot: ``[B]`` int64, each stream's row in the pools. first: ``[B]`` bool, streams that start
            (or restart) with a dense frame.

    Reads go through :meth:`tensor` (the live ``[capacity, ...]`` tensor, read in place by kernels).
    Every write goes through :meth:`write_rows`, :meth:`scatter` or :meth:`update_in_place`, which
    first keep what they overwrite; :meth:`rollback` restores it in reverse order. The undo of a
    scatter is one gather of the packed rows' old values (as many rows as the packed batch), the
    undo of a row write one copy of the batch's rows.
    """

    def __init__(self, store: StreamStore, grid: Grid, pool: _Pool, ids: list[Hashable],
                 new_slots: dict[Hashable, int], slot: torch.Tensor, first: torch.Tensor):
        self._store = store
        self.grid = grid
        self._pool = pool
        self.ids = ids
        self.new_slots = new_slots
        self.slot = slot
        self.first = first
        self._undo: list[Callable[[], None]] = []
        self._done = False

    @property
    def first_count(self) -> int:
        """How many frames of the batch are first frames (host-known: ``first`` without a read)."""
        return len(self.new_slots)

    # -- reads -------------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """The live ``[capacity, ...]`` pool tensor ``name``: read it, never write it directly."""
        return self._pool.tensors[name]

    def rows(self, name: str) -> torch.Tensor:
        """A copy of the batch's rows of ``name``: ``[B, ...]``."""
        return self.tensor(name).index_select(0, self.slot)

    # -- writes ------------------------------------------------------------------------------------
    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """Set the batch's rows of ``name`` to ``rows`` ``[B, ...]``."""
        t = self.tensor(name)
        self._keep_rows(t)
        with torch.no_grad():
            t.index_copy_(0, self.slot, rows.detach().to(t.dtype))

    def update_in_place(self, name: str) -> torch.Tensor:
        """Keep the batch's rows of ``name``, then hand out the live pool for an op that rewrites
        exactly those rows in place (the gate's EMA update)."""
        t = self.tensor(name)
        self._keep_rows(t)
        return t

    def scatter(self, name: str, src: torch.Tensor, cu_seqlens: torch.Tensor, index: torch.Tensor,
                layer: int | None = None, scale: str | None = None) -> None:
        """``state[slot[b], index[t]] = src[t]`` for each packed row t of stream b, through the
        registered op ``torch.ops.neuroflow.cache_scatter`` (see
        :func:`neuroflow.ops.cache_scatter.cache_scatter`), as is its undo.

        Args:
            src: ``[T_cap, D]`` packed rows; cu_seqlens: ``[B + 1]`` int32; index: ``[T_cap]`` int32.
            layer: for per-layer state ``[S, L, T_tok, D]``, the layer written.
            scale: for an 8-bit state, the name of its scale state ``[S, (L,) T_tok, G]``: the rows
                are quantised per group of ``D / G`` channels (undo restores both exactly).
        """
        t = self.tensor(name)
        s = self.tensor(scale) if scale is not None else None
        rows = self.slot
        if layer is not None:
            num_layers = t.shape[1]
            t = t.view(t.shape[0] * num_layers, *t.shape[2:])
            s = s.view(s.shape[0] * num_layers, *s.shape[2:]) if s is not None else None
            rows = self.slot * num_layers + layer
        old = _gather_packed(t, rows, cu_seqlens, index)
        if s is None:
            self._undo.append(lambda: cache_scatter_op(t, rows, old, cu_seqlens, index, None))
        else:
            old_scale = _gather_packed(s, rows, cu_seqlens, index)

            def restore():  # raw copies: the old 8-bit rows and their scales, not re-quantised
                cache_scatter_op(t, rows, old, cu_seqlens, index, None)
                cache_scatter_op(s, rows, old_scale, cu_seqlens, index, None)
            self._undo.append(restore)
        cache_scatter_op(t, rows, src, cu_seqlens, index, s)

    def _keep_rows(self, t: torch.Tensor) -> None:
        old = t.index_select(0, self.slot)
        slot = self.slot

        def restore():
            with torch.no_grad():
                t.index_copy_(0, slot, old)
        self._undo.append(restore)

    # -- end ---------------------------------------------------------------------------------------
    def commit(self, keep_undo: bool = False) -> None:
        """Keep every write; the batch's streams become known (and most recently seen).

        ``keep_undo``: keep what the writes overwrote, so :meth:`undo_commit` can still take the
        batch back (the engine's deferred finiteness check); :meth:`release` drops it."""
        self._end()
        if not keep_undo:
            self._undo.clear()
        self._store._finish(self, admit=True)

    def undo_commit(self) -> None:
        """Take back a batch committed with ``keep_undo=True``; must come before any other change
        to the store. Rows of streams known before the batch get their old values back; streams
        the batch admitted (new, or moved to this grid) are forgotten; evictions stay."""
        with torch.inference_mode(False), torch.no_grad():
            for restore in reversed(self._undo):
                restore()
        self._undo.clear()
        for i in self.new_slots:
            if i in self._store:
                self._store._remove(i)

    def release(self) -> None:
        """Drop what a ``keep_undo`` commit kept."""
        self._undo.clear()

    def rollback(self) -> None:
        """Undo every write in reverse order; no stream is admitted and none is forgotten."""
        self._end()
        with torch.inference_mode(False), torch.no_grad():
            for restore in reversed(self._undo):
                restore()
        self._undo.clear()
        self._store._finish(self, admit=False)

    def _end(self) -> None:
        if self._done:
            raise RuntimeError("this batch was already committed or rolled back")
        self._done = True


def _gather_packed(t: torch.Tensor, rows: torch.Tensor, cu_seqlens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[rows[frame(r)], index[r]]`` for every packed row r < ``len(index)``, without a host sync:
    rows past ``cu_seqlens[-1]`` read row 0 of position 0 (they are never written back)."""
    r = torch.arange(index.shape[0], device=index.device)
    frame = torch.searchsorted(cu_seqlens[1:].to(torch.int64), r, right=True).clamp_max(rows.shape[0] - 1)
    valid = r < cu_seqlens[-1]
    pos = torch.where(valid, index.to(torch.int64), 0)
    return t[torch.where(valid, rows[frame], 0), pos]
