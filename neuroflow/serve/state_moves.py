"""Moving streams between engines with their state: subsets and merges of
``NeuroFlow.stream_state_dict()`` snapshots.

A snapshot is ``{"format", "config", "settings", "pools": [{"grid", "ids", "tensors"}]}``, one
pool per patch grid, tensor rows in the order of ``ids``. :func:`take` keeps some streams' rows;
:func:`merge` adds one snapshot's streams to another's. Loading the merge with
``load_stream_state_dict`` is checked by the engine (same architecture and geometry, else nothing
changes). A snapshot of another layout raises :class:`StateFormatError`; the caller then restarts
the streams dense instead and says so.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import torch


class StateFormatError(ValueError):
    """A stream-state snapshot does not have the layout this module knows."""


def _pools(state: dict) -> list[dict]:
    pools = state.get("pools") if isinstance(state, dict) else None
    if not isinstance(pools, list) or not all(
        isinstance(p, dict) and {"grid", "ids", "tensors"} <= set(p) for p in pools
    ):
        raise StateFormatError("stream state has no list of pools with grid, ids and tensors")
    return pools


def stream_ids(state: dict) -> list[Hashable]:
    """Every stream id in a snapshot."""
    return [i for p in _pools(state) for i in p["ids"]]


def take(state: dict, ids: Iterable[Hashable]) -> dict:
    """The snapshot restricted to ``ids`` (ids not in it are ignored; empty pools dropped)."""
    wanted = set(ids)
    pools = []
    for p in _pools(state):
        rows = [r for r, i in enumerate(p["ids"]) if i in wanted]
        if not rows:
            continue
        index = torch.tensor(rows, dtype=torch.int64)
        pools.append({
            "grid": list(p["grid"]),
            "ids": [p["ids"][r] for r in rows],
            "tensors": {n: t.index_select(0, index) for n, t in p["tensors"].items()},
        })
    return {**{k: v for k, v in state.items() if k != "pools"}, "pools": pools}


def merge(base: dict, extra: dict) -> dict:
    """``base`` plus ``extra``'s streams (same grid -> rows appended to that pool).

    Raises:
        StateFormatError: a stream is in both, or a pool's tensors differ in names.
    """
    pools = {tuple(p["grid"]): {"grid": list(p["grid"]), "ids": list(p["ids"]), "tensors": dict(p["tensors"])}
             for p in _pools(base)}
    known = set(stream_ids(base))
    for p in _pools(extra):
        both = known.intersection(p["ids"])
        if both:
            raise StateFormatError(f"stream(s) {sorted(map(repr, both))} are in both snapshots")
        grid = tuple(p["grid"])
        if grid not in pools:
            pools[grid] = {"grid": list(grid), "ids": list(p["ids"]), "tensors": dict(p["tensors"])}
            continue
        target = pools[grid]
        if set(target["tensors"]) != set(p["tensors"]):
            raise StateFormatError(f"pool {grid}: state tensors {sorted(p['tensors'])} do not match "
                                   f"{sorted(target['tensors'])}")
        target["ids"] += list(p["ids"])
        target["tensors"] = {n: torch.cat([t, p["tensors"][n]]) for n, t in target["tensors"].items()}
    return {**{k: v for k, v in base.items() if k != "pools"}, "pools": list(pools.values())}
