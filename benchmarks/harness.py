"""Side-by-side CPU latency of ldmrt's backends and peers on the same weights.

    .venv/bin/python -m benchmarks --sizes 256 512 --repeats 5 --out results/bench

For each image size, each component (text encoder, UNet step, VAE decoder) is prepared in every variant,
warmed up, then timed in interleaved rounds (A B C, B C A, ...: drift on a shared machine hits every variant
alike); the median is reported with its ratio to the baseline variant of the same run, the output's rel L2
to the fp32 reference (ldmrt-torch-fp32, else diffusers-fp32) on the same inputs, FLOPs per call (counted
by torch's FlopCounterMode on the fp32 graph) and the FLOP/s achieved. Memory: the resident-set growth
while a variant is prepared (its weights, caches) and the peak growth during its timed calls.

End-to-end seconds per image are composed from the medians: text encoder + the sampler plan's UNet calls +
decoder (batch 2 = one classifier-free guided step, decoder batch 1); the sampler loop's own cost is ~1 ms a
step (benchmarks/sampler_overhead.py). Per `--modes` (exact; cacheN: feature caching every N-th step; cutP:
no guidance on the last P% of the steps; joined by +) the plan says which call each step is: a full guided
step (unet), a conditional one (unet_cond), or the cached versions of either (unet_shallow[_cond]).

Writes bench.json, bench.md (tables) and bench.png (ratios) to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models import make_peers, save_diffusers_folder
from .variants import VARIANTS, Unavailable

COMPONENTS = ("text_encoder", "unet", "unet_cond", "unet_shallow", "unet_shallow_cond", "decoder")
STEP_COMPONENTS = {(True, False): "unet", (False, False): "unet_cond", (True, True): "unet_shallow",
                   (False, True): "unet_shallow_cond"}  # (guided, shallow) of a plan stage -> what it runs
DEFAULT_VARIANTS = [name for name, v in VARIANTS.items() if not v.optional]
REFERENCES = ("ldmrt-torch-fp32", "diffusers-fp32")


@dataclass
class Bench:
    """What the variants share during a run: the peer modules, ldmrt's model on the same tensors, caches."""
    peers: object
    folder: Path
    work_dir: Path
    threads: int
    ldm: object = None
    cache: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)

    def load_ldmrt(self):
        """A LatentDiffusion read from the diffusers folder through ldmrt's converter (its own tensors)."""
        from ldmrt.checkpoint import load_model
        return load_model(self.folder)


def share_peer_weights(ldm, peers, folder: Path) -> None:
    """Point ldmrt's parameters at the peers' tensors (renamed by ldmrt's converter, no copies): one set of
    fp32 weights in memory, and a check (strict loading) that the converter maps every tensor."""
    from ldmrt.diffusers_convert import (convert_text_encoder_state_dict, convert_unet_state_dict,
                                         convert_vae_state_dict)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    ldm.model.diffusion_model.load_state_dict(convert_unet_state_dict(peers.unet.state_dict(), unet_cfg),
                                              strict=True, assign=True)
    ldm.first_stage_model.load_state_dict(convert_vae_state_dict(peers.vae.state_dict(), vae_cfg),
                                          strict=True, assign=True)
    ldm.cond_stage_model.transformer.load_state_dict(
        convert_text_encoder_state_dict(peers.text_encoder.state_dict()), strict=True, assign=True)


