"""Serving failures without a Ray cluster: plain shards and a front whose shard "actors" are
in-process wrappers that can fail like Ray actors do (``ActorUnavailableError`` after the call
ran, ``ActorDiedError`` on a state import). Each scenario ends with every accepted frame answered
exactly once (checked against a reference engine that saw each frame once: a frame computed
twice would change the EMA state and the next embeddings) and no stream's state replaced
without ``state_lost``.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

pytest.importorskip("ray", reason="Ray is not installed (pip install 'neuroflow[serve]')")

from ray.exceptions import ActorDiedError, ActorUnavailableError  # noqa: E402

from neuroflow.engine.presets import PRESETS  # noqa: E402
from neuroflow.serve.frames import FrameChecker  # noqa: E402
from neuroflow.serve.front import Front  # noqa: E402
from neuroflow.serve.routing import HashRing, moves, shard_names  # noqa: E402
from neuroflow.serve.shard import LOST_LIMIT, Shard, is_sticky_device_error  # noqa: E402
from neuroflow.serve.spec import build_engine, input_geometry  # noqa: E402
from test_serve import Reference, camera, close, tiny_config  # noqa: E402


class _Method:
    def __init__(self, actor, name):
        self.actor, self.name = actor, name

    def remote(self, *args):
        return self.actor.call(self.name, *args)


class LocalActor:
    """A shard behind an actor-like handle: ``handle.method.remote(...)`` is awaitable.
    ``faults[method]`` is a list of ``"unavailable_after"`` (run the call, then raise
    ``ActorUnavailableError``) or ``"died"`` (raise ``ActorDiedError`` without running it)."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.faults: dict[str, list[str]] = {}
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        if name.startswith("_") or name in ("shard", "faults", "calls"):
            raise AttributeError(name)
        return _Method(self, name)

    async def call(self, name, *args):
        self.calls.append((name, *args[:2]))
        fault = self.faults.get(name, []).pop(0) if self.faults.get(name) else None
        if fault == "died":
            raise ActorDiedError()
        result = await getattr(self.shard, name)(*args)
        if fault == "unavailable_after":
            raise ActorUnavailableError("injected", None)
        return result


class LocalFront(Front):
    def __init__(self, config, actors: dict[str, LocalActor]):
        self.actors = actors
        self.saved_counts: list[int] = []
        self.removed: list[str] = []
        super().__init__(config)

    def _discover(self):
        return sorted(self.actors)

    def _make_shard(self, name):
        if name not in self.actors:
            self.actors[name] = LocalActor(Shard(self.config, name))
        return self.actors[name]

    def _save_count(self, count):
        self.saved_counts.append(count)

    def _remove_shard(self, name):
        self.removed.append(name)
        self.shards.pop(name)
        self.actors.pop(name).shard._executor.shutdown(wait=True)


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make(config, names=("shard-0", "shard-1")):
    return {n: LocalActor(Shard(config, n)) for n in names}


def close_all(loop, actors):
    for a in actors.values():
        loop.run_until_complete(a.shard.close())


def checker(config):
    pre, side, channels = input_geometry(config)
    return FrameChecker(pre, side, channels)


def test_a_failed_compute_rolls_back_and_the_same_frame_can_be_sent_again(loop):
    from helpers import assert_same_state

    config = tiny_config(max_wait_ms=5.0)
    shard, ref, check = Shard(config, "shard-0"), Reference(config), checker(config)
    cam = camera(1, 3)

    async def scenario():
        first = await shard.submit("a", 0, check(cam[0]))
        before = shard.engine.nf.stream_state_dict()
        await shard.inject_fault("error")
        failed = await shard.submit("a", 1, check(cam[1]))
        after = shard.engine.nf.stream_state_dict()
        again = await shard.submit("a", 1, check(cam[1]))
        return first, before, failed, after, again

    first, before, failed, after, again = loop.run_until_complete(scenario())
    loop.run_until_complete(shard.close())
    err = failed["error"]
    assert err["error"] == "compute_failed" and err["retriable"] and err["status"] == 500
    assert "rolled the batch back" in err["message"] and "dense" not in err["message"]
    assert_same_state(before, after)
    ref("a", cam[0])
    emb, was_first = ref("a", cam[1])
    assert again["ok"] and not again["first_frame"] and not was_first and not again["state_lost"]
    assert close(again["embedding"], emb)


