"""Sampler plans (C++ loop, ldmrt.sampling) against the float64 reference loops (ldmrt.testing.sampling_reference).

Tolerances: relative L2 <= 1e-6 with float64 latents, <= 1e-5 with float32, on analytic toy denoisers and on a
tiny random UNet. Parity with the CompVis DDIM/PLMS samplers themselves needs LDMRT_COMPVIS_SRC.
"""

import numpy as np
import pytest
import torch

from ldmrt import sampling
from ldmrt.testing import sampling_reference as ref
from helpers import import_compvis, rel_l2

T = 1000
AC = sampling.make_alphas_cumprod("linear", T, 0.00085, 0.012)  # Stable Diffusion's schedule
SHAPE = (2, 4, 8, 8)
# unipc and dpmpp_2s are diffusers' own solvers: their reference is diffusers itself (tests/test_schedulers.py).
REFERENCED = [s for s in sampling.SAMPLERS if s in ref.SAMPLERS]
CASES = [(s, sp) for s in REFERENCED for sp in sampling.SPACINGS]


def gaussian_eps(mean, std):
    return ref.gaussian_eps(AC, mean, std)


def guided_gaussian_eps(mean_u, mean_c, std):
    """[uncond; cond] halves of the doubled batch see different data means, as with two conditionings."""
    eps_u, eps_c = gaussian_eps(mean_u, std), gaussian_eps(mean_c, std)

    def eps(x, t):
        half = x.shape[0] // 2
        return np.concatenate([eps_u(x[:half], t), eps_c(x[half:], t)])
    return eps


def philox_noise(dtype):
    return lambda draw: sampling.randn(7, SHAPE, stream=draw + 1, dtype=dtype)


def both(eps_fn, x_T, dtype, **kw):
    """(plan result, float64 reference) from the same x_T and the same noise draws."""
    out = sampling.sample(eps_fn, x_T.astype(dtype), seed=7, **kw)
    expected = ref.sample_reference(eps_fn, x_T, noise_fn=philox_noise("float64"), **kw)
    return out, expected


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return dict(x_T=sampling.randn(3, SHAPE, dtype="float64"), mean=rng.standard_normal(SHAPE) * 0.5,
                mean_c=rng.standard_normal(SHAPE) * 0.5, x0=rng.standard_normal(SHAPE),
                mask=(rng.random((2, 1, 8, 8)) > 0.5).astype(np.float64))


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-6), ("float32", 1e-5)])
@pytest.mark.parametrize("sampler,spacing", CASES)
def test_plan_matches_reference(data, sampler, spacing, dtype, tol):
    kw = dict(sampler=sampler, steps=10, alphas_cumprod=AC, timestep_spacing=spacing)
    out, expected = both(gaussian_eps(data["mean"], 0.7), data["x_T"], dtype, **kw)
    assert out.dtype == np.dtype(dtype)
    assert rel_l2(out, expected) <= tol


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-6), ("float32", 1e-5)])
@pytest.mark.parametrize("sampler", REFERENCED)
def test_guidance_img2img_inpainting(data, sampler, dtype, tol):
    eps = guided_gaussian_eps(data["mean"], data["mean_c"], 0.7)
    spacing = "karras" if sampler in ("euler", "euler_ancestral", "dpmpp_2m") else "leading"
    kw = dict(sampler=sampler, steps=12, alphas_cumprod=AC, timestep_spacing=spacing, steps_offset=1,
              guidance_scale=7.5)
    for extra in (dict(x0=data["x0"], strength=0.6), dict(x0=data["x0"], mask=data["mask"]),
                  dict(x0=data["x0"], mask=data["mask"], strength=0.5)):
        if spacing == "karras":
            kw["steps_offset"] = 0
        out, expected = both(eps, data["x_T"], dtype, **kw, **extra)
        assert rel_l2(out, expected) <= tol, extra


