"""Float64 reference implementations of every sampler, written the way their sources write them.

These are for tests only: each is a direct numpy transcription of the original loop (CompVis DDIMSampler,
PLMSSampler and LatentDiffusion.p_sample_loop for DDIM, PLMS and DDPM; k-diffusion's sample_euler,
sample_euler_ancestral and sample_dpmpp_2m over DiscreteEpsDDPMDenoiser for the others), independent of the
plan compiler in csrc/, against which tests compare `ldmrt.sampling.sample`.

Conventions shared with the C++ loop, so both can be fed the same noise: `noise_fn(draw)` returns standard normal
noise of x_T's shape for draw 0, 1, ...: per step the inpainting blend's draw (when a mask is given) comes first,
then the step's own (only when its noise coefficient is nonzero).
"""
import math

import numpy as np

SAMPLERS = ("ddpm", "ddim", "plms", "dpmpp_2m", "euler", "euler_ancestral")
SPACINGS = ("uniform", "leading", "trailing", "linspace", "karras")


def make_alphas_cumprod(schedule, num_timesteps, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """CompVis make_beta_schedule followed by cumprod(1 - betas), in float64."""
    if schedule == "linear":
        betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    elif schedule == "sqrt_linear":
        betas = np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
    elif schedule == "sqrt":
        betas = np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64) ** 0.5
    elif schedule == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + cosine_s
        f = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        f = f / f[0]
        betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return np.cumprod(1 - betas)


def _log_sigmas(alphas_cumprod):
    return np.log(np.sqrt((1 - alphas_cumprod) / alphas_cumprod))


def sigma_to_t(alphas_cumprod, sigma):
    """k-diffusion DiscreteSchedule.sigma_to_t (interpolating)."""
    log_sigmas = _log_sigmas(alphas_cumprod)
    dists = math.log(sigma) - log_sigmas
    low = min(int(np.cumsum(dists >= 0).argmax()), len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - math.log(sigma)) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def t_to_sigma(alphas_cumprod, t):
    """k-diffusion DiscreteSchedule.t_to_sigma."""
    log_sigmas = _log_sigmas(alphas_cumprod)
    low, high = int(math.floor(t)), int(math.ceil(t))
    w = t - low
    return math.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def alpha_at(alphas_cumprod, t):
    if t == int(t):
        return float(alphas_cumprod[int(t)])
    return 1 / (1 + t_to_sigma(alphas_cumprod, t) ** 2)


