"""The Ray application: a Ray Serve deployment of the front (HTTP and handle calls) over K
detached shard actors; :func:`start` runs it, :func:`stop` takes it down.

The front runs as one replica (it holds the ring, the per-stream order locks and the scaling
lock); it does little work per frame (decode, resize, route). Shards do the model work.
"""

from __future__ import annotations

import ray
from ray import serve

from .client import ServeClient
from .front import Front, actor_name, clear_shard_count
from .http_api import handle, response_headers
from .spec import ServeConfig


@serve.deployment(num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class FrontDeployment(Front):
    """:class:`~neuroflow.serve.front.Front` as a Serve deployment: ``__call__`` serves HTTP,
    the other methods are the handle API (see :class:`~neuroflow.serve.client.ServeClient`)."""

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        status, body = await handle(self, request)
        return JSONResponse(body, status_code=status, headers=response_headers(status, body))


def start(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
          http: bool = True) -> ServeClient:
    """Deploy the application on the connected Ray cluster (``ray.init`` first) and wait until
    every shard has loaded its model. Returns a client on the front's handle.

    ``host``/``port``: where Ray Serve's HTTP proxy listens (loopback by default; the proxy is
    shared by every Serve application of the cluster, so only the first start sets it).
    """
    config.check()
    if http:
        serve.start(http_options={"host": host, "port": port})
    else:
        serve.start(http_options={"location": "NoServer"})
    app = FrontDeployment.options(name=f"{config.app_name}-front").bind(config)
    h = serve.run(app, name=config.app_name, route_prefix=route_prefix if http else None)
    client = ServeClient(h)
    client.wait_ready()
    return client


def stop(config: ServeConfig) -> None:
    """Delete the Serve application and kill its shard actors (their state is lost); forget the
    stored shard count."""
    try:
        serve.delete(config.app_name)
    except Exception:  # not deployed
        pass
    clear_shard_count(config)
    k = 0
    while True:
        try:
            actor = ray.get_actor(actor_name(config, f"shard-{k}"), namespace=config.namespace)
        except ValueError:
            break
        ray.kill(actor, no_restart=True)
        k += 1
