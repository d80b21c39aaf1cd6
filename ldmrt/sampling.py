"""Sampling: CompVis' DDPM, DDIM and PLMS, k-diffusion's samplers (Euler, Euler a, Heun, DPM2, DPM2 a, LMS,
DPM++ 2S a, DPM++ SDE, DPM++ 2M, 2M SDE, 3M SDE), diffusers' UniPC and LCM, compiled to a plan and run by the C++ loop in
`ldmrt._C` (csrc/). The names users know from AUTOMATIC1111 and diffusers map onto these in ldmrt.schedulers.

The model is any callable `eps = eps_fn(x, t)`: x has the latent's type (numpy array, or CPU torch tensor when
x_T is one) and shape, t is a float timestep (fractional with Karras sigmas), and it returns eps of x's shape.
It must not keep or modify x: x is the loop's own buffer, passed without a copy. With `guidance_scale` the
callable receives the doubled batch [x; x] and must evaluate its first half with the unconditional and its
second half with the conditional conditioning (it closes over both, e.g. c_in = cat([uc, c])); the loop makes
that one call per evaluation and combines eps_u + s * (eps_c - eps_u). (Plans with a guidance interval pass
x alone on their unguided steps; plans with feature caching mark the stages whose evaluation may run the
UNet's shallow branch: `plan.stages[i]["shallow"]` for the i-th call.)

Latent conventions: the latent is always the variance-preserving x_t the eps-model takes (k-diffusion's
x / sqrt(sigma^2 + 1)). x_T is unit Gaussian noise: CompVis samplers start from it as is, the k-diffusion ones
from sigma_max * x_T in their own variables, exactly as k-diffusion does.
"""
from typing import NamedTuple

import numpy as np

from . import _C

SAMPLERS = tuple(_C.sampler_names())
SPACINGS = ("uniform", "leading", "trailing", "linspace", "kdiffusion", "karras", "exponential", "simple",
            "sgm_uniform", "lcm")
# Grid and convention options of make_plan beyond the spacing, with their defaults (csrc/include/ldmrt/samplers.h):
# what a diffusers scheduler_config.json becomes (ldmrt.schedulers).
PLAN_OPTIONS = {"steps_offset": 0, "final_alpha_cumprod": None, "sigma_interpolation": "log", "respace": "",
                "round_timesteps": False, "drop_last_timestep": False, "original_steps": 50, "start_noise": "default", "lower_order_final": None,
                "euler_at_final": False, "solver_type": "", "solver_order": 0,
                "prev_timestep_stride": False}

make_alphas_cumprod = _C.make_alphas_cumprod
make_timesteps = _C.make_timesteps


def make_plan(*, sampler, steps, alphas_cumprod, eta=None, timestep_spacing="uniform", strength=1.0, cache_interval=1,
              guidance_interval=None, cache_schedule="uniform", **options):
    """Compile a sampler into an `ldmrt._C.Plan` (see csrc/include/ldmrt/plan.h); raises ValueError on bad
    arguments (steps < 1 or > T, eta < 0, unknown sampler or spacing, strength outside [0, 1]).

    options: PLAN_OPTIONS (diffusers' conventions: steps_offset, final_alpha_cumprod, sigma_interpolation "log" or
    "linear", respace "karras"/"exponential" over the spaced range, round_timesteps, drop_last_timestep,
    original_steps (lcm),
    start_noise "default"/"sigma"/"unit", lower_order_final, euler_at_final, solver_type "midpoint"/"heun" of the
    DPM++ multistep samplers or "bh1"/"bh2" of unipc, solver_order of unipc, prev_timestep_stride of diffusers'
    DDIM/DDPM).
    cache_interval: DeepCache, the full UNet every N-th step and its shallow branch between (stage["shallow"]);
    cache_schedule "quadratic" places as many full steps denser around 30% of the schedule (csrc/samplers.cpp).
    guidance_interval: (from, until) fractions of the steps where guidance applies (stage["guided"]); outside
    it a guided loop makes one conditional evaluation of the batch alone."""
    unknown = set(options) - set(PLAN_OPTIONS)
    if unknown:
        raise ValueError(f"unknown plan option(s) {sorted(unknown)} (expected {sorted(PLAN_OPTIONS)})")
    o = {**PLAN_OPTIONS, **options}
    lo, hi = (0.0, 1.0) if guidance_interval is None else map(float, guidance_interval)
    final = o["final_alpha_cumprod"]
    return _C.make_plan(sampler, int(steps), _as_float64(alphas_cumprod), None if eta is None else float(eta),
                        timestep_spacing, int(o["steps_offset"]), None if final is None else float(final),
                        float(strength), int(cache_interval), (lo, hi), str(cache_schedule),
                        str(o["sigma_interpolation"]), str(o["respace"]), bool(o["round_timesteps"]),
                        bool(o["drop_last_timestep"]),
                        int(o["original_steps"]), str(o["start_noise"]),
                        None if o["lower_order_final"] is None else bool(o["lower_order_final"]),
                        bool(o["euler_at_final"]), str(o["solver_type"]), int(o["solver_order"]),
                        bool(o["prev_timestep_stride"]))


