"""`skinscan serve --replicas N`: the service's own FastAPI app (`service.create_app`) as a Ray Serve deployment.

Each replica is a Ray actor that builds the app from the same `Settings` and runs its lifespan (model load,
warm-up inference, dynamic batcher) exactly as `skinscan serve` does; Ray Serve's HTTP proxy listens on the
host and port and spreads requests over the replicas. The HTTP contract is therefore the same by
construction. `/metrics` answers from whichever replica gets the request; see the README for gathering
metrics across replicas (Ray's own per-replica metrics, or scraping each replica).

Only `skinscan serve --replicas` imports this module, and only it imports Ray.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .ray_cluster import connect, import_ray

if TYPE_CHECKING:
    from .service import Settings

log = logging.getLogger("skinscan")

APP_NAME = "skinscan"


class _WithoutRequestIdHeader:
    """ASGI wrapper: drops the app's X-Request-ID response header, which Ray's proxy adds too (same id)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:  # Ray Serve reads the FastAPI app's attributes (docs, handlers)
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def send_without(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            await send(message)

        await self.app(scope, receive, send_without if scope["type"] == "http" else send)


def deployment(settings: Settings, replicas: int, max_replicas: int | None = None) -> Any:
    """The bound Ray Serve application: `replicas` copies of the app (autoscaling up to `max_replicas` on
    load when given), each reserving `settings.threads` CPUs (its ONNX Runtime threads)."""
    serve = import_ray("`skinscan serve --replicas`").serve

    @serve.deployment(name=APP_NAME, graceful_shutdown_timeout_s=settings.request_timeout_s + 1)
    @serve.ingress()
    class SkinscanReplica:
        def __init__(self, settings: Settings) -> None:
            self.settings = settings

        def __serve_build_asgi_app__(self) -> Any:
            from skinscan.service import create_app

            # The lifespan (model, warm-up, batcher) runs in the replica. Ray's proxy passes the request id
            # (the client's X-Request-ID, or its own) to the app and puts it on the response itself.
            return _WithoutRequestIdHeader(create_app(self.settings))

    scaling: dict[str, Any] = {"num_replicas": replicas}
    if max_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas}}
    return SkinscanReplica.options(ray_actor_options={"num_cpus": settings.threads}, **scaling).bind(settings)


def serve_replicas(
    settings: Settings, replicas: int, *, max_replicas: int | None = None, address: str | None = None
) -> None:
    """Run the service on Ray Serve until interrupted (Ctrl-C or SIGTERM), then drain and stop Ray.

    Without `address` (or RAY_ADDRESS) Ray starts on this machine, and the replicas must fit its CPUs."""
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ConfigError("--replicas must be >= 1 and --max-replicas >= --replicas")
    if settings.workers != 1:
        raise ConfigError("--workers and --replicas do not mix: Ray Serve runs the replicas (use --replicas only)")
    local = not (address or os.environ.get("RAY_ADDRESS"))
    cpus = os.cpu_count() or 1
    if settings.threads is None:  # share the cores out instead of every replica taking all of them
        settings = settings.model_copy(update={"threads": max(1, cpus // (max_replicas or replicas))})
    needed = (max_replicas or replicas) * settings.threads
    if local and needed > cpus:
        raise ConfigError(
            f"{max_replicas or replicas} replica(s) x {settings.threads} thread(s) need {needed} CPUs; this machine "
            f"has {cpus}: lower --replicas or --threads, or give --address of a larger Ray cluster"
        )
    if settings.model is not None and not settings.model.is_file():
        raise ConfigError(f"--model {settings.model}: no such file")
    ray = connect(address)
    from ray import serve

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM drains like Ctrl-C: the finally below stops Serve and Ray

    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own handler
    try:
        serve.start(
            http_options={
                "host": settings.host,
                "port": settings.port,
                "request_timeout_s": settings.request_timeout_s + 1,  # the app answers 408 first
            }
        )
        serve.run(deployment(settings, replicas, max_replicas), name=APP_NAME, route_prefix="/", blocking=False)
        log.info(
            "skinscan on Ray Serve: %d replica(s)%s at http://%s:%d",
            replicas,
            f" (autoscaling to {max_replicas})" if max_replicas else "",
            settings.host,
            settings.port,
        )
        signal.pause()
    except KeyboardInterrupt:
        log.info("stopping: draining the replicas")
    finally:
        serve.shutdown()
        ray.shutdown()
