"""How close ldmrt's memory estimate (ldmrt/memory.py) comes to the measured peak of a request.

For each model, backend and size: a fresh process loads the engine, resets its peak-RSS counter
(/proc/self/clear_refs), runs one guided generate of 2 steps and reports the peak RSS above what it held after
loading, beside the estimate. Models: the shipped `shapes` (64 px native) and SD v1's architecture at reduced
width (random weights, ldmrt.testing.reduced_config). Linux only.

    python -m benchmarks.memory [--sizes 256 512] [--backends onnxruntime torch] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = ("shapes", "sd-v1-reduced")


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(engine_dir: str, size: int) -> dict:
    """In this process: the peak of one generate above the loaded engine, and the estimate."""
    import torch

    from ldmrt import Engine
    from ldmrt.memory import estimate, fused_attention
    torch.set_num_threads(2)
    engine = Engine.load(engine_dir)
    prompt = "a red circle" if engine.summary["conditioning"] == "text" else None
    engine.generate(prompt, steps=1, height=engine.summary["size_multiple"], width=engine.summary["size_multiple"])
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss("VmRSS")
    engine.generate(prompt, steps=2, height=size, width=size)
    m = engine.manifest
    est = estimate(engine.summary, m["backend"], m["precision"], 1, size, size, guided=True,
                   device=str(engine.backend.device), fused_attention=fused_attention(m))
    return {"measured": rss("VmHWM") - before, "estimate": est["peak"], "parts": est}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measure", nargs=2, metavar=("ENGINE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]))))
        return
    from ldmrt import Engine
    from ldmrt.machine import cpu_features
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for backend in args.backends:
                folder = Path(tmp) / f"{model}-{backend}"
                if model == "shapes":
                    Engine.build("shapes", folder, backend=backend, progress=None)
                else:
                    build_reduced_sd(folder, backend)
                for size in args.sizes:
                    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--measure", str(folder), str(size)],
                                         capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    r.update(model=model, backend=backend, size=size, ratio=r["estimate"] / r["measured"])
                    rows.append(r)
                    print(f"{model:14s} {backend:12s} {size:5d}  measured {r['measured'] / 2**20:8.0f} MB  "
                          f"estimate {r['estimate'] / 2**20:8.0f} MB  estimate/measured {r['ratio']:.2f}", flush=True)
    cpu = cpu_features()
    print(f"machine: {cpu['machine']}, {cpu['processor'] or ''}, torch threads 2")
    if args.out:
        from ldmrt.files import atomic_write
        atomic_write(args.out, json.dumps({"rows": rows, "cpu": cpu}, indent=1))


def build_reduced_sd(folder: Path, backend: str):
    """SD v1's architecture at reduced width, random weights, with a CLIP tokenizer for a few words."""
    from ldmrt import Engine
    from ldmrt.testing import reduced_config, write_clip_tokenizer
    tokenizer = folder.with_name(folder.name + "-tokenizer")
    write_clip_tokenizer(tokenizer, ["a", "red", "circle"])
    Engine.build(reduced_config("sd-v1"), folder, backend=backend, random_weights=True, tokenizer=tokenizer,
                 progress=None)


if __name__ == "__main__":
    main()
