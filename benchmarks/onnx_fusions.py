"""CPU latency of onnxruntime's fused operators on an exported UNet, one fusion at a time.

Exports the UNet of a reduced zoo model (fp32), rewrites it with onnxruntime.transformers' optimizer
enabling one fusion group per variant, and times each variant against the unfused graph interleaved
(A B A B ...), reporting medians, the ratio (< 1: the fusion is faster) and the rel L2 to the unfused
output. Variants whose operators have no CPU kernel are reported as such.

    .venv/bin/python benchmarks/onnx_fusions.py --model sd-v1 --width 64 --latent 32 --rounds 15 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ldmrt.checkpoint import load_model
from ldmrt.export.graphs import graphs_for
from ldmrt.export.onnx import export_onnx
from ldmrt.export.optimize import FUSION_GROUPS, fused_model
from ldmrt.testing import reduced_config


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd-v1", help="zoo preset, reduced by ldmrt.testing.reduced_config")
    parser.add_argument("--width", type=int, default=64, help="UNet/first-stage base channels (multiple of 32)")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2, help="batch (2 = one guided step)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per variant")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.simplefilter("ignore")

    model = load_model(reduced_config(args.model, width=args.width), random_weights=True)
    example = graphs_for(model, batch=args.batch, latent_size=args.latent)["unet"]
    feeds = {n: t.numpy() for n, t in zip(example.input_names, example.example_inputs)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_onnx(model, tmp)  # all graphs: cheap at this size; only the UNet is timed
        base_path = tmp / "unet.onnx"
        base = session(base_path, args.threads)
        reference = base.run(None, feeds)[0]
        print(f"{args.model} width {args.width}, UNet x {tuple(feeds['x'].shape)}, {args.threads} thread(s), "
              f"{args.rounds} interleaved rounds; ratio = fused / unfused median latency")
        for variant in ("all", *FUSION_GROUPS):
            groups = tuple(FUSION_GROUPS) if variant == "all" else (variant,)
            proto, applied = fused_model(onnx.load(str(base_path)), groups)
            if not applied:
                print(f"  {variant:18s} nothing fused")
                continue
            path = tmp / f"unet_{variant}.onnx"
            onnx.save_model(proto, str(path))
            try:
                fused = session(path, args.threads)
            except Exception as err:  # a contrib operator without a CPU kernel
                print(f"  {variant:18s} {applied}: no CPU session ({str(err).splitlines()[0][:100]})")
                continue
            out = fused.run(None, feeds)[0]
            rel = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            times = {"base": [], "fused": []}
            for _ in range(args.rounds):
                for name, sess in (("base", base), ("fused", fused)):
                    start = time.perf_counter()
                    sess.run(None, feeds)
                    times[name].append(time.perf_counter() - start)
            b, f = statistics.median(times["base"]), statistics.median(times["fused"])
            print(f"  {variant:18s} {f / b:5.3f}  (unfused {b * 1e3:7.1f} ms, fused {f * 1e3:7.1f} ms, "
                  f"rel L2 {rel:.1e})  {applied}")


if __name__ == "__main__":
    main()
