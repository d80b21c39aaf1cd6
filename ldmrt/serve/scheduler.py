"""Step-level batching: every active request keeps its own place in its own sampler plan, and each tick runs one
UNet call per group of compatible evaluations (same shape, same shallow/full branch), whatever their step,
sampler, step count, guidance scale or prompt.

    submit() --queue--> admitted at the next tick (pipeline.prepare: checks, plan, conditioning, x_T)
    tick: group the steppers' next() by shape -> one UNet call per group (per-sample t and context) -> apply
    finished: decoded together (same size) -> pipeline.finish -> the request's Future

One worker thread owns the engine (backends are not assumed thread-safe); callers wait on Futures.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..errors import BusyError
from ..pipeline import UNetCalls, decode, finish, numerical_error, prepare
from ..sampling import Stepper

DEFAULT_MAX_BATCH = 16  # samples per UNet call (a guided image counts 2)
DEFAULT_MAX_QUEUE = 64  # requests waiting or running; past it submit() raises BusyError
RATE_WINDOW_S = 60.0  # images/s is measured over this window


@dataclass
class Job:
    settings: dict  # Engine.generate's keyword arguments (prompt included)
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    # set when admitted:
    prepared: object = None  # pipeline.Prepared
    calls: UNetCalls | None = None  # the request's constant UNet inputs per batch size
    stepper: Stepper | None = None
    deep: torch.Tensor | None = None  # DeepCache: the deep feature of the request's last full evaluation

    def shape_key(self, ev) -> tuple:
        """What must agree for evaluations to share one UNet call."""
        inputs = self.calls.inputs[ev.x.shape[0]]
        return (ev.shallow, tuple(ev.x.shape[1:]),
                *(tuple(inputs[k].shape[1:]) if k in inputs else None for k in ("context", "concat")))


class Metrics:
    """Counters the server exports (GET /metrics)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.images = self.requests = self.failed = self.unet_calls = self.ticks = 0
        self.step_seconds = 0.0  # sum over ticks
        self.finished_at = collections.deque()  # (time, images) within RATE_WINDOW_S

    def finished(self, images: int):
        now = time.monotonic()
        with self.lock:
            self.images += images
            self.requests += 1
            self.finished_at.append((now, images))
            while self.finished_at and self.finished_at[0][0] < now - RATE_WINDOW_S:
                self.finished_at.popleft()

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            recent = sum(n for t, n in self.finished_at if t >= now - RATE_WINDOW_S)
        return recent / RATE_WINDOW_S


