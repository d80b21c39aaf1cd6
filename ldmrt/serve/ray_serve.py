"""The same app on Ray Serve: one engine (and its step batcher) per replica, Ray's proxy spreading requests over the
replicas, on one machine or a cluster (`pip install 'ray[serve]'`).

    ldmrt serve --engine DIR --ray --replicas 2                    # a local Ray instance, two replicas
    ldmrt serve --engine DIR --ray --ray-address auto --min-replicas 1 --max-replicas 8 --num-gpus 1   # a cluster

The engine folder must be readable at the same path on every node that runs a replica (a shared filesystem, or
the folder copied to each).
"""
from __future__ import annotations


def application(engine_dir: str, *, replicas: int | None = None, min_replicas: int | None = None,
                max_replicas: int | None = None, num_gpus: float = 0, num_cpus: float = 1,
                target_ongoing_requests: int = 8, **app_options):
    """A Ray Serve Application of create_app over engine_dir: `replicas` fixed, or autoscaled between
    min_replicas and max_replicas (Ray's autoscaler keeps about target_ongoing_requests in flight per replica)."""
    from ray import serve

    def build():  # runs on each replica: each loads its own engine
        from ..engine import Engine
        from .app import create_app
        return create_app(Engine.load(engine_dir), **app_options)

    options = {"name": "ldmrt", "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
               # a replica takes its scheduler's whole queue: Ray's proxy must not cap it lower
               "max_ongoing_requests": app_options.get("max_queue") or 64}
    if min_replicas is not None or max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": min_replicas or 1,
                                         "max_replicas": max_replicas or max(min_replicas or 1, 1),
                                         "target_ongoing_requests": target_ongoing_requests}
    else:
        options["num_replicas"] = replicas or 1
    return serve.deployment(serve.ingress(build)(), **options).bind()


def run(engine_dir: str, *, host: str = "127.0.0.1", port: int = 7860, address: str | None = None, blocking=True,
        **options):
    """Start Ray (or join the cluster at `address`), deploy the app at host:port; with blocking, serve until
    interrupted."""
    import ray
    from ray import serve
    ray.init(address=address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(engine_dir, **options), name="ldmrt", route_prefix="/", blocking=blocking)