def noise_from_sampler(plan, noise_sampler, *, with_mask=False):
    """A noise_fn for `run` from a k-diffusion-style noise_sampler(sigma_from, sigma_to) (e.g. k-diffusion's
    BrownianTreeNoiseSampler, as AUTOMATIC1111 uses for its SDE samplers): draw d gets the interval of the plan's
    d-th noise draw (plan.noise_intervals)."""
    intervals = plan.noise_intervals(with_mask)
    return lambda draw: noise_sampler(*intervals[draw])


def randn(seed, shape, *, stream=0, dtype="float32"):
    """Philox4x32-10 + Box-Muller normal noise; bit-identical to ldmrt::randn in a C++ host. Returns numpy."""
    return _C.randn(int(seed), list(shape), int(stream), str(np.dtype(dtype)))


def sample(eps_fn, x_T, *, sampler, steps, alphas_cumprod, eta=None, timestep_spacing="uniform", guidance_scale=None,
           x0=None, mask=None, strength=1.0, seed=0, noise_fn=None, guidance_interval=None, **options):
    """Run a sampler from x_T (float32 or float64, numpy or CPU torch); returns a new latent of x_T's type.

    eta: DDIM's eta (default 0) or the ancestral/SDE samplers' (default 1); other samplers take none.
    timestep_spacing: SPACINGS ("uniform" is CompVis DDIMSampler's; "leading" (with steps_offset), "trailing",
        "linspace" diffusers'; "kdiffusion", "karras", "exponential" k-diffusion's; "simple", "sgm_uniform"
        ComfyUI's; "lcm" diffusers' LCMScheduler's).
    options: see make_plan; final_alpha_cumprod is the alpha after the last step (default alphas_cumprod[0] for
        the CompVis-style samplers as CompVis; 1.0, diffusers' set_alpha_to_one, and the k-diffusion default).
    x0, strength: img2img, run the last int(strength * steps) steps from x0 noised with x_T to the first of them.
    x0, mask: inpainting with an ordinary model (CompVis semantics): before each step, where mask is 1 the latent
        is replaced by x0 noised to that step's level. mask broadcasts to the latent's shape.
    seed / noise_fn: the stochastic samplers' noise; Philox streams 1, 2, ... of `seed` by default, or
        `noise_fn(draw)` returning unit normal noise of the latent's shape for draw 0, 1, ... (in loop order: per
        step the inpainting blend's draw, then the step's; none where the coefficient is 0), e.g.
        `lambda draw: torch.randn(shape, generator=g)` to reproduce a torch.Generator stream, or
        noise_from_sampler(plan, k-diffusion's BrownianTreeNoiseSampler).
    guidance_interval: (from, until) fractions of the steps with guidance; on the others eps_fn gets x alone
        (not doubled) and must evaluate it with the conditional conditioning.
    """
    plan = make_plan(sampler=sampler, steps=steps, alphas_cumprod=alphas_cumprod, eta=eta,
                     timestep_spacing=timestep_spacing, strength=strength, guidance_interval=guidance_interval, **options)
    return run(plan, eps_fn, x_T, guidance_scale=guidance_scale, x0=x0, mask=mask, seed=seed, noise_fn=noise_fn)


def run(plan, eps_fn, x_T, *, guidance_scale=None, x0=None, mask=None, seed=0, noise_fn=None):
    """Run a compiled plan (see `sample`)."""
    latent, wrap, x0_np, mask_np, noise = _loop_arguments(plan, x_T, guidance_scale, x0, mask, noise_fn)

    def model(x, t):
        eps = _to_numpy(eps_fn(wrap(x), t), latent.dtype)
        if eps.shape != x.shape:
            raise ValueError(f"the model returned shape {eps.shape} for an input of shape {x.shape}")
        return eps

    _C.run_plan(plan, latent, model, x0=x0_np, mask=mask_np, guidance_scale=guidance_scale, seed=int(seed),
                noise_fn=noise)
    return wrap(latent)


