"""Consistent hashing of stream ids onto shards (a hash ring with virtual nodes).

Every shard owns ``vnodes`` points on a 64-bit ring; a stream goes to the shard owning the first
point at or after the stream's hash. Adding a K+1-th shard moves only the streams that land on the
new shard's points (about 1/(K+1) of them); removing one moves only that shard's streams. Hashes
are BLAKE2b of a canonical encoding, so every process (front replicas, restarted fronts, tests)
maps a stream to the same shard (Python's ``hash`` of a str changes per process).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Hashable, Iterable, Sequence

DEFAULT_VNODES = 160


def stream_key(stream_id: Hashable) -> bytes:
    """Canonical bytes of a stream id: ``str`` and ``int`` only (the ids the engine can also save)."""
    if isinstance(stream_id, str):
        return b"s:" + stream_id.encode("utf-8")
    if isinstance(stream_id, int) and not isinstance(stream_id, bool):
        return b"i:" + str(stream_id).encode("ascii")
    raise TypeError(f"stream id {stream_id!r} must be a str or an int")


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """Shard names -> ring; :meth:`shard_for` maps a stream id to one of them.

    Args:
        shards: distinct shard names (at least one).
        vnodes: points per shard; more points give a more even split (160: within ~10% for 2-16 shards).
    """

    def __init__(self, shards: Sequence[str], vnodes: int = DEFAULT_VNODES):
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"vnodes must be an int >= 1, got {vnodes!r}")
        shards = list(shards)
        if not shards:
            raise ValueError("a hash ring needs at least one shard")
        if len(set(shards)) != len(shards):
            raise ValueError(f"shard names must be distinct, got {shards}")
        self.shards = shards
        self.vnodes = vnodes
        points = sorted((_point(f"{name}#{v}".encode()), name) for name in shards for v in range(vnodes))
        self._points = [p for p, _ in points]
        self._owners = [name for _, name in points]

    def shard_for(self, stream_id: Hashable) -> str:
        """The shard that serves ``stream_id``."""
        i = bisect.bisect_left(self._points, _point(stream_key(stream_id)))
        return self._owners[i % len(self._owners)]

    def assign(self, stream_ids: Iterable[Hashable]) -> dict[str, list[Hashable]]:
        """Shard name -> its streams among ``stream_ids`` (every shard present, maybe empty)."""
        out: dict[str, list[Hashable]] = {name: [] for name in self.shards}
        for s in stream_ids:
            out[self.shard_for(s)].append(s)
        return out

    def with_shards(self, shards: Sequence[str]) -> HashRing:
        """A ring over other shards with the same vnodes."""
        return HashRing(shards, self.vnodes)


def moves(old: HashRing, new: HashRing, stream_ids: Iterable[Hashable]) -> dict[Hashable, tuple[str, str]]:
    """Streams whose shard differs between two rings: id -> (old shard, new shard)."""
    out = {}
    for s in stream_ids:
        a, b = old.shard_for(s), new.shard_for(s)
        if a != b:
            out[s] = (a, b)
    return out


def shard_names(count: int) -> list[str]:
    """``["shard-0", ..., "shard-{count-1}"]``: growing the count keeps the existing names."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the shard count must be an int >= 1, got {count!r}")
    return [f"shard-{k}" for k in range(count)]
