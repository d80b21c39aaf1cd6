"""Float64 reference implementations of every sampler, written the way their sources write them.

These are for tests only: each is a direct numpy transcription of the original loop (CompVis DDIMSampler,
PLMSSampler and LatentDiffusion.p_sample_loop for DDIM, PLMS and DDPM; k-diffusion's sample_* loops over
DiscreteEpsDDPMDenoiser for the others; diffusers' LCMScheduler.step for LCM), independent of the plan compiler in
csrc/, against which tests compare `ldmrt.sampling.sample`. The grids follow their sources too: CompVis
make_ddim_timesteps, diffusers' set_timesteps, k-diffusion's get_sigmas_*, ComfyUI's simple/sgm_uniform.

Conventions shared with the C++ loop, so both can be fed the same noise: `noise_fn(draw)` returns standard normal
noise of x_T's shape for draw 0, 1, ...: per step the inpainting blend's draw (when a mask is given) comes first,
then the step's own (only when its noise coefficient is nonzero).
"""
import math

import numpy as np

SAMPLERS = ("ddpm", "ddim", "plms", "lcm", "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms",
            "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "dpmpp_3m_sde")
SPACINGS = ("uniform", "leading", "trailing", "linspace", "kdiffusion", "karras", "exponential", "simple",
            "sgm_uniform", "lcm")
COMPVIS_STYLE = ("ddpm", "ddim", "plms", "lcm")  # start from x_T, end on alphas_cumprod[0]; the rest as k-diffusion


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


def sigma_at(alphas_cumprod, t, interpolation="log"):
    """sigma at a timestep: k-diffusion's t_to_sigma (log), or np.interp of sigma (diffusers' Euler family)."""
    sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    if interpolation == "linear":
        return float(np.interp(t, np.arange(len(sigmas)), sigmas))
    return t_to_sigma(alphas_cumprod, t)


def alpha_at(alphas_cumprod, t):
    if t == int(t):
        return float(alphas_cumprod[int(t)])
    return 1 / (1 + t_to_sigma(alphas_cumprod, t) ** 2)


def make_grid(spacing, steps, alphas_cumprod, steps_offset=0, sigma_interpolation="log", respace="",
              round_timesteps=False, drop_last_timestep=False, original_steps=50):
    """(timesteps, sigmas), descending, as each source computes them."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    T = len(ac)
    if spacing in ("karras", "exponential"):  # k-diffusion: over the whole schedule
        spacing, respace = "kdiffusion", spacing
    n = steps + 1 if drop_last_timestep else steps
    if spacing == "uniform":
        t = (np.asarray(list(range(0, T, T // n))) + 1)[::-1]
    elif spacing == "leading":
        t = ((np.arange(0, n) * (T // n)).round() + steps_offset)[::-1]
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n)) - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "kdiffusion":  # DiscreteSchedule.get_sigmas
        t = np.linspace(T - 1, 0, n)
    elif spacing == "sgm_uniform":  # sd_schedulers.sgm_uniform: linspace(start, end, n + 1)[:-1]
        t = np.linspace(T - 1, 0, n + 1)[:-1]
    elif spacing == "simple":  # sigmas[-(1 + int(x * len(sigmas) / n))]
        t = np.array([T - 1 - int(x * (T / n)) for x in range(n)])
    elif spacing == "lcm":  # LCMScheduler.set_timesteps, strength 1
        origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
        t = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    t = np.asarray(t, dtype=np.float64)
    sigmas = np.array([sigma_at(ac, x, sigma_interpolation) for x in t])
    if respace:
        hi, lo = sigmas[0], sigmas[-1]
        if respace == "karras":  # get_sigmas_karras
            rho, ramp = 7.0, np.linspace(0, 1, n)
            sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        else:  # get_sigmas_exponential
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
        t = np.array([sigma_to_t(ac, x) for x in sigmas])
        if round_timesteps:
            t = t.round()
    if drop_last_timestep:
        t, sigmas = t[:-1], sigmas[:-1]
    return t, sigmas


def make_timesteps(spacing, steps, alphas_cumprod, steps_offset=0):
    return make_grid(spacing, steps, alphas_cumprod, steps_offset)[0]


class _Model:
    """Calls eps_fn once per evaluation, with the doubled batch [x; x] under guidance, and combines. With a
    guidance interval (lo, hi) over n steps, the evaluations of step k are guided when lo <= k / n < hi, else
    eps_fn gets x alone."""

    def __init__(self, eps_fn, guidance_scale, interval=None, steps=1):
        self.eps_fn, self.scale, self.interval, self.steps = eps_fn, guidance_scale, interval, steps

    def __call__(self, x, t, step):
        if self.scale is None or (self.interval is not None and not self.interval[0] <= step / self.steps < self.interval[1]):
            return np.asarray(self.eps_fn(x, t), dtype=np.float64)
        eps_u, eps_c = np.split(np.asarray(self.eps_fn(np.concatenate([x, x]), t), dtype=np.float64), 2)
        return eps_u + self.scale * (eps_c - eps_u)


class _Noise:
    """noise_fn's draws in order; k-diffusion's noise_sampler(sigma, sigma_next) form too (the interval unused)."""

    def __init__(self, noise_fn):
        self.noise_fn, self.draw = noise_fn, 0

    def __call__(self, *interval):
        out = np.asarray(self.noise_fn(self.draw), dtype=np.float64)
        self.draw += 1
        return out


def sample_reference(eps_fn, x_T, *, sampler, steps, alphas_cumprod, eta=None, timestep_spacing="uniform",
                     final_alpha_cumprod=None, guidance_scale=None, x0=None, mask=None, strength=1.0, noise_fn=None,
                     guidance_interval=None, start_noise="default", lower_order_final=False, euler_at_final=False,
                     solver_type="", noise_sampler=None, **grid):
    """noise_sampler(sigma_from, sigma_to): the k-diffusion samplers' noise in k-diffusion's form (else noise_fn's
    draws in order)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    x_T = np.asarray(x_T, dtype=np.float64)
    x0 = None if x0 is None else np.asarray(x0, dtype=np.float64)
    mask = None if mask is None else np.broadcast_to(np.asarray(mask, dtype=np.float64), x_T.shape)
    ts, sigmas = make_grid(timestep_spacing, steps, ac, **grid)
    keep = int(strength * len(ts))
    ts, sigmas = ts[len(ts) - keep:], sigmas[len(ts) - keep:]
    model, noise = _Model(eps_fn, guidance_scale, guidance_interval, len(ts)), _Noise(noise_fn)
    if keep == 0:
        return x0.copy()
    if sampler in COMPVIS_STYLE:
        a_end = 1.0 if sampler == "ddpm" else ac[0] if final_alpha_cumprod is None else final_alpha_cumprod
        alphas = np.array([alpha_at(ac, t) if s == sigma_at(ac, t) else 1 / (1 + s * s) for t, s in zip(ts, sigmas)])
        img = math.sqrt(alphas[0]) * x0 + math.sqrt(1 - alphas[0]) * x_T if strength < 1 else x_T.copy()
        if start_noise == "sigma" and strength == 1:
            img = img * sigmas[0] / math.sqrt(1 + sigmas[0] ** 2)
        if sampler == "ddpm":
            return _compvis_ddpm(model, noise, img, ts, alphas, a_end, x0, mask)
        if sampler == "lcm":
            return _diffusers_lcm(model, noise, img, ts, alphas, a_end, x0, mask)
        return _compvis_ddim_plms(model, noise, img, ts, alphas, a_end, 0.0 if eta is None else eta, sampler == "plms",
                                  x0, mask)
    sigma_end = 0.0 if final_alpha_cumprod is None else math.sqrt(1 / final_alpha_cumprod - 1)
    sigmas = np.append(sigmas, sigma_end)
    if strength < 1:
        x = x0 + sigmas[0] * x_T
    elif start_noise == "unit":  # diffusers' init_noise_sigma sqrt(sigma_max^2 + 1)
        x = math.sqrt(sigmas[0] ** 2 + 1) * x_T
    else:
        x = sigmas[0] * x_T
    # The k-diffusion denoiser over the discrete eps model (CompVisDenoiser): x_ve in, denoised out; the model's
    # timestep is sigma_to_t(sigma), or the grid's own timestep where the sigma is a grid point.
    grid_t = dict(zip(sigmas[:-1], ts))

    def denoise(x, sigma, step):
        t = grid_t.get(sigma)
        t = sigma_to_t(ac, sigma) if t is None else t
        return x - sigma * model(x / math.sqrt(sigma ** 2 + 1), float(t), step)

    def blend(x, step):  # the CompVis blend, written for x = x0 + sigma * noise, before each step
        return x if mask is None else (x0 + sigmas[step] * noise()) * mask + (1 - mask) * x

    eta = 1.0 if eta is None else eta
    opts = dict(lower_order_final=lower_order_final, euler_at_final=euler_at_final, solver_type=solver_type)
    return _K_SAMPLERS[sampler](denoise, blend, x, sigmas, noise if noise_sampler is None else noise_sampler, eta, opts)


def _blend(noise, x, x0, mask, a):
    """CompVis: img = q_sample(x0, t) * mask + (1 - mask) * img, before each step."""
    if mask is None:
        return x
    return (math.sqrt(a) * x0 + math.sqrt(1 - a) * noise()) * mask + (1 - mask) * x


def _compvis_ddim_plms(model, noise, img, ts, alphas, a_end, eta, plms, x0, mask):
    alphas_prev = np.append(alphas[1:], a_end)
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
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
        e_t = model(img, float(t), i)
        if not plms:
            img = step(img, e_t, i)
            continue
        if len(old_eps) == 0:
            x_prev = step(img, e_t, i)
            e_t_next = model(x_prev, float(ts[min(i + 1, len(ts) - 1)]), i)
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


def _compvis_ddpm(model, noise, img, ts, alphas, a_end, x0, mask):
    alphas_prev = np.append(alphas[1:], a_end)
    for i, t in enumerate(ts):
        img = _blend(noise, img, x0, mask, alphas[i])
        a, a_prev = alphas[i], alphas_prev[i]
        beta = 1 - a / a_prev
        eps = model(img, float(t), i)
        x_recon = math.sqrt(1 / a) * img - math.sqrt(1 / a - 1) * eps
        mean = (beta * math.sqrt(a_prev) / (1 - a)) * x_recon + ((1 - a_prev) * math.sqrt(1 - beta) / (1 - a)) * img
        variance = beta * (1 - a_prev) / (1 - a)
        img = mean + math.sqrt(variance) * noise() if variance > 0 else mean
    return img


def _diffusers_lcm(model, noise, img, ts, alphas, a_end, x0, mask):
    """LCMScheduler.step (epsilon prediction): boundary-condition scalings, then re-noise to the next timestep."""
    for i, t in enumerate(ts):
        img = _blend(noise, img, x0, mask, alphas[i])
        a = alphas[i]
        a_prev = alphas[i + 1] if i + 1 < len(ts) else a_end
        scaled = t * 10
        c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25) ** 0.5
        pred_x0 = (img - math.sqrt(1 - a) * model(img, float(t), i)) / math.sqrt(a)
        denoised = c_out * pred_x0 + c_skip * img
        img = math.sqrt(a_prev) * denoised + math.sqrt(1 - a_prev) * noise() if i + 1 < len(ts) else denoised
    return img


