"""The front: checks frames, routes each stream to its shard actor, retries across shard restarts,
and moves streams when the shard count changes.

Ray Serve's own request routing is not sticky (any replica may get any request), so the front
routes itself: a :class:`~neuroflow.serve.routing.HashRing` over named shard actors
(``{app_name}/shard-{k}`` in ``config.namespace``), created detached so they outlive a front
restart. A restarted front finds the shards that exist (also those a scale-up added).

Guarantees (one front replica; the application runs one):

- frames of one stream go to its shard one at a time, in arrival order (a per-stream lock held
  until the reply or ``shard_timeout_s``; a lock nobody holds or waits for is dropped); the front
  and the shard refuse sequence numbers that are not above the last answered one, also after the
  shard restarted;
- a bad frame, an unknown model or a refused sequence number is answered before any shard state
  changes; so is a frame over the shard's ``max_queue`` (429 ``overloaded``, with retry-after);
- a frame whose compute failed gets ``compute_failed``: the engine rolled back and the sequence
  number is free, so the same frame can be sent again;
- a frame whose shard died in flight (``ActorDiedError``) is sent again, with the same sequence
  number, until ``retry_timeout_s``; a shard that ran out of Ray restarts is created again by the
  front. After ``ActorUnavailableError`` (Ray: the call may have run) or a timeout, the same frame
  is sent as a *replay*: the shard answers the result it computed (or is computing) for that
  sequence number instead of computing it twice. Every frame is answered once;
- the first frame a stream answers after its state was lost (its shard restarted, the engine
  evicted it under ``max_streams``, a move without state) says ``state_lost=True`` and why. The
  front learns of a restart from the shard's process id, which it remembers per stream (the last
  ``front_streams`` streams); a front that restarted itself has no such memory, so a stream whose
  shard restarted in the same window runs dense (``first_frame``) without ``state_lost``;
- :meth:`Front.scale` copies the streams whose shard changes to their new shard, switches the ring
  only when every copy arrived, then drops the originals (a destination dying mid-move leaves the
  old ring and every state in place); the shard count is stored in Ray's internal key-value store,
  so a restarted front keeps the scaled ring. Frames wait during a move.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from .errors import (BadRequest, InternalError, SequenceError, ServeError, ShardTimeout, ShardUnavailable,
                     UnknownModel)
from .frames import FrameChecker
from .routing import HashRing, shard_names
from .shard import Shard, check_request
from .spec import ServeConfig, input_geometry

ShardActor = ray.remote(Shard)

try:
    from ray.exceptions import ActorUnavailableError
except ImportError:  # older Ray: no such error
    class ActorUnavailableError(RayActorError):  # type: ignore[no-redef]
        pass

# Errors after which the shard certainly did not change the stream: the frame is not "unsure".
SETTLED = ("bad_frame", "bad_request", "sequence", "overloaded", "compute_failed", "shutting_down")

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


def _count_key(config: ServeConfig) -> bytes:
    return f"neuroflow/{config.namespace}/{config.app_name}/num_shards".encode()


def saved_shard_count(config: ServeConfig) -> int | None:
    """The shard count the last :meth:`Front.scale` stored (None: never scaled)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_count_key(config))
    return int(raw) if raw else None


def save_shard_count(config: ServeConfig, count: int) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_count_key(config), str(count).encode(), overwrite=True)


def clear_shard_count(config: ServeConfig) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_count_key(config))