def test_guidance_combines_one_doubled_call(data):
    calls = []

    def eps(x, t):
        calls.append(x.shape)
        return np.concatenate([np.zeros_like(x[:2]), np.ones_like(x[2:])])
    out = sampling.sample(eps, data["x_T"], sampler="ddim", steps=3, alphas_cumprod=AC, guidance_scale=3.0,
                          timestep_spacing="leading")
    expected = ref.sample_reference(lambda x, t: np.full(x.shape, 3.0), data["x_T"], sampler="ddim", steps=3,
                                    alphas_cumprod=AC, timestep_spacing="leading")
    assert calls == [(4, 4, 8, 8)] * 3
    assert rel_l2(out, expected) <= 1e-12


def test_schedule_and_uniform_spacing_match_compvis_formulas():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2
    assert rel_l2(AC, np.cumprod(1 - betas)) <= 1e-15
    for name in ("linear", "cosine", "sqrt_linear", "sqrt"):
        assert rel_l2(sampling.make_alphas_cumprod(name, T), ref.make_alphas_cumprod(name, T)) <= 1e-14
    # range(0, T, T // S) + 1, including step counts that give extra entries (T=1000, S=7 -> 8 steps)
    assert list(sampling.make_timesteps("uniform", 50, AC)) == list(range(981, 0, -20))
    assert len(sampling.make_timesteps("uniform", 7, AC)) == 8
    plan = sampling.make_plan(sampler="plms", steps=50, alphas_cumprod=AC)
    assert plan.num_steps == 50 and len(plan.stages) == 51  # PLMS warm-up: one extra evaluation


def test_spacings_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for spacing in ("leading", "trailing", "linspace"):
        for steps in (1, 7, 20, 50, 999):
            sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012, steps_offset=1 if spacing == "leading" else 0,
                                            timestep_spacing=spacing)
            sched.set_timesteps(steps)
            ours = sampling.make_timesteps(spacing, steps, AC, steps_offset=1 if spacing == "leading" else 0)
            assert list(ours) == sched.timesteps.tolist(), (spacing, steps)
    sched = diffusers.EulerDiscreteScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012, use_karras_sigmas=True)
    sched.set_timesteps(20)
    karras = sampling.make_timesteps("karras", 20, AC)
    sigmas = np.sqrt((1 - np.array([ref.alpha_at(AC, t) for t in karras])) / [ref.alpha_at(AC, t) for t in karras])
    assert rel_l2(sigmas, sched.sigmas.numpy()[:-1]) <= 1e-5  # diffusers keeps sigmas in float32


def test_torch_tensors_in_and_out_without_copies(data):
    x_T = torch.from_numpy(data["x_T"]).float()
    seen = []

    def eps(x, t):
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        seen.append(x.data_ptr())
        return torch.from_numpy(gaussian_eps(data["mean"], 0.7)(x.double().numpy(), t)).float()
    out = sampling.sample(eps, x_T, sampler="dpmpp_2m", steps=5, alphas_cumprod=torch.from_numpy(AC).float(),
                          timestep_spacing="karras")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == x_T.shape
    assert len(set(seen)) == 1 and seen[0] == out.data_ptr()  # the model sees the loop's latent itself
    expected = ref.sample_reference(gaussian_eps(data["mean"], 0.7), data["x_T"], sampler="dpmpp_2m", steps=5,
                                    alphas_cumprod=torch.from_numpy(AC).float().double().numpy(),
                                    timestep_spacing="karras")
    assert rel_l2(out.numpy(), expected) <= 1e-5