def test_replay_returns_the_computed_result_and_a_plain_duplicate_is_refused(loop):
    config = tiny_config(max_wait_ms=5.0)
    shard, check = Shard(config, "shard-0"), checker(config)
    cam = camera(2, 2)

    async def scenario():
        r0 = await shard.submit("a", 0, check(cam[0]))
        dup = await shard.submit("a", 0, check(cam[0]))
        rep = await shard.submit("a", 0, check(cam[0]), True)
        fresh = await shard.submit("a", 1, check(cam[1]), True)  # a replay of an unseen seq computes
        return r0, dup, rep, fresh

    r0, dup, rep, fresh = loop.run_until_complete(scenario())
    loop.run_until_complete(shard.close())
    assert dup["error"]["error"] == "sequence"
    assert rep["ok"] and rep["replayed"] and not r0["replayed"] and np.array_equal(rep["embedding"], r0["embedding"])
    assert fresh["ok"] and not fresh["replayed"] and fresh["seq"] == 1 and shard.frames == 2


def test_a_full_queue_refuses_with_retry_after_and_close_answers_every_queued_frame(loop):
    config = tiny_config(max_wait_ms=60_000.0, max_queue=2, max_batch=8)
    shard, check = Shard(config, "shard-0"), checker(config)
    x = check(camera(3, 1)[0])

    async def scenario():
        tasks = [asyncio.ensure_future(shard.submit(s, 0, x)) for s in ("a", "b")]
        while len(shard._batcher) < 2:
            await asyncio.sleep(0.001)
        over = await shard.submit("c", 0, x)
        await shard.close()
        queued = await asyncio.gather(*tasks)
        return over, queued

    over, queued = loop.run_until_complete(scenario())
    assert over["error"]["error"] == "overloaded" and over["error"]["status"] == 429
    assert over["error"]["retry_after_s"] > 0 and "max_queue 2" in over["error"]["message"]
    assert [q["error"]["error"] for q in queued] == ["shutting_down", "shutting_down"]
    assert shard._last_seq == {}  # the sequence numbers were given back


def test_eviction_is_reported_old_numbers_are_refused_and_tables_stay_bounded(loop):
    config = tiny_config(max_wait_ms=1.0, max_streams=4, front_streams=300, max_batch=8)
    actors = make(config, ("shard-0",))
    front = LocalFront(config, actors)
    shard = actors["shard-0"].shard
    x = checker(config)(camera(4, 1)[0])
    ids = [f"churn-{i}" for i in range(2000)]

    def sizes():
        return (len(shard.engine.nf.stream_ids), len(shard._last_seq), len(shard._results), len(shard._lost),
                front.tracked["locks"], front.tracked["streams"])

    async def scenario():
        seen = {}
        for k in range(0, len(ids), 8):
            replies = await asyncio.gather(*(front.submit(s, 0, x) for s in ids[k:k + 8]))
            assert all(r["ok"] for r in replies), replies
            if k + 8 in (1200, 1600, 2000):
                seen[k + 8] = sizes()
        back = await front.submit(ids[-20], 1, x)  # evicted by the engine (max_streams 4)
        old = await front.submit(ids[-500], 0, x)  # the front forgot it (front_streams): the shard refuses
        return back, old, seen

    back, old, seen = loop.run_until_complete(scenario())
    # Flat: every table stays under a bound set by the config, not by the 2000 streams seen. The
    # exact sizes depend on how the batcher split the last eight frames (a call keeps all of its
    # own streams, so the engine holds up to max(max_streams, max_batch) right after one).
    lost_limit = max(LOST_LIMIT, 4 * config.max_streams)
    bound = (max(4, config.max_batch), 4 + config.max_batch, 4 + config.max_batch, lost_limit, 0, 300)
    for count, size in seen.items():
        assert all(s <= b for s, b in zip(size, bound)), (count, size, bound)
    assert {size[3:] for size in seen.values()} == {(lost_limit, 0, 300)}, seen  # full and no larger
    close_all(loop, actors)
    assert back["ok"] and back["first_frame"] and back["state_lost"] and "evicted" in back["state_lost_reason"]
    assert old["error"]["error"] == "sequence"
    assert len(shard.engine.nf.stream_ids) <= 4
    assert len(shard._last_seq) <= 4 + config.max_batch and len(shard._results) <= 4 + config.max_batch
    assert len(shard._lost) <= lost_limit < len(ids)
    assert front.tracked == {"locks": 0, "streams": 300}


def test_actor_unavailable_after_the_call_ran_answers_that_result_once(loop):
    config = tiny_config(max_wait_ms=5.0, num_shards=1)
    actors = make(config, ("shard-0",))
    front, ref, check = LocalFront(config, actors), Reference(config), checker(config)
    cam = camera(5, 3)

    async def scenario():
        r0 = await front.submit("u", 0, check(cam[0]))
        actors["shard-0"].faults["submit"] = ["unavailable_after"]
        r1 = await front.submit("u", 1, check(cam[1]))
        r2 = await front.submit("u", 2, check(cam[2]))
        dup = await front.submit("u", 2, check(cam[2]))
        return r0, r1, r2, dup

    r0, r1, r2, dup = loop.run_until_complete(scenario())
    close_all(loop, actors)
    assert r1["ok"] and r1["retries"] == 1 and r1["replayed"] and not r1["state_lost"]
    assert actors["shard-0"].shard.frames == 3  # frame 1 computed once
    for t, r in enumerate((r0, r1, r2)):
        emb, first = ref("u", cam[t])
        assert close(r["embedding"], emb) and r["first_frame"] == first, t
    assert dup["error"]["error"] == "sequence" and "last answered 2" in dup["error"]["message"]


