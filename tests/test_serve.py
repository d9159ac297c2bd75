"""Serving many streams with Ray (neuroflow.serve): the hash ring, micro-batching, per-frame checks
and sequence order on plain shards in this process; then one local Ray instance (2 CPUs,
loopback) running the application with a tiny random-weight SigLIP (2 layers, 32x32 input) for
HTTP, the handle API, a killed shard and scaling. Random weights: the checks are about routing,
order and state, not about embedding quality.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from neuroflow.serve import state_moves
from neuroflow.serve.batching import FrameBatcher, Pending
from neuroflow.serve.errors import BadFrame, SequenceError
from neuroflow.serve.frames import FrameChecker
from neuroflow.serve.routing import HashRing, moves, shard_names
from neuroflow.serve.spec import ServeConfig, build_engine, input_geometry

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)


def tiny_config(**kw) -> ServeConfig:
    base = dict(random_config=dict(TINY), shard_cpus=0, torch_threads=1, max_batch=8, max_wait_ms=250.0,
                retry_timeout_s=60.0, num_shards=2, app_name="nftest", namespace="nftest")
    base.update(kw)
    return ServeConfig(**base)


def camera(seed: int, frames: int, h: int = 40, w: int = 48) -> list[np.ndarray]:
    """A static camera: one random uint8 scene, a small bright square moving one pixel a frame."""
    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = []
    for t in range(frames):
        f = scene.copy()
        f[4 + t : 10 + t, 4 + t : 10 + t] = 255
        out.append(f)
    return out


def png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class Reference:
    """The same model and preprocessing in this process, one stream per call."""

    def __init__(self, config: ServeConfig):
        self.engine = build_engine(config)
        pre, side, channels = input_geometry(config)
        self.checker = FrameChecker(pre, side, channels)

    def __call__(self, stream, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        x = torch.from_numpy(self.checker(rgb))[None]
        with torch.inference_mode():
            out = self.engine.nf(x, stream_ids=[stream])
        return out.pooler_output[0].numpy(), bool(out.first_frame[0])


def close(a, b) -> bool:
    return np.allclose(a, b, atol=1e-4, rtol=1e-4)


# -- the hash ring ---------------------------------------------------------------------------------

def test_ring_is_balanced_and_the_same_in_every_process():
    ids = [f"cam-{i}" for i in range(4000)]
    ring = HashRing(shard_names(4))
    counts = {k: len(v) for k, v in ring.assign(ids).items()}
    assert all(0.8 * 1000 <= c <= 1.2 * 1000 for c in counts.values()), counts
    again = HashRing(shard_names(4))
    assert all(ring.shard_for(s) == again.shard_for(s) for s in ids)
    # Another process with another str-hash seed maps every stream the same way (routing.py uses
    # only the standard library, so it is loaded on its own there).
    import subprocess
    import sys

    from neuroflow.serve import routing

    probe = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('routing', {routing.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "ring = m.HashRing(m.shard_names(4))\n"
        "print(json.dumps([ring.shard_for(f'cam-{i}') for i in range(4000)] + [ring.shard_for(7)]))\n"
    )
    for seed in ("1", "12345"):
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [ring.shard_for(s) for s in ids] + [ring.shard_for(7)]
    with pytest.raises(TypeError, match="str or an int"):
        ring.shard_for(1.5)
    with pytest.raises(ValueError, match="distinct"):
        HashRing(["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        HashRing([])


def test_adding_a_shard_moves_about_one_kth_of_the_streams_and_only_to_it():
    ids = [f"cam-{i}" for i in range(4000)]
    for k in (2, 4, 8):
        old, new = HashRing(shard_names(k)), HashRing(shard_names(k + 1))
        moved = moves(old, new, ids)
        share = len(moved) / len(ids)
        assert 0.6 / (k + 1) <= share <= 1.4 / (k + 1), (k, share)
        assert {b for _, b in moved.values()} == {f"shard-{k}"}
        # Removing it again moves exactly those streams back.
        assert moves(new, old, ids).keys() == moved.keys()


# -- frames and batching (no Ray) ------------------------------------------------------------------

def test_frame_checker_accepts_images_and_arrays_and_names_what_is_wrong():
    pre, side, channels = input_geometry(tiny_config())
    check = FrameChecker(pre, side, channels, max_side=512)
    rgb = camera(0, 1)[0]
    from_png = check(png(rgb))
    assert from_png.shape == (3, 32, 32) and from_png.dtype == np.float32
    assert np.array_equal(from_png, check(rgb))
    buf = io.BytesIO()
    np.save(buf, rgb)
    assert np.array_equal(check(buf.getvalue()), from_png)
    from PIL import Image

    jpg = io.BytesIO()
    Image.fromarray(rgb).save(jpg, format="JPEG")
    assert check(jpg.getvalue()).shape == (3, 32, 32)
    assert np.array_equal(check(from_png), from_png)  # pixel values at the served size pass through
    cases = [
        (b"GIF89a...", "not a PNG or JPEG"),
        (b"", "empty request body"),
        (png(rgb)[:40], "cannot decode the PNG"),
        (np.zeros((3, 48, 48), np.float32), r"shape \[3, 48, 48\].*\[3, 32, 32\]"),
        (np.zeros((40, 48, 4), np.uint8), r"RGB \[H, W, 3\]"),
        (np.full((3, 32, 32), np.nan, np.float32), "NaN or Inf"),
        (np.zeros((3, 32, 32), np.int32), "dtype int32"),
        (np.zeros((600, 10, 3), np.uint8), "between 1 and 512"),
    ]
    for frame, message in cases:
        with pytest.raises(BadFrame, match=message):
            check(frame)


def test_batcher_merges_streams_keeps_each_stream_in_order_and_cuts_at_max_batch():
    async def scenario():
        b = FrameBatcher(max_batch=3, max_wait_s=0.05)
        loop = asyncio.get_running_loop()
        x, y = np.zeros((3, 4, 4)), np.zeros((3, 8, 8))

        def put(stream, seq, pixels=x):
            b.put(Pending(stream, seq, pixels, loop.create_future()))

        put("a", 0), put("a", 1), put("b", 0), put("c", 0), put("d", 0), put("e", 0, y)
        first = await b.next_batch()  # full at once: three streams, a's second frame held back
        second = await b.next_batch()  # a1 and d0 (e has another size)
        third = await b.next_batch()
        return [[(p.stream_id, p.seq) for p in batch] for batch in (first, second, third)], len(b)

    batches, left = asyncio.run(scenario())
    assert batches == [[("a", 0), ("b", 0), ("c", 0)], [("a", 1), ("d", 0)], [("e", 0)]]
    assert left == 0


@pytest.fixture(scope="module")
def plain_shards():
    """Two shards in this process (no Ray), the event loop they live on (one for their lifetime,
    as in a Ray actor), and a reference engine with the same weights."""
    from neuroflow.serve.shard import Shard

    config = tiny_config(max_wait_ms=30.0)
    loop = asyncio.new_event_loop()
    a, b = Shard(config, "shard-0"), Shard(config, "shard-1")
    yield config, a, b, Reference(config), loop
    for shard in (a, b):
        loop.run_until_complete(shard.close())
    loop.close()


def test_a_shard_batches_streams_refuses_bad_frames_alone_and_enforces_order(plain_shards):
    config, shard, _, ref, loop = plain_shards
    pre, side, channels = input_geometry(config)
    check = FrameChecker(pre, side, channels)
    cams = {s: camera(i, 3) for i, s in enumerate(["p", "q", "r", "s"])}

    async def scenario():
        good = [shard.submit(s, 0, check(cams[s][0])) for s in ("p", "q", "r")]
        bad = [shard.submit("s", 0, np.full((3, 32, 32), np.inf, np.float32)),
               shard.submit("t", 0, np.zeros((3, 16, 16), np.float32))]
        first = await asyncio.gather(*good, *bad)
        before = shard.engine.nf.stream_state_dict()
        refused = await asyncio.gather(shard.submit("p", 0, check(cams["p"][1])),
                                       shard.submit("p", -1, check(cams["p"][1])),
                                       shard.submit(1.5, 0, check(cams["p"][1])))
        after = shard.engine.nf.stream_state_dict()
        later = await asyncio.gather(shard.submit("p", 5, check(cams["p"][1])),
                                     shard.submit("q", 1, check(cams["q"][1])))
        late = await shard.submit("p", 3, check(cams["p"][2]))
        return first, refused, before, after, later, late

    first, refused, before, after, later, late = loop.run_until_complete(scenario())
    for r, s in zip(first[:3], ("p", "q", "r")):
        assert r["ok"] and r["batch_size"] == 3 and r["first_frame"], r
        emb, _ = ref(s, cams[s][0])
        assert close(r["embedding"], emb)
    assert [r["error"]["error"] for r in first[3:]] == ["bad_frame", "bad_frame"]
    assert "NaN or Inf" in first[3]["error"]["message"] and "[3, 16, 16]" in first[4]["error"]["message"]
    assert set(shard.engine.nf.stream_ids) >= {"p", "q", "r"} and not {"s", "t"} & set(shard.engine.nf.stream_ids)
    assert [r["error"]["error"] for r in refused] == ["sequence", "bad_request", "bad_request"]
    assert "duplicate sequence number 0" in refused[0]["error"]["message"]
    from helpers import assert_same_state

    assert_same_state(before, after)  # refused frames changed nothing
    assert all(r["ok"] and not r["first_frame"] and r["batch_size"] == 2 for r in later)
    for r, s in zip(later, ("p", "q")):
        assert close(r["embedding"], ref(s, cams[s][1])[0])
    assert late["error"]["error"] == "sequence" and "out-of-order sequence number 3 (last accepted 5)" in \
        late["error"]["message"]


def test_exported_streams_continue_on_another_shard_with_their_state(plain_shards):
    config, a, b, ref, loop = plain_shards
    pre, side, channels = input_geometry(config)
    check = FrameChecker(pre, side, channels)
    cam = camera(7, 4)

    async def scenario():
        for t in range(2):
            assert (await a.submit("m", t, check(cam[t])))["ok"]
        blob = await a.export_streams(["m"])
        kept = "m" in a.engine.nf.stream_ids  # the source keeps it until the import succeeded
        imported = await b.import_streams(blob)
        await a.drop_streams(["m"])
        reply = await b.submit("m", 2, check(cam[2]))
        stale = await b.submit("m", 1, check(cam[3]))
        return blob, kept, imported, reply, stale

    for t in range(2):
        ref("m", cam[t])
    blob, kept, imported, reply, stale = loop.run_until_complete(scenario())
    assert kept
    assert state_moves.stream_ids(blob["state"]) == ["m"] and blob["seq"] == {"m": 1}
    assert imported["moved"] == ["m"] and imported["dense"] == [] and imported["error"] is None
    assert "m" not in a.engine.nf.stream_ids
    emb, first = ref("m", cam[2])
    assert not first and reply["ok"] and not reply["first_frame"] and reply["sparsity"] > 0
    assert close(reply["embedding"], emb)
    assert stale["error"]["error"] == "sequence"  # the sequence number moved with the stream


# -- the application on a local Ray ----------------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'neuroflow[serve]')")
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")
    from ray import serve

    from neuroflow.serve import app

    # The test session switches the Triton interpreter on; the shards run the CPU reference path.
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Serve's controller kills an HTTP proxy that is not ready within 5 s (then start() fails);
    # on a loaded 2-core CI machine starting one can take longer. The raylet and every worker
    # inherit these from this process.
    patient = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "120"}
    saved_env = {k: os.environ.get(k) for k in patient}
    os.environ.update(patient)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"TRITON_INTERPRET": "0", **patient}})
    config = tiny_config()
    try:
        client = app.start(config, host="127.0.0.1", port=port)
        yield config, client, f"http://127.0.0.1:{port}", Reference(config)
    finally:
        app.stop(config)
        serve.shutdown()
        ray.shutdown()
        for k, v in {**saved_env, "TRITON_INTERPRET": saved}.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def post(url: str, body: bytes, ctype: str = "image/png") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_frames_errors_leave_the_stream_as_it_was(served):
    config, client, base, ref = served
    cam = camera(11, 3)
    url = f"{base}/models/{config.model_name}/streams/h1/frames"
    status, body = post(f"{url}?seq=0", png(cam[0]))
    assert status == 200, body
    assert len(body["embedding"]) == TINY["hidden_size"] and body["seq"] == 0 and body["first_frame"]
    assert set(body["timing"]) == {"decode_ms", "queue_ms", "compute_ms", "shard_ms", "total_ms"}
    assert close(np.array(body["embedding"], np.float32), ref("h1", cam[0])[0])
    errors = [
        post(f"{base}/models/nope/streams/h1/frames?seq=1", png(cam[1])),
        post(f"{url}?seq=1", b"not an image", "image/png"),
        post(f"{url}?seq=1", png(cam[1])[:50]),
        post(url, png(cam[1])),
        post(f"{url}?seq=0", png(cam[1])),
    ]
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 48, 48), np.float32))
    errors.append(post(f"{url}?seq=1", buf.getvalue(), "application/x-npy"))
    assert [(s, b["error"]) for s, b in errors] == [
        (404, "unknown_model"), (422, "bad_frame"), (422, "bad_frame"), (400, "bad_request"), (409, "sequence"),
        (422, "bad_frame")]
    assert "'nope'" in errors[0][1]["message"] and "missing ?seq" in errors[3][1]["message"]
    assert "[3, 48, 48]" in errors[5][1]["message"]
    status, body = post(f"{url}?seq=1", png(cam[1]))
    assert status == 200 and not body["first_frame"], body
    assert close(np.array(body["embedding"], np.float32), ref("h1", cam[1])[0])
    with urllib.request.urlopen(f"{base}/health", timeout=30) as r:
        assert json.loads(r.read())["ok"]


def _frames(client, ref, cams: dict, t: int, expect_first: bool | None = None) -> dict:
    """Send frame ``t`` of every camera through the handle concurrently; check each against the
    reference unless ``ref`` is None. Returns stream -> FrameResult."""

    async def go():
        return await asyncio.gather(*(client.asend(s, t, cams[s][t]) for s in cams))

    results = dict(zip(cams, asyncio.run(go())))
    if ref is not None:
        for s, r in results.items():
            emb, first = ref(s, cams[s][t])
            assert r.first_frame == first and close(r.embedding, emb), (s, t)
    return results


def test_handle_routes_by_the_ring_batches_and_a_killed_shard_restarts_only_its_streams(served):
    import ray

    config, client, _, ref = served
    ring = HashRing(shard_names(2), config.vnodes)
    cams = {f"k{i}": camera(100 + i, 5) for i in range(8)}
    first = _frames(client, ref, cams, 0)
    assert all(r.shard == ring.shard_for(s) for s, r in first.items())
    assert {r.shard for r in first.values()} == {"shard-0", "shard-1"}
    assert max(r.batch_size for r in first.values()) > 1  # frames of several streams in one call
    _frames(client, ref, cams, 1)
    stats = client.stats()
    pid = stats["shards"]["shard-0"]["pid"]
    assert sum(n * c for s in stats["shards"].values() for n, c in s["batch_sizes"].items()) >= 16

    # Kill shard-0's process while a frame of one of its streams waits in its batch window.
    victim = next(s for s, r in first.items() if r.shard == "shard-0")
    survivors = {s: c for s, c in cams.items() if ring.shard_for(s) == "shard-1"}

    async def kill_during_frame():
        pending = asyncio.ensure_future(client.asend(victim, 2, cams[victim][2]))
        while not (await client.handle.stats.remote())["shards"]["shard-0"]["queued"]:
            await asyncio.sleep(0.005)
        os.kill(pid, 9)
        return await pending

    r = asyncio.run(kill_during_frame())
    assert r.retries >= 1 and r.first_frame and r.shard == "shard-0", r  # resent, dense on the new process
    assert r.state_lost and "restarted" in r.state_lost_reason, r
    # The restarted shard knows no sequence numbers; the front still refuses old ones.
    other = next(s for s in cams if s != victim and ring.shard_for(s) == "shard-0")
    with pytest.raises(SequenceError, match="duplicate sequence number 1"):
        client.send(other, 1, cams[other][1])
    ref.engine.nf.reset([s for s in cams if ring.shard_for(s) == "shard-0"])
    ref(victim, cams[victim][2])
    later = _frames(client, ref, {s: c for s, c in cams.items() if s != victim}, 2)
    for s, res in later.items():
        assert res.first_frame == (ring.shard_for(s) == "shard-0"), s  # shard-1's streams untouched
        assert res.state_lost == (ring.shard_for(s) == "shard-0"), s
        assert res.retries == 0 or ring.shard_for(s) == "shard-0"
    assert all(not later[s].first_frame for s in survivors)
    stats = client.stats()
    assert stats["restarts"].get("shard-0") == 1 and "shard-1" not in stats["restarts"]
    assert stats["shards"]["shard-0"]["restarted"] and stats["shards"]["shard-0"]["pid"] != pid
    del ray


def test_a_sticky_device_error_and_spent_restarts_each_bring_the_shard_back(served):
    import ray

    config, client, _, ref = served
    ring = HashRing(shard_names(2), config.vnodes)
    cams = {s: camera(400 + i, 3) for i, s in enumerate(f"g{i}" for i in range(40)) if ring.shard_for(s) == "shard-1"}
    a, b = list(cams)[:2]
    ref.engine.nf.reset([s for s in (a, b) if s in ref.engine.nf.stream_ids])
    first = {s: client.send(s, 0, cams[s][0]) for s in (a, b)}
    for s in (a, b):
        ref(s, cams[s][0])
    pid = client.stats()["shards"]["shard-1"]["pid"]
    actor = ray.get_actor(f"{config.app_name}/shard-1", namespace=config.namespace)
    assert ray.get(actor.inject_fault.remote("sticky"))["ok"]
    r = client.send(a, 1, cams[a][1])  # the process exits; Ray restarts it; the front resends
    assert r.retries >= 1 and r.first_frame and r.state_lost and "restarted" in r.state_lost_reason, r
    assert client.stats()["shards"]["shard-1"]["pid"] != pid
    ref.engine.nf.reset([a])
    assert close(r.embedding, ref(a, cams[a][1])[0])
    # Out of restarts: the actor is dead for good; the front creates it again under its name.
    ray.kill(ray.get_actor(f"{config.app_name}/shard-1", namespace=config.namespace), no_restart=True)
    r = client.send(b, 1, cams[b][1])
    assert r.retries >= 1 and r.first_frame and r.state_lost, r
    ref.engine.nf.reset([b])
    assert close(r.embedding, ref(b, cams[b][1])[0])
    assert not first[a].state_lost and not first[b].state_lost
    assert client.stats()["shards"]["shard-1"] is not None


def test_a_hung_shard_times_out_and_the_resend_gets_the_hung_frames_result(served):
    import dataclasses

    import ray

    from neuroflow.serve.front import Front

    config, _, _, ref = served
    cam = camera(500, 3)
    quick = dataclasses.replace(config, shard_timeout_s=1.0)  # a front (as after a restart) with a short wait
    HANG_S = 6.0  # the hung call's length: far above the timeout, so a loaded machine cannot blur them

    async def scenario():
        front = Front(quick)
        name = front.ring.shard_for("hang-0")
        r0 = await front.submit("hang-0", 0, cam[0])
        actor = ray.get_actor(f"{config.app_name}/{name}", namespace=config.namespace)
        await actor.inject_fault.remote("hang", 1, HANG_S)
        t0 = asyncio.get_running_loop().time()
        timed_out = await front.submit("hang-0", 1, cam[1])
        waited = asyncio.get_running_loop().time() - t0
        other = next(s for s in (f"hang-x{i}" for i in range(50)) if front.ring.shard_for(s) != name)
        elsewhere = await front.submit(other, 0, cam[0])  # the other shard is not held up
        replies = [timed_out]
        while not replies[-1].get("ok") and len(replies) < 20:
            await asyncio.sleep(replies[-1]["error"].get("retry_after_s", 0.5))
            replies.append(await front.submit("hang-0", 1, cam[1]))
        r2 = await front.submit("hang-0", 2, cam[2])
        return r0, timed_out, waited, elsewhere, replies[-1], r2, front.tracked

    r0, timed_out, waited, elsewhere, again, r2, tracked = asyncio.run(scenario())
    assert timed_out["error"]["error"] == "shard_timeout" and timed_out["error"]["status"] == 503, timed_out
    assert waited < HANG_S - 2.0 and elsewhere["ok"]  # the front gave up long before the hang ended
    assert again["ok"] and again["replayed"], again  # the hung call's result, not a second computation
    for t, r in enumerate((r0, again, r2)):
        emb, first = ref("hang-0", cam[t])
        assert close(r["embedding"], emb) and r["first_frame"] == first, t
    assert tracked["locks"] == 0


def test_scaling_moves_a_kth_of_the_streams_with_their_state(served):
    config, client, _, ref = served
    import ray

    cams = {f"z{i}": camera(200 + i, 5) for i in range(12)}
    _frames(client, ref, cams, 0)
    old, new = HashRing(shard_names(2), config.vnodes), HashRing(shard_names(3), config.vnodes)
    expected = moves(old, new, cams)
    result = client.scale(3)
    moved = [s for s in result["moved"] if s in cams]
    assert sorted(moved) == sorted(expected) and result["errors"] == [] and not result["dense"]
    assert 0 < len(moved) < len(cams)
    after = _frames(client, ref, cams, 1)  # moved streams continue sparse, as if nothing happened
    for s, r in after.items():
        assert r.shard == new.shard_for(s) and not r.first_frame and r.sparsity > 0
    back = client.scale(2)
    assert set(back["moved"]) >= set(moved) and client.stats()["ring"] == ["shard-0", "shard-1"]
    final = _frames(client, ref, cams, 2)
    assert all(r.shard == old.shard_for(s) and not r.first_frame for s, r in final.items())

    # A destination that dies mid-move: nothing moves, the ring and every state stay; a retry works.
    from neuroflow.serve.front import shard_actor

    for _ in range(100):  # the shard-2 that scale(2) killed may still hold its name for a moment
        try:
            assert ray.get(shard_actor(config, "shard-2").inject_fault.remote("die_on_import"))["ok"]
            break
        except ray.exceptions.RayActorError:
            time.sleep(0.1)
    else:
        raise AssertionError("could not start a new shard-2")
    failed = client.handle.scale.remote(3).result()
    assert not failed["ok"] and failed["error"]["error"] == "shard_unavailable", failed
    assert client.stats()["ring"] == ["shard-0", "shard-1"]
    kept = _frames(client, ref, cams, 3)  # checked against the reference: state kept, one answer each
    assert all(not r.first_frame and not r.state_lost and r.shard == old.shard_for(s) for s, r in kept.items())

    # Scale down, then a front that starts afresh (as after a front restart) keeps the scaled ring
    # and the moved streams go on with their state.
    assert client.scale(1)["ok"]
    from neuroflow.serve.front import Front

    async def fresh_front():
        front = Front(config)
        replies = await asyncio.gather(*(front.submit(s, 4, cams[s][4]) for s in cams))
        return list(front.ring.shards), dict(zip(cams, replies))

    ring, replies = asyncio.run(fresh_front())
    assert ring == ["shard-0"]
    for s, r in replies.items():
        emb, first = ref(s, cams[s][4])
        assert r["ok"] and r["shard"] == "shard-0" and not r["first_frame"] and not first, (s, r)
        assert close(r["embedding"], emb)
    assert client.scale(2)["ok"]


def test_serve_command_rejects_bad_options_before_starting_ray(capsys, tmp_path):
    from neuroflow.cli import main

    assert main(["serve", "--random-config", "[1]"]) == 2
    assert main(["serve", "--shards", "0"]) == 2
    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--max-streams", "0"]) == 2
    assert main(["serve", "--max-queue", "0"]) == 2
    assert main(["serve", "--max-staleness", "-1"]) == 2
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--model", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "--random-config must be a JSON object" in err and "--shards must be >= 1" in err
    assert "max_streams must be an int >= 1" in err and "max_queue must be an int >= 1" in err
    assert "max_staleness must be an int >= 0" in err
    assert "max_batch must be an int >= 1" in err and "missing: does not exist" in err and "no config.json" in err