def test_determinism_and_noise_sources(data):
    eps = gaussian_eps(data["mean"], 0.7)
    kw = dict(sampler="euler_ancestral", steps=8, alphas_cumprod=AC, timestep_spacing="trailing")
    a = sampling.sample(eps, data["x_T"], seed=1, **kw)
    assert np.array_equal(a, sampling.sample(eps, data["x_T"], seed=1, **kw))
    assert rel_l2(sampling.sample(eps, data["x_T"], seed=2, **kw), a) > 1e-3
    # a caller's noise (e.g. a torch.Generator stream) replaces the Philox draws
    gen = torch.Generator().manual_seed(0)
    draws = []

    def noise_fn(draw):
        draws.append(draw)
        return torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    b = sampling.sample(eps, data["x_T"], noise_fn=noise_fn, **kw)
    gen.manual_seed(0)
    expected = ref.sample_reference(eps, data["x_T"], noise_fn=lambda d: torch.randn(SHAPE, generator=gen,
                                                                                     dtype=torch.float64).numpy(), **kw)
    assert draws == list(range(7))  # no noise after the last step
    assert rel_l2(b, expected) <= 1e-12


def test_strength_zero_returns_x0(data):
    out = sampling.sample(gaussian_eps(data["mean"], 0.7), data["x_T"], sampler="ddim", steps=10, alphas_cumprod=AC,
                          x0=data["x0"], strength=0.0)
    assert np.array_equal(out, data["x0"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=0), "steps must be in"),
    (dict(steps=1001), "steps must be in"),
    (dict(eta=-0.5), "eta must be >= 0"),
    (dict(sampler="plms", eta=0.5), "takes no eta"),
    (dict(sampler="dpm_fast"), "unknown sampler"),
    (dict(sampler="euler", solver_type="heun"), "only to the DPM"),
    (dict(sampler="dpmpp_2m", solver_type="rk4"), "solver_type must be"),
    (dict(sampler="euler", start_noise="half"), "start_noise must be"),
    (dict(sigma_interpolation="cubic", timestep_spacing="kdiffusion", sampler="euler"), "unknown sigma interpolation"),
    (dict(respace="beta", sampler="euler"), "unknown sigma re-spacing"),
    (dict(plan_grid="x"), "unknown plan option"),
    (dict(timestep_spacing="lcm", steps=60), "original_steps"),
    (dict(cfg_rescale=0.7), "unknown plan option"),
    (dict(timestep_spacing="quad"), "unknown timestep spacing"),
    (dict(strength=1.5), "strength must be in"),
    (dict(strength=-0.1), "strength must be in"),
    (dict(steps=3), "past the schedule"),  # CompVis uniform: range(0, 1000, 333) + 1 reaches 1000
    (dict(timestep_spacing="leading", steps_offset=5, steps=1), None),
    (dict(timestep_spacing="leading", steps_offset=40, steps=50), "outside"),
    (dict(alphas_cumprod=np.array([0.5, 1.5])), "must lie in"),
    (dict(x0=np.zeros((2, 4, 8, 9))), "expected the latent's"),
    (dict(x0=np.zeros(SHAPE), mask=np.zeros((3, 1, 8, 8))), "does not broadcast"),
    (dict(strength=0.5), "needs x0"),
    (dict(mask=np.zeros(SHAPE)), "needs x0"),
])
def test_bad_arguments_raise_value_error(data, kwargs, message):
    kw = dict(sampler="ddim", steps=10, alphas_cumprod=AC, eps_fn=lambda x, t: np.zeros_like(x), x_T=data["x_T"])
    kw.update(kwargs)
    if message is None:
        sampling.sample(**kw)
        return
    with pytest.raises(ValueError, match=message):
        sampling.sample(**kw)


def test_model_output_shape_is_checked(data):
    with pytest.raises(ValueError, match=r"returned shape \(2, 4, 4, 4\) for an input of shape \(2, 4, 8, 8\)"):
        sampling.sample(lambda x, t: np.zeros((2, 4, 4, 4)), data["x_T"], sampler="ddim", steps=2, alphas_cumprod=AC,
                        timestep_spacing="leading")


# --- a tiny random UNet (ldmrt.models.unet) with cross-attention conditioning and guidance ---

