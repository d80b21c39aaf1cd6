"""Every sampler against its references, on a toy float64 denoiser (the exact eps of Gaussian data): the error
table of the README.

For each ldmrt sampler: relative L2 of the C++ plan's latent against (1) ldmrt's float64 transcription of the
source loop (ldmrt.testing.sampling_reference), with float64 and float32 latents, (2) k-diffusion's own
sample_* function (the installed k-diffusion package, or LDMRT_KDIFFUSION_SRC, a checkout),
(3) the diffusers scheduler of the same method, driven as its pipelines drive it (diffusers installed), each from
the same x_T and the same noise draws.

    .venv/bin/python -m benchmarks.sampler_parity [--steps 20]
"""
import argparse
import inspect

import numpy as np
import torch

from ldmrt import sampling, schedulers
from ldmrt.testing import sampling_reference as ref

T = 1000
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=T)
SHAPE = (2, 4, 16, 16)
# The diffusers scheduler (class, config) of each sampler: Stable Diffusion's settings otherwise.
DIFFUSERS = {
    "ddim": ("DDIMScheduler", dict(timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)),
    "ddpm": ("DDPMScheduler", dict(timestep_spacing="leading", steps_offset=1, clip_sample=False)),
    "plms": ("PNDMScheduler", dict(timestep_spacing="leading", steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)),
    "lcm": ("LCMScheduler", dict(set_alpha_to_one=False)),
    "euler": ("EulerDiscreteScheduler", {}), "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}), "unipc": ("UniPCMultistepScheduler", {}),
}
K_DIFFUSION = {"euler": "sample_euler", "euler_ancestral": "sample_euler_ancestral", "heun": "sample_heun",
               "dpm_2": "sample_dpm_2", "dpm_2_ancestral": "sample_dpm_2_ancestral", "lms": "sample_lms",
               "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral", "dpmpp_sde": "sample_dpmpp_sde",
               "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
               "dpmpp_3m_sde": "sample_dpmpp_3m_sde"}


def rel_l2(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def vs_reference(name, eps, x_T, ac, steps):
    if name not in ref.SAMPLERS:
        return None, None
    spacing = "uniform" if name in ref.COMPVIS_STYLE and name != "lcm" else "lcm" if name == "lcm" else "kdiffusion"
    noise = [sampling.randn(11, SHAPE, stream=d + 1, dtype="float64") for d in range(4 * steps)]
    kw = dict(sampler=name, steps=steps, alphas_cumprod=ac, timestep_spacing=spacing)
    expected = ref.sample_reference(eps, x_T, noise_fn=lambda d: noise[d], **kw)
    out = [sampling.sample(eps, x_T.astype(dtype), noise_fn=lambda d, dt=dtype: noise[d].astype(dt), **kw)
           for dtype in ("float64", "float32")]
    return rel_l2(out[0], expected), rel_l2(out[1], expected)


def vs_k_diffusion(k, name, eps, x_T, ac, steps):
    if k is None or name not in K_DIFFUSION:
        return None
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its grids' linspace in float64, as ldmrt's
    try:
        acs = torch.from_numpy(ac)
        log_sigmas = torch.log(((1 - acs) / acs) ** 0.5)
        sigmas = k.get_sigmas_karras(steps, log_sigmas[0].exp().item(), log_sigmas[-1].exp().item())

        def denoiser(x, sigma):
            s = float(sigma.reshape(-1)[0])
            return x - s * torch.from_numpy(eps((x / (s * s + 1) ** 0.5).numpy(), ref.sigma_to_t(ac, s)))
        noise = [torch.from_numpy(sampling.randn(12, SHAPE, stream=d + 1, dtype="float64")) for d in range(3 * steps)]
        taken = iter(noise)
        fn = getattr(k, K_DIFFUSION[name])
        extra = {"noise_sampler": lambda a, b: next(taken)} if "noise_sampler" in inspect.signature(fn).parameters else {}
        expected = fn(denoiser, sigmas[0] * torch.from_numpy(x_T), sigmas, disable=True, **extra)
    finally:
        torch.set_default_dtype(default)
    out = sampling.sample(eps, x_T, sampler=name, steps=steps, alphas_cumprod=ac, timestep_spacing="karras",
                          noise_fn=lambda d: noise[d].numpy())
    return rel_l2(out, expected.numpy())


def vs_diffusers(diffusers, name, eps, x_T, ac, steps):
    if diffusers is None or name not in DIFFUSERS:
        return None, None
    cls, config = DIFFUSERS[name]
    scheduler = getattr(diffusers, cls)(**SD, **config)
    expected = ref.diffusers_reference(scheduler, eps, x_T, steps, seed=5)
    choice = schedulers.from_diffusers({"_class_name": cls, **scheduler.config})
    g = torch.Generator().manual_seed(5)
    dtype = torch.float32 if cls == "DPMSolverMultistepScheduler" else torch.float64  # its SDE noise is float32
    plan = sampling.make_plan(steps=steps, alphas_cumprod=ac, **schedulers.plan_arguments(choice, ac))
    out = sampling.run(plan, eps, x_T, noise_fn=lambda d: torch.randn(SHAPE, generator=g, dtype=dtype).double())
    return cls + (f" {config}" if name in ("dpmpp_2m_sde", "dpmpp_3m") else ""), rel_l2(out, expected)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    ac = sampling.make_alphas_cumprod("linear", T, 0.00085, 0.012)
    x_T = sampling.randn(3, SHAPE, dtype="float64")
    eps = ref.gaussian_eps(ac, np.random.default_rng(0).standard_normal(SHAPE) * 0.5)
    src = ref.k_diffusion_source()
    k = ref.load_k_diffusion(src) if src else None
    try:
        import diffusers
    except ImportError:
        diffusers = None
    aliases = {}
    for label, (name, options) in schedulers.A1111_SAMPLERS.items():
        aliases.setdefault(name, label)
    fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    print(f"{args.steps} steps, toy Gaussian denoiser, latent {SHAPE}; relative L2 of ldmrt's latent against each reference\n")
    print("| ldmrt | AUTOMATIC1111 | vs transcription f64 / f32 | vs k-diffusion (Karras grid) | diffusers scheduler | vs diffusers |")
    print("|---|---|---|---|---|---|")
    for name in sampling.SAMPLERS:
        f64, f32 = vs_reference(name, eps, x_T, ac, args.steps)
        cls, err = vs_diffusers(diffusers, name, eps, x_T, ac, args.steps)
        print(f"| {name} | {aliases.get(name, '-')} | {fmt(f64)} / {fmt(f32)} | "
              f"{fmt(vs_k_diffusion(k, name, eps, x_T, ac, args.steps))} | {cls or '-'} | {fmt(err)} |")


if __name__ == "__main__":
    main()