class Evaluation(NamedTuple):
    """The model evaluation a stepper's current stage needs: eps = model(x, t) with `x` (the doubled batch
    [x; x] = [uncond; cond] when `guided`), on the UNet's shallow branch when `shallow` (DeepCache)."""
    x: object  # the loop's buffer (numpy, or a CPU tensor sharing it): read it, do not keep or change it
    t: float
    guided: bool
    shallow: bool


class Stepper:
    """One request's plan run step by step by its caller, the same loop as `run` (ldmrt::Stepper): `next()` names
    the evaluation the current stage needs, `apply(eps)` makes its update. A server evaluates the `next()` of
    several steppers (different plans, stages, guidance scales) in one batched model call and hands each its
    slice of the output. Same arguments as `run`, without the model; `latent` is x_T's type."""

    def __init__(self, plan, x_T, *, guidance_scale=None, x0=None, mask=None, seed=0, noise_fn=None):
        self.plan = plan
        latent, self._wrap, x0_np, mask_np, noise = _loop_arguments(plan, x_T, guidance_scale, x0, mask, noise_fn)
        self._dtype = latent.dtype
        self._stepper = _C.stepper(plan, latent, x0=x0_np, mask=mask_np, guidance_scale=guidance_scale,
                                   seed=int(seed), noise_fn=noise)
        self.latent = self._wrap(latent)  # updated in place

    @property
    def done(self) -> bool:
        return self._stepper.done

    @property
    def stage(self) -> int:
        """Stages applied so far (the index of the next one in plan.stages)."""
        return self._stepper.stage

    def next(self) -> Evaluation:
        x, t, guided, shallow = self._stepper.next()
        return Evaluation(self._wrap(x), t, guided, shallow)

    def apply(self, eps):
        self._stepper.apply(_to_numpy(eps, self._dtype))


def _loop_arguments(plan, x_T, guidance_scale, x0, mask, noise_fn):
    """(latent numpy copy of x_T, wrap: numpy -> x_T's kind, x0, mask, noise_fn) as the C++ loop takes them."""
    torch = _torch_if_tensor(x_T)
    if torch is not None:
        if x_T.device.type != "cpu":
            raise ValueError(f"x_T must be a CPU tensor for the CPU loop, got device {x_T.device}")
        latent = x_T.detach().to(memory_format=torch.contiguous_format).clone().numpy()
    else:
        latent = np.array(x_T, order="C", copy=True)
    if latent.dtype not in (np.float32, np.float64):
        raise ValueError(f"x_T must be float32 or float64, got {latent.dtype}")
    dtype = latent.dtype
    x0_np = None if x0 is None else _as_array(x0, dtype, latent.shape, "x0", broadcast=False)
    mask_np = None if mask is None else _as_array(mask, dtype, latent.shape, "mask", broadcast=True)
    if guidance_scale is not None and latent.ndim == 0:
        raise ValueError("guidance needs a batch dimension on x_T")
    wrap = torch.from_numpy if torch is not None else (lambda x: x)
    noise = None if noise_fn is None else (lambda draw: _as_array(noise_fn(draw), dtype, latent.shape, "noise"))
    return latent, wrap, x0_np, mask_np, noise


def _torch_if_tensor(x):
    try:
        import torch
    except ImportError:
        return None
    return torch if isinstance(x, torch.Tensor) else None


def _to_numpy(x, dtype):
    """numpy view of a CPU tensor (or array) when it already has the dtype and is contiguous, else one copy."""
    torch = _torch_if_tensor(x)
    if torch is not None:
        if x.device.type != "cpu":
            raise ValueError(f"the model must return a CPU tensor, got device {x.device}")
        x = x.detach()
        if x.dtype != torch.float32 and x.dtype != torch.float64:
            x = x.float()
        x = x.numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _as_array(x, dtype, shape, name, broadcast=False):
    x = _to_numpy(x, dtype)
    if x.shape != tuple(shape):
        if not broadcast:
            raise ValueError(f"{name} has shape {x.shape}, expected the latent's {tuple(shape)}")
        try:
            x = np.ascontiguousarray(np.broadcast_to(x, shape))
        except ValueError:
            raise ValueError(f"{name} of shape {x.shape} does not broadcast to the latent's {tuple(shape)}") from None
    return x


def _as_float64(a):
    return np.ascontiguousarray(_to_numpy(a, np.float64))