# --- k-diffusion's samplers (k_diffusion/sampling.py), over denoise(x, sigma, step) -----------------------------
# Each loop is k-diffusion's, with s_churn = 0 and s_noise = 1; blend(x, i) is the inpainting blend at a step's
# start (the identity without a mask).


def _ancestral(sigma_from, sigma_to, eta):
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def _euler(denoise, blend, x, sigmas, noise, eta, opts, ancestral=False):
    for i in range(len(sigmas) - 1):
        x = blend(x, i)
        denoised = denoise(x, sigmas[i], i)
        down, up = _ancestral(sigmas[i], sigmas[i + 1], eta) if ancestral else (sigmas[i + 1], 0.0)
        d = (x - denoised) / sigmas[i]
        x = x + d * (down - sigmas[i])
        if sigmas[i + 1] > 0 and up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def _heun(denoise, blend, x, sigmas, noise, eta, opts):
    for i in range(len(sigmas) - 1):
        x = blend(x, i)
        denoised = denoise(x, sigmas[i], i)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, sigmas[i + 1], i)) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def _dpm_2(denoise, blend, x, sigmas, noise, eta, opts, ancestral=False):
    for i in range(len(sigmas) - 1):
        x = blend(x, i)
        denoised = denoise(x, sigmas[i], i)
        down, up = _ancestral(sigmas[i], sigmas[i + 1], eta) if ancestral else (sigmas[i + 1], 0.0)
        d = (x - denoised) / sigmas[i]
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            sigma_mid = math.exp((math.log(sigmas[i]) + math.log(down)) / 2)
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = (x_2 - denoise(x_2, sigma_mid, i)) / sigma_mid
            x = x + d_2 * (down - sigmas[i])
            if ancestral and up > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def _lms_coefficient(order, sigmas, i, j):
    """The integral of the Lagrange basis polynomial, exactly (numpy polynomials; k-diffusion uses quad)."""
    poly = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.poly1d([1.0, -sigmas[i - k]]) / (sigmas[i - j] - sigmas[i - k])
    integral = poly.integ()
    return integral(sigmas[i + 1]) - integral(sigmas[i])