@pytest.fixture(scope="module")
def tiny_unet():
    unet_module = pytest.importorskip("ldmrt.models.unet")
    torch.manual_seed(0)
    model = unet_module.UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                                  attention_resolutions=[2], channel_mult=[1, 2], num_heads=2,
                                  use_spatial_transformer=True, context_dim=16, legacy=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # CompVis zero-initialises output convs; random weights everywhere keep eps non-trivial
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    context = torch.randn(4, 5, 16, generator=gen)  # [uncond; cond] for a batch of 2
    return model.eval(), context


def unet_eps(model, context, dtype):
    model = model.to(dtype)

    def eps(x, t):
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(x)).to(dtype)
            out = model(x, torch.full((x.shape[0],), t, dtype=dtype), context.to(dtype)[: x.shape[0]] if x.shape[0] == 4
                        else context.to(dtype)[2:])
        return out.double().numpy()
    return eps


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-6), ("float32", 1e-5)])
@pytest.mark.parametrize("sampler", REFERENCED)
def test_tiny_unet_plan_matches_reference(tiny_unet, data, sampler, dtype, tol):
    model, context = tiny_unet
    eps = unet_eps(model, context, getattr(torch, dtype))
    spacing = "karras" if sampler == "dpmpp_2m" else "leading"
    kw = dict(sampler=sampler, steps=4, alphas_cumprod=AC, timestep_spacing=spacing, guidance_scale=5.0)
    out, expected = both(eps, data["x_T"], dtype, **kw)
    assert rel_l2(out, expected) <= tol


# --- parity with CompVis' own DDIMSampler / PLMSSampler (float32, their buffers are float32) ---

def compvis_sampler_module(name):
    return import_compvis(pytest.MonkeyPatch(), f"ldm.models.diffusion.{name}")  # kept for the module's tests


class FakeLatentDiffusion:
    """What DDIMSampler / PLMSSampler read from a LatentDiffusion: the schedule buffers and apply_model."""

    def __init__(self, eps_fn):
        self.num_timesteps = T
        betas = 1 - AC / np.append(1.0, AC[:-1])
        self.betas = torch.tensor(betas, dtype=torch.float32)
        self.alphas_cumprod = torch.tensor(AC, dtype=torch.float32)
        self.alphas_cumprod_prev = torch.tensor(np.append(1.0, AC[:-1]), dtype=torch.float32)
        self.device = torch.device("cpu")
        self.eps_fn = eps_fn

    def apply_model(self, x, t, c):
        return torch.from_numpy(self.eps_fn(x.double().numpy(), float(t[0]))).float()


@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 0.8), ("plms", 0.0)])
def test_compvis_samplers_parity(data, name, eta):
    module = compvis_sampler_module(name)
    cls = module.DDIMSampler if name == "ddim" else module.PLMSSampler
    eps = gaussian_eps(data["mean"], 0.7)
    model = FakeLatentDiffusion(eps)
    sampler = cls(model)
    sampler.register_buffer = lambda name, attr: setattr(sampler, name, attr)  # CompVis moves buffers to CUDA
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(SHAPE, generator=gen)
    torch.manual_seed(11)  # CompVis draws its DDIM noise from the global generator, every step
    expected, _ = sampler.sample(20, SHAPE[0], SHAPE[1:], conditioning=None, eta=eta, x_T=x_T, verbose=False)
    torch.manual_seed(11)
    out = sampling.sample(lambda x, t: torch.from_numpy(eps(x.double().numpy(), t)), x_T, sampler=name, steps=20,
                          alphas_cumprod=model.alphas_cumprod, eta=eta, noise_fn=lambda draw: torch.randn(SHAPE))
    assert rel_l2(out.numpy(), expected.numpy()) <= 1e-5, rel_l2(out.numpy(), expected.numpy())


# --- doing less per image: the plan's per-stage evaluation flags ---

