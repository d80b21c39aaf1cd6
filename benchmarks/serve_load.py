"""Load on `ldmrt serve`: N concurrent clients for a fixed time against the shipped model's engine, step-batched
against one request at a time (`--one-at-a-time`), in the same run. Not a test.

Each client loops POST /v1/generate (one image, the same settings, its own seed) over one keep-alive connection;
a cell counts the images answered within its window and the latency of each. Cells run interleaved (for each
client count: batched, then one-at-a-time) on servers started once per mode.

    .venv/bin/python -m benchmarks.serve_load --clients 1 4 16 --seconds 30 --out benchmarks/results/serve_load.json
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

MODES = {"step-batched": [], "one-at-a-time": ["--one-at-a-time"]}


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine_dir: str, flags: list[str], max_queue: int):
    import httpx
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ldmrt.cli", "serve", "--engine", engine_dir, "--port", str(port),
                             "--max-queue", str(max_queue), *flags], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/v1/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("ldmrt serve did not start")


def rss_mb(pid: int) -> float:
    """Resident memory of the server process (Linux), MB: flat across cells when nothing leaks."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_cell(url: str, clients: int, seconds: float, request: dict) -> dict:
    import httpx
    latencies, errors = [], []
    lock = threading.Lock()
    start = time.perf_counter()
    end = start + seconds

    def client(k: int):
        with httpx.Client(timeout=600) as c:
            n = 0
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                r = c.post(url + "/v1/generate", json={**request, "seed": 1000 * k + n})
                t1 = time.perf_counter()
                n += 1
                with lock:
                    if r.status_code != 200:
                        errors.append(r.status_code)
                    elif t1 <= end:  # answered within the window
                        latencies.append(t1 - t0)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"clients": clients, "images": len(latencies), "images_per_s": len(latencies) / seconds,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)), "errors": len(errors)}


def unet_per_sample(engine_dir: str, batches=(2, 8, 32), repeats: int = 20) -> dict:
    """Median ms per sample of one UNet call at each batch size, in this process: the most step batching can save."""
    import torch

    from ldmrt.engine import Engine
    engine = Engine.load(engine_dir)
    s = engine.summary
    side = s["default_size"] // s["latent_factor"]
    from ldmrt.pipeline import text_contexts
    context = text_contexts(engine, ["a red circle"])  # the shipped model is a text model
    out = {}
    for b in batches:
        inputs = {"x": torch.randn(b, s["latent_channels"], side, side), "t": torch.full((b,), 500.0),
                  "context": context.expand(b, -1, -1).contiguous()}
        engine.backend.run("unet", **inputs)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.backend.run("unet", **inputs)
            times.append(time.perf_counter() - t0)
        out[b] = 1e3 * float(np.median(times)) / b
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", help="engine folder (default: the shipped model's, built once into the cache)")
    p.add_argument("--backend", default="onnxruntime", help="backend of the default engine")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=30.0, help="window per cell")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--unet-only", action="store_true",
                   help="only time one UNet call per sample at batch 2, 8 and 32 (no servers)")
    args = p.parse_args(argv)

    engine_dir = args.engine
    if engine_dir is None:
        from ldmrt.engine import DEFAULT_MODEL, Engine
        engine_dir = str(Engine.open(DEFAULT_MODEL, backend=args.backend, progress=print).path)
    if args.unet_only:
        per_sample = unet_per_sample(engine_dir)
        print(f"{cpu_model()}; {engine_dir}: UNet ms per sample " + ", ".join(f"batch {b}: {ms:.1f}"
                                                                       for b, ms in per_sample.items()))
        return
    request = {"prompt": "a large red circle in the top left on a gray background", "steps": args.steps,
               "sampler": args.sampler}
    servers = {mode: start_server(engine_dir, flags, max_queue=4 * max(args.clients)) for mode, flags in MODES.items()}
    results = []
    try:
        for mode, (_, url) in servers.items():  # warm-up: first calls allocate and (some backends) compile
            run_cell(url, 2, 3.0, request)
        for clients in args.clients:
            for mode, (proc, url) in servers.items():
                cell = {"mode": mode, **run_cell(url, clients, args.seconds, request), "server_rss_mb": rss_mb(proc.pid)}
                results.append(cell)
                print(json.dumps(cell), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()

    print(f"\n{cpu_model()}; engine {engine_dir}; {args.steps} {args.sampler} steps, guided, 64x64; "
          f"{args.seconds:g} s per cell\n")
    print("| clients | step-batched images/s | p50 s | p99 s | one-at-a-time images/s | p50 s | p99 s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        b, o = (next(r for r in results if r["clients"] == clients and r["mode"] == m) for m in MODES)
        print(f"| {clients} | {b['images_per_s']:.2f} | {b['p50_s']:.2f} | {b['p99_s']:.2f} | {o['images_per_s']:.2f} | "
              f"{o['p50_s']:.2f} | {o['p99_s']:.2f} | {b['images_per_s'] / max(o['images_per_s'], 1e-9):.2f} |")
    if args.out:
        from ldmrt.files import atomic_write
        payload = {"cpu": cpu_model(), "engine": engine_dir, "request": request, "seconds": args.seconds,
                   "results": results}
        atomic_write(args.out, json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
