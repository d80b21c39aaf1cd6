"""diffusers' schedulers and AUTOMATIC1111's sampler names as ldmrt plans (ldmrt.schedulers).

Each diffusers class is driven as its pipelines drive it (init_noise_sigma, scale_model_input, step with a
torch.Generator) on a toy float64 denoiser; ldmrt's plan from `from_diffusers(scheduler.config)` must give the same
latent for the same x_T and the same noise draws. Tolerance: relative L2 <= 2e-5 (diffusers keeps its sigmas in
float32; measured errors are 1e-7 to 2e-6).
"""
import numpy as np
import pytest
import torch

from ldmrt import sampling, schedulers
from ldmrt.errors import InputError
from ldmrt.testing import sampling_reference as ref
from helpers import rel_l2

diffusers = pytest.importorskip("diffusers")

T = 1000
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=T)
AC = sampling.make_alphas_cumprod("linear", T, 0.00085, 0.012)
SHAPE = (2, 4, 8, 8)


def toy_eps(mean):
    return ref.gaussian_eps(AC, mean)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return dict(x_T=sampling.randn(5, SHAPE, dtype="float64"), mean=rng.standard_normal(SHAPE) * 0.5)


def diffusers_loop(scheduler, eps, x_T, steps, seed, eta=None):
    return ref.diffusers_reference(scheduler, eps, x_T, steps, seed, eta)


def ldmrt_loop(scheduler, eps, x_T, steps, seed, eta=None):
    """As a saved scheduler_config.json reads: the class name and the full config."""
    choice = schedulers.from_diffusers({"_class_name": type(scheduler).__name__, **scheduler.config})
    g = torch.Generator().manual_seed(seed)
    plan = sampling.make_plan(steps=steps, alphas_cumprod=AC, eta=eta, **schedulers.plan_arguments(choice, AC))
    # diffusers draws the noise in the sample's dtype, but DPMSolverMultistep's SDE form in float32.
    dtype = torch.float32 if isinstance(scheduler, diffusers.DPMSolverMultistepScheduler) else torch.float64
    return sampling.run(plan, eps, x_T, noise_fn=lambda d: torch.randn(SHAPE, generator=g, dtype=dtype).double())