def flags(plan):
    return [(s["guided"], s["shallow"]) for s in plan.stages]


def test_plan_schedules_guidance_and_feature_caching():
    plan = sampling.make_plan(sampler="ddim", steps=10, alphas_cumprod=AC, cache_interval=3, guidance_interval=(0, 0.5))
    g, f = True, False  # full UNet on steps 0, 3, 6, 9 and where guidance switches off (step 5)
    assert flags(plan) == [(g, f), (g, True), (g, True), (g, f), (g, True), (f, f), (f, f), (f, True), (f, True), (f, f)]
    plms = sampling.make_plan(sampler="plms", steps=6, alphas_cumprod=AC, cache_interval=2, guidance_interval=(0.3, 1))
    # CompVis' uniform spacing gives PLMS 7 steps here, the first evaluating twice, both full; guidance switches
    # on at step 3 (3/7 >= 0.3), which runs full although 3 % 2 != 0
    assert plms.num_steps == 7
    assert flags(plms) == [(f, f), (f, f), (f, True), (f, f), (True, f), (True, f), (True, True), (True, f)]
    exact = sampling.make_plan(sampler="dpmpp_2m", steps=5, alphas_cumprod=AC)
    assert flags(exact) == [(True, False)] * 5
    for kw, message in ((dict(cache_interval=0), "cache_interval must be >= 1"),
                        (dict(guidance_interval=(0.6, 0.2)), "0 <= from <= until <= 1")):
        with pytest.raises(ValueError, match=message):
            sampling.make_plan(sampler="ddim", steps=4, alphas_cumprod=AC, **kw)


def interval_eps(mean_u, mean_c, std, batch):
    """guided_gaussian_eps for [uncond; cond] calls, and the conditional one for calls with the batch alone."""
    guided, cond = guided_gaussian_eps(mean_u, mean_c, std), gaussian_eps(mean_c, std)
    return lambda x, t: guided(x, t) if x.shape[0] == 2 * batch else cond(x, t)


@pytest.mark.parametrize("interval", [(0, 0.7), (0.3, 1), (0.2, 0.6), (0, 0)])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler", "euler_ancestral"])
def test_guidance_interval_matches_reference(data, sampler, interval):
    eps = interval_eps(data["mean"], data["mean_c"], 0.7, batch=SHAPE[0])
    kw = dict(sampler=sampler, steps=10, alphas_cumprod=AC, guidance_scale=6.0, guidance_interval=interval,
              timestep_spacing="karras" if sampler in ("euler", "euler_ancestral", "dpmpp_2m") else "uniform")
    out, expected = both(eps, data["x_T"], "float64", **kw)
    assert rel_l2(out, expected) <= 1e-6
    full, _ = both(eps, data["x_T"], "float64", **{**kw, "guidance_interval": None})
    assert rel_l2(out, full) > 1e-3  # the interval changes the result: it was applied


def test_quadratic_cache_schedule():
    """As many full steps as uniform caching, step 0 and the last among them, denser near 30% of the schedule."""
    plan = sampling.make_plan(sampler="ddim", steps=50, alphas_cumprod=AC, cache_interval=3, cache_schedule="quadratic")
    full = [i for i, s in enumerate(plan.stages) if not s["shallow"]]
    assert len(full) == 17 and full[0] == 0 and full[-1] == 49
    gaps = np.diff(full)
    assert gaps[:3].mean() > gaps[5:9].mean() < gaps[-3:].mean()  # sparse, dense around step 15, sparse
    with pytest.raises(ValueError, match="cache_schedule must be 'uniform' or 'quadratic'"):
        sampling.make_plan(sampler="ddim", steps=4, alphas_cumprod=AC, cache_interval=2, cache_schedule="cubic")


# --- k-diffusion itself (installed by `make test`, or LDMRT_KDIFFUSION_SRC: a checkout; scipy, torchsde, torchdiffeq) ---

