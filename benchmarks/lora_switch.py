"""LoRA switch time against a rebuild, and the UNet step with and without a LoRA, on SD v1's architecture (random
weights, a random rank-16 LoRA in the kohya layout on the UNet's attention, feed-forward and projections and the
text encoder's attention and MLP), per backend, in one run:

    python -m benchmarks.lora_switch [--backends onnxruntime torch] [--rank 16] [--size 256] [--threads 2] [--locon]

rebuild: Engine.build of the model (what a runtime without weight swaps does per LoRA: export and load; the
merge itself not counted). switch: Engine.set_loras from base to LoRA A, A to B, B to base, base to A (each file
read and merged, the engine's weights changed; the first also reads the graphs' weight names). step: one guided
UNet step (batch 2) at --size, of a base engine and the engine with LoRA A side by side (interleaved rounds). For
ONNX Runtime the alternative design, the weights LoRA A touches as graph inputs (a switch would then only merge),
is timed per step with them: "onnxruntime-inputs".
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

UNET_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LOCON_MODULES = ("conv1", "conv2")  # --locon: the UNet's ResBlock convolutions too (3x3 down, 1x1 up)


def write_lora(peers, path: Path, rank: int, seed: int, locon: bool = False) -> Path:
    """A random kohya-layout LoRA over the modules SD LoRA trainers adapt by default (and LoCon's)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    unet_modules = UNET_MODULES + (LOCON_MODULES if locon else ())
    for prefix, model, leaves in (("lora_unet_", peers.unet, unet_modules), ("lora_te_", peers.text_encoder,
                                                                             TEXT_MODULES)):
        for name, module in model.named_modules():
            if not name.endswith(leaves) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            name = name if prefix == "lora_unet_" or name.startswith("text_model.") else "text_model." + name
            key = prefix + name.replace(".", "_")
            w = module.weight
            state[f"{key}.lora_down.weight"] = 0.01 * torch.randn(rank, *w.shape[1:], generator=gen)
            state[f"{key}.lora_up.weight"] = 0.01 * torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)),
                                                                 generator=gen)
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def step_inputs(size: int, context_dim: int):
    gen = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 4, size // 8, size // 8, generator=gen), "t": torch.tensor([500.0, 500.0]),
            "context": torch.randn(2, 77, context_dim, generator=gen)}


def time_steps(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, timed in interleaved rounds (the machine's load drifts between rounds, not
    between the variants of one round); a first call each beforehand (allocations, OpenVINO's compile)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def inputs_variant(engine, lora: Path, threads: int, inputs: dict):
    """A UNet step of ONNX Runtime with the weights LoRA `lora` touches as graph inputs instead of initializers."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from ldmrt.lora import lora_deltas
    backend = engine.backend
    deltas, _ = lora_deltas([(str(lora), 1.0)], backend.weight_shapes(), engine.manifest["model"]["config"])
    unet_weights = backend._weight_map()["unet"]
    moved = {unet_weights[name].initializer for name in deltas if name in unet_weights}
    path = backend.files["unet"]
    proto = onnx.load(str(path), load_external_data=False)
    kept = [t for t in proto.graph.initializer if t.name not in moved]
    feeds = {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in proto.graph.initializer
             if t.name in moved}
    for t in proto.graph.initializer:
        if t.name in moved:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds.update({name: value.numpy() for name, value in inputs.items()})
    print(f"  onnxruntime-inputs: {len(moved)} UNet weights as graph inputs")
    return lambda: session.run(["eps"], feeds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    ap.add_argument("--architecture", default="sd-v1", choices=("sd-v1", "tiny"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--locon", action="store_true", help="LoRAs on the ResBlock convolutions too (LoCon)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from benchmarks.models import make_peers, save_diffusers_folder
    from ldmrt import Engine
    from ldmrt.testing import write_clip_tokenizer

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {cpu}; {args.threads} threads; {args.architecture}, rank {args.rank}{', LoCon' if args.locon else ''}, "
          f"{args.size}x{args.size}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peers = make_peers(args.architecture)
        folder = save_diffusers_folder(peers, tmp / "diffusers")
        write_clip_tokenizer(folder / "tokenizer", ["a", "photo"])
        lora_a, lora_b = (write_lora(peers, tmp / f"{n}.safetensors", args.rank, seed, args.locon)
                          for n, seed in (("a", 1), ("b", 2)))
        inputs = step_inputs(args.size, peers.context_dim)
        del peers
        for backend in args.backends:
            t0 = time.perf_counter()
            Engine.build(str(folder), tmp / backend, backend=backend, progress=None)
            rebuild = time.perf_counter() - t0
            engine = Engine.load(tmp / backend, threads=args.threads)
            engine.backend.run("unet", **inputs)  # sessions warm, as in use
            switches = []
            for loras in ([(str(lora_a), 0.8)], [(str(lora_b), 0.8)], [], [(str(lora_a), 0.8)]):
                t0 = time.perf_counter()
                report = engine.set_loras(loras)
                switches.append(time.perf_counter() - t0)
            print(f"  {backend}: LoRA A changes {report[0].matched} weights")
            base = Engine.load(tmp / backend, threads=args.threads)  # a second engine: steps timed side by side
            runs = {"base": lambda: base.backend.run("unet", **inputs),
                    "lora": lambda: engine.backend.run("unet", **inputs)}
            if backend == "onnxruntime":
                runs["inputs"] = inputs_variant(engine, lora_a, args.threads, inputs)
            steps = time_steps(runs, args.repeats)
            rows.append((backend, rebuild, switches, statistics.median(switches), steps["base"], steps["lora"]))
            if "inputs" in steps:
                rows.append(("onnxruntime-inputs", None, None, None, steps["base"], steps["inputs"]))
            del engine, base, runs
    print("\n| backend | rebuild s | switches A, A->B, ->base, ->A s | switch / rebuild | UNet step base s | "
          "step with LoRA s | step ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for backend, rebuild, switches, switch, base_step, lora_step in rows:
        cells = ["-", "-", "-"] if rebuild is None else \
            [f"{rebuild:.1f}", ", ".join(f"{s:.2f}" for s in switches), f"{switch / rebuild:.3f}"]
        print(f"| {backend} | {' | '.join(cells)} | {base_step:.2f} | {lora_step:.2f} | {lora_step / base_step:.2f} |")


if __name__ == "__main__":
    main()
