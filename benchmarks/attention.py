"""How ONNX graphs can spell attention, measured: peak memory and seconds of one attention over a latent grid.

Forms (one ONNX graph each, q, k, v given, batch 1):
    materialised  MatMul, Softmax, MatMul: what the TorchScript exporter writes for scaled_dot_product_attention
    chunked16     the queries in 16 slices, each slice's softmax(q k^T) v concatenated (exact; a fixed count, so
                  the scores held are tokens^2 / 16: bounded only for a bounded size)
    mha           com.microsoft MultiHeadAttention (ONNX Runtime's contrib operator; its CPU kernel is a flash
                  attention)
    attention23   the opset-23 Attention operator
Layers: SD v1's first-stage mid-block attention (1 head of 512) and its UNet's first self-attention (8 heads of
40), over a grid of SIZE x SIZE latent pixels (64: SD at 512 px; 128: 1024 px). Each run in a fresh process;
peak = ru_maxrss after two runs minus before the first (the inputs excluded). Runtimes: ONNX Runtime, OpenVINO.

    python -m benchmarks.attention [--sizes 64 128] [--runtimes onnxruntime openvino] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

FORMS = ("materialised", "chunked16", "mha", "attention23")
LAYERS = {"first_stage": (1, 512), "unet": (8, 40)}  # heads, head width
CHUNKS = 16


def graph(form: str, tokens: int, heads: int, width: int):
    from onnx import TensorProto, helper
    value = helper.make_tensor_value_info
    four_d = [1, heads, tokens, width]
    opset = [helper.make_opsetid("", 17)]
    inits, nodes = [], []
    if form == "mha":
        shape = [1, tokens, heads * width]
        nodes = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft",
                                  num_heads=heads)]
        opset.append(helper.make_opsetid("com.microsoft", 1))
    elif form == "attention23":
        shape, opset = four_d, [helper.make_opsetid("", 23)]
        nodes = [helper.make_node("Attention", ["q", "k", "v"], ["o"])]
    else:
        shape = four_d
        inits.append(helper.make_tensor("scale", TensorProto.FLOAT, [], [width ** -0.5]))
        nodes.append(helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]))
        slices = [(0, tokens)] if form == "materialised" else [
            (i * tokens // CHUNKS, (i + 1) * tokens // CHUNKS) for i in range(CHUNKS)]
        inits.append(helper.make_tensor("axis", TensorProto.INT64, [1], [2]))
        for i, (lo, hi) in enumerate(slices):
            inits += [helper.make_tensor(f"lo{i}", TensorProto.INT64, [1], [lo]),
                      helper.make_tensor(f"hi{i}", TensorProto.INT64, [1], [hi])]
            nodes += [helper.make_node("Slice", ["q", f"lo{i}", f"hi{i}", "axis"], [f"q{i}"]),
                      helper.make_node("MatMul", [f"q{i}", "kt"], [f"s{i}"]),
                      helper.make_node("Mul", [f"s{i}", "scale"], [f"z{i}"]),
                      helper.make_node("Softmax", [f"z{i}"], [f"p{i}"], axis=-1),
                      helper.make_node("MatMul", [f"p{i}", "v"], [f"o{i}"])]
        nodes.append(helper.make_node("Concat", [f"o{i}" for i in range(len(slices))], ["o"], axis=2))
    g = helper.make_graph(nodes, form, [value(n, TensorProto.FLOAT, shape) for n in "qkv"],
                          [value("o", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(g, opset_imports=opset)
    model.ir_version = 10
    return model, shape


def measure(runtime: str, form: str, layer: str, size: int, threads: int) -> dict:
    import numpy as np
    heads, width = LAYERS[layer]
    model, shape = graph(form, size * size, heads, width)
    feeds = [np.random.default_rng(i).standard_normal(shape, dtype=np.float32) for i in range(3)]
    if runtime == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        run = lambda: session.run(None, dict(zip("qkv", feeds)))[0]  # noqa: E731
    else:
        import openvino as ov
        core = ov.Core()
        compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                      {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
        run = lambda: compiled(feeds)[0]  # noqa: E731
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    q, k, v = feeds if form != "mha" else [f.reshape(1, -1, heads, width).transpose(0, 2, 1, 3) for f in feeds]
    out = out if form != "mha" else out.reshape(1, -1, heads, width).transpose(0, 2, 1, 3)
    s = q[:, :, :64] @ k.transpose(0, 1, 3, 2) * width ** -0.5  # the first 64 queries against float32 numpy
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v
    error = float(np.linalg.norm(out[:, :, :64] - ref) / np.linalg.norm(ref))
    return {"peak": peak, "seconds": seconds, "rel_l2": error}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        runtime, form, layer, size = args.measure
        print(json.dumps(measure(runtime, form, layer, int(size), args.threads)))
        return
    print("| runtime | layer | latent | form | peak MB | seconds | rel L2 |\n|---|---|---:|---|---:|---:|---:|")
    for runtime in args.runtimes:
        for layer in LAYERS:
            for size in args.sizes:
                for form in args.forms:
                    command = [sys.executable, "-m", "benchmarks.attention", "--threads", str(args.threads),
                               "--measure", runtime, form, layer, str(size)]
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode:
                        print(f"| {runtime} | {layer} | {size}² | {form} | failed: "
                              f"{(done.stderr.strip().splitlines() or ['?'])[-1][:80]} | | |", flush=True)
                        continue
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    print(f"| {runtime} | {layer} | {size}² | {form} | {r['peak'] / 2 ** 20:.0f} | {r['seconds']:.2f} "
                          f"| {r['rel_l2']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