K_DIFFUSION = {"euler": "sample_euler", "euler_ancestral": "sample_euler_ancestral", "heun": "sample_heun",
               "dpm_2": "sample_dpm_2", "dpm_2_ancestral": "sample_dpm_2_ancestral", "lms": "sample_lms",
               "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral", "dpmpp_sde": "sample_dpmpp_sde",
               "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
               "dpmpp_3m_sde": "sample_dpmpp_3m_sde"}


def k_diffusion_sampling(mp):
    src = ref.k_diffusion_source()
    if src is None:
        pytest.skip("k-diffusion is not installed (make test installs it) and LDMRT_KDIFFUSION_SRC is not set")
    for needed in ("scipy", "torchsde", "torchdiffeq", "tqdm"):
        pytest.importorskip(needed)
    return ref.load_k_diffusion(src)


@pytest.fixture
def float64_default():
    """k-diffusion's grids call torch.linspace with the default dtype: float64, as ldmrt computes them."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("grid", ["kdiffusion", "karras", "exponential"])
@pytest.mark.parametrize("name", sorted(K_DIFFUSION))
def test_k_diffusion_parity(data, monkeypatch, float64_default, name, grid):
    """ldmrt's plan == k-diffusion's own loop (float64, its grids, the same noise draws in order)."""
    k = k_diffusion_sampling(monkeypatch)
    eps = gaussian_eps(data["mean"], 0.7)
    steps, ac = 12, torch.from_numpy(AC)
    log_sigmas = torch.log(((1 - ac) / ac) ** 0.5)
    sigma_min, sigma_max = log_sigmas[0].exp().item(), log_sigmas[-1].exp().item()
    if grid == "kdiffusion":  # DiscreteSchedule.get_sigmas
        t = torch.linspace(T - 1, 0, steps, dtype=torch.float64)
        low, w = t.floor().long(), t.frac()
        sigmas = k.append_zero(((1 - w) * log_sigmas[low] + w * log_sigmas[t.ceil().long()]).exp())
    else:
        sigmas = getattr(k, f"get_sigmas_{grid}")(steps, sigma_min, sigma_max).double()

    def denoiser(x, sigma):
        s = float(sigma.reshape(-1)[0])
        x_in = (x / (s * s + 1) ** 0.5).numpy()
        return x - s * torch.from_numpy(eps(x_in, ref.sigma_to_t(AC, s)))

    draws = [torch.from_numpy(sampling.randn(9, SHAPE, stream=d + 1, dtype="float64")) for d in range(3 * steps)]
    taken = iter(draws)
    x_T = torch.from_numpy(data["x_T"])
    import inspect
    takes_noise = "noise_sampler" in inspect.signature(getattr(k, K_DIFFUSION[name])).parameters
    extra = {"noise_sampler": lambda a, b: next(taken)} if takes_noise else {}
    expected = getattr(k, K_DIFFUSION[name])(denoiser, sigmas[0] * x_T, sigmas, disable=True, **extra)
    out = sampling.sample(eps, data["x_T"], sampler=name, steps=steps, alphas_cumprod=AC, timestep_spacing=grid,
                          noise_fn=lambda d: draws[d].numpy())
    assert rel_l2(out, expected.numpy()) <= 1e-9


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                  "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_noise_intervals_feed_a_noise_sampler(data, name):
    """noise_from_sampler gives each draw the (sigma, sigma_next) k-diffusion passes its noise_sampler, in order:
    a noise sampler whose output depends on the interval (as Brownian-tree noise does) gives the same image."""
    def noise_sampler(sigma_from, sigma_to):
        seed = int(1e6 * sigma_from) ^ int(1e9 * sigma_to)
        return sampling.randn(seed % (2 ** 63), SHAPE, dtype="float64")
    kw = dict(sampler=name, steps=8, alphas_cumprod=AC, timestep_spacing="karras")
    plan = sampling.make_plan(**kw)
    out = sampling.run(plan, gaussian_eps(data["mean"], 0.7), data["x_T"],
                       noise_fn=sampling.noise_from_sampler(plan, noise_sampler))
    calls = []

    def recording(*interval):
        calls.append(interval)
        return noise_sampler(*interval)
    expected = ref.sample_reference(gaussian_eps(data["mean"], 0.7), data["x_T"], noise_sampler=recording, **kw)
    assert np.allclose(plan.noise_intervals(), np.array(calls, dtype=np.float64), rtol=1e-12, atol=0)
    assert rel_l2(out, expected) <= 1e-10


@pytest.mark.parametrize("options", [
    dict(timestep_spacing="kdiffusion", sigma_interpolation="linear"),
    dict(timestep_spacing="leading", steps_offset=1, respace="karras"),
    dict(timestep_spacing="trailing", respace="exponential"),
    dict(timestep_spacing="karras", round_timesteps=True),
    dict(timestep_spacing="linspace", drop_last_timestep=True, start_noise="unit"),
    dict(timestep_spacing="karras", drop_last_timestep=True),
    dict(timestep_spacing="trailing", final_alpha_cumprod=float(AC[0]), lower_order_final=True),
    dict(timestep_spacing="sgm_uniform", euler_at_final=True, solver_type="heun"),
])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"])
def test_plan_options_match_reference(data, sampler, options):
    """Every grid and convention option (diffusers' and AUTOMATIC1111's) against the reference's own grid code."""
    if "solver_type" in options and not sampler.startswith("dpmpp"):
        options = {k: v for k, v in options.items() if k != "solver_type"}
    kw = dict(sampler=sampler, steps=11, alphas_cumprod=AC, **options)
    out, expected = both(gaussian_eps(data["mean"], 0.7), data["x_T"], "float64", **kw)
    assert rel_l2(out, expected) <= 1e-9


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_k_diffusion_brownian_tree_noise(data, monkeypatch, float64_default, name):
    """k-diffusion's SDE samplers with their default noise, a torchsde Brownian tree (as AUTOMATIC1111 seeds it):
    the same tree given to ldmrt through noise_from_sampler gives k-diffusion's image."""
    k = k_diffusion_sampling(monkeypatch)
    steps, ac = 10, torch.from_numpy(AC)
    sigmas = k.get_sigmas_karras(steps, float(((1 - ac[0]) / ac[0]) ** 0.5), float(((1 - ac[-1]) / ac[-1]) ** 0.5))
    eps = gaussian_eps(data["mean"], 0.7)
    x_T = torch.from_numpy(data["x_T"])

    def tree():
        return k.BrownianTreeNoiseSampler(x_T, sigmas[sigmas > 0].min(), sigmas.max(), seed=1234)

    def denoiser(x, sigma):
        s = float(sigma.reshape(-1)[0])
        return x - s * torch.from_numpy(eps((x / (s * s + 1) ** 0.5).numpy(), ref.sigma_to_t(AC, s)))
    expected = getattr(k, K_DIFFUSION[name])(denoiser, sigmas[0] * x_T, sigmas, disable=True, noise_sampler=tree())
    plan = sampling.make_plan(sampler=name, steps=steps, alphas_cumprod=AC, timestep_spacing="karras")
    ours = tree()
    out = sampling.run(plan, eps, data["x_T"],
                       noise_fn=sampling.noise_from_sampler(plan, lambda a, b: ours(torch.tensor(a), torch.tensor(b)).numpy()))
    assert rel_l2(out, expected.numpy()) <= 1e-9