def _lms(denoise, blend, x, sigmas, noise, eta, opts, order=4):
    ds = []
    for i in range(len(sigmas) - 1):
        x = blend(x, i)
        denoised = denoise(x, sigmas[i], i)
        ds = (ds + [(x - denoised) / sigmas[i]])[-order:]
        cur = min(i + 1, order)
        x = x + sum(_lms_coefficient(cur, sigmas, i, j) * d for j, d in zip(range(cur), reversed(ds)))
    return x


def _dpmpp_2s_ancestral(denoise, blend, x, sigmas, noise, eta, opts):
    for i in range(len(sigmas) - 1):
        x = blend(x, i)
        denoised = denoise(x, sigmas[i], i)
        down, up = _ancestral(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(down)
            h = t_next - t
            s = t + h / 2
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-h / 2) * denoised
            denoised_2 = denoise(x_2, math.exp(-s), i)
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0 and up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def _dpmpp_sde(denoise, blend, x, sigmas, noise, eta, opts, r=0.5):
    sigma_fn, t_fn = (lambda t: math.exp(-t)), (lambda s: -math.log(s))
    for i in range(len(sigmas) - 1):
        x = blend(x, i)
        denoised = denoise(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = _ancestral(sigma_fn(t), sigma_fn(s), eta)
        s_ = t_fn(sd)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - math.expm1(t - s_) * denoised
        if su > 0:
            x_2 = x_2 + noise(sigma_fn(t), sigma_fn(s)) * su
        denoised_2 = denoise(x_2, sigma_fn(s), i)
        sd, su = _ancestral(sigma_fn(t), sigma_fn(t_next), eta)
        t_next_ = t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - math.expm1(t - t_next_) * denoised_d
        if su > 0:
            x = x + noise(sigma_fn(t), sigma_fn(t_next)) * su
    return x


def _order_cap(i, n, opts):
    """diffusers DPMSolverMultistep's lower_order_final / euler_at_final (k-diffusion has neither)."""
    if i == n - 1 and (opts["euler_at_final"] or (opts["lower_order_final"] and n < 15)):
        return 1
    if i == n - 2 and opts["lower_order_final"] and n < 15:
        return 2
    return 3


def _dpmpp_2m(denoise, blend, x, sigmas, noise, eta, opts):
    if opts["solver_type"] == "heun":  # k-diffusion's 2M SDE at eta 0 is 2M with that correction
        return _dpmpp_2m_sde(denoise, blend, x, sigmas, noise, 0.0, opts)
    old_denoised = None
    n = len(sigmas) - 1
    for i in range(n):
        x = blend(x, i)
        denoised = denoise(x, sigmas[i], i)
        t, t_next = -math.log(sigmas[i]), (math.inf if sigmas[i + 1] == 0 else -math.log(sigmas[i + 1]))
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0 or _order_cap(i, n, opts) < 2:
            x = denoised if sigmas[i + 1] == 0 else (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised
        else:
            r = (t - -math.log(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


def _dpmpp_2m_sde(denoise, blend, x, sigmas, noise, eta, opts):
    solver_type = opts["solver_type"] or "midpoint"
    old_denoised, h_last = None, None
    n = len(sigmas) - 1
    for i in range(n):
        x = blend(x, i)
        denoised = denoise(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x + -math.expm1(-h - eta_h) * denoised
            if old_denoised is not None and _order_cap(i, n, opts) >= 2:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * -math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old_denoised = denoised
    return x


def _dpmpp_3m_sde(denoise, blend, x, sigmas, noise, eta, opts):
    denoised_1 = denoised_2 = h_1 = h_2 = None
    n = len(sigmas) - 1
    for i in range(n):
        x = blend(x, i)
        denoised = denoise(x, sigmas[i], i)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + -math.expm1(-h_eta) * denoised
            cap = _order_cap(i, n, opts)
            if h_2 is not None and cap >= 3:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and cap >= 2:  # k-diffusion's warm-up: the heun form (midpoint: diffusers' option)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                c = 0.5 * -math.expm1(-h_eta) if opts["solver_type"] == "midpoint" else phi_2
                x = x + c * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


_K_SAMPLERS = {
    "euler": _euler,
    "euler_ancestral": lambda *a: _euler(*a, ancestral=True),
    "heun": _heun,
    "dpm_2": _dpm_2,
    "dpm_2_ancestral": lambda *a: _dpm_2(*a, ancestral=True),
    "lms": _lms,
    "dpmpp_2s_ancestral": _dpmpp_2s_ancestral,
    "dpmpp_sde": _dpmpp_sde,
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_2m_sde": _dpmpp_2m_sde,
    "dpmpp_3m": lambda denoise, blend, x, sigmas, noise, eta, opts: _dpmpp_3m_sde(denoise, blend, x, sigmas, noise,
                                                                                 0.0, opts),
    "dpmpp_3m_sde": _dpmpp_3m_sde,
}


def gaussian_eps(alphas_cumprod, mean, std=0.7):
    """The exact eps-prediction for data x0 ~ N(mean, std^2) under the schedule: nonlinear in t, so every
    sampler's steps matter. eps(x, t) for numpy x; t may be fractional (log-sigma interpolation)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)

    def eps(x, t):
        a = alpha_at(ac, t)
        x0_hat = mean + np.sqrt(a) * std ** 2 / (a * std ** 2 + 1 - a) * (x - np.sqrt(a) * mean)
        return (x - np.sqrt(a) * x0_hat) / np.sqrt(1 - a)
    return eps


def k_diffusion_source():
    """Where k-diffusion's sources are: LDMRT_KDIFFUSION_SRC (a checkout), else the installed k-diffusion package
    (`make test` installs it; its __init__ is not run), else None."""
    import importlib.util
    import os
    from pathlib import Path
    if os.environ.get("LDMRT_KDIFFUSION_SRC"):
        return os.environ["LDMRT_KDIFFUSION_SRC"]
    spec = importlib.util.find_spec("k_diffusion")
    return None if spec is None else str(Path(spec.submodule_search_locations[0]).parent)


def load_k_diffusion(src):
    """k-diffusion's own k_diffusion/sampling.py from a checkout at `src` (needs scipy, torchsde, torchdiffeq):
    the module alone, as its package's __init__ imports training code; utils.append_dims is all it uses."""
    import importlib.util
    import sys
    import types
    package = types.ModuleType("k_diffusion")
    package.__path__ = [f"{src}/k_diffusion"]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    saved = {name: sys.modules.get(name) for name in ("k_diffusion", "k_diffusion.utils")}
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    try:
        spec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{src}/k_diffusion/sampling.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


def diffusers_reference(scheduler, eps_fn, x_T, steps, seed, eta=None):
    """A diffusers scheduler driven as its pipelines drive it (init_noise_sigma, scale_model_input, step with a
    torch.Generator seeded `seed`) over eps_fn, from x_T (float64 numpy); returns the final latent."""
    import torch
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.asarray(x_T, dtype=np.float64)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        e = torch.from_numpy(eps_fn(scheduler.scale_model_input(x, t).numpy(), float(t)))
        kw = {"eta": eta} if eta is not None else {}
        if "generator" in scheduler.step.__code__.co_varnames:
            kw["generator"] = g
        x = scheduler.step(e, t, x, **kw).prev_sample
    return x.numpy()
