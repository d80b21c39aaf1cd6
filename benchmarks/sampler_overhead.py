"""Sampler loop overhead per step with a zero-cost model: the C++ plan (ldmrt._C) vs the same math in Python.

The model returns a preallocated eps, so what is timed is the loop itself: the C++ loop's fused update (with
guidance combination and noise) against (a) a Python loop applying the same plan with torch ops, one op per
term, and (b) the float64 numpy reference loops in ldmrt.testing.sampling_reference, written as CompVis/k-diffusion.

    .venv/bin/python benchmarks/sampler_overhead.py [--steps 50] [--repeats 3]
"""
import argparse
import time

import numpy as np
import torch

from ldmrt import sampling
from ldmrt.testing import sampling_reference

SIZES = {"sd-512 (1x4x64x64)": (1, 4, 64, 64), "sd-512 batch 4": (4, 4, 64, 64), "sd-768 (1x4x96x96)": (1, 4, 96, 96)}
SAMPLERS = {"ddim": "uniform", "plms": "uniform", "dpmpp_2m": "karras", "euler_ancestral": "leading",
            "heun": "karras", "lms": "kdiffusion", "dpmpp_sde": "karras", "dpmpp_2m_sde": "karras",
            "dpmpp_3m_sde": "exponential", "lcm": "lcm"}


def zero_cost_model(shape, guided, dtype):
    eps = np.full((2 * shape[0],) + shape[1:] if guided else shape, 0.01, dtype=dtype)
    return lambda x, t: eps


def python_plan_loop(plan, x_T, eps_fn, guidance_scale, seed):
    """The plan's stages as separate torch ops (what a Python sampler loop does per step)."""
    x = torch.from_numpy(x_T.copy())
    history = [torch.empty_like(x) for _ in range(plan.history_slots)]
    gen = torch.Generator().manual_seed(seed)
    for stage in plan.stages:
        inp = x if stage["model_input"] < 0 else history[stage["model_input"]]
        if guidance_scale is None:
            eps = torch.from_numpy(eps_fn(inp.numpy(), stage["timestep"]))
        else:
            eps_u, eps_c = torch.from_numpy(eps_fn(torch.cat([inp, inp]).numpy(), stage["timestep"])).chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        out = stage["c_latent"] * x + stage["c_eps"] * eps
        for slot, c in zip(stage["history_slot"], stage["c_history"]):
            if slot >= 0:
                out += c * history[slot]
        if stage["c_noise"]:
            out += stage["c_noise"] * torch.randn(x.shape, generator=gen)
        if stage["push_slot"] >= 0:
            history[stage["push_slot"]] = stage["push_latent"] * x + stage["push_eps"] * eps
        if stage["dst"] < 0:
            x = out
        else:
            history[stage["dst"]] = out
    return x


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ac = sampling.make_alphas_cumprod("linear", 1000, 0.00085, 0.012)
    g = args.guidance_scale
    print(f"torch {torch.__version__}, 1 thread; {args.steps} steps, guidance {g}, float32 latent "
          f"(reference: float64); microseconds per step, best of {args.repeats}")
    print(f"{'size':22s} {'sampler':16s} {'C++ plan':>10s} {'py torch':>10s} {'py ref64':>10s} {'speedup':>8s}")
    for size_name, shape in SIZES.items():
        x_T = sampling.randn(0, shape)
        model = zero_cost_model(shape, True, np.float32)
        model64 = zero_cost_model(shape, True, np.float64)
        for sampler, spacing in SAMPLERS.items():
            plan = sampling.make_plan(sampler=sampler, steps=args.steps, alphas_cumprod=ac, timestep_spacing=spacing)
            steps = plan.num_steps
            t_cpp = best_of(lambda: sampling.run(plan, model, x_T, guidance_scale=g, seed=1), args.repeats)
            t_py = best_of(lambda: python_plan_loop(plan, x_T, model, g, 1), args.repeats)
            t_ref = best_of(lambda: sampling_reference.sample_reference(
                model64, x_T, sampler=sampler, steps=args.steps, alphas_cumprod=ac, timestep_spacing=spacing,
                guidance_scale=g, noise_fn=lambda d: np.zeros(shape)), 1)
            us = lambda t: 1e6 * t / steps  # noqa: E731
            print(f"{size_name:22s} {sampler:16s} {us(t_cpp):10.1f} {us(t_py):10.1f} {us(t_ref):10.1f} "
                  f"{t_py / t_cpp:7.1f}x")


if __name__ == "__main__":
    main()