def test_a_hung_shard_times_out_frees_the_stream_and_the_resend_gets_the_result(loop):
    config = tiny_config(max_wait_ms=1.0, num_shards=1, shard_timeout_s=0.3)
    actors = make(config, ("shard-0",))
    front, ref, check = LocalFront(config, actors), Reference(config), checker(config)
    cam = camera(6, 3)

    async def scenario():
        r0 = await front.submit("h", 0, check(cam[0]))
        await actors["shard-0"].shard.inject_fault("hang", seconds=1.0)
        timed_out = await front.submit("h", 1, check(cam[1]))
        locks_after = front.tracked["locks"]
        tries = 1
        while True:  # a client resending after retry_after: each resend is a replay of the hung call
            again = await front.submit("h", 1, check(cam[1]))
            if again["ok"] or again["error"]["error"] != "shard_timeout" or tries > 20:
                break
            tries += 1
        r2 = await front.submit("h", 2, check(cam[2]))
        return r0, timed_out, locks_after, again, r2

    r0, timed_out, locks_after, again, r2 = loop.run_until_complete(scenario())
    close_all(loop, actors)
    err = timed_out["error"]
    assert err["error"] == "shard_timeout" and err["status"] == 503 and err["retriable"] and err["retry_after_s"] > 0
    assert locks_after == 0
    assert again["ok"] and again["replayed"] and actors["shard-0"].shard.frames == 3
    for t, r in enumerate((r0, again, r2)):
        assert close(r["embedding"], ref("h", cam[t])[0]), t


def test_a_destination_dying_mid_move_leaves_the_ring_and_every_state(loop):
    config = tiny_config(max_wait_ms=5.0, num_shards=2)
    actors = make(config)
    front, ref, check = LocalFront(config, actors), Reference(config), checker(config)
    cams = {f"m{i}": camera(300 + i, 3) for i in range(10)}
    old, new = HashRing(shard_names(2), config.vnodes), HashRing(shard_names(3), config.vnodes)
    assert moves(old, new, cams)

    async def frames(t):
        return dict(zip(cams, await asyncio.gather(*(front.submit(s, t, check(cams[s][t])) for s in cams))))

    async def scenario():
        first = await frames(0)
        front._make_shard("shard-2").faults["import_streams"] = ["died"]
        failed = await front.scale(3)
        ring = list(front.ring.shards)
        after = await frames(1)
        ok = await front.scale(3)
        last = await frames(2)
        return first, failed, ring, after, ok, last

    first, failed, ring, after, ok, last = loop.run_until_complete(scenario())
    close_all(loop, actors)
    assert not failed["ok"] and failed["error"]["error"] == "shard_unavailable" and "nothing moved" in \
        failed["error"]["message"]
    assert ring == ["shard-0", "shard-1"] and front.saved_counts == [2, 3] and front.removed == ["shard-2"]
    assert sorted(ok["moved"]) == sorted(moves(old, new, cams)) and ok["dense"] == []
    for t, replies in enumerate((first, after, last)):
        for s, r in replies.items():
            emb, was_first = ref(s, cams[s][t])
            assert r["ok"] and close(r["embedding"], emb) and r["first_frame"] == was_first, (s, t)
            assert not r["state_lost"], (s, t)
            assert r["shard"] == (new if t == 2 else old).shard_for(s)


def test_sticky_device_errors_are_told_apart():
    assert is_sticky_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_sticky_device_error(RuntimeError("CUDA error: out of memory"))
    assert not is_sticky_device_error(ValueError("bad shape"))
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None:
        assert is_sticky_device_error(accel("device-side assert triggered"))


def test_serve_spec_defaults_to_the_measured_preset_and_passes_engine_options():
    from neuroflow.engine.engine import PRESETS

    nf = build_engine(tiny_config()).nf
    measured = PRESETS["measured"]
    assert nf.preset == "measured" and nf.arch == measured["arch"] and nf.max_staleness == measured["max_staleness"]
    nf = build_engine(tiny_config(preset="paper", threshold=0.2, max_streams=7, max_staleness=3)).nf
    assert nf.preset == "paper" and nf.arch == "C" and nf.max_streams == 7 and nf.max_staleness == 3
    assert build_engine(tiny_config(max_staleness=0)).nf.max_staleness is None
    assert build_engine(tiny_config(signal="patch")).nf.signal == "patch"
    for bad, message in [(dict(preset="fast"), "preset must be one of"), (dict(max_streams=0), "max_streams"),
                         (dict(max_queue=0), "max_queue"), (dict(shard_timeout_s=0), "shard_timeout_s"),
                         (dict(max_staleness=-1), "max_staleness")]:
        with pytest.raises(ValueError, match=message):
            tiny_config(**bad).check()


