"""In-process clients: :class:`ServeClient` wraps the front's Ray Serve handle.

``send`` returns a :class:`FrameResult` or raises the :class:`~neuroflow.serve.errors.ServeError`
the front answered (``BadFrame``, ``SequenceError``, ``ShardUnavailable`` ...).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from .errors import from_dict


@dataclass
class FrameResult:
    """One frame's reply.

    Attributes:
        stream, seq: the frame.
        embedding: ``[D]`` float32, the engine's ``pooler_output`` row (CLS row where none).
        sparsity: ``1 - active / N`` of this frame.
        first_frame: True when the stream (re)started densely with this frame.
        batch_size: frames in the engine call that computed it.
        shard: the shard that computed it.
        retries: times the front sent it again after its shard died or was unavailable.
        state_lost: True on the first frame the stream answers after its state was lost (shard
            restart, eviction under ``max_streams``, a move without state); ``state_lost_reason``
            says which. The frame ran dense.
        replayed: the shard answered a result it had already computed for this sequence number
            (after a timeout or ``ActorUnavailableError``), not a second computation.
        timing: milliseconds: ``decode_ms`` (front), ``queue_ms`` (wait for a batch), ``compute_ms``
            (the engine call), ``shard_ms`` (in the shard), ``total_ms`` (in the front).
    """

    stream: Hashable
    seq: int
    embedding: np.ndarray
    sparsity: float
    first_frame: bool
    batch_size: int
    shard: str
    retries: int
    timing: dict
    state_lost: bool = False
    state_lost_reason: str | None = None
    replayed: bool = False

    @classmethod
    def from_reply(cls, reply: dict) -> FrameResult:
        if not reply.get("ok"):
            raise from_dict(reply["error"])
        return cls(reply["stream"], reply["seq"], np.asarray(reply["embedding"], dtype=np.float32),
                   reply["sparsity"], reply["first_frame"], reply["batch_size"], reply["shard"],
                   reply["retries"], reply["timing"], bool(reply.get("state_lost")),
                   reply.get("state_lost_reason"), bool(reply.get("replayed")))


def _ok(reply: dict) -> dict:
    if not reply.get("ok"):
        raise from_dict(reply["error"])
    return reply


class ServeClient:
    """Args:
    handle: the front's ``DeploymentHandle`` (``serve.get_app_handle(app_name)``).
    """

    def __init__(self, handle):
        self.handle = handle

    @classmethod
    def connect(cls, app_name: str = "neuroflow") -> ServeClient:
        """A client for a running application on the connected Ray cluster."""
        from ray import serve

        return cls(serve.get_app_handle(app_name))

    def send(self, stream_id: Hashable, seq: int, frame, model: str | None = None) -> FrameResult:
        """One frame (image bytes, uint8 ``[H, W, 3]``, or float ``[C, S, S]``) -> its result."""
        return FrameResult.from_reply(self.handle.submit.remote(stream_id, seq, frame, model).result())

    async def asend(self, stream_id: Hashable, seq: int, frame, model: str | None = None) -> FrameResult:
        """:meth:`send` for asyncio code."""
        return FrameResult.from_reply(await self.handle.submit.remote(stream_id, seq, frame, model))

    def reset(self, stream_ids: list[Hashable], model: str | None = None) -> None:
        _ok(self.handle.reset.remote(list(stream_ids), model).result())

    def scale(self, num_shards: int) -> dict:
        """Change the shard count; returns which streams moved with state and which restart dense."""
        return _ok(self.handle.scale.remote(num_shards).result())

    def stats(self) -> dict:
        return _ok(self.handle.stats.remote().result())

    def routing(self, stream_ids: list[Hashable]) -> dict:
        """Stream id -> shard name."""
        return self.handle.routing.remote(list(stream_ids)).result()

    def wait_ready(self) -> dict:
        """Block until every shard has built its engine; shard name -> pid."""
        return self.handle.wait_ready.remote().result()
