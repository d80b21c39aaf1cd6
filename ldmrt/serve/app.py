"""The HTTP app of `ldmrt serve` (Starlette, an ASGI app: uvicorn runs it, Ray Serve wraps it).

    POST /v1/generate         Engine.generate's parameters (images base64) -> {"images": [base64 PNG], "parameters": [...]}
    GET  /v1/health           {"status": "ok", queue depth, active requests}
    GET  /metrics             Prometheus text: queue depth, images/s, step latency, counters
    POST /sdapi/v1/txt2img    AUTOMATIC1111's API (ldmrt/serve/a1111.py)
    POST /sdapi/v1/img2img
    GET  /sdapi/v1/samplers, /sdapi/v1/sd-models, GET/POST /sdapi/v1/options

Errors: bad JSON 400; an ldmrt InputError 422 with its message; a full queue or a server shutting down 503 with
Retry-After; a request past its timeout 504; a body past the limit 413. A client that disconnects frees its slot.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from ..errors import BusyError, InputError, LdmrtError
from ..images import PARAMETERS
from . import a1111
from .scheduler import Scheduler

MAX_BODY_BYTES = 32 * 2 ** 20  # a request body (base64 images included)
MAX_IMAGE_BYTES = 16 * 2 ** 20  # one decoded input image
REQUEST_TIMEOUT_S = 600.0
RETRY_AFTER_S = 5
POLL_S = 0.05  # how often a waiting request checks for its client's disconnect
# Engine.generate's parameters that /v1/generate takes (images as base64 strings).
GENERATE_FIELDS = ("prompt", "negative_prompt", "steps", "sampler", "guidance_scale", "eta", "seed", "height", "width",
                   "batch_size", "strength", "timestep_spacing", "cache_interval", "guidance_interval",
                   "cache_schedule", "clip_skip", "class_label", "layout", "init_image", "mask", "low_res_image")
IMAGE_FIELDS = ("init_image", "mask", "low_res_image")


class TooLarge(Exception):
    """A body past max_body_bytes (413)."""


class BadJSON(Exception):
    """A body that is not JSON (400)."""


def png_base64(image) -> str:
    """A PIL image from Engine.generate -> base64 PNG with its `parameters` chunk (what write_png writes)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text(PARAMETERS, image.info[PARAMETERS])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(engine, *, batching: bool = True, max_batch: int | None = None, max_queue: int | None = None,
               timeout_s: float = REQUEST_TIMEOUT_S, max_body_bytes: int = MAX_BODY_BYTES,
               max_image_bytes: int = MAX_IMAGE_BYTES, drain_s: float = 30.0) -> Starlette:
    """The app over one loaded Engine; its scheduler thread runs while the app's lifespan does."""
    scheduler = Scheduler(engine, batching=batching,
                          **{k: v for k, v in (("max_batch", max_batch), ("max_queue", max_queue)) if v is not None})
    options = {"sd_model_checkpoint": str(engine.manifest["model"].get("name")), "CLIP_stop_at_last_layers": 1}

    async def body_of(request: Request):
        size = 0
        chunks = []
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise TooLarge(f"the request body is over this server's {max_body_bytes:,}-byte limit")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadJSON(f"the request body is not valid JSON: {e}") from None

    async def wait_all(request: Request, futures: list):
        """The futures' results; cancels them all when the client leaves, the deadline passes or one fails."""
        deadline = time.monotonic() + timeout_s
        wrapped = [asyncio.wrap_future(f) for f in futures]
        try:
            while True:
                done, pending = await asyncio.wait(wrapped, timeout=POLL_S, return_when=asyncio.FIRST_EXCEPTION)
                if any(f.exception() is not None for f in done if not f.cancelled()) or not pending:
                    return [f.result() for f in wrapped]  # raises the first error
                if await request.is_disconnected():
                    raise ClientDisconnect()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the request did not finish within this server's {timeout_s:g} s timeout")
        finally:
            for f in futures:
                f.cancel()  # no effect on finished ones; frees the slot of the others

    def submit_all(settings: list[dict]) -> list:
        futures = []
        try:
            for s in settings:
                futures.append(scheduler.submit(**s))
        except BusyError:
            for f in futures:
                f.cancel()
            raise
        return futures

    def endpoint(handler):
        """The handler with ldmrt's errors as HTTP statuses."""
        async def wrapped(request: Request):
            try:
                return await handler(request)
            except TooLarge as e:
                return JSONResponse({"error": "too_large", "detail": str(e)}, status_code=413)
            except BadJSON as e:
                return JSONResponse({"error": "bad_json", "detail": str(e)}, status_code=400)
            except InputError as e:
                return JSONResponse({"error": type(e).__name__, "detail": str(e)}, status_code=422)
            except BusyError as e:
                return JSONResponse({"error": "busy", "detail": str(e)}, status_code=503,
                                    headers={"Retry-After": str(RETRY_AFTER_S)})
            except TimeoutError as e:
                return JSONResponse({"error": "timeout", "detail": str(e)}, status_code=504)
            except ClientDisconnect:
                return PlainTextResponse("", status_code=499)  # nobody reads it
            except LdmrtError as e:  # engine or numerical errors: the request ran and failed
                return JSONResponse({"error": type(e).__name__, "detail": str(e)}, status_code=500)
        return wrapped

    async def generate(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object of Engine.generate's parameters")
        unknown = sorted(set(body) - set(GENERATE_FIELDS))
        if unknown:
            raise InputError(f"unknown field(s) {unknown}: /v1/generate takes {', '.join(GENERATE_FIELDS)}")
        settings = dict(body)
        for name in IMAGE_FIELDS:
            if settings.get(name) is not None:
                settings[name] = a1111.decode_image(settings[name], name, max_image_bytes)
        settings["output_type"] = "pil"
        images = (await wait_all(request, submit_all([settings])))[0]
        return JSONResponse({"images": [png_base64(im) for im in images],
                             "parameters": [json.loads(im.info[PARAMETERS]) for im in images]})

    def a1111_endpoint(img2img: bool):
        async def handler(request: Request):
            body = await body_of(request)
            settings, report = a1111.requests(body, img2img=img2img, max_image_bytes=max_image_bytes)
            results = await wait_all(request, submit_all(settings))
            images = [im for result in results for im in result]
            return JSONResponse(a1111.response([png_base64(im) for im in images],
                                               [json.loads(im.info[PARAMETERS]) for im in images], body, report))
        return handler

    async def health(request: Request):
        return JSONResponse({"status": "ok", "queue_depth": scheduler.queue_depth, "active": scheduler.active,
                             "engine": str(engine.path), "pid": os.getpid()})  # pid: which replica answered

    async def metrics(request: Request):
        m = scheduler.metrics
        with m.lock:
            ticks, step_s = m.ticks, m.step_seconds
            counters = {"images": m.images, "requests": m.requests, "failed": m.failed, "unet_calls": m.unet_calls}
        lines = ["# TYPE ldmrt_queue_depth gauge", f"ldmrt_queue_depth {scheduler.queue_depth}",
                 "# TYPE ldmrt_active_requests gauge", f"ldmrt_active_requests {scheduler.active}",
                 "# TYPE ldmrt_images_per_second gauge", f"ldmrt_images_per_second {m.images_per_second():.6g}",
                 "# TYPE ldmrt_step_seconds summary", f"ldmrt_step_seconds_sum {step_s:.6g}",
                 f"ldmrt_step_seconds_count {ticks}"]
        for name, value in counters.items():
            lines += [f"# TYPE ldmrt_{name}_total counter", f"ldmrt_{name}_total {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def samplers(request: Request):
        from ..schedulers import A1111_SAMPLERS
        return JSONResponse([{"name": name, "aliases": [], "options": {}} for name in A1111_SAMPLERS])

    async def sd_models(request: Request):
        name = options["sd_model_checkpoint"]
        return JSONResponse([{"title": name, "model_name": name, "hash": None, "sha256": None,
                              "filename": str(engine.path), "config": None}])

    async def get_options(request: Request):
        return JSONResponse(options)

    async def set_options(request: Request):
        """Options are accepted for clients' sake; ldmrt serves one engine, so none changes what runs."""
        body = await body_of(request)
        if not isinstance(body, dict):
            raise InputError("options must be a JSON object")
        return JSONResponse(None)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:  # uvicorn has drained the open connections (timeout_graceful_shutdown) before this runs
            await asyncio.to_thread(scheduler.close, drain_s)

    routes = [Route("/v1/generate", endpoint(generate), methods=["POST"]),
              Route("/v1/health", endpoint(health), methods=["GET"]),
              Route("/metrics", endpoint(metrics), methods=["GET"]),
              Route("/sdapi/v1/txt2img", endpoint(a1111_endpoint(False)), methods=["POST"]),
              Route("/sdapi/v1/img2img", endpoint(a1111_endpoint(True)), methods=["POST"]),
              Route("/sdapi/v1/samplers", endpoint(samplers), methods=["GET"]),
              Route("/sdapi/v1/sd-models", endpoint(sd_models), methods=["GET"]),
              Route("/sdapi/v1/options", endpoint(get_options), methods=["GET"]),
              Route("/sdapi/v1/options", endpoint(set_options), methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.scheduler = scheduler
    return app


def serve(engine_dir, *, host: str = "127.0.0.1", port: int = 7860, drain_s: float = 30.0, **app_options):
    """`ldmrt serve`: load the engine, run the app under uvicorn until SIGINT/SIGTERM (then drain within drain_s)."""
    import uvicorn

    from ..engine import Engine
    engine = Engine.load(engine_dir)
    app = create_app(engine, drain_s=drain_s, **app_options)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=drain_s, log_level="info")
