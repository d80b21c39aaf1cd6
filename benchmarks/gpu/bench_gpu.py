"""GPU benchmark of ldmrt's Triton kernels and the SD-v1 UNet step, for a CUDA machine with PyTorch and Triton.

    python benchmarks/gpu/bench_gpu.py [--out results.json] [--no-build] [--budget-s 360] [--tiles-budget-s 75]
    python benchmarks/gpu/bench_gpu.py --cpu-check      # no GPU: the checkable parts, tiny, interpreted

1. build   installs the project (pip install -e . --no-build-isolation --no-deps: the C++ sampler core needs
           cmake and pybind11) unless ldmrt is importable already or --no-build is given.
2. checks  every kernel against torch in float64 (relative L2), per dtype: attention at SD's shapes (head
           dims 40, 80, 160 self and cross with 77 keys, CLIP's causal 77 tokens) and GroupNorm(+SiLU) at the
           UNet's and VAE's shapes, NCHW and channels-last.
3. kernels fp16 timings (triton.testing.do_bench, median): the attention kernel against
           F.scaled_dot_product_attention, the GroupNorm+SiLU kernel (chunked as it runs, and with one
           program per group) against F.group_norm then F.silu.
4. unet    the SD-v1 UNet step (512x512 -> 64x64 latent, batch 2 as classifier-free guidance runs it, fp16,
           random weights), as a backend runs it (float32 CPU inputs in, float32 CPU eps out): torch eager
           with SDPA; ldmrt's CUDA configuration (channels-last, Triton kernels) eager and replayed from a
           CUDA graph (ldmrt.backends.cuda_graphs); torch ops replayed from a graph, to separate the effects.
5. sampler 20 DDIM steps driven by the C++ sampler plan (ldmrt.sampling) with the graphed step.
6. engine  the product path: the shipped model's torch engine built with --fp16 and loaded on this device
           (on CUDA: fp16, channels-last, Triton kernels, the UNet from a CUDA graph), Engine.generate for
           the demo prompt (20 DDIM steps), its latent against the fp32 engine on the CPU and its image
           scored by ldmrt.testing.adherence.
7. tiles   fp16 attention at the shapes of 3. with other tile configs in place of the defaults in
           attention.TILES, and with attention.SPLIT_HEADS flipped, to tune both (chosen without a GPU:
           ldmrt.kernels.resources): time and error of each; registers, spills and shared memory of the
           default and the fastest, from this machine's Triton.

Prints a table and writes JSON. Sections 1-6 stop starting new work past --budget-s (default 360 s), the
tile sweep past its own --tiles-budget-s (default 75 s), so that the whole run stays under 8 minutes.
--cpu-check runs 2, 4 (eager variants), 5 and 6 on tiny shapes (6 on the CPU) under
TRITON_INTERPRET=1: it checks the script and the kernels' logic, its timings mean nothing.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}  # as tests/test_kernels.py

# SD v1's UNet (ldmrt/presets/sd-v1.yaml, unet_config), spelled out so that the benchmark needs no YAML.
SD_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
               transformer_depth=1, context_dim=768, legacy=False)
TINY_UNET = dict(SD_UNET, model_channels=32, channel_mult=[1, 2], attention_resolutions=[1], num_res_blocks=1,
                 num_heads=2, context_dim=24)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-check", action="store_true", help="no GPU: tiny shapes under TRITON_INTERPRET=1")
    p.add_argument("--out", type=Path, help="JSON results (default results/bench_gpu[-cpu-check].json)")
    p.add_argument("--no-build", action="store_true", help="do not pip install the project")
    p.add_argument("--budget-s", type=float, default=360.0, help="sections 1-6 start no new work after this")
    p.add_argument("--tiles-budget-s", type=float, default=75.0, help="the tile sweep's own time budget")
    return p.parse_args()


class Budget:
    def __init__(self, seconds):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self):
        return self.seconds - (time.perf_counter() - self.start)


def build(args, budget) -> dict:
    """Install the project unless it is importable; after installing, re-run this script in a fresh
    interpreter (an editable install only takes effect at start-up)."""
    try:
        import ldmrt.kernels  # noqa: F401  (the installed layout: kernels/ is the package ldmrt.kernels)
        return {"status": "installed", "ldmrt": str(Path(ldmrt.__file__).parent)}
    except ImportError:
        pass
    if args.no_build:
        sys.exit("ldmrt is not installed and --no-build was given: pip install -e . first")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(ROOT)]
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"building ldmrt failed:\n{done.stdout}\n{done.stderr}")
    rerun = [sys.executable, __file__, *sys.argv[1:], "--no-build", "--budget-s", f"{max(budget.left(), 60):.0f}"]
    os.execv(sys.executable, rerun)


def environment(device) -> dict:
    import torch
    import triton
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "device": device, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    return env


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


# ---- checks ----

def attention_cases(tiny):
    """(name, q shape, kv length, causal)."""
    if tiny:
        return [(f"d{d} {kind}", (1, 2, 130, d), nk, False) for d in (40, 64, 80, 160)
                for kind, nk in (("self", 130), ("cross", 77))] + [("clip causal", (1, 2, 77, 64), 77, True)]
    cases = []
    for res, d in ((64, 40), (32, 80), (16, 160), (8, 160)):
        cases += [(f"{res}x{res} self d{d}", (2, 8, res * res, d), res * res, False),
                  (f"{res}x{res} cross d{d}", (2, 8, res * res, d), 77, False)]
    return cases + [("clip causal d64", (2, 12, 77, 64), 77, True)]


def group_norm_cases(tiny):
    """(name, x shape, groups)."""
    if tiny:
        return [("C/G 10, 7x9", (2, 40, 7, 9), 4), ("tiles, 17x31", (1, 32, 17, 31), 2)]
    return [("unet 320@64", (2, 320, 64, 64), 32), ("unet 640@32", (2, 640, 32, 32), 32),
            ("unet 1280@16", (2, 1280, 16, 16), 32), ("unet 960@64", (2, 960, 64, 64), 32),
            ("vae 512@128", (1, 512, 128, 128), 32), ("vae 128@512", (1, 128, 512, 512), 32)]


def run_checks(device, tiny, budget) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from ldmrt.kernels import attention as attention_kernel
    from ldmrt.kernels import group_norm as group_norm_kernel

    gen = torch.Generator(device).manual_seed(0)
    rows = []
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    for name, shape, seq_k, causal in attention_cases(tiny):
        for dtype in dtypes:
            if budget.left() < 0:
                return rows + [{"kind": "skipped", "why": "time budget"}]
            q = torch.randn(shape, device=device, generator=gen).to(dtype)
            k, v = (torch.randn(shape[:2] + (seq_k, shape[3]), device=device, generator=gen).to(dtype)
                    for _ in range(2))
            out = attention_kernel.attention(q, k, v, causal=causal)
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
            rows.append(_check_row("attention", name, dtype, rel_err(out, ref)))
    for name, shape, groups in group_norm_cases(tiny):
        for dtype in dtypes:
            for channels_last in (False, True):
                if budget.left() < 0:
                    return rows + [{"kind": "skipped", "why": "time budget"}]
                x = (torch.randn(shape, device=device, generator=gen) * 2 + 1).to(dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                w, b = (torch.randn(shape[1], device=device, generator=gen) for _ in range(2))
                out = group_norm_kernel.group_norm(x, groups, w, b, 1e-5, silu=True)
                ref = F.silu(F.group_norm(x.double(), groups, w.double(), b.double(), 1e-5))
                layout = "channels-last" if channels_last else "NCHW"
                rows.append(_check_row("group_norm+silu", f"{name} {layout}", dtype, rel_err(out, ref)))
    return rows


def _check_row(kernel, case, dtype, err):
    dtype = str(dtype).removeprefix("torch.")
    return {"kind": "check", "kernel": kernel, "case": case, "dtype": dtype, "rel_err": err,
            "tolerance": TOLERANCE[dtype], "ok": err < TOLERANCE[dtype]}


# ---- kernel timings ----

def time_kernels(budget) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from ldmrt.kernels import attention as attention_kernel
    from ldmrt.kernels import group_norm as group_norm_kernel

    def ms(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    rows = []
    for name, shape, seq_k, causal in attention_cases(tiny=False):
        if budget.left() < 0:
            return rows + [{"kind": "skipped", "why": "time budget"}]
        q = torch.randn(shape, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(shape[:2] + (seq_k, shape[3]), device="cuda", dtype=torch.float16) for _ in range(2))
        rows.append(_timing_row("attention fp16", name,
                                ms(lambda: attention_kernel.attention(q, k, v, causal=causal)),
                                ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
                                "F.scaled_dot_product_attention"))
    for name, shape, groups in group_norm_cases(tiny=False):
        for channels_last in (False, True):
            if budget.left() < 0:
                return rows + [{"kind": "skipped", "why": "time budget"}]
            x = torch.randn(shape, device="cuda", dtype=torch.float16)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            w = torch.ones(shape[1], device="cuda", dtype=torch.float16)
            b = torch.zeros_like(w)
            layout = "channels-last" if channels_last else "NCHW"
            row = _timing_row("group_norm+silu fp16", f"{name} {layout}",
                              ms(lambda: group_norm_kernel.group_norm(x, groups, w, b, 1e-5, silu=True)),
                              ms(lambda: F.silu(F.group_norm(x, groups, w, b, 1e-5))), "F.group_norm + F.silu")
            # The chunk count's two alternatives: one program per group, and 4x the default.
            more = 4 * group_norm_kernel.default_chunks(shape[0] * groups, x.device)
            row["triton_one_chunk_ms"] = ms(lambda: group_norm_kernel.group_norm(x, groups, w, b, 1e-5, silu=True,
                                                                                 chunks=1))
            row["triton_4x_chunks_ms"] = ms(lambda: group_norm_kernel.group_norm(x, groups, w, b, 1e-5, silu=True,
                                                                                 chunks=more))
            rows.append(row)
    return rows


def _timing_row(kernel, case, triton_ms, torch_ms, baseline):
    return {"kind": "timing", "kernel": kernel, "case": case, "triton_ms": triton_ms, "torch_ms": torch_ms,
            "baseline": baseline, "speedup": torch_ms / triton_ms}


# ---- attention tile configs ----

TILE_CANDIDATES = {  # padded head width: (BLOCK_M, BLOCK_N, num_warps, num_stages), besides the default
    64: [(128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (128, 32, 8, 3), (64, 32, 4, 2)],
    128: [(128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2)],
    256: [(64, 32, 8, 2), (64, 32, 4, 3), (32, 32, 8, 2), (64, 16, 8, 2)],
}


def sweep_attention_tiles(budget) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    from ldmrt.kernels import attention as attention_kernel
    from ldmrt.kernels import resources

    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    table, default_split = attention_kernel.TILES["16-bit"], attention_kernel.SPLIT_HEADS
    rows = []
    for name, shape, seq_k, causal in attention_cases(tiny=False):
        width = max(64, triton.next_power_of_2(shape[3]))
        default = table[width]
        q = torch.randn(shape, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(shape[:2] + (seq_k, shape[3]), device="cuda", dtype=torch.float16) for _ in range(2))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)

        def attend():
            return attention_kernel.attention(q, k, v, causal=causal)

        splittable = attention_kernel.head_blocks(shape[3], split=True)[1] > 0
        split = default_split and splittable
        variants = ([(default, split)] + [(t, split) for t in TILE_CANDIDATES[width] if t != default]
                    + ([(default, not split)] if splittable else []))
        runs = []
        for tiles, split_heads in variants:
            if budget.left() < 0:
                return rows + runs + [{"kind": "skipped", "why": "time budget"}]
            row = {"kind": "tiles", "case": name, "tiles": list(tiles), "split_heads": split_heads,
                   "default": (tiles, split_heads) == (default, split)}
            table[width], attention_kernel.SPLIT_HEADS = tiles, split_heads
            try:
                row["rel_err"] = rel_err(attend(), ref)
                row["ms"] = do_bench(attend, warmup=10, rep=40, return_mode="median")
            except Exception as e:  # e.g. Triton's OutOfResources: reported, the sweep goes on
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            finally:
                table[width], attention_kernel.SPLIT_HEADS = default, default_split
            runs.append(row)
        timed = [r for r in runs if "ms" in r]
        fastest = min(timed, key=lambda r: r["ms"]) if timed else None
        # What the default and the fastest cost on this machine's Triton: the table's no-spill, 99 KB rule.
        for row in {id(r): r for r in timed if r["default"] or r is fastest}.values():
            table[width], attention_kernel.SPLIT_HEADS = tuple(row["tiles"]), row["split_heads"]
            try:
                ((kernel, args, meta),) = resources.record_launches(attention_kernel, ("_attention_fwd",), attend)
                row.update(resources.resource_usage(resources.compile_launch(kernel, args, meta, arch)))
            except Exception as e:
                row["resources_error"] = f"{type(e).__name__}: {e}"[:200]
            finally:
                table[width], attention_kernel.SPLIT_HEADS = default, default_split
        rows += runs
    return rows


# ---- the UNet step ----

def unet_step_variants(device, tiny, budget) -> tuple[list[dict], object]:
    """Times each variant of the step; returns the rows and the step for the sampler section (the graphed
    Triton step when it ran, else the eager one)."""
    import torch

    from ldmrt.backends.cuda_graphs import CudaGraphRunner
    from ldmrt.models.unet import UNetModel

    cfg, latent = (TINY_UNET, 8) if tiny else (SD_UNET, 64)
    dtype = torch.float32 if tiny else torch.float16  # the interpreter's fp16 is numpy's, slow but exact
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNetModel(**cfg).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent, latent, generator=gen)
    t = torch.tensor([981.0, 981.0])
    context = torch.randn(2, 77, cfg["context_dim"], generator=gen)

    def step(x, t, context):  # what a backend's run("unet") computes, in the model's precision
        return unet(x.to(device, dtype), t.to(device), context=context.to(device, dtype)).float()

    def as_backend(fn):  # CPU float32 in, CPU float32 out, as the sampler loop hands tensors over
        return lambda x, t, context: fn(x, t, context).cpu()

    variants = [  # name, LDMRT_KERNELS, channels-last, graphed
        ("torch eager, SDPA (NCHW)", "torch", False, False),
        ("ldmrt cuda: Triton kernels, channels-last, eager", "triton", True, False),
        ("ldmrt cuda: Triton kernels, channels-last, CUDA graph", "triton", True, True),
        ("torch ops (SDPA), channels-last, CUDA graph", "torch", True, True),
    ]
    rows, reference, sampler_step = [], None, None
    warmup, repeats = (0, 1) if tiny else (5, 30)
    for name, kernels, channels_last, use_graph in variants:
        if use_graph and device != "cuda":
            rows.append({"kind": "unet", "variant": name, "skipped": "CUDA graphs need CUDA"})
            continue
        if budget.left() < 0:
            rows.append({"kind": "unet", "variant": name, "skipped": "time budget"})
            continue
        os.environ["LDMRT_KERNELS"] = kernels  # read per call; a graph keeps what it captured
        unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        fn = as_backend(CudaGraphRunner(step, device) if use_graph else step)
        with torch.no_grad():
            for _ in range(warmup):
                fn(x, t, context)
            t0 = time.perf_counter()
            for _ in range(repeats):
                eps = fn(x, t, context)
            seconds = (time.perf_counter() - t0) / repeats
        reference = eps if reference is None else reference
        rows.append({"kind": "unet", "variant": name, "ms": seconds * 1e3, "shape": list(x.shape),
                     "dtype": str(dtype).removeprefix("torch."), "rel_err_vs_eager_sdpa": rel_err(eps, reference)})
        if kernels == "triton" and (use_graph or sampler_step is None):
            sampler_step = fn
    # The sampler runs ldmrt's configuration; on CPU it checks the loop's plumbing, where the interpreted
    # kernels would only slow it down.
    os.environ["LDMRT_KERNELS"] = "torch" if tiny else "triton"
    unet.to(memory_format=torch.channels_last)
    if tiny:
        sampler_step = as_backend(step)
    return rows, (sampler_step, x, context)


def sampler_run(step_setup, tiny, budget) -> list[dict]:
    import torch
    try:
        from ldmrt import sampling
    except ImportError as e:
        return [{"kind": "sampler", "skipped": f"the C++ core is not built ({e})"}]
    step, x, context = step_setup
    if step is None or budget.left() < 0:
        return [{"kind": "sampler", "skipped": "time budget"}]
    steps = 4 if tiny else 20
    alphas = sampling.make_alphas_cumprod("linear", 1000, 0.00085, 0.012)  # SD v1's schedule

    def eps_fn(x_in, t):  # x_in is the guided batch [x; x]
        return step(x_in, torch.full((x_in.shape[0],), float(t)), context)

    t0 = time.perf_counter()
    with torch.no_grad():
        latent = sampling.sample(eps_fn, x[:1].clone(), sampler="ddim", steps=steps, alphas_cumprod=alphas,
                                 guidance_scale=7.5)
    seconds = time.perf_counter() - t0
    return [{"kind": "sampler", "sampler": "ddim", "steps": steps, "guidance_scale": 7.5, "total_s": seconds,
             "ms_per_step": seconds / steps * 1e3, "latent_finite": bool(torch.isfinite(latent).all())}]


# ---- the engine ----

def engine_run(device, budget) -> list[dict]:
    import tempfile

    import torch

    from ldmrt.testing.adherence import score
    from ldmrt.cli import DEMO_PROMPT as PROMPT
    from ldmrt.engine import DEFAULT_MODEL, Engine

    if budget.left() < 0:
        return [{"kind": "engine", "skipped": "time budget"}]
    steps = 20
    with tempfile.TemporaryDirectory() as tmp:
        Engine.build(DEFAULT_MODEL, Path(tmp) / "fp32", backend="torch", progress=None)
        Engine.build(DEFAULT_MODEL, Path(tmp) / "fp16", backend="torch", fp16=True, progress=None)
        reference = Engine.load(Path(tmp) / "fp32", device="cpu")
        engine = Engine.load(Path(tmp) / "fp16", device=device)  # fp16 on CUDA, bf16 on a CPU
        ref = reference.generate(PROMPT, steps=steps, seed=0, output_type="latent")
        engine.generate(PROMPT, steps=steps, seed=0, output_type="latent")  # captures the graph, compiles
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        latent = engine.generate(PROMPT, steps=steps, seed=0, output_type="latent")
        seconds = time.perf_counter() - t0
        image = engine.generate(PROMPT, steps=steps, seed=0)[0]
    return [{"kind": "engine", "model": DEFAULT_MODEL, "device": device, "dtype": str(engine.backend.dtype),
             "prompt": PROMPT, "steps": steps, "generate_s": seconds, "rel_err_vs_cpu_fp32": rel_err(latent, ref),
             "adherence": score(PROMPT, image)}]


# ---- report ----

def print_table(results):
    checks = [r for r in results["checks"] if r["kind"] == "check"]
    bad = [r for r in checks if not r["ok"]]
    print(f"\nkernel checks: {len(checks) - len(bad)}/{len(checks)} within tolerance (relative L2 vs float64)")
    for dtype in TOLERANCE:
        errs = [r["rel_err"] for r in checks if r["dtype"] == dtype]
        if errs:
            print(f"  {dtype:9s} worst {max(errs):.2e}  (tolerance {TOLERANCE[dtype]:.0e})")
    for r in bad:
        print(f"  FAILED {r['kernel']} {r['case']} {r['dtype']}: {r['rel_err']:.2e}")
    if results["kernel_timings"]:
        print(f"\n{'kernel':22s} {'case':32s} {'triton ms':>10s} {'torch ms':>10s} {'speedup':>8s}  "
              "(group norm ms: 1 chunk, 4x chunks)")
        for r in results["kernel_timings"]:
            if r["kind"] == "timing":
                one_chunk = (f"  {r['triton_one_chunk_ms']:10.4f} {r['triton_4x_chunks_ms']:10.4f}"
                             if "triton_one_chunk_ms" in r else "")
                print(f"{r['kernel']:22s} {r['case']:32s} {r['triton_ms']:10.4f} {r['torch_ms']:10.4f} "
                      f"{r['speedup']:7.2f}x{one_chunk}")
    print(f"\n{'UNet step variant':56s} {'ms':>9s} {'rel err':>9s}")
    for r in results["unet"]:
        if "skipped" in r:
            print(f"{r['variant']:56s} skipped: {r['skipped']}")
        else:
            print(f"{r['variant']:56s} {r['ms']:9.2f} {r['rel_err_vs_eager_sdpa']:9.1e}")
    for r in results["sampler"]:
        if "skipped" in r:
            print(f"\nsampler: skipped: {r['skipped']}")
        else:
            print(f"\nsampler: {r['steps']} {r['sampler']} steps (C++ plan, guidance {r['guidance_scale']}): "
                  f"{r['total_s']:.2f} s, {r['ms_per_step']:.2f} ms/step")
    for r in results["engine"]:
        if "skipped" in r:
            print(f"\nengine: skipped: {r['skipped']}")
        else:
            obeyed = sum(r["adherence"].values())
            print(f"\nengine: shipped model, {r['dtype']} on {r['device']}: {r['steps']} steps in "
                  f"{r['generate_s']:.3f} s; latent vs CPU fp32 {r['rel_err_vs_cpu_fp32']:.1e} rel L2; "
                  f"image obeys {obeyed}/{len(r['adherence'])} attributes of {r['prompt']!r}")
    tiles = [r for r in results["attention_tiles"] if r["kind"] == "tiles" and "ms" in r]
    if tiles:
        print(f"\n{'attention fp16 case':24s} {'tiles':24s} {'ms':>8s} {'rel err':>8s} {'regs':>5s} {'spill B':>8s} "
              f"{'shared B':>9s}")
        for case in dict.fromkeys(r["case"] for r in tiles):
            runs = [r for r in tiles if r["case"] == case]
            fastest = min(runs, key=lambda r: r["ms"])
            for label, r in (("default", next((r for r in runs if r["default"]), None)), ("fastest", fastest)):
                if r is None or (label == "fastest" and r["default"]):
                    continue
                usage = (f"{r['regs']:5d} {r['spill_bytes']:8d} {r['shared_bytes']:9d}" if "regs" in r
                         else r.get("resources_error", ""))
                tiles_text = f"{tuple(r['tiles'])}{' split' if r['split_heads'] else ''}"
                print(f"{case + ' ' + label:24s} {tiles_text:24s} {r['ms']:8.4f} {r['rel_err']:8.1e} {usage}")


def main():
    args = parse_args()
    if args.cpu_check:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    budget = Budget(args.budget_s)
    results = {"build": build(args, budget)}
    import torch
    if not args.cpu_check and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-check for the parts a CPU can check")
    device = "cpu" if args.cpu_check else "cuda"
    if args.cpu_check:
        torch.set_num_threads(1)  # tiny shapes: extra threads only contend
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    results["mode"] = "cpu-check" if args.cpu_check else "gpu"
    results["environment"] = environment(device)
    results["checks"] = run_checks(device, args.cpu_check, budget)
    results["kernel_timings"] = [] if args.cpu_check else time_kernels(budget)
    results["unet"], step_setup = unet_step_variants(device, args.cpu_check, budget)
    results["sampler"] = sampler_run(step_setup, args.cpu_check, budget)
    results["engine"] = engine_run(device, budget)
    results["attention_tiles"] = [] if args.cpu_check else sweep_attention_tiles(Budget(args.tiles_budget_s))
    results["seconds"] = round(time.perf_counter() - budget.start, 1)
    print_table(results)
    out = args.out or ROOT / "results" / ("bench_gpu-cpu-check.json" if args.cpu_check else "bench_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from ldmrt.files import atomic_write
    atomic_write(out, json.dumps(results, indent=1))  # written whole or not at all
    print(f"\nwrote {out} ({results['seconds']} s)")
    failed = [r for r in results["checks"] if r["kind"] == "check" and not r["ok"]]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