CASES = [
    ("DDIMScheduler", dict(timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)),
    ("DDIMScheduler", dict(timestep_spacing="linspace", clip_sample=False)),
    ("DDIMScheduler", dict(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)),
    ("DDPMScheduler", dict(timestep_spacing="leading", steps_offset=1, clip_sample=False)),
    ("PNDMScheduler", dict(timestep_spacing="leading", steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)),
    ("LCMScheduler", dict(set_alpha_to_one=False)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="linspace")),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1, use_karras_sigmas=True)),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True)),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="linspace")),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("HeunDiscreteScheduler", dict(timestep_spacing="linspace")),
    ("HeunDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1, use_karras_sigmas=True)),
    ("LMSDiscreteScheduler", dict(timestep_spacing="linspace")),
    ("LMSDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("KDPM2DiscreteScheduler", dict(timestep_spacing="linspace")),
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True)),
    ("KDPM2AncestralDiscreteScheduler", dict(timestep_spacing="linspace")),
    ("KDPM2AncestralDiscreteScheduler", dict(timestep_spacing="trailing", use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict()),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="leading", steps_offset=1)),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="trailing", solver_type="heun")),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("DPMSolverMultistepScheduler", dict(euler_at_final=True, lower_order_final=False)),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
    ("DPMSolverSinglestepScheduler", dict()),
    ("DPMSolverSinglestepScheduler", dict(lower_order_final=True, solver_type="heun")),
    ("DPMSolverSinglestepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", dict()),
    ("UniPCMultistepScheduler", dict(solver_order=3, timestep_spacing="leading", steps_offset=1)),
    ("UniPCMultistepScheduler", dict(solver_type="bh1", final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", dict(use_karras_sigmas=True, solver_order=1)),
]


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("cls,config", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_diffusers_scheduler_reproduced(data, cls, config, steps):
    if cls == "LCMScheduler" and steps > 50:
        pytest.skip("LCM runs at most original_inference_steps")
    scheduler = getattr(diffusers, cls)(**SD, **config)
    eps = toy_eps(data["mean"])
    expected = diffusers_loop(scheduler, eps, data["x_T"], steps, seed=3)
    out = ldmrt_loop(scheduler, eps, data["x_T"], steps, seed=3)
    assert rel_l2(out, expected) <= 2e-5, rel_l2(out, expected)


def test_ddim_eta_matches_diffusers(data):
    config = dict(timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    scheduler = diffusers.DDIMScheduler(**SD, **config)
    eps = toy_eps(data["mean"])
    expected = diffusers_loop(scheduler, eps, data["x_T"], 15, seed=4, eta=0.6)
    assert rel_l2(ldmrt_loop(scheduler, eps, data["x_T"], 15, seed=4, eta=0.6), expected) <= 2e-5


@pytest.mark.parametrize("config,message", [
    (dict(_class_name="DEISMultistepScheduler"), "no ldmrt equivalent"),
    (dict(_class_name="EulerDiscreteScheduler", prediction_type="v_prediction"), "predict epsilon"),
    (dict(_class_name="DDIMScheduler"), "clip_sample=True"),
    (dict(_class_name="PNDMScheduler"), "skip_prk_steps=False"),
    (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver"), "data-prediction"),
    (dict(_class_name="EulerDiscreteScheduler", use_beta_sigmas=True), "use_beta_sigmas"),
    (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3), "3M SDE"),
])
def test_unsupported_settings_are_named(config, message):
    with pytest.raises(InputError, match=message):
        schedulers.from_diffusers(config)


@pytest.mark.parametrize("name,expected", [
    ("Euler a", {"sampler": "euler_ancestral", "timestep_spacing": "kdiffusion"}),
    ("DPM++ 2M Karras", {"sampler": "dpmpp_2m", "timestep_spacing": "karras"}),
    ("k_dpmpp_2m", {"sampler": "dpmpp_2m", "timestep_spacing": "kdiffusion"}),
    ("DPM2 a Karras", {"sampler": "dpm_2_ancestral", "timestep_spacing": "karras", "drop_last_timestep": True}),
    ("DPM++ 2M SDE Heun", {"sampler": "dpmpp_2m_sde", "solver_type": "heun", "timestep_spacing": "kdiffusion"}),
    ("DDIM", {"sampler": "ddim", "timestep_spacing": "uniform"}),
    ("heun", {"sampler": "heun"}),
])
def test_a1111_names(name, expected):
    assert schedulers.resolve(name) == expected


def test_a1111_scheduler_names_and_errors():
    assert schedulers.resolve("DPM++ SDE", "SGM Uniform")["timestep_spacing"] == "sgm_uniform"
    assert schedulers.resolve("Euler", "Automatic")["timestep_spacing"] == "kdiffusion"
    with pytest.raises(InputError, match="unknown sampler 'DPM fast'"):
        schedulers.resolve("DPM fast")
    with pytest.raises(InputError, match="unknown scheduler 'Beta'"):
        schedulers.resolve("Euler", "Beta")


def test_a1111_dpm2_discards_the_next_to_last_sigma():
    """AUTOMATIC1111: sigmas = get_sigmas(steps + 1), then the next-to-last (smallest nonzero) dropped."""
    plan = sampling.make_plan(steps=10, alphas_cumprod=AC, **schedulers.resolve("DPM2"))
    t, _ = ref.make_grid("kdiffusion", 11, AC)
    assert np.allclose(plan.timesteps, t[:-1], rtol=0, atol=1e-9)


# --- a diffusers folder's scheduler through the engine --------------------------------------------------------

@pytest.mark.parametrize("cls,config,sampler", [
    ("PNDMScheduler", {}, "plms"),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), "dpmpp_2m"),
    ("EulerDiscreteScheduler", {}, "euler"),
    ("UniPCMultistepScheduler", {}, "unipc"),
])
def test_a_folders_scheduler_is_the_engines_default(tmp_path, cls, config, sampler):
    """Built from a diffusers folder, the engine samples as the folder's scheduler does: the same latent as
    diffusers' StableDiffusionPipeline from the same x_T, with guidance (tiny random SD, fp32)."""
    from ldmrt import Engine
    from helpers import diffusers_pipeline, write_tiny_sd_folder
    folder = write_tiny_sd_folder(tmp_path / "sd", ["a", "red", "circle"])
    pipe = diffusers_pipeline(folder)
    pipe.tokenizer.model_max_length = 77  # the tiny tokenizer files record none
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **config)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    engine = Engine.build(folder, tmp_path / "engine", backend="torch")
    assert engine.manifest["default_sampler"]["sampler"] == sampler
    s = engine.summary
    size, side = s["default_size"], s["default_size"] // s["latent_factor"]
    x_T = torch.randn(1, s["latent_channels"], side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe("a red circle", num_inference_steps=9, guidance_scale=6.0, latents=x_T.clone(),
                        output_type="latent", height=size, width=size).images
    out = engine.generate("a red circle", steps=9, guidance_scale=6.0, latents=x_T, output_type="latent")
    assert rel_l2(out.numpy(), expected.numpy()) <= 1e-4, rel_l2(out.numpy(), expected.numpy())
    # The image records what ran: a request naming no sampler says the folder's.
    record = engine.generate("a red circle", steps=2)[0].info["parameters"]
    assert sampler in record


def test_cli_takes_a1111_names(tmp_path, capsys):
    """`ldmrt generate --sampler 'Euler a' --scheduler Karras`: the PNG records the sampler and grid that ran; an
    unknown name exits 2 naming the known ones."""
    import json

    from PIL import Image

    from ldmrt.cli import main
    engine = tmp_path / "engine"
    assert main(["build", "--model", "shapes", "--backend", "torch", "-o", str(engine)]) == 0
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--engine", str(engine), "--steps", "4", "--sampler", "Euler a",
                 "--scheduler", "Karras", "-o", str(out)]) == 0
    record = json.loads(Image.open(out).text["parameters"])
    assert (record["sampler"], record["timestep_spacing"]) == ("euler_ancestral", "karras")
    capsys.readouterr()
    assert main(["generate", "a red circle", "--engine", str(engine), "--sampler", "DPM fast", "-o", str(out)]) == 2
    assert "unknown sampler 'DPM fast'" in capsys.readouterr().err
