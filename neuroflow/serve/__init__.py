"""Serving many camera streams with Ray: a front routes every stream to one of K shards by
consistent hashing; each shard holds one NeuroFlow engine and batches its streams' frames.

    client -> front (HTTP / handle: check, decode, route, retry) -> shard-k actor
           -> micro-batch -> NeuroFlow engine

Modules: :mod:`.routing` (hash ring), :mod:`.frames` (decode and check frames),
:mod:`.batching` (micro-batches), :mod:`.shard` (one engine), :mod:`.state_moves` (stream-state
subsets), :mod:`.front` (routing, retries, scaling), :mod:`.http_api`, :mod:`.app` (start/stop),
:mod:`.client` (handle API), :mod:`.errors`, :mod:`.spec` (settings, engine building).

``routing``, ``frames``, ``batching``, ``state_moves``, ``errors`` and ``spec`` import without Ray;
the rest need ``pip install "neuroflow[serve]"``.
"""

from .errors import (
    BadFrame,
    BadRequest,
    ComputeFailed,
    InternalError,
    Overloaded,
    SequenceError,
    ServeError,
    ShardTimeout,
    ShardUnavailable,
    ShuttingDown,
    UnknownModel,
    UnknownStream,
)
from .routing import HashRing
from .spec import ServeConfig

__all__ = [
    "BadFrame", "BadRequest", "ComputeFailed", "HashRing", "InternalError", "Overloaded", "SequenceError",
    "ServeConfig", "ServeError", "ShardTimeout", "ShardUnavailable", "ShuttingDown", "UnknownModel", "UnknownStream",
]
