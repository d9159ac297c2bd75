"""Load test of ``neuroflow serve``: K shards, C cameras posting PNG frames over HTTP at a fixed
rate, one shard killed and another hung mid-run.

Starts a local Ray instance (loopback only) and the serving application, then runs one thread per
camera for ``--duration`` seconds: frame ``i`` of a camera is due at ``start + i / fps`` (sent at
once when the camera is behind, never skipped). A camera resends a frame that got a retriable
error (429 overloaded, 503 shard_unavailable / shard_timeout, 500 compute_failed) with the same
sequence number after the reply's ``retry_after_s`` until ``--give-up`` seconds; any other error,
or giving up, counts the frame as lost. At ``--kill-at`` seconds the process of shard-0 gets
SIGKILL; Ray restarts it and the front resends its frames in flight. At ``--hang-at`` seconds
shard-1's next engine call sleeps ``--hang-s`` seconds (fault injection); the front answers
``shard_timeout`` after ``--shard-timeout`` s, and the camera's resend is a replay that gets the
hung call's result.

Measured (client side unless noted): frames sent, answered, shed (429 replies: refused by a full
shard queue, resent later), timeouts (503 shard_timeout replies), lost (goal: 0), replies with
``state_lost`` and ``replayed``, throughput, latency
p50/p99/max (request to reply, including retries), the p99 of the frames that were not in flight
during the 10 s after the kill, batch sizes (frames per engine call, from the replies), restarts
and retries (front counters), streams that restarted dense after the kill. Writes one JSON record to
``bench/results/serve.jsonl`` (appended) and the table to ``bench/results/serve.md``, and prints
the table. The model has random weights unless ``--model`` is given: only the serving figures
mean something, not the embeddings. Stops by itself: a watchdog ends the process
``--duration + 180`` s after the start at the latest.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, markdown_table, write_results  # noqa: E402

DEFAULT_RANDOM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": 64, "patch_size": 16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--fps", type=float, default=4.0, help="frames per second per camera")
    p.add_argument("--duration", type=float, default=12.0, help="seconds of load")
    p.add_argument("--kill-at", type=float, default=3.0, help="seconds into the run to SIGKILL shard-0 (<0: never)")
    p.add_argument("--hang-at", type=float, default=7.0, help="seconds into the run to hang shard-1 (<0: never)")
    p.add_argument("--hang-s", type=float, default=2.0, help="how long shard-1's engine call hangs")
    p.add_argument("--shard-timeout", type=float, default=1.0, help="the front's wait for one shard call (s)")
    p.add_argument("--max-queue", type=int, default=3, help="frames queued per shard at most (then 429; small, so the hang sheds)")
    p.add_argument("--frame-size", type=int, default=64, help="camera frame side in pixels (PNG)")
    p.add_argument("--model", default=None, help="local checkpoint folder (default: random weights)")
    p.add_argument("--random-config", default=json.dumps(DEFAULT_RANDOM),
                   help="SiglipVisionConfig fields of the random model (JSON)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per shard")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--device", default="cpu")
    p.add_argument("--give-up", type=float, default=60.0, help="seconds a camera keeps resending one frame")
    p.add_argument("--port", type=int, default=0, help="HTTP port (0: a free one)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def camera_frames(seed: int, side: int, count: int = 24) -> list[bytes]:
    """PNG frames of a static camera: a noisy scene, a bright square moving across it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = []
    box = max(4, side // 8)
    for t in range(count):
        f = scene.copy()
        x = (t * max(1, side // count)) % (side - box)
        f[side // 3 : side // 3 + box, x : x + box] = 255
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Camera(threading.Thread):
    """Posts frames of one stream at a fixed rate over one keep-alive connection."""

    def __init__(self, name: str, frames: list[bytes], port: int, model: str, fps: float, start: float,
                 stop_at: float, give_up: float):
        super().__init__(daemon=True)
        self.name_, self.frames, self.port, self.model = name, frames, port, model
        self.fps, self.start_at, self.stop_at, self.give_up = fps, start, stop_at, give_up
        self.results: list[dict] = []  # per frame: seq, sent, latency_s, ok, error, batch_size, first_frame
        self.retried_503 = 0
        self.shed = 0  # 429 replies (full shard queue)
        self.timeouts = 0  # 503 shard_timeout replies

    def _post(self, conn, seq: int, body: bytes):
        conn.request("POST", f"/models/{self.model}/streams/{self.name_}/frames?seq={seq}", body=body,
                     headers={"Content-Type": "image/png"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.give_up)
        seq = 0
        while True:
            due = self.start_at + seq / self.fps
            if due >= self.stop_at:
                break
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            body = self.frames[seq % len(self.frames)]
            sent = time.perf_counter()
            rec = {"seq": seq, "sent": sent - self.start_at, "ok": False, "error": None}
            while True:
                try:
                    status, reply = self._post(conn, seq, body)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.give_up)
                    status, reply = 0, {"error": f"connection: {type(exc).__name__}", "retriable": True}
                if status == 200:
                    rec.update(ok=True, batch_size=reply["batch_size"], first_frame=reply["first_frame"],
                               retries=reply["retries"], shard=reply["shard"], state_lost=reply["state_lost"],
                               replayed=reply["replayed"])
                    break
                if reply.get("retriable") and time.perf_counter() - sent < self.give_up:
                    if status == 429:
                        self.shed += 1
                    elif reply.get("error") == "shard_timeout":
                        self.timeouts += 1
                    else:
                        self.retried_503 += 1
                    time.sleep(min(float(reply.get("retry_after_s") or 0.2), 1.0))
                    continue
                rec["error"] = reply.get("error", f"HTTP {status}")
                break
            rec["latency_s"] = time.perf_counter() - sent
            self.results.append(rec)
            seq += 1
        conn.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
    args = parse_args(argv)
    # Watchdog: the benchmark never outlives its budget, whatever hangs.
    threading.Timer(args.duration + 180.0, lambda: os._exit(3)).start()
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import ray
    import torch

    import neuroflow
    from neuroflow.serve import app
    from neuroflow.serve.spec import ServeConfig

    config = ServeConfig(
        model_folder=args.model, random_config={} if args.model else json.loads(args.random_config),
        num_shards=args.shards, shard_cpus=0, torch_threads=args.threads, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, device=args.device, retry_timeout_s=args.give_up, app_name="nfbench",
        namespace="nfbench", shard_timeout_s=args.shard_timeout, max_queue=args.max_queue,
    )
    port = args.port
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    t_boot = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        client = app.start(config, host="127.0.0.1", port=port)
        boot_s = time.perf_counter() - t_boot
        frames = {f"cam-{i:02d}": camera_frames(i, args.frame_size) for i in range(args.cameras)}
        start = time.perf_counter() + 1.0
        stop_at = start + args.duration
        cams = [Camera(n, f, port, config.model_name, args.fps, start, stop_at, args.give_up) for n, f in frames.items()]
        for c in cams:
            c.start()
        killed_at, victim_pid = None, None
        if args.kill_at >= 0:
            time.sleep(max(0.0, start + args.kill_at - time.perf_counter()))
            victim_pid = client.stats()["shards"]["shard-0"]["pid"]
            os.kill(victim_pid, signal.SIGKILL)
            killed_at = time.perf_counter() - start
            print(f"killed shard-0 (pid {victim_pid}) at {killed_at:.1f} s", flush=True)
        hung_at = None
        if args.hang_at >= 0 and args.shards > 1:
            time.sleep(max(0.0, start + args.hang_at - time.perf_counter()))
            hung = ray.get_actor(f"{config.app_name}/shard-1", namespace=config.namespace)
            ray.get(hung.inject_fault.remote("hang", 1, args.hang_s))
            hung_at = time.perf_counter() - start
            print(f"hung shard-1 for {args.hang_s:g} s at {hung_at:.1f} s", flush=True)
        for c in cams:
            c.join(timeout=max(1.0, stop_at - time.perf_counter()) + args.give_up + 10)
        wall = time.perf_counter() - start
        stats = client.stats()
    finally:
        app.stop(config)
        from ray import serve

        serve.shutdown()
        ray.shutdown()

    recs = [r for c in cams for r in c.results]
    ok = [r for r in recs if r["ok"]]
    lat = [1e3 * r["latency_s"] for r in ok]
    # Frames not in flight at any time during the 10 s after the kill (those waited for the restart).
    calm = [1e3 * r["latency_s"] for r in ok
            if killed_at is None or r["sent"] + r["latency_s"] < killed_at or r["sent"] > killed_at + 10]
    sizes = [r["batch_size"] for r in ok]
    dense_after_kill = sorted({c.name_ for c in cams for r in c.results
                               if r["ok"] and r["seq"] > 0 and r.get("first_frame")})
    expected = sum(int(np.ceil(args.duration * args.fps)) for _ in cams)
    still_running = sum(c.is_alive() for c in cams)
    env = environment(torch.device(args.device))
    env["device"] = f"CPU ({os.cpu_count()} cores, {platform.machine()})" if args.device == "cpu" else env["device"]
    record = {
        "bench": "serve", **env, "ray": ray.__version__, "neuroflow": neuroflow.__version__,
        "weights": "local checkpoint" if args.model else "random weights",
        "model": args.model or f"SigLIP random {json.loads(args.random_config)}",
        "shards": args.shards, "cameras": args.cameras, "fps_per_camera": args.fps, "duration_s": args.duration,
        "frame_size": args.frame_size, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "torch_threads_per_shard": args.threads, "boot_s": boot_s, "wall_s": wall,
        "frames_due": expected, "frames_sent": len(recs), "frames_ok": len(ok),
        "frames_lost": len(recs) - len(ok) + still_running, "errors": dict(Counter(r["error"] for r in recs if not r["ok"])),
        "throughput_fps": len(ok) / wall, "offered_fps": args.cameras * args.fps,
        "latency_p50_ms": percentile(lat, 50), "latency_p99_ms": percentile(lat, 99), "latency_max_ms": max(lat) if lat else None,
        "latency_p99_outside_kill_ms": percentile(calm, 99),
        "batch_mean": statistics.fmean(sizes) if sizes else None, "batch_max": max(sizes) if sizes else None,
        "batch_hist": dict(sorted(Counter(sizes).items())),
        "killed_at_s": killed_at, "restarts": sum(stats["restarts"].values()), "front_retries": sum(stats["retries"].values()),
        "client_resends_503": sum(c.retried_503 for c in cams), "streams_dense_after_kill": len(dense_after_kill),
        "shed_429": sum(c.shed for c in cams), "timeouts_503": sum(c.timeouts for c in cams),
        "hung_at_s": hung_at, "hang_s": args.hang_s, "shard_timeout_s": args.shard_timeout, "max_queue": args.max_queue,
        "replies_state_lost": sum(1 for r in ok if r.get("state_lost")),
        "replies_replayed": sum(1 for r in ok if r.get("replayed")),
    }
    columns = [("shards", "shards"), ("cameras", "cameras"), ("fps_per_camera", "fps/cam"), ("duration_s", "s"),
               ("frames_sent", "sent"), ("frames_ok", "answered"), ("shed_429", "shed (429)"),
               ("timeouts_503", "timeouts (503)"), ("frames_lost", "lost"), ("replies_state_lost", "state_lost"),
               ("replies_replayed", "replayed"), ("throughput_fps", "frames/s"),
               ("latency_p50_ms", "p50 ms"), ("latency_p99_ms", "p99 ms"), ("latency_p99_outside_kill_ms", "p99 ms (not in flight 10 s after kill)"),
               ("latency_max_ms", "max ms"), ("batch_mean", "batch mean"), ("batch_max", "batch max"),
               ("restarts", "restarts"), ("front_retries", "front retries"), ("streams_dense_after_kill", "dense restarts")]
    header = (f"# Serving load test (`python bench/bench_serve.py`)\n\n"
              f"Device: {record['device']}; torch {record['torch']}, transformers {record['transformers']}, "
              f"ray {record['ray']}; commit {record['commit']}; {record['time']}.\n"
              f"Model: {record['model']}, **{record['weights']}** (serving figures only; embeddings meaningless). "
              f"Frames: {args.frame_size}x{args.frame_size} PNG over HTTP (loopback), one thread per camera, "
              f"fixed rate; shard-0 SIGKILLed at {killed_at if killed_at is None else round(killed_at, 1)} s, "
              f"shard-1 hung {args.hang_s:g} s at {hung_at if hung_at is None else round(hung_at, 1)} s "
              f"(front timeout {args.shard_timeout:g} s, max_queue {args.max_queue}). "
              f"Batch sizes: frames-weighted, from the replies; histogram {record['batch_hist']}. "
              f"Errors: {record['errors'] or 'none'}.")
    table = markdown_table([record], columns)
    write_results("serve", [record], table, out=args.out, header=header)
    print(header + "\n\n" + table, flush=True)
    os._exit(0 if record["frames_lost"] == 0 else 1)


if __name__ == "__main__":
    main()