# --- stepping several plans in one batched model call (ldmrt serve) ----------------------------------------------
def conditioned_eps(x, t, c):
    """An elementwise denoiser of (x, t, c) per sample: batch-invariant to the bit, so a batched evaluation must
    give each request exactly what its own evaluation gives."""
    return np.tanh(0.5 * x + 1e-3 * t + c)


STEPPED = [dict(sampler="ddim", steps=5, guidance_scale=7.5, c=(0.1, 0.3)),
           dict(sampler="euler_ancestral", steps=7, timestep_spacing="karras", c=(0.2,)),
           dict(sampler="dpmpp_2m", steps=4, guidance_scale=3.0, guidance_interval=(0.0, 0.5), c=(-0.2, 0.4)),
           dict(sampler="heun", steps=4, timestep_spacing="karras", guidance_scale=5.0, inpaint=True, c=(0.0, -0.1)),
           dict(sampler="plms", steps=6, strength=0.5, c=(0.05,))]


def _request(data, r, i):
    plan = sampling.make_plan(sampler=r["sampler"], steps=r["steps"], alphas_cumprod=AC,
                              timestep_spacing=r.get("timestep_spacing", "uniform"), strength=r.get("strength", 1.0),
                              guidance_interval=r.get("guidance_interval"))
    x0 = data["x0"] if r.get("inpaint") or r.get("strength") else None
    kw = dict(guidance_scale=r.get("guidance_scale"), x0=x0, mask=data["mask"] if r.get("inpaint") else None,
              seed=10 + i)
    return plan, sampling.randn(20 + i, SHAPE, dtype="float64"), kw


