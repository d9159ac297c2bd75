"""The front: checks frames, routes each stream to its shard actor, retries across shard restarts,
and moves streams when the shard count changes.

Ray Serve's own request routing is not sticky (any replica may get any request), so the front
routes itself: a :class:`~neuroflow.serve.routing.HashRing` over named shard actors
(``{app_name}/shard-{k}`` in ``config.namespace``), created detached so they outlive a front
restart. A restarted front finds the shards that exist (also those a scale-up added).

Guarantees (one front replica; the application runs one):

- frames of one stream go to its shard one at a time, in arrival order (a per-stream lock held
  until the reply); the shard refuses sequence numbers that are not increasing;
- a bad frame, an unknown model or a refused sequence number is answered before any shard state
  changes;
- a frame whose shard dies in flight is sent again, with the same sequence number, to the
  restarted shard (Ray restarts it, ``max_restarts``) until ``retry_timeout_s``; then the caller
  gets a retriable ``shard_unavailable`` error. Only that shard's callers wait or fail. The
  restarted shard has no state: its streams' next frames run dense (``first_frame`` True) and
  their sequence numbers start afresh;
- :meth:`Front.scale` moves the streams whose shard changes with their engine state (a
  ``stream_state_dict`` subset) and sequence numbers; their frames wait during the move, other
  streams' frames go on.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from .errors import BadRequest, InternalError, ServeError, ShardUnavailable, UnknownModel
from .frames import FrameChecker
from .routing import HashRing, shard_names
from .shard import Shard, check_request
from .spec import ServeConfig, input_geometry

ShardActor = ray.remote(Shard)

# How long a front waits for a new shard's model to load before giving up on starting it.
SHARD_START_TIMEOUT_S = 600.0


def actor_name(config: ServeConfig, shard: str) -> str:
    return f"{config.app_name}/{shard}"


def shard_actor(config: ServeConfig, shard: str):
    """Get or create the named, detached actor of ``shard`` (``shard_gpus`` GPUs each on CUDA)."""
    return ShardActor.options(
        name=actor_name(config, shard), namespace=config.namespace, lifetime="detached", get_if_exists=True,
        max_restarts=config.max_restarts, max_task_retries=0, max_concurrency=10_000,
        num_cpus=config.shard_cpus, num_gpus=config.shard_gpus if config.uses_gpu else 0,
    ).remote(config, shard)


def existing_shards(config: ServeConfig) -> list[str]:
    """Names of ``config.num_shards`` shards, plus any later ones that already exist (a scale-up
    before this front restarted)."""
    names = shard_names(config.num_shards)
    k = config.num_shards
    while True:
        try:
            ray.get_actor(actor_name(config, f"shard-{k}"), namespace=config.namespace)
        except ValueError:
            return names
        names.append(f"shard-{k}")
        k += 1


class Front:
    """Args:
    config: the application's settings (checked here: a bad one raises ``ValueError``).
    """

    def __init__(self, config: ServeConfig):
        config.check()
        self.config = config
        pre, side, channels = input_geometry(config)
        self.checker = FrameChecker(pre, side, channels, config.max_image_side)
        names = existing_shards(config)
        self.ring = HashRing(names, config.vnodes)
        self.shards = {name: shard_actor(config, name) for name in names}
        self._decode = ThreadPoolExecutor(max_workers=2, thread_name_prefix="neuroflow-decode")
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._open = asyncio.Event()
        self._open.set()
        self._busy = 0
        self._quiet = asyncio.Condition()
        self._scale_lock = asyncio.Lock()
        self._pids: dict[str, int] = {}
        self.restarts: Counter = Counter()
        self.retries: Counter = Counter()
        self.counts: Counter = Counter()

    async def wait_ready(self, timeout_s: float = SHARD_START_TIMEOUT_S) -> dict:
        """Wait until every shard has built its engine; shard name -> pid."""
        refs = {name: actor.ready.remote() for name, actor in self.shards.items()}
        out = {}
        for name, ref in refs.items():
            info = await asyncio.wait_for(ref, timeout=timeout_s)
            self._note_pid(name, info["pid"])
            out[name] = info["pid"]
        return out

    def _note_pid(self, shard: str, pid: int) -> None:
        old = self._pids.get(shard)
        if old is not None and old != pid:
            self.restarts[shard] += 1
        self._pids[shard] = pid

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise UnknownModel(f"model {model!r} is not served here (served: {self.config.model_name!r})")

    # -- frames ------------------------------------------------------------------------------------
    async def submit(self, stream_id: Hashable, seq: int, frame, model: str | None = None,
                     content_type: str | None = None) -> dict:
        """One frame of one stream -> reply dict (see :meth:`Shard.submit`) with ``"retries"`` and
        ``timing`` extended by ``decode_ms`` and ``total_ms``; or ``{"ok": False, "error": ...}``.

        ``frame``: PNG/JPEG or ``.npy`` bytes, a uint8 ``[H, W, 3]`` array, or float pixel values
        ``[C, S, S]`` (see :mod:`neuroflow.serve.frames`).
        """
        t0 = time.perf_counter()
        try:
            self._check_model(model)
            check_request(stream_id, seq)
            loop = asyncio.get_running_loop()
            pixels = await loop.run_in_executor(self._decode, self.checker, frame, content_type)
        except ServeError as exc:
            self.counts[exc.kind] += 1
            return {"ok": False, "error": exc.to_dict()}
        decode_ms = (time.perf_counter() - t0) * 1e3
        await self._open.wait()
        self._busy += 1
        try:
            lock = self._locks.setdefault(stream_id, asyncio.Lock())
            async with lock:
                reply = await self._send(stream_id, int(seq), pixels)
        finally:
            self._busy -= 1
            async with self._quiet:
                self._quiet.notify_all()
        if reply.get("ok"):
            reply["timing"]["decode_ms"] = decode_ms
            reply["timing"]["total_ms"] = (time.perf_counter() - t0) * 1e3
            self.counts["ok"] += 1
        else:
            self.counts[reply["error"]["error"]] += 1
        return reply

    async def _send(self, stream_id: Hashable, seq: int, pixels) -> dict:
        """Send to the stream's shard; on a dead shard retry (same seq) until ``retry_timeout_s``."""
        deadline = time.perf_counter() + self.config.retry_timeout_s
        backoff, retries = 0.05, 0
        while True:
            name = self.ring.shard_for(stream_id)
            try:
                reply = await self.shards[name].submit.remote(stream_id, seq, pixels)
            except RayActorError as exc:
                self.retries[name] += 1
                retries += 1
                if time.perf_counter() + backoff > deadline:
                    return {"ok": False, "error": ShardUnavailable(
                        f"shard {name} of stream {stream_id!r} is not back after {retries} tries "
                        f"({self.config.retry_timeout_s:g} s): {type(exc).__name__}; send the frame again").to_dict()}
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if reply.get("ok"):
                self._note_pid(name, reply["pid"])
            reply["retries"] = retries
            return reply

    # -- streams -----------------------------------------------------------------------------------
    async def reset(self, stream_ids: list[Hashable], model: str | None = None) -> dict:
        """Forget streams (their next frame runs dense, any sequence number)."""
        try:
            self._check_model(model)
            for s in stream_ids:
                check_request(s, 0)
        except ServeError as exc:
            return {"ok": False, "error": exc.to_dict()}
        groups = self.ring.assign(stream_ids)
        replies = await asyncio.gather(*(self.shards[n].reset.remote(ids) for n, ids in groups.items() if ids))
        for r in replies:
            if not r.get("ok"):
                return r
        return {"ok": True, "reset": list(stream_ids)}

    async def scale(self, num_shards: int) -> dict:
        """Change the shard count to ``num_shards``; moved streams keep their state.

        Returns ``{"ok", "shards", "moved" (ids whose state moved), "dense" (ids that restart dense
        on their new shard), "errors", "seconds"}``.
        """
        try:
            names = shard_names(num_shards)
        except ValueError as exc:
            return {"ok": False, "error": BadRequest(str(exc)).to_dict()}
        t0 = time.perf_counter()
        async with self._scale_lock:
            old = self.ring
            new = old.with_shards(names)
            for name in names:
                if name not in self.shards:
                    self.shards[name] = shard_actor(self.config, name)
            await asyncio.gather(*(self.shards[n].ready.remote() for n in names))
            # Pause new frames until every frame in flight is done, so the stream lists are final.
            self._open.clear()
            try:
                async with self._quiet:
                    await self._quiet.wait_for(lambda: self._busy == 0)
                lists = await asyncio.gather(*(self.shards[n].stream_ids.remote() for n in old.shards))
                moving: dict[tuple[str, str], list] = {}
                for name, ids in zip(old.shards, lists):
                    for s in ids:
                        target = new.shard_for(s)
                        if target != name:
                            moving.setdefault((name, target), []).append(s)
                locks = [self._locks.setdefault(s, asyncio.Lock()) for group in moving.values() for s in group]
                for lock in locks:  # free: nothing is in flight
                    await lock.acquire()
                self.ring = new
            finally:
                self._open.set()
            moved, dense, errors = [], [], []
            try:
                for (src, dst), ids in moving.items():
                    blob = await self.shards[src].export_streams.remote(ids)
                    result = await self.shards[dst].import_streams.remote(blob)
                    moved += result["moved"]
                    dense += result["dense"]
                    if result["error"]:
                        errors.append(f"{src} -> {dst}: {result['error']} (streams restart dense)")
            finally:
                for lock in locks:
                    lock.release()
            for name in [n for n in old.shards if n not in names]:
                ray.kill(self.shards.pop(name), no_restart=True)
            return {"ok": True, "shards": len(names), "moved": moved, "dense": dense, "errors": errors,
                    "seconds": time.perf_counter() - t0}

    async def stats(self, timeout_s: float = 5.0) -> dict:
        """Front counters plus every shard's :meth:`Shard.stats` (``None`` for a shard that does
        not answer within ``timeout_s``, e.g. while it restarts)."""
        shards = {}
        for name, actor in list(self.shards.items()):
            try:
                shards[name] = await asyncio.wait_for(actor.stats.remote(), timeout=timeout_s)
            except (RayActorError, GetTimeoutError, asyncio.TimeoutError):
                shards[name] = None
        return {
            "ok": True, "model": self.config.model_name, "image_size": self.checker.image_size,
            "ring": list(self.ring.shards), "counts": dict(self.counts), "restarts": dict(self.restarts),
            "retries": dict(self.retries), "shards": shards,
        }

    async def routing(self, stream_ids: list[Hashable]) -> dict:
        """Stream id -> shard name under the current ring."""
        return {s: self.ring.shard_for(s) for s in stream_ids}


def internal(exc: BaseException) -> dict:
    return {"ok": False, "error": InternalError(f"{type(exc).__name__}: {exc}").to_dict()}