def test_retriable_errors_carry_a_retry_after_header():
    from neuroflow.serve.errors import ComputeFailed, Overloaded, SequenceError, ShardTimeout, from_dict
    from neuroflow.serve.http_api import response_headers

    over = Overloaded("full").to_dict()
    assert response_headers(429, over) == {"Retry-After": "1"}
    assert response_headers(503, dict(ShardTimeout("slow").to_dict(), retry_after_s=2.5)) == {"Retry-After": "3"}
    assert response_headers(409, SequenceError("dup").to_dict()) == {}
    assert response_headers(500, ComputeFailed("x").to_dict()) == {} and ComputeFailed.retriable
    back = from_dict(over)
    assert isinstance(back, Overloaded) and back.retry_after_s == over["retry_after_s"] and back.status == 429


def test_serve_command_takes_the_shared_gate_options():
    """`neuroflow serve` parses the same gate and frame-policy options as `run` and `demo` (one
    helper), left-out options stay None (the preset decides), and the engine receives them."""
    import argparse

    from neuroflow.commands import serve as serve_command

    p = argparse.ArgumentParser()
    serve_command.add_arguments(p)
    config = serve_command._config(p.parse_args(["--random-config", '{"num_hidden_layers": 2}']))
    assert config.preset == "measured" and config.threshold is None and config.skip_below is None
    args = p.parse_args(["--preset", "paper", "--threshold", "0.2", "--max-staleness", "none", "--skip-below", "0.05",
                         "--keyframe-every", "6", "--keyframe-drift", "1.5", "--batch-budget", "0.5"])
    config = serve_command._config(args)
    assert (config.preset, config.threshold, config.max_staleness) == ("paper", 0.2, 0)
    assert (config.skip_below, config.keyframe_every, config.keyframe_drift, config.batch_budget) == (0.05, 6, 1.5, 0.5)
    nf = build_engine(tiny_config(skip_below=0.05, keyframe_every=6, keyframe_drift=1.5, batch_budget=0.5)).nf
    assert (nf.gate_settings.skip_below, nf.gate_settings.keyframe_every, nf.gate_settings.batch_budget) == (0.05, 6, 0.5)
    with pytest.raises(ValueError, match="keyframe_every"):
        tiny_config(keyframe_every=-1).check()
    # 0 switches the preset's keyframes off (as max_staleness=0 its staleness bound); --keyframe-every none says so
    assert build_engine(tiny_config(keyframe_every=0)).nf.keyframe_every is None
    assert build_engine(tiny_config()).nf.keyframe_every == PRESETS["measured"]["keyframe_every"]
    assert serve_command._config(p.parse_args(["--keyframe-every", "none"])).keyframe_every == 0
    # the same for the preset's drift keyframes: 0 (or --keyframe-drift none) is off, None the preset's
    assert build_engine(tiny_config(keyframe_drift=0)).nf.keyframe_drift is None
    assert build_engine(tiny_config()).nf.keyframe_drift == PRESETS["measured"]["keyframe_drift"]
    assert serve_command._config(p.parse_args(["--keyframe-drift", "none"])).keyframe_drift == 0
    with pytest.raises(ValueError, match="keyframe_drift"):
        tiny_config(keyframe_drift=-1.0).check()


def test_serving_takes_the_cache_dtype_and_the_capacity():
    """`--cache-dtype` and `--capacity` reach the engine (an int capacity keeps a GPU step sync-free
    under the default's keyframes); bad values are refused before anything starts."""
    import argparse

    from neuroflow.commands import serve as serve_command
    from neuroflow.serve.spec import CACHE_DTYPES

    assert serve_command.CACHE_DTYPE_NAMES == tuple(CACHE_DTYPES)
    p = argparse.ArgumentParser()
    serve_command.add_arguments(p)
    config = serve_command._config(p.parse_args(["--cache-dtype", "int8", "--capacity", "64"]))
    assert (config.cache_dtype, config.capacity) == ("int8", 64)
    nf = build_engine(tiny_config(cache_dtype="int8", capacity=64)).nf
    assert nf.architecture.cache_dtype == torch.int8 and nf._planner.mode == 64
    assert build_engine(tiny_config()).nf.architecture.cache_dtype is None
    for bad in (dict(cache_dtype="int4"), dict(capacity=0), dict(capacity="sometimes"), dict(capacity=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_config(**bad).check()
    with pytest.raises(SystemExit):
        p.parse_args(["--capacity", "-3"])