class Scheduler:
    """Runs requests on one engine, batched step by step (batching=False: one request at a time, the baseline)."""

    def __init__(self, engine, *, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                 batching: bool = True):
        hi = engine.manifest.get("shapes", {}).get("batch", [1, None])[1]  # compiled batch range (TensorRT, AOTI)
        self.engine, self.batching = engine, batching
        self.max_batch = max(2, min(max_batch, hi) if hi else max_batch)
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # --- callers ---------------------------------------------------------------------------------------------
    def submit(self, **settings) -> Future:
        """Queue one Engine.generate call; the Future gives its images (or raises its LdmrtError)."""
        job = Job(settings)
        with self._lock:
            if self._closing:
                raise BusyError("the server is shutting down: send the request to another replica")
            if len(self._pending) + len(self._active) >= self.max_queue:
                raise BusyError(f"the queue is full ({self.max_queue} requests): retry in a few seconds")
            self._pending.append(job)
            self._lock.notify()
        return job.future

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self):
        self._thread = threading.Thread(target=self._serve, name="ldmrt-scheduler", daemon=True)
        self._thread.start()

    def close(self, deadline_s: float = 30.0) -> bool:
        """Refuse new requests, let the queued and running ones finish within the deadline, cancel the rest.
        Returns whether everything finished."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(deadline_s)
        with self._lock:
            left = [*self._pending, *self._active]
            self._pending.clear()
            self._active.clear()
        for job in left:
            _fail(job, BusyError("the server shut down before this request finished: send it again"))
        return not left

    # --- the worker ------------------------------------------------------------------------------------------
    def _serve(self):
        while True:
            with self._lock:
                while not self._pending and not self._active and not self._closing:
                    self._lock.wait()
                if self._closing and not self._pending and not self._active:
                    return
            self.tick()

    def tick(self):
        """Admit waiting requests, advance every active one by one evaluation, finish those done."""
        start = time.perf_counter()
        self._admit()
        self._active = [job for job in self._active if not job.future.cancelled()]  # a client that left
        groups: dict[tuple, list] = collections.defaultdict(list)
        for job in self._active:
            ev = job.stepper.next()
            groups[job.shape_key(ev)].append((job, ev))
        for group in groups.values():
            for chunk in _chunks(group, self.max_batch):
                self._evaluate(chunk)
        done = [job for job in self._active if job.future.done() or job.stepper.done]
        self._active = [job for job in self._active if job not in done]
        self._finish([job for job in done if not job.future.done()])
        if groups:
            with self.metrics.lock:
                self.metrics.ticks += 1
                self.metrics.step_seconds += time.perf_counter() - start

    def _admit(self):
        while True:
            with self._lock:
                if not self._pending or (not self.batching and self._active):
                    return
                job = self._pending.popleft()
            if job.future.cancelled():
                continue
            try:
                settings = dict(job.settings)
                p = prepare(self.engine, settings.pop("prompt", None), **settings)
                job.prepared, job.calls = p, UNetCalls(self.engine, p.req, p.plan, p.context, p.concat)
                job.stepper = Stepper(p.plan, p.x_T, guidance_scale=p.req.guidance_scale, x0=p.x0,
                                      mask=p.sample_mask, seed=p.req.seed)
            except Exception as e:  # an LdmrtError (the caller's mistake) or a bug: the caller gets it, others go on
                _fail(job, e, self.metrics)
                continue
            self._active.append(job)

    def _evaluate(self, group: list):
        """One UNet call for a group of (job, evaluation) of one shape key; each job gets its slice of eps."""
        ok = []
        for job, ev in group:
            if torch.isfinite(ev.x).all():
                ok.append((job, ev))
            else:
                _fail(job, numerical_error(self.engine, job.prepared.req, f"the latent before UNet call "
                                           f"{job.stepper.stage + 1}"), self.metrics)
        if not ok:
            return
        shallow = ok[0][1].shallow
        sizes = [ev.x.shape[0] for _, ev in ok]
        inputs = {"x": torch.cat([ev.x for _, ev in ok]),
                  "t": torch.cat([torch.full((n,), ev.t, dtype=torch.float32) for n, (_, ev) in zip(sizes, ok)])}
        names = ok[0][0].calls.shallow_inputs if shallow else ("context", "concat")  # a branch may take no context
        for name in ("context", "concat"):
            if name in names and name in ok[0][0].calls.inputs[sizes[0]]:
                inputs[name] = torch.cat([job.calls.inputs[n][name] for n, (job, _) in zip(sizes, ok)])
        try:
            if shallow:
                inputs["deep"] = torch.cat([job.deep if job.deep.shape[0] == n else job.deep[-n:]
                                            for n, (job, _) in zip(sizes, ok)])
                out = self.engine.backend.run("unet_shallow", **inputs)
            else:
                out = self.engine.backend.run("unet", **inputs)
        except Exception as e:  # the whole call failed: every request in it gets the error
            for job, _ in ok:
                _fail(job, e, self.metrics)
            return
        with self.metrics.lock:
            self.metrics.unet_calls += 1
        eps_all, deep_all = out["eps"], out.get("deep")
        offset = 0
        for n, (job, _) in zip(sizes, ok):
            eps = eps_all[offset:offset + n]
            if not shallow and deep_all is not None:  # a copy: the backend may reuse its output buffers
                job.deep = deep_all[offset:offset + n].clone()
            offset += n
            if not torch.isfinite(eps).all():
                _fail(job, numerical_error(self.engine, job.prepared.req, f"the output of UNet call "
                                           f"{job.stepper.stage + 1}"), self.metrics)
                continue
            job.stepper.apply(eps)

    def _finish(self, jobs: list):
        """Decode finished requests, those of one size together, and resolve their Futures."""
        groups = collections.defaultdict(list)
        for job in jobs:
            latent = job.stepper.latent
            if not torch.isfinite(latent).all():
                _fail(job, numerical_error(self.engine, job.prepared.req, "the final latent"), self.metrics)
            elif job.prepared.req.output_type == "latent":
                _resolve(job, latent.clone(), self.metrics)
            elif job.prepared.tile is not None:  # tiled decodes run alone
                groups[id(job)].append(job)
            else:
                groups[tuple(latent.shape[1:])].append(job)
        for group in groups.values():
            for chunk in _chunks([(job, None) for job in group], self.max_batch, lambda item: item[0].stepper.latent.shape[0]):
                members = [job for job, _ in chunk]
                try:
                    images = decode(self.engine, torch.cat([job.stepper.latent for job in members]),
                                    members[0].prepared.tile)
                except Exception as e:
                    for job in members:
                        _fail(job, e, self.metrics)
                    continue
                offset = 0
                for job in members:
                    n = job.stepper.latent.shape[0]
                    try:
                        _resolve(job, finish(self.engine, job.prepared.req, images[offset:offset + n]), self.metrics)
                    except Exception as e:
                        _fail(job, e, self.metrics)
                    offset += n


def _chunks(items: list, limit: int, size=lambda item: item[1].x.shape[0]):
    """Consecutive runs of items whose sizes sum to at most limit (an item larger than limit runs alone)."""
    chunk, total = [], 0
    for item in items:
        n = size(item)
        if chunk and total + n > limit:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += n
    if chunk:
        yield chunk


def _resolve(job: Job, result, metrics: Metrics):
    if job.future.set_running_or_notify_cancel():
        job.future.set_result(result)
        metrics.finished(job.prepared.req.batch_size)


def _fail(job: Job, error: Exception, metrics: Metrics | None = None):
    if job.future.done():
        return
    if job.future.set_running_or_notify_cancel():
        job.future.set_exception(error)
        if metrics is not None:
            with metrics.lock:
                metrics.failed += 1
