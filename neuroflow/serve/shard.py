"""One shard: a NeuroFlow engine for the streams the hash ring sends it, fed by micro-batches.

:class:`Shard` is a plain asyncio class; the application runs each one as a named Ray actor
(``ray.remote(Shard)``, one GPU or CPU worker each; see :mod:`neuroflow.serve.app`). Every
method returns plain data (dicts, numpy arrays): errors come back as
``{"ok": False, "error": ServeError.to_dict()}`` rather than as exceptions, so callers never
depend on how Ray wraps exceptions.

Per stream the shard keeps the engine state, the last accepted sequence number and that frame's
result (so a caller that lost the answer can replay the frame and get it, instead of a duplicate
refusal or a second computation). A frame is checked (sequence number, then shape, dtype, NaN/Inf
after the cast to the model dtype, then the queue bound ``max_queue``) before it is queued, so a
refused frame changes nothing and never joins a batch. A failed engine call is rolled back by the
engine; its frames give their sequence numbers back (``compute_failed``, retriable). A sticky
CUDA error ends the process (Ray restarts it). Streams the engine evicts (``max_streams``) are
remembered (bounded) so their next frame says ``state_lost`` and their old numbers are refused. The engine runs in
one worker thread, so the event loop keeps accepting frames while a batch computes; stream
moves and resets run in the same thread, between batches.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import state_moves
from .batching import FrameBatcher, Pending
from .errors import (BadFrame, BadRequest, ComputeFailed, Overloaded, SequenceError, ServeError, ShuttingDown,
                     UnknownStream)
from .routing import stream_key
from .spec import ServeConfig, build_engine


def _was_restarted() -> bool:
    try:
        import warnings

        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a Ray instance
            return False
        with warnings.catch_warnings():  # Ray 2.60 warns about an attribute it reads internally
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside a Ray actor (a plain Shard in tests)
        return False


# Streams whose state a shard dropped (eviction) that it still remembers, to flag and refuse.
LOST_LIMIT = 1024


def is_sticky_device_error(exc: BaseException) -> bool:
    """A CUDA error after which the process's CUDA context is unusable (every later call fails):
    ``torch.AcceleratorError`` where torch has it, else a ``RuntimeError`` saying "CUDA error"
    (out-of-memory is not sticky: the allocator recovers)."""
    accel = getattr(torch, "AcceleratorError", None)
    text = str(exc)
    if "out of memory" in text:
        return False
    return (accel is not None and isinstance(exc, accel)) or (isinstance(exc, RuntimeError) and "CUDA error" in text)


def _copy(result: dict, replayed: bool, shard_ms: float) -> dict:
    """One caller's copy of a frame's result (a replay shares the future with the first caller)."""
    if not result.get("ok"):
        return result
    out = dict(result, replayed=replayed)
    out["timing"] = dict(result["timing"], shard_ms=shard_ms)
    return out


def check_request(stream_id: Hashable, seq: int) -> None:
    """Stream ids are str or int; sequence numbers are ints >= 0 (raises :class:`BadRequest`)."""
    try:
        stream_key(stream_id)
    except TypeError as exc:
        raise BadRequest(str(exc)) from exc
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 0:
        raise BadRequest(f"sequence number must be an int >= 0, got {seq!r}")


class Shard:
    """Args:
    config: the application's settings (model, engine, batching).
    name: this shard's ring name, e.g. ``"shard-0"``.
    """

    def __init__(self, config: ServeConfig, name: str):
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.name = name
        self.engine = build_engine(config)
        self.device = torch.device(config.device)
        self.pid = os.getpid()
        self.started = time.time()
        self.restarted = _was_restarted()
        self._batcher = FrameBatcher(config.max_batch, config.max_wait_ms / 1000.0)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"neuroflow-{name}")
        self._last_seq: dict[Hashable, int] = {}
        # stream -> (seq, future) of its last accepted frame, for a caller's replay of that frame
        self._results: dict[Hashable, tuple[int, asyncio.Future]] = {}
        # stream -> (why its state is gone, its last sequence number), bounded, oldest dropped
        self._lost: OrderedDict[Hashable, tuple[str, int]] = OrderedDict()
        self._lost_limit = max(LOST_LIMIT, 4 * (config.max_streams or 0))
        self._faults: list[tuple[str, float]] = []
        self._die_on_import = False
        self._computing: list[Pending] = []
        self._closed = False
        self._inflight: Counter = Counter()
        self._idle = asyncio.Condition()
        self._worker: asyncio.Task | None = None
        self.frames = 0
        self.batches = 0
        self.batch_sizes: Counter = Counter()
        self.errors: Counter = Counter()

    # -- frames ------------------------------------------------------------------------------------
    async def ready(self) -> dict:
        """Identity of the running process (the front notices restarts by a new pid)."""
        return {"shard": self.name, "pid": self.pid, "started": self.started, "restarted": self.restarted}

    def _check_pixels(self, pixels) -> torch.Tensor:
        e = self.engine
        want = (e.channels, e.image_size, e.image_size)
        if isinstance(pixels, np.ndarray):
            if not np.issubdtype(pixels.dtype, np.floating):
                raise BadFrame(f"pixel values must be floating point, got {pixels.dtype}")
            x = torch.from_numpy(np.array(pixels, copy=True))  # Ray hands read-only arrays
        elif isinstance(pixels, torch.Tensor) and pixels.is_floating_point():
            x = pixels.detach().cpu()
        else:
            raise BadFrame(f"pixel values must be a float array [C, S, S], got {type(pixels).__name__}")
        if tuple(x.shape) != want:
            raise BadFrame(f"pixel values have shape {list(x.shape)}, this shard serves {list(want)}")
        x = x.to(e.dtype)
        if not torch.isfinite(x).all():
            raise BadFrame(f"pixel values contain NaN or Inf (after conversion to {e.dtype})")
        return x

    async def submit(self, stream_id: Hashable, seq: int, pixels, replay: bool = False) -> dict:
        """Queue one preprocessed frame ``[C, S, S]`` and wait for its result.

        ``replay``: the caller sent this frame before and did not get the answer (a timeout, or
        Ray's ``ActorUnavailableError``, after which the call may have run). If ``seq`` is the
        stream's last accepted frame, its result is returned again (``"replayed": True``) rather
        than refused as a duplicate or computed twice; otherwise the frame is handled as new.

        Returns ``{"ok": True, "stream", "seq", "embedding" (float32 [D]), "sparsity",
        "first_frame", "state_lost", "state_lost_reason" (str or None), "replayed",
        "batch_size", "shard", "pid", "timing": {"queue_ms", "compute_ms", "shard_ms"}}`` or
        ``{"ok": False, "error": {...}}``.
        """
        t0 = time.perf_counter()
        if replay and stream_id in self._results and self._results[stream_id][0] == seq:
            result = await asyncio.shield(self._results[stream_id][1])
            return _copy(result, replayed=True, shard_ms=(time.perf_counter() - t0) * 1e3)
        try:
            check_request(stream_id, seq)
            seq = int(seq)
            last = self._last_seq.get(stream_id)
            if last is None and stream_id in self._lost:
                last = self._lost[stream_id][1]
            if last is not None and seq <= last:
                what = "duplicate" if seq == last else "out-of-order"
                raise SequenceError(f"stream {stream_id!r}: {what} sequence number {seq} (last accepted {last}); "
                                    "frames of a stream must have increasing sequence numbers")
            x = self._check_pixels(pixels)
            if len(self._batcher) >= self.config.max_queue:
                raise Overloaded(f"shard {self.name} has {len(self._batcher)} frames queued (max_queue "
                                 f"{self.config.max_queue}); nothing changed, send the frame again later")
        except ServeError as exc:
            self.errors[exc.kind] += 1
            return {"ok": False, "error": exc.to_dict()}
        if self._closed:
            return {"ok": False, "error": ShuttingDown(f"shard {self.name} is closing").to_dict()}
        loop = asyncio.get_running_loop()
        prev = self._last_seq.get(stream_id)
        self._last_seq[stream_id] = seq
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        fut = loop.create_future()
        self._results[stream_id] = (seq, fut)
        self._inflight[stream_id] += 1
        self._batcher.put(Pending(stream_id, seq, x, fut, t0, prev_seq=prev))
        try:
            result = await asyncio.shield(fut)  # the future outlives a caller that went away (replay)
        finally:
            self._inflight[stream_id] -= 1
            if not self._inflight[stream_id]:
                del self._inflight[stream_id]
            async with self._idle:
                self._idle.notify_all()
        return _copy(result, replayed=False, shard_ms=(time.perf_counter() - t0) * 1e3)

    def _give_back(self, p: Pending) -> None:
        """A frame that was not computed: its sequence number may be used again."""
        if self._last_seq.get(p.stream_id) == p.seq:
            if p.prev_seq is None:
                del self._last_seq[p.stream_id]
            else:
                self._last_seq[p.stream_id] = p.prev_seq
        if self._results.get(p.stream_id, (None,))[0] == p.seq:
            del self._results[p.stream_id]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._batcher.next_batch()
            self._computing = batch
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._executor, self._compute, batch)
            except Exception as exc:
                if is_sticky_device_error(exc):
                    # The CUDA context is unusable for this process: exit so Ray restarts the
                    # shard, and the front resends these frames to the new process. Answering
                    # them here would be a lie (nothing else this process computes can be trusted).
                    print(f"neuroflow shard {self.name}: sticky device error, exiting: {exc!r}", flush=True)
                    os._exit(70)
                self.errors["compute_failed"] += len(batch)
                err = ComputeFailed(
                    f"the engine failed on a batch of {len(batch)} frame(s) ({type(exc).__name__}: {exc}); it rolled "
                    "the batch back, so each stream keeps the state it had before this frame: send the same frame "
                    "again (same sequence number)").to_dict()
                for p in batch:
                    self._give_back(p)
                    if not p.future.done():
                        p.future.set_result({"ok": False, "error": err})
                continue
            finally:
                self._computing = []
            compute_ms = (time.perf_counter() - start) * 1e3
            self.frames += len(batch)
            self.batches += 1
            self.batch_sizes[len(batch)] += 1
            pooled, sparsity, first, evicted = out
            for i in evicted:  # max_streams: forget them, but refuse their old sequence numbers
                self._forget(i, f"evicted from shard {self.name} (max_streams {self.config.max_streams})")
            for k, p in enumerate(batch):
                lost = self._lost.pop(p.stream_id, None)
                if p.future.done():
                    continue
                p.future.set_result({
                    "ok": True, "stream": p.stream_id, "seq": p.seq, "embedding": pooled[k],
                    "sparsity": float(sparsity[k]), "first_frame": bool(first[k]),
                    "state_lost": lost is not None, "state_lost_reason": lost[0] if lost else None,
                    "batch_size": len(batch), "shard": self.name, "pid": self.pid,
                    "timing": {"queue_ms": (start - p.enqueued) * 1e3, "compute_ms": compute_ms},
                })

    def _forget(self, stream_id: Hashable, reason: str) -> None:
        """Drop a stream's sequence number and cached result, remembering (bounded) why and its
        last sequence number, so its next frame says ``state_lost`` and old numbers are refused."""
        last = self._last_seq.pop(stream_id, None)
        self._results.pop(stream_id, None)
        if last is None:
            return
        self._lost[stream_id] = (reason, last)
        self._lost.move_to_end(stream_id)
        while len(self._lost) > self._lost_limit:
            self._lost.popitem(last=False)

    async def inject_fault(self, kind: str, count: int = 1, seconds: float = 0.0) -> dict:
        """Fault injection for failure tests and load tests: the next ``count`` engine calls
        fail with ``kind``: ``"error"`` (an exception: the batch is rolled back), ``"sticky"``
        (a sticky CUDA error: the process exits), ``"hang"`` (the call sleeps ``seconds`` first);
        ``"die_on_import"``: the process exits at the next :meth:`import_streams` (a destination
        dying mid-move).
        """
        if kind == "die_on_import":
            self._die_on_import = True
            return {"ok": True, "faults": len(self._faults)}
        if kind not in ("error", "sticky", "hang"):
            return {"ok": False, "error": BadRequest(f"unknown fault {kind!r}").to_dict()}
        self._faults += [(kind, float(seconds))] * int(count)
        return {"ok": True, "faults": len(self._faults)}

    def _compute(self, batch: list[Pending]):
        if self._faults:
            kind, seconds = self._faults.pop(0)
            if kind == "hang":
                time.sleep(seconds)
            elif kind == "sticky":
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            else:
                raise RuntimeError("injected engine failure")
        nf = self.engine.nf
        x = torch.stack([p.pixels for p in batch]).to(self.device)
        with torch.inference_mode():
            out = nf(x, stream_ids=[p.stream_id for p in batch])
            pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
            return (pooled.float().cpu().numpy(), out.sparsity.cpu().numpy(), out.first_frame.cpu().numpy(),
                    nf.last_evicted)

    # -- streams -----------------------------------------------------------------------------------
    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _drain(self, ids) -> None:
        async with self._idle:
            await self._idle.wait_for(lambda: not any(i in self._inflight for i in ids))

    async def stream_ids(self) -> list[Hashable]:
        """Streams this shard knows (engine state or a sequence number)."""
        return sorted(set(self._last_seq) | set(self.engine.nf.stream_ids), key=repr)

    async def reset(self, ids: list[Hashable]) -> dict:
        """Forget streams (engine state and sequence numbers); their next frame runs dense and
        may start at any sequence number. Unknown ids -> ``unknown_stream`` error, nothing forgotten."""
        unknown = [i for i in ids if i not in self._last_seq and i not in self.engine.nf.stream_ids
                   and i not in self._lost]
        if unknown:
            return {"ok": False, "error": UnknownStream(f"unknown stream(s): {', '.join(map(repr, unknown))}").to_dict()}
        await self._drop_streams(ids)
        return {"ok": True, "reset": list(ids)}

    async def _drop_streams(self, ids: list[Hashable]) -> None:
        """Wait for the streams' frames in flight, then drop their engine state, sequence
        numbers, stored results and lost-state flags."""
        await self._drain(ids)
        held = [i for i in ids if i in self.engine.nf.stream_ids]
        if held:
            await self._run(self.engine.nf.reset, held)
        for i in ids:
            self._last_seq.pop(i, None)
            self._results.pop(i, None)
            self._lost.pop(i, None)

    async def export_streams(self, ids: list[Hashable]) -> dict:
        """A copy of streams for another shard: wait for their frames in flight, return
        ``{"state": stream_state_dict subset or None, "seq": {id: last seq}, "error": str|None}``.
        The streams stay here until :meth:`drop_streams` (after the import succeeded), so a
        destination that dies mid-move loses nothing. On a snapshot layout this module does not
        know, ``state`` is None and ``error`` says why."""
        await self._drain(ids)

        def work():
            nf = self.engine.nf
            held = [i for i in ids if i in nf.stream_ids]
            state, error = None, None
            if held:
                try:
                    state = state_moves.take(nf.stream_state_dict(), held)
                except state_moves.StateFormatError as exc:
                    error = str(exc)
            return state, error

        state, error = await self._run(work)
        seq = {i: self._last_seq[i] for i in ids if i in self._last_seq}
        return {"ok": True, "state": state, "seq": seq, "error": error}

    async def drop_streams(self, ids: list[Hashable]) -> dict:
        """Forget streams that now live on another shard (engine state, sequence numbers)."""
        await self._drop_streams(ids)
        return {"ok": True, "dropped": list(ids)}

    async def import_streams(self, blob: dict) -> dict:
        """Take over streams exported by :meth:`export_streams`: their state joins this engine's
        (``load_stream_state_dict`` of the merge; checked by the engine) and their sequence numbers
        carry on. Returns ``{"moved": ids with state, "dense": ids that restart dense, "error"}``."""
        if self._die_on_import:
            os._exit(70)

        def work():
            nf = self.engine.nf
            state = blob.get("state")
            if state is None:
                return [], blob.get("error")
            moved = state_moves.stream_ids(state)
            try:
                nf.load_stream_state_dict(state_moves.merge(nf.stream_state_dict(), state))
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                return [], f"{type(exc).__name__}: {exc}"
            return moved, None

        moved, error = await self._run(work)
        seq = blob.get("seq", {})
        for i, s in seq.items():
            self._last_seq[i] = max(s, self._last_seq.get(i, -1))
        dense = [i for i in seq if i not in set(moved)]
        return {"ok": True, "moved": moved, "dense": dense, "error": error}

    async def close(self) -> None:
        """Stop the batching task and the engine thread; every frame not answered yet gets a
        ``shutting_down`` error (queued ones are given back their sequence numbers)."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        computing, self._computing = self._computing, []
        self._executor.shutdown(wait=True)
        err = ShuttingDown(f"shard {self.name} closed before this frame was answered").to_dict()
        for p in self._batcher.drain():
            self._give_back(p)
            if not p.future.done():
                p.future.set_result({"ok": False, "error": err})
        for p in computing:  # computed or not, this process will not answer them
            if not p.future.done():
                p.future.set_result({"ok": False, "error": err})

    async def stats(self) -> dict:
        return {
            "shard": self.name, "pid": self.pid, "started": self.started, "restarted": self.restarted,
            "streams": len(self.engine.nf.stream_ids), "frames": self.frames, "batches": self.batches,
            "batch_sizes": dict(self.batch_sizes), "errors": dict(self.errors), "queued": len(self._batcher),
            "tracked": {"last_seq": len(self._last_seq), "results": len(self._results), "lost": len(self._lost),
                        "inflight": len(self._inflight)},
            "evictions": self.engine.nf.evictions,
        }