def make_timesteps(spacing, steps, alphas_cumprod, steps_offset=0):
    """Descending timesteps: CompVis make_ddim_timesteps('uniform'), diffusers leading/trailing/linspace,
    or Karras sigmas mapped to fractional timesteps (k-diffusion)."""
    T = len(alphas_cumprod)
    if spacing == "uniform":
        t = np.asarray(list(range(0, T, T // steps))) + 1
    elif spacing == "leading":
        t = (np.arange(0, steps) * (T // steps)).round() + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps))[::-1] - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, steps).round()
    elif spacing == "karras":
        sigmas = np.exp(_log_sigmas(alphas_cumprod))
        rho = 7.0
        ramp = np.linspace(0, 1, steps)
        min_inv, max_inv = sigmas[0] ** (1 / rho), sigmas[-1] ** (1 / rho)
        karras = (max_inv + ramp * (min_inv - max_inv)) ** rho
        return np.array([sigma_to_t(alphas_cumprod, s) for s in karras])
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    return np.asarray(t, dtype=np.float64)[::-1].copy()


class _Model:
    """Calls eps_fn once per evaluation, with the doubled batch [x; x] under guidance, and combines. With a
    guidance interval (lo, hi) over n steps, evaluation k is guided when lo <= k / n < hi, else eps_fn gets x
    alone (samplers with one evaluation per step: not PLMS, whose first step evaluates twice)."""

    def __init__(self, eps_fn, guidance_scale, interval=None, steps=1):
        self.eps_fn, self.scale, self.interval, self.steps, self.calls = eps_fn, guidance_scale, interval, steps, 0

    def __call__(self, x, t):
        k, self.calls = self.calls, self.calls + 1
        if self.scale is None or (self.interval is not None and not self.interval[0] <= k / self.steps < self.interval[1]):
            return np.asarray(self.eps_fn(x, t), dtype=np.float64)
        eps_u, eps_c = np.split(np.asarray(self.eps_fn(np.concatenate([x, x]), t), dtype=np.float64), 2)
        return eps_u + self.scale * (eps_c - eps_u)


class _Noise:
    def __init__(self, noise_fn):
        self.noise_fn, self.draw = noise_fn, 0

    def __call__(self):
        out = np.asarray(self.noise_fn(self.draw), dtype=np.float64)
        self.draw += 1
        return out


def sample_reference(eps_fn, x_T, *, sampler, steps, alphas_cumprod, eta=None, timestep_spacing="uniform",
                     steps_offset=0, final_alpha_cumprod=None, guidance_scale=None, x0=None, mask=None,
                     strength=1.0, noise_fn=None, guidance_interval=None):
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    x_T = np.asarray(x_T, dtype=np.float64)
    x0 = None if x0 is None else np.asarray(x0, dtype=np.float64)
    mask = None if mask is None else np.broadcast_to(np.asarray(mask, dtype=np.float64), x_T.shape)
    ts = make_timesteps(timestep_spacing, steps, ac, steps_offset)
    keep = int(strength * len(ts))
    ts = ts[len(ts) - keep:]
    model, noise = _Model(eps_fn, guidance_scale, guidance_interval, len(ts)), _Noise(noise_fn)
    if keep == 0:
        return x0.copy()
    if sampler in ("ddim", "plms"):
        a_end = ac[0] if final_alpha_cumprod is None else final_alpha_cumprod
        eta = 0.0 if eta is None else eta
        return _compvis_ddim_plms(model, noise, x_T, ts, ac, a_end, eta, sampler == "plms", x0, mask, strength < 1)
    if sampler == "ddpm":
        return _compvis_ddpm(model, noise, x_T, ts, ac, x0, mask, strength < 1)
    eta = 1.0 if eta is None else eta
    return _k_diffusion(sampler, model, noise, x_T, ts, ac, eta, x0, mask, strength < 1)


def _blend(noise, x, x0, mask, a):
    """CompVis: img = q_sample(x0, t) * mask + (1 - mask) * img, before each step."""
    if mask is None:
        return x
    return (math.sqrt(a) * x0 + math.sqrt(1 - a) * noise()) * mask + (1 - mask) * x


def _compvis_ddim_plms(model, noise, x_T, ts, ac, a_end, eta, plms, x0, mask, img2img):
    alphas = np.array([alpha_at(ac, t) for t in ts])
    alphas_prev = np.append(alphas[1:], a_end)
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    img = math.sqrt(alphas[0]) * x0 + math.sqrt(1 - alphas[0]) * x_T if img2img else x_T.copy()
    old_eps = []

    def step(x, e_t, i):
        a_t, a_prev, sigma_t = alphas[i], alphas_prev[i], sigmas[i]
        pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
        dir_xt = math.sqrt(1 - a_prev - sigma_t ** 2) * e_t
        x_prev = math.sqrt(a_prev) * pred_x0 + dir_xt
        if sigma_t != 0:
            x_prev = x_prev + sigma_t * noise()
        return x_prev

    for i, t in enumerate(ts):
        img = _blend(noise, img, x0, mask, alphas[i])
        e_t = model(img, float(t))
        if not plms:
            img = step(img, e_t, i)
            continue
        if len(old_eps) == 0:
            x_prev = step(img, e_t, i)
            e_t_next = model(x_prev, float(ts[min(i + 1, len(ts) - 1)]))
            e_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        img = step(img, e_prime, i)
        old_eps = (old_eps + [e_t])[-3:]
    return img


def _compvis_ddpm(model, noise, x_T, ts, ac, x0, mask, img2img):
    alphas = np.array([alpha_at(ac, t) for t in ts])
    alphas_prev = np.append(alphas[1:], 1.0)
    img = math.sqrt(alphas[0]) * x0 + math.sqrt(1 - alphas[0]) * x_T if img2img else x_T.copy()
    for i, t in enumerate(ts):
        img = _blend(noise, img, x0, mask, alphas[i])
        a, a_prev = alphas[i], alphas_prev[i]
        beta = 1 - a / a_prev
        eps = model(img, float(t))
        x_recon = math.sqrt(1 / a) * img - math.sqrt(1 / a - 1) * eps
        mean = (beta * math.sqrt(a_prev) / (1 - a)) * x_recon + ((1 - a_prev) * math.sqrt(1 - beta) / (1 - a)) * img
        variance = beta * (1 - a_prev) / (1 - a)
        img = mean + math.sqrt(variance) * noise() if variance > 0 else mean
    return img


def _k_diffusion(sampler, model, noise, x_T, ts, ac, eta, x0, mask, img2img):
    """k-diffusion samplers over the discrete eps model: denoised = x - sigma * eps(x / sqrt(sigma^2 + 1), t)."""
    sigmas = np.append([math.sqrt(1 / alpha_at(ac, t) - 1) for t in ts], 0.0)
    x = x0 + sigmas[0] * x_T if img2img else sigmas[0] * x_T
    old_denoised = None
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if mask is not None:  # the CompVis blend, written for x = x0 + sigma * noise
            x = (x0 + sigma * noise()) * mask + (1 - mask) * x
        denoised = x - sigma * model(x / math.sqrt(sigma ** 2 + 1), float(t))
        if sampler == "euler":
            d = (x - denoised) / sigma
            x = x + d * (sigma_next - sigma)
        elif sampler == "euler_ancestral":
            sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
            sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
            d = (x - denoised) / sigma
            x = x + d * (sigma_down - sigma)
            if sigma_next > 0 and sigma_up > 0:
                x = x + noise() * sigma_up
        elif sampler == "dpmpp_2m":
            t_fn = lambda s: -math.log(s)  # noqa: E731
            if sigma_next == 0:
                x = denoised
            else:
                h = t_fn(sigma_next) - t_fn(sigma)
                if old_denoised is None:
                    x = (sigma_next / sigma) * x - math.expm1(-h) * denoised
                else:
                    r = (t_fn(sigma) - t_fn(sigmas[i - 1])) / h
                    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                    x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            old_denoised = denoised
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
    return x