def make_inputs(component: str, size: int, bench: "Bench", batch: int, seed: int = 0) -> list[torch.Tensor]:
    peers = bench.peers
    g = torch.Generator().manual_seed(seed)
    latent = size // peers.latent_factor
    if component == "text_encoder":
        return [torch.randint(0, peers.vocab_size, (batch, peers.max_length), generator=g)]
    if component.startswith("unet"):
        b = batch if component in ("unet", "unet_shallow") else max(1, batch // 2)
        inputs = [torch.randn(b, 4, latent, latent, generator=g), torch.full((b,), 500.0),
                  torch.randn(b, peers.max_length, peers.context_dim, generator=g)]
        if "shallow" in component:  # the deep feature of ldmrt's fp32 UNet on these inputs: the exact cached step
            from ldmrt.export.graphs import graph_modules
            with torch.no_grad():
                inputs.append(graph_modules(bench.ldm)["unet"](*inputs)[1])
        return inputs
    return [torch.randn(1, 4, latent, latent, generator=g)]


def count_flops(ldm, component: str, inputs) -> int:
    """FLOPs of one call of ldmrt's fp32 graph (matrix products and attention; elementwise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldmrt.export.graphs import graph_modules
    from ldmrt.config import instantiate_from_config
    from .variants import GRAPHS
    with torch.device("meta"):
        meta_model = instantiate_from_config(ldm.ldmrt_config)
    module = graph_modules(meta_model)[GRAPHS[component]]
    from .variants import GRAPH_INPUTS
    feeds = [x.to("meta") for n, x in zip(GRAPH_INPUTS[component], inputs) if n in module.input_names]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*feeds)
    return int(counter.get_total_flops())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def measure(bench: Bench, component: str, size: int, variants: list[str], args, log) -> list[dict]:
    inputs = make_inputs(component, size, bench, args.batch)
    calls, rows = {}, {}
    for name in variants:
        row = rows[name] = {"size": size, "component": component, "variant": name,
                            "runtime": VARIANTS[name].runtime, "precision": VARIANTS[name].precision,
                            "ldmrt": VARIANTS[name].ldmrt}
        rss0, t0 = _rss(), time.perf_counter()
        try:
            call = VARIANTS[name].prepare(bench, component, inputs)
            t1 = time.perf_counter()
            row["output"] = call()  # warm-up 1 (compilers compile here)
            t2 = time.perf_counter()
        except Unavailable as e:
            row["unavailable"] = str(e)
            log(f"  {component} {size}: {name}: unavailable ({e})")
            continue
        for _ in range(args.warmup - 1):
            call()
        row.update(setup_s=t1 - t0, first_call_s=t2 - t1, setup_rss_mb=(_rss() - rss0) / 2 ** 20)
        calls[name] = call
        log(f"  {component} {size}: {name}: set up in {t1 - t0:.1f} s, first call {t2 - t1:.2f} s")

    times = {name: [] for name in calls}
    peaks = {name: 0 for name in calls}
    order = list(calls)
    can_reset = _reset_peak()
    for r in range(args.repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            before = _rss()
            _reset_peak()
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
            if can_reset:
                peaks[name] = max(peaks[name], _peak() - before)
        log(f"  {component} {size}: round {r + 1}/{args.repeats}: " +
            ", ".join(f"{n} {times[n][-1]:.3f}" for n in order))

    reference = next((rows[n]["output"] for n in REFERENCES if "output" in rows.get(n, {})), None)
    for name in calls:
        row = rows[name]
        row["times_s"] = times[name]
        row["median_s"] = statistics.median(times[name])
        row["run_peak_mb"] = peaks[name] / 2 ** 20 if can_reset else None
        row["rel_l2_vs_fp32"] = rel_l2(row["output"], reference) if reference is not None else None
    for row in rows.values():
        row.pop("output", None)
    calls.clear()
    return list(rows.values())


def step_counts(mode: str, sampler: str, steps: int) -> dict[str, int]:
    """{component: calls} of one image's sampler loop in `mode`, from the plan ldmrt compiles for it."""
    from ldmrt.sampling import make_alphas_cumprod, make_plan
    from ldmrt.testing import mode_settings
    settings = mode_settings(mode)
    plan = make_plan(sampler=sampler, steps=steps, alphas_cumprod=make_alphas_cumprod("linear", 1000), **settings)
    counts = dict.fromkeys(STEP_COMPONENTS.values(), 0)
    for stage in plan.stages:
        counts[STEP_COMPONENTS[(stage["guided"], stage["shallow"])]] += 1
    return counts


def add_derived(rows: list[dict], baseline: str, flops: dict, steps: int, modes=("exact",),
                sampler: str = "ddim") -> list[dict]:
    """Ratios to the baseline of the same size and component, FLOP/s, and composed end-to-end seconds per
    mode: text encoder + each plan stage's UNet call + decoder (a variant without a call a mode needs, e.g.
    no feature caching, has no row for that mode)."""
    medians = {(r["size"], r["component"], r["variant"]): r["median_s"] for r in rows if "median_s" in r}
    for r in rows:
        if "median_s" not in r:
            continue
        base = medians.get((r["size"], r["component"], baseline))
        r["ratio_vs_baseline"] = r["median_s"] / base if base else None
        r["gflop"] = flops[(r["size"], r["component"])] / 1e9
        r["gflop_per_s"] = r["gflop"] / r["median_s"]
    e2e = []
    for steps, mode in ((n, m) for n in ([steps] if isinstance(steps, int) else steps) for m in modes):
        counts = {c: n for c, n in step_counts(mode, sampler, steps).items() if n}
        for size in sorted({r["size"] for r in rows}):
            for variant in dict.fromkeys(r["variant"] for r in rows):
                parts = {c: medians.get((size, c, variant)) for c in ("text_encoder", "decoder", *counts)}
                if None in parts.values():
                    continue
                seconds = parts["text_encoder"] + parts["decoder"] + sum(n * parts[c] for c, n in counts.items())
                e2e.append({"size": size, "variant": variant, "mode": mode, "steps": steps, "calls": counts,
                            "seconds_per_image": seconds})
    base = {(e["size"], e["steps"]): e["seconds_per_image"] for e in e2e
            if e["variant"] == baseline and e["mode"] == "exact"}
    for e in e2e:
        key = (e["size"], e["steps"])
        e["ratio_vs_baseline"] = e["seconds_per_image"] / base[key] if key in base else None
    return e2e


def machine_facts(threads: int) -> dict:
    from ldmrt.machine import cpu_features, library_version
    model = None
    if Path("/proc/cpuinfo").exists():
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None)
    cpu = cpu_features()
    return {
        "cpu": model, "machine": platform.machine(), "logical_cpus": os.cpu_count(), "threads": threads,
        "cpu_flags": [f for f, on in cpu["flags"].items() if on] + [f for f in ("avx512_vnni",) if _has_flag(f)],
        "amx": bool(cpu["flags"].get("amx_bf16")),
        "torch_cpu_capability": cpu["torch_cpu_capability"],
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
        "load_average_start": os.getloadavg(),
        "versions": {name: library_version(name) for name in ("ldmrt", "torch", "onnxruntime", "openvino", "diffusers",
                                                         "transformers", "numpy")} | {
            "python": platform.python_version()},
    }


