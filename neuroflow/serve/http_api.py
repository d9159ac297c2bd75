"""The HTTP routes of the front (served by Ray Serve's proxy; bind it to loopback unless a
network in front of it authenticates callers: there is no authentication here).

=======  ==============================================  ==========================================
POST     ``/models/{model}/streams/{stream}/frames?seq=N``  body: PNG/JPEG, or ``.npy`` bytes of a uint8
                                                         ``[H, W, 3]`` or float ``[C, S, S]`` array
DELETE   ``/models/{model}/streams/{stream}``             forget the stream (next frame dense)
GET      ``/stats``                                      front and shard counters
GET      ``/health``                                     200 when every shard answers, else 503
POST     ``/admin/scale?shards=K``                        change the shard count (moves streams)
=======  ==============================================  ==========================================

A frame's reply (200): ``{"stream", "seq", "embedding": [D floats], "sparsity", "first_frame",
"state_lost", "state_lost_reason", "replayed", "batch_size", "shard", "retries", "timing":
{"decode_ms", "queue_ms", "compute_ms", "shard_ms", "total_ms"}}``. Errors: ``{"error": kind,
"message", "retriable", "status", "retry_after_s" (retriable kinds)}`` with that status (400 bad
request, 404 unknown model or stream, 409 sequence, 422 bad frame, 429 overloaded, 500
compute_failed (retriable: same seq) or internal, 503 shard_unavailable / shard_timeout /
shutting_down) and a ``Retry-After`` header where ``retry_after_s`` is set.
"""

from __future__ import annotations

from urllib.parse import unquote

import numpy as np

from .errors import BadRequest, ServeError
from .front import Front, internal

MAX_BODY_BYTES = 64 * 1024 * 1024


def response_headers(status: int, body: dict) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1, as HTTP wants) for an error with a retry hint."""
    if status >= 400 and body.get("retry_after_s") is not None:
        return {"Retry-After": str(max(1, int(-(-float(body["retry_after_s"]) // 1))))}
    return {}


def _reply_json(reply: dict) -> tuple[int, dict]:
    if not reply.get("ok"):
        err = reply["error"]
        return int(err.get("status", 500)), err
    body = {k: v for k, v in reply.items() if k not in ("ok", "pid")}
    if isinstance(body.get("embedding"), np.ndarray):
        body["embedding"] = body["embedding"].tolist()
    return 200, body


async def handle(front: Front, request) -> tuple[int, dict]:
    """A Starlette ``Request`` -> ``(status, JSON body)``."""
    try:
        path = request.url.path
        root = request.scope.get("root_path", "") or ""
        if root and path.startswith(root):
            path = path[len(root):]
        parts = [unquote(p) for p in path.strip("/").split("/") if p]
        method = request.method.upper()
        if method == "POST" and len(parts) == 5 and parts[0] == "models" and parts[2] == "streams" \
                and parts[4] == "frames":
            seq_text = request.query_params.get("seq")
            if seq_text is None:
                raise BadRequest("missing ?seq=N (the frame's sequence number in its stream)")
            try:
                seq = int(seq_text)
            except ValueError as exc:
                raise BadRequest(f"seq must be an integer, got {seq_text!r}") from exc
            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                raise BadRequest(f"body of {len(body)} bytes is over the {MAX_BODY_BYTES} byte limit")
            reply = await front.submit(parts[3], seq, body, model=parts[1],
                                       content_type=request.headers.get("content-type"))
            return _reply_json(reply)
        if method == "DELETE" and len(parts) == 4 and parts[0] == "models" and parts[2] == "streams":
            return _reply_json(await front.reset([parts[3]], model=parts[1]))
        if method == "GET" and parts == ["stats"]:
            return _reply_json(await front.stats())
        if method == "GET" and parts == ["health"]:
            stats = await front.stats()
            down = [n for n, s in stats["shards"].items() if s is None]
            return (503 if down else 200), {"ok": not down, "shards": stats["ring"], "down": down}
        if method == "POST" and parts == ["admin", "scale"]:
            text = request.query_params.get("shards", "")
            if not text.isdigit():
                raise BadRequest(f"shards must be a positive integer, got {text!r}")
            return _reply_json(await front.scale(int(text)))
        raise BadRequest(f"no route {method} {path}; see neuroflow.serve.http_api for the routes")
    except ServeError as exc:
        return exc.status, exc.to_dict()
    except Exception as exc:  # a bug: say so rather than drop the connection
        return _reply_json(internal(exc))
