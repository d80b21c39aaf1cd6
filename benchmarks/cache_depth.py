"""Feature caching's branch depth (ldmrt.export.graphs.DEEP_CACHE_KEEP) on the shipped model: for each depth, an
engine built with it, and cache_interval N against exact on the same prompts and seeds: speed ratio and PSNR.

    python -m benchmarks.cache_depth [--keeps 1 2] [--interval 3] [--steps 20] [--prompts 12] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keeps", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "training"))
    import dataset  # the held-out wordings of the shipped model

    from ldmrt import Engine
    from ldmrt.export import graphs
    prompts = [p for p, _ in dataset.evaluation_prompts(args.prompts)]
    for keep in args.keeps:
        graphs.DEEP_CACHE_KEEP = keep  # read when the graphs are cut, at build time
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine.build("shapes", Path(tmp) / "engine", progress=None)
            seconds, images = {}, {}
            for interval in (1, args.interval):
                t0 = time.perf_counter()
                images[interval] = [engine.generate(p, steps=args.steps, seed=i, output_type="np",
                                                    cache_interval=interval)[0] for i, p in enumerate(prompts)]
                seconds[interval] = time.perf_counter() - t0
        mse = np.mean([(a - b) ** 2 for a, b in zip(images[args.interval], images[1])])
        print(f"depth {keep}: cache_interval {args.interval} is {seconds[1] / seconds[args.interval]:.2f}x exact, "
              f"PSNR {10 * np.log10(1 / mse):.1f} dB ({args.prompts} prompts, DDIM {args.steps})", flush=True)


if __name__ == "__main__":
    main()