def _has_flag(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags"))
    except OSError:
        return False


def run(args, log=print) -> dict:
    from .report import write_report
    torch.set_num_threads(args.threads)
    variants = args.variants or DEFAULT_VARIANTS
    unknown = [v for v in variants + [args.baseline] if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if args.baseline not in variants:
        variants = variants + [args.baseline]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": shlex.join([Path(sys.executable).name, "-m", "benchmarks", *args.argv]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_facts(args.threads),
              "config": {k: v for k, v in vars(args).items() if k not in ("argv",)} | {"variants": variants},
              "baseline": args.baseline}
    with tempfile.TemporaryDirectory(prefix="ldmrt-bench-", dir=args.work_dir) as work:
        work = Path(work)
        t0 = time.perf_counter()
        peers = make_peers(args.model, seed=args.seed)
        folder = save_diffusers_folder(peers, work / "diffusers")
        bench = Bench(peers, folder, work, args.threads)
        bench.ldm = bench.load_ldmrt()
        share_peer_weights(bench.ldm, peers, folder)
        log(f"models ({args.model}) ready in {time.perf_counter() - t0:.1f} s")
        rows, flops = [], {}
        for size in args.sizes:
            for component in args.components:
                if component == "text_encoder" and size != args.sizes[0]:
                    # the text encoder does not depend on the image size: its rows stand for every size
                    rows += [dict(r, size=size) for r in rows if r["component"] == component]
                    flops[(size, component)] = flops[(args.sizes[0], component)]
                    continue
                inputs = make_inputs(component, size, bench, args.batch)
                flops[(size, component)] = count_flops(bench.ldm, component, inputs)
                rows += measure(bench, component, size, variants, args, log)
                gc.collect()
                # what is measured so far, in case a later (bigger) shape does not finish
                result.update(facts=bench.facts, results=rows, finished=None,
                              e2e=add_derived(rows, args.baseline, flops, args.steps, args.modes, args.sampler))
                write_report(result, out)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result["machine"]["load_average_end"] = os.getloadavg()
    result["machine"]["peak_rss_gb"] = _peak() / 2 ** 30
    write_report(result, out)
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd-v1", choices=("sd-v1", "tiny"), help="architecture (random weights)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes (square)")
    p.add_argument("--components", nargs="+", default=list(COMPONENTS), choices=COMPONENTS)
    p.add_argument("--variants", nargs="+", help=f"default: {' '.join(DEFAULT_VARIANTS)}; also "
                   f"{' '.join(n for n, v in VARIANTS.items() if v.optional)}")
    p.add_argument("--baseline", default="diffusers-bf16", help="ratios are to this variant's medians")
    p.add_argument("--batch", type=int, default=2, help="UNet / text encoder batch (2: one guided step)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first (>= 1)")
    p.add_argument("--steps", type=int, nargs="+", default=[50], help="sampler steps of the composed end-to-end "
                   "times (each)")
    p.add_argument("--sampler", default="ddim", help="sampler whose plan composes the end-to-end time")
    p.add_argument("--modes", nargs="+", default=["exact"], help="exact, cacheN (feature caching), cutP (no "
                   "guidance on the last P%% of the steps), joined by +: composed end-to-end times for each")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every runtime")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="where the temporary diffusers folder and exports go")
    p.add_argument("--out", default="results/bench", help="folder for bench.json, bench.md, bench.png")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    args.warmup = max(1, args.warmup)
    return args


def main(argv=None) -> int:
    # Tracer warnings of the OpenVINO conversion and diffusers' notes on casting are not results.
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    run(parse_args(sys.argv[1:] if argv is None else argv))
    return 0