def existing_shards(config: ServeConfig, count: int | None = None) -> list[str]:
    """Names of the ``count`` shards :meth:`Front.scale` stored; without one, ``config.num_shards``
    shards plus any later ones that already exist."""
    if count is not None:  # stored by scale(): authoritative (a removed shard may still be dying)
        return shard_names(count)
    k = config.num_shards
    names = shard_names(k)
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
        names = self._discover()
        self.ring = HashRing(names, config.vnodes)
        self.shards = {name: self._make_shard(name) for name in names}
        self._decode = ThreadPoolExecutor(max_workers=2, thread_name_prefix="neuroflow-decode")
        # stream -> [lock, users]; dropped when the last user leaves (bounded under churn)
        self._locks: dict[Hashable, list] = {}
        # stream -> what the front knows of it (bounded LRU of ``front_streams``)
        self._streams: OrderedDict[Hashable, dict] = OrderedDict()
        self._open = asyncio.Event()
        self._open.set()
        self._busy = 0
        self._quiet = asyncio.Condition()
        self._scale_lock = asyncio.Lock()
        self._pids: dict[str, int] = {}
        self.restarts: Counter = Counter()
        self.retries: Counter = Counter()
        self.counts: Counter = Counter()

    # Where shards come from (overridden by in-process tests).
    def _discover(self) -> list[str]:
        return existing_shards(self.config, saved_shard_count(self.config))

    def _make_shard(self, name: str):
        return shard_actor(self.config, name)

    def _save_count(self, count: int) -> None:
        save_shard_count(self.config, count)

    def _remove_shard(self, name: str) -> None:
        ray.kill(self.shards.pop(name), no_restart=True)

    async def _lock(self, stream_id: Hashable) -> asyncio.Lock:
        entry = self._locks.setdefault(stream_id, [asyncio.Lock(), 0])
        entry[1] += 1
        await entry[0].acquire()
        return entry[0]

    def _unlock(self, stream_id: Hashable) -> None:
        entry = self._locks[stream_id]
        entry[0].release()
        entry[1] -= 1
        if not entry[1]:
            del self._locks[stream_id]

    def _record(self, stream_id: Hashable) -> dict | None:
        rec = self._streams.get(stream_id)
        if rec is not None:
            self._streams.move_to_end(stream_id)
        return rec

    def _remember(self, stream_id: Hashable, **fields) -> dict:
        rec = self._streams.get(stream_id)
        if rec is None:
            rec = self._streams[stream_id] = {"shard": None, "pid": None, "seq": None, "unsure": None, "lost": None}
        rec.update(fields)
        self._streams.move_to_end(stream_id)
        while len(self._streams) > self.config.front_streams:
            self._streams.popitem(last=False)
        return rec

    @property
    def tracked(self) -> dict:
        """Sizes of the front's per-stream tables (for memory checks)."""
        return {"locks": len(self._locks), "streams": len(self._streams)}

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
            await self._lock(stream_id)
            try:
                reply = await self._guarded_send(stream_id, int(seq), pixels)
            finally:
                self._unlock(stream_id)
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

    async def _guarded_send(self, stream_id: Hashable, seq: int, pixels) -> dict:
        """Sequence check against the last answered frame, then :meth:`_send`; keeps the record."""
        rec = self._record(stream_id)
        if rec is not None and rec["seq"] is not None and seq <= rec["seq"]:
            what = "duplicate" if seq == rec["seq"] else "out-of-order"
            return {"ok": False, "error": SequenceError(
                f"stream {stream_id!r}: {what} sequence number {seq} (last answered {rec['seq']}); frames of a "
                "stream must have increasing sequence numbers").to_dict()}
        replay = rec is not None and rec["unsure"] == seq
        reply = await self._send(stream_id, seq, pixels, replay)
        if not reply.get("ok"):
            if reply["error"]["error"] in SETTLED:
                if rec is not None and rec["unsure"] == seq:
                    rec["unsure"] = None
            else:  # the shard may have taken the frame: the next try of this seq is a replay
                self._remember(stream_id, unsure=seq)
            return reply
        lost = reply.get("state_lost_reason")
        if lost is None and rec is not None and rec["shard"] is not None:
            if rec["lost"]:
                lost = rec["lost"]
            elif rec["shard"] != reply["shard"]:
                lost = f"the stream moved from {rec['shard']} to {reply['shard']} without its state"
            elif rec["pid"] is not None and rec["pid"] != reply["pid"]:
                lost = f"shard {reply['shard']} restarted (process {rec['pid']} -> {reply['pid']})"
        reply["state_lost"] = lost is not None
        reply["state_lost_reason"] = lost
        self._remember(stream_id, shard=reply["shard"], pid=reply["pid"], seq=seq, unsure=None, lost=None)
        return reply

    async def _send(self, stream_id: Hashable, seq: int, pixels, replay: bool) -> dict:
        """Send to the stream's shard; on a dead shard retry (same seq) until ``retry_timeout_s``.

        ``ActorUnavailableError`` (the call may have run) and a timeout turn the frame into a
        replay: the shard then answers its result for ``seq`` rather than refusing a duplicate.
        A shard that is dead for good (out of restarts) is created again.
        """
        deadline = time.perf_counter() + self.config.retry_timeout_s
        backoff, retries = 0.05, 0
        while True:
            name = self.ring.shard_for(stream_id)
            try:
                reply = await asyncio.wait_for(self.shards[name].submit.remote(stream_id, seq, pixels, replay),
                                               timeout=self.config.shard_timeout_s)
            except asyncio.TimeoutError:
                self.counts["timeouts"] += 1
                return {"ok": False, "error": ShardTimeout(
                    f"shard {name} of stream {stream_id!r} did not answer within {self.config.shard_timeout_s:g} s; "
                    "the frame may still be computed: send the same frame again (same sequence number) to get its "
                    "result").to_dict()}
            except RayActorError as exc:
                self.retries[name] += 1
                retries += 1
                if isinstance(exc, ActorUnavailableError):
                    replay = True  # Ray: the call may have run; ask for its result, do not compute twice
                else:
                    self._revive(name)
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

    def _revive(self, name: str) -> None:
        """Get the shard's actor again: the same one while Ray restarts it; a new one (same
        name) once it is dead for good (``max_restarts`` used up)."""
        try:
            self.shards[name] = self._make_shard(name)
            self.counts["revive_calls"] += 1
        except Exception:  # the GCS is busy or the name is being freed: the next retry tries again
            pass

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
        for s in stream_ids:
            self._streams.pop(s, None)
        return {"ok": True, "reset": list(stream_ids)}

    async def scale(self, num_shards: int) -> dict:
        """Change the shard count to ``num_shards``; moved streams keep their state.

        Every moving stream is copied to its new shard first; the ring switches (and the count is
        stored) only when every copy arrived, then the originals are dropped. When a copy fails
        (a destination died), the copies are dropped, the old ring stays and the reply is
        ``{"ok": False, "error": shard_unavailable}``: nothing moved, nothing was lost.

        Returns ``{"ok", "shards", "moved" (ids whose state moved), "dense" (ids whose state could
        not be copied: their next frame says ``state_lost``), "errors", "seconds"}``.
        """
        try:
            names = shard_names(num_shards)
        except ValueError as exc:
            return {"ok": False, "error": BadRequest(str(exc)).to_dict()}
        t0 = time.perf_counter()
        timeout = self.config.shard_timeout_s
        async with self._scale_lock:
            old = self.ring
            new = old.with_shards(names)
            for name in names:
                if name not in self.shards:
                    self.shards[name] = self._make_shard(name)
            try:
                infos = await asyncio.wait_for(asyncio.gather(*(self.shards[n].ready.remote() for n in names)),
                                               timeout=SHARD_START_TIMEOUT_S)
            except (RayActorError, asyncio.TimeoutError) as exc:
                return {"ok": False, "error": ShardUnavailable(f"a shard did not start: {exc!r}").to_dict()}
            for name, info in zip(names, infos):
                self._note_pid(name, info["pid"])
            # Pause new frames until every frame in flight is done (each waits shard_timeout_s at
            # most), so the stream lists are final; frames stay paused during the move.
            self._open.clear()
            copied: dict[str, list] = {}
            try:
                async with self._quiet:
                    await self._quiet.wait_for(lambda: self._busy == 0)
                try:
                    lists = await asyncio.wait_for(
                        asyncio.gather(*(self.shards[n].stream_ids.remote() for n in old.shards)), timeout=timeout)
                    moving: dict[tuple[str, str], list] = {}
                    for name, ids in zip(old.shards, lists):
                        for s in ids:
                            target = new.shard_for(s)
                            if target != name:
                                moving.setdefault((name, target), []).append(s)
                    moved, dense, errors = [], [], []
                    for (src, dst), ids in moving.items():
                        blob = await asyncio.wait_for(self.shards[src].export_streams.remote(ids), timeout=timeout)
                        result = await asyncio.wait_for(self.shards[dst].import_streams.remote(blob), timeout=timeout)
                        copied.setdefault(dst, []).extend(blob["seq"])
                        moved += result["moved"]
                        dense += result["dense"]
                        if result["error"]:
                            errors.append(f"{src} -> {dst}: {result['error']} (these streams lost their state)")
                except (RayActorError, asyncio.TimeoutError) as exc:
                    for dst, ids in copied.items():  # undo the copies; the originals never left
                        try:
                            await asyncio.wait_for(self.shards[dst].drop_streams.remote(ids), timeout=timeout)
                        except (RayActorError, asyncio.TimeoutError):
                            pass  # a dead destination holds nothing anyway
                    # A restarted front must find the old ring, not the shards this call added.
                    self._save_count(len(old.shards))
                    for name in [n for n in names if n not in old.shards]:
                        self._remove_shard(name)
                    return {"ok": False, "error": ShardUnavailable(
                        f"scaling to {num_shards} shards stopped, nothing moved: {type(exc).__name__}: {exc}; "
                        "the ring is unchanged, try again").to_dict()}
                self.ring = new
                self._save_count(len(names))
                for (src, _), ids in moving.items():
                    try:
                        await asyncio.wait_for(self.shards[src].drop_streams.remote(ids), timeout=timeout)
                    except (RayActorError, asyncio.TimeoutError) as exc:  # unreachable now: only memory
                        errors.append(f"{src}: could not drop the moved streams ({type(exc).__name__})")
                for s in dense:
                    if s in self._streams:
                        self._streams[s]["lost"] = "its state could not be moved to its new shard when scaling"
                for (_, dst), ids in moving.items():
                    for s in ids:
                        if s in self._streams and s not in dense:
                            self._streams[s].update(shard=dst, pid=self._pids.get(dst))
            finally:
                self._open.set()
            for name in [n for n in old.shards if n not in names]:
                self._remove_shard(name)
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
            "retries": dict(self.retries), "tracked": self.tracked, "shards": shards,
        }

    async def routing(self, stream_ids: list[Hashable]) -> dict:
        """Stream id -> shard name under the current ring."""
        return {s: self.ring.shard_for(s) for s in stream_ids}


def internal(exc: BaseException) -> dict:
    return {"ok": False, "error": InternalError(f"{type(exc).__name__}: {exc}").to_dict()}
