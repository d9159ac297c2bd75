"""Per-stream state: which streams exist, at which grid, and their tensors in slot-indexed pools.

Every stream lives in the pool of its patch grid ``(gh, gw)``. A pool keeps each state tensor as
one ``[capacity, ...]`` tensor and gives every stream a slot (a row), so a batch of frames reads and
writes its streams' rows with one gather and one scatter per tensor: the layout the gate kernels
take (``ema[S, N, D]`` plus a per-frame slot index).

A call first admits its streams (:meth:`StreamStore.admit`), then its ops update their rows in
place; the engine drops the batch's streams if anything fails after admission.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

Grid = tuple[int, int]
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class _Pool:
    tensors: dict[str, torch.Tensor]
    owner: list[Hashable | None] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return len(self.owner)

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


class StreamStore:
    """All streams' state.

    Args:
        specs: state tensor name -> (per-stream shape given the grid, dtype). Called per grid:
            ``specs_for(grid) -> {name: (shape, dtype)}``.
        device: where new pools are allocated.
    """

    def __init__(self, specs_for: Callable[[Grid], Specs], device: torch.device):
        self._specs_for = specs_for
        self._device = torch.device(device)
        self._pools: dict[Grid, _Pool] = {}
        self._where: dict[Hashable, tuple[Grid, int]] = {}

    # -- queries ---------------------------------------------------------------------------------
    def __contains__(self, stream_id: Hashable) -> bool:
        return stream_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    @property
    def stream_ids(self) -> list[Hashable]:
        return list(self._where)

    def grid_of(self, stream_id: Hashable) -> Grid | None:
        where = self._where.get(stream_id)
        return where[0] if where else None

    def admit(self, ids: list[Hashable], grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """Give every stream of ``ids`` a slot in the pool of ``grid``.

        A stream that is unknown, or known at another grid (its old state is dropped), gets a
        fresh zeroed slot and starts over with a dense frame.
        Returns ``(slot [B] int64, first [B] bool)``.
        """
        for i in ids:
            if i in self._where and self._where[i][0] != grid:
                self.remove([i])
        pool = self._pool(grid)
        new = [i for i in ids if i not in self._where]
        free = [s for s, o in enumerate(pool.owner) if o is None]
        if len(new) > len(free):
            pool.grow(pool.capacity + len(new) - len(free))
            free = [s for s, o in enumerate(pool.owner) if o is None]
        for i, s in zip(new, free):
            pool.owner[s] = i
            self._where[i] = (grid, s)
        slot = torch.tensor([self._where[i][1] for i in ids], dtype=torch.int64, device=self._device)
        first = torch.tensor([i in new for i in ids], dtype=torch.bool, device=self._device)
        return slot, first

    def tensor(self, name: str, grid: Grid) -> torch.Tensor:
        """The live ``[capacity, ...]`` pool tensor ``name`` of ``grid`` (ops write it in place)."""
        return self._pools[grid].tensors[name]

    def write(self, name: str, grid: Grid, slot: torch.Tensor, rows: torch.Tensor) -> None:
        """Set rows ``slot`` of state ``name`` to ``rows``."""
        t = self.tensor(name, grid)
        with torch.no_grad():
            t.index_copy_(0, slot, rows.detach().to(t.dtype))

    def remove(self, ids: list[Hashable]) -> None:
        for i in ids:
            grid, s = self._where.pop(i)
            pool = self._pools[grid]
            pool.owner[s] = None
            for t in pool.tensors.values():
                t[s].zero_()
            if all(o is None for o in pool.owner):
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
        """Plain-data snapshot: ``{"pools": [{"grid", "ids", "tensors"}]}`` with occupied rows only."""
        pools = []
        for grid, pool in self._pools.items():
            slots = [s for s, o in enumerate(pool.owner) if o is not None]
            index = torch.tensor(slots, dtype=torch.int64, device=self._device)
            pools.append({
                "grid": list(grid),
                "ids": [pool.owner[s] for s in slots],
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
                slot, _ = self.admit(ids, grid)
                for name, t in tensors.items():
                    self.write(name, grid, slot, t.to(self._device))