def test_steppers_batched_equal_each_alone_bitwise(data):
    """Five requests (different samplers, step counts, guidance, img2img, inpainting) stepped together, one model
    call per tick over all their evaluations with per-sample t and conditioning, end bit for bit where each
    ends alone."""
    alone, steppers = [], []
    for i, r in enumerate(STEPPED):
        plan, x_T, kw = _request(data, r, i)

        def eps_fn(x, t, c=r["c"]):
            halves = c if x.shape[0] == 2 * SHAPE[0] else c[-1:]  # doubled: [uncond; cond]
            return conditioned_eps(x, t, np.repeat(halves, SHAPE[0])[:, None, None, None])
        alone.append(sampling.run(plan, eps_fn, x_T, **kw))
        steppers.append(sampling.Stepper(plan, x_T, **kw))
    calls = 0
    while not all(s.done for s in steppers):
        live = [(s, r) for s, r in zip(steppers, STEPPED) if not s.done]
        evs = [s.next() for s, _ in live]
        x = np.concatenate([ev.x for ev in evs])
        t = np.concatenate([np.full(ev.x.shape[0], ev.t) for ev in evs])[:, None, None, None]
        c = np.concatenate([np.repeat(r["c"] if ev.guided else r["c"][-1:], SHAPE[0]) for ev, (_, r) in zip(evs, live)])
        eps = conditioned_eps(x, t, c[:, None, None, None])
        calls += 1
        offset = 0
        for ev, (s, _) in zip(evs, live):
            n = ev.x.shape[0]
            s.apply(eps[offset:offset + n])
            offset += n
    assert calls == max(len(_request(data, r, i)[0].stages) for i, r in enumerate(STEPPED))
    for got, want in zip(steppers, alone):
        assert np.array_equal(got.latent, want)


def test_stepper_contract(data):
    plan, x_T, kw = _request(data, STEPPED[0], 0)
    s = sampling.Stepper(plan, torch.from_numpy(x_T), **kw)
    ev = s.next()
    assert ev.guided and not ev.shallow and ev.x.shape == (2 * SHAPE[0], *SHAPE[1:]) and isinstance(ev.x, torch.Tensor)
    assert s.next().t == ev.t and s.stage == 0  # next() is idempotent within a stage
    with pytest.raises(ValueError, match="returned"):
        s.apply(np.zeros(SHAPE))  # half the values of the doubled input
    while not s.done:
        s.apply(np.zeros_like(s.next().x))
    assert s.stage == len(plan.stages)
    with pytest.raises(ValueError, match="finished"):
        s.apply(np.zeros(SHAPE))
