"""Serve many camera streams over HTTP with Ray: a front routes each stream to one of K engine shards.

Starts (or joins, --address) a Ray cluster, deploys the front as a Ray Serve application and K
shard actors (one GPU each with --device cuda, else CPU workers), waits until every shard has
loaded the model, prints the address and serves until Ctrl-C/SIGTERM (or --duration seconds).

  POST /models/MODEL/streams/STREAM/frames?seq=N   body: PNG/JPEG, or .npy (uint8 [H,W,3] or
                                                   float [C,S,S] pixel values); JSON reply with
                                                   the pooled embedding, sparsity, timing
  DELETE /models/MODEL/streams/STREAM              forget a stream
  GET /stats, GET /health, POST /admin/scale?shards=K

The default model has random weights (SigLIP-base-patch16-224's geometry; --random-config
changes the config): its embeddings are meaningless, for plumbing and load tests only.
--model PATH serves a local checkpoint folder (never downloaded). There is no authentication:
keep --host on loopback unless something in front of it checks callers.

Exit status: 0 stopped; 1 Ray is not installed, the model cannot be loaded or the application
does not start; 2 bad options.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time

from ._common import DTYPES, CommandError, add_gate_arguments, gate_kwargs, one_line, print_error


CACHE_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int8", "float8_e4m3fn")
"""``--cache-dtype`` choices: ``neuroflow.serve.spec.CACHE_DTYPES``'s names (a test keeps them equal;
this module does not import the serving package before the options are checked)."""


def _capacity(text: str) -> str | int:
    if text in ("auto", "exact"):
        return text
    try:
        rows = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, exact or a row count, got {text!r}") from None
    if rows < 1:
        raise argparse.ArgumentTypeError(f"a row count must be >= 1, got {rows}")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, metavar="PATH",
                   help="local checkpoint folder (default: SigLIP-base geometry with random weights)")
    m.add_argument("--model-name", default="siglip", help="name requests use in /models/NAME/... (default siglip)")
    m.add_argument("--random-config", default=None, metavar="JSON",
                   help='SiglipVisionConfig fields for the random model, e.g. \'{"num_hidden_layers": 2}\'')
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    m.add_argument("--image-size", type=int, default=None,
                   help="model input side; images are resized to it (default: the model config's)")
    m.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: shards are CPU workers; cuda: each shard gets one GPU (num_gpus=1)")
    e = p.add_argument_group("engine (options left out come from --preset)")
    add_gate_arguments(e, ranker=False)
    e.add_argument("--max-streams", type=int, default=None,
                   help="streams each shard keeps (least recently seen evicted; default: no bound)")
    e.add_argument("--cache-dtype", choices=CACHE_DTYPE_NAMES, default=None,
                   help="key/value cache dtype, e.g. int8 (default: the model's dtype)")
    e.add_argument("--capacity", type=_capacity, default=None, metavar="auto|exact|ROWS",
                   help="packed rows per engine call: auto (default), exact, or a fixed row count for the "
                        "frames that are not first frames or scheduled keyframes")
    s = p.add_argument_group("shards and batching")
    s.add_argument("--shards", type=int, default=None,
                   help="shard count K (default: GPUs in the cluster / --gpus-per-shard with --device cuda, else 1)")
    s.add_argument("--shard-cpus", type=float, default=1.0, help="CPUs Ray reserves per shard (default 1)")
    s.add_argument("--gpus-per-shard", type=float, default=1.0,
                   help="GPUs per shard with --device cuda (default 1; 0.5 puts two shards on each GPU)")
    s.add_argument("--threads", type=int, default=None, help="torch threads per shard (default: torch's)")
    s.add_argument("--max-batch", type=int, default=32, help="most frames per engine call (default 32)")
    s.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="batching window after the first queued frame (default 5 ms)")
    s.add_argument("--max-restarts", type=int, default=10, help="Ray restarts of a dead shard (-1: always)")
    s.add_argument("--retry-timeout", type=float, default=30.0,
                   help="seconds the front keeps resending a frame whose shard died (default 30)")
    s.add_argument("--shard-timeout", type=float, default=60.0,
                   help="seconds the front waits for one shard call before a 503 shard_timeout (default 60)")
    s.add_argument("--max-queue", type=int, default=1024,
                   help="frames queued per shard at most; beyond it a 429 with Retry-After (default 1024)")
    r = p.add_argument_group("Ray and HTTP")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' or HOST:PORT; default: start a local one)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    r.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1, loopback only)")
    r.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    r.add_argument("--app-name", default="neuroflow", help="Ray Serve application name (default neuroflow)")
    r.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until stopped)")


def _engine_fields(args) -> dict:
    """The :class:`~neuroflow.serve.spec.ServeConfig` engine fields from the shared gate options
    (``--preset`` and what was given; the rest stays None: from the preset)."""
    fields = gate_kwargs(args)
    if "threshold" in fields and fields["threshold"] is None:
        raise CommandError("--threshold none is not available in serve (a shard's budget alone cannot be "
                           "set per stream); give a threshold", code=2)
    for name in ("max_staleness", "keyframe_every", "keyframe_drift"):
        if name in fields and fields[name] is None:
            fields[name] = 0  # ServeConfig: 0 is off, None is the preset's
    if "cls_readout" in fields:
        raise CommandError("--cls-readout is not available in serve", code=2)
    return fields


def _config(args):
    from ..serve.spec import ServeConfig

    random_config = {}
    if args.random_config is not None:
        try:
            random_config = json.loads(args.random_config)
        except ValueError as exc:
            raise CommandError(f"--random-config is not JSON ({one_line(exc)})", code=2) from exc
        if not isinstance(random_config, dict):
            raise CommandError("--random-config must be a JSON object of SiglipVisionConfig fields", code=2)
        if args.model is not None:
            raise CommandError("--random-config is for the random model; it cannot be combined with --model", code=2)
    config = ServeConfig(
        model_name=args.model_name, model_folder=args.model, random_config=random_config, seed=args.seed,
        image_size=args.image_size, **_engine_fields(args), max_streams=args.max_streams, cache_dtype=args.cache_dtype,
        capacity=args.capacity, dtype=args.dtype, device=args.device, num_shards=args.shards or 1,
        shard_cpus=args.shard_cpus, shard_gpus=args.gpus_per_shard, torch_threads=args.threads,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, max_restarts=args.max_restarts, retry_timeout_s=args.retry_timeout,
        shard_timeout_s=args.shard_timeout, max_queue=args.max_queue, app_name=args.app_name,
    )
    try:
        config.check()
    except ValueError as exc:
        raise CommandError(one_line(exc), code=2) from exc
    return config


def _check_model(config) -> str:
    """Load the model once here, so a bad folder is one clear line before any shard starts."""
    from ..serve.spec import input_geometry, load_vision_model

    try:
        _, side, _ = input_geometry(config)
        model = load_vision_model(config)
    except Exception as exc:  # ValueError from the loader; OSError, TypeError from configs
        raise CommandError(one_line(exc)) from exc
    params = sum(p.numel() for p in model.parameters())
    del model
    what = f"{config.model_folder}" if config.model_folder else "random weights (SigLIP config)"
    return f"model {config.model_name!r}: {what}, {params / 1e6:.1f} M parameters, input {side}x{side}"


def run(args: argparse.Namespace) -> int:
    try:
        return _serve(args)
    except CommandError as exc:
        print_error("serve", str(exc))
        return exc.code


def _serve(args) -> int:
    if args.port < 0 or args.port > 65535:
        raise CommandError(f"--port must be in 0..65535, got {args.port}", code=2)
    if args.shards is not None and args.shards < 1:
        raise CommandError(f"--shards must be >= 1, got {args.shards}", code=2)
    config = _config(args)
    try:
        import ray
    except ImportError as exc:
        raise CommandError('Ray is not installed: pip install "neuroflow[serve]"') from exc
    described = _check_model(config)
    if args.address is None:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    else:
        ray.init(address=args.address, logging_level="WARNING")
    if args.shards is None and config.uses_gpu:
        config.num_shards = max(1, int(ray.cluster_resources().get("GPU", 0) / config.shard_gpus))
    from ..serve import app

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            app.start(config, host=args.host, port=args.port)
        except Exception as exc:
            raise CommandError(f"the application did not start: {one_line(exc)}") from exc
        print(f"neuroflow serve: {described}; {config.num_shards} shard(s) on {config.device}; "
              f"http://{args.host}:{args.port}/models/{config.model_name}/streams/STREAM/frames?seq=N", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not stop.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            stop.wait(timeout=1.0 if left is None else min(1.0, left))
    finally:
        app.stop(config)
        ray.shutdown()
    print("neuroflow serve: stopped", flush=True)
    return 0
