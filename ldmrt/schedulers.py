"""The sampler names users bring, as ldmrt plans (ldmrt.sampling): AUTOMATIC1111's sampler and scheduler names,
and a diffusers `scheduler_config.json` (class name + config) mapped onto a sampler and make_plan's options so that
the plan reproduces that scheduler's image for the same latents (tests/test_schedulers.py drives each diffusers
class and compares).

A resolved choice is plain data, {"sampler": ..., "timestep_spacing": ..., "eta": ..., **plan options}: what an
engine's manifest stores as its default scheduler and what `ldmrt.sampling.make_plan` takes.
"""
from .errors import InputError
from .sampling import PLAN_OPTIONS, SAMPLERS, SPACINGS

# final_alpha_cumprod of diffusers' final_sigmas_type "sigma_min": the model's alphas_cumprod[0], resolved by
# plan_arguments.
FIRST_ALPHA = "alphas_cumprod[0]"
# The k-diffusion default grid, as AUTOMATIC1111's "Automatic" scheduler gives it to k-diffusion samplers.
KDIFFUSION_GRID = "kdiffusion"

# AUTOMATIC1111's sampler names (modules/sd_samplers_*.py, also their k_* aliases) -> (ldmrt sampler, options).
# DPM2 and DPM2 a drop the next-to-last sigma there (discard_next_to_last_sigma).
A1111_SAMPLERS = {
    "Euler a": ("euler_ancestral", {}), "Euler": ("euler", {}), "LMS": ("lms", {}), "Heun": ("heun", {}),
    "DPM2": ("dpm_2", {"drop_last_timestep": True}), "DPM2 a": ("dpm_2_ancestral", {"drop_last_timestep": True}),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", {}), "DPM++ 2M": ("dpmpp_2m", {}), "DPM++ SDE": ("dpmpp_sde", {}),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", {}), "DPM++ 2M SDE Heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", {}),
    # CompVis' samplers, on CompVis' grid ("uniform").
    "DDIM": ("ddim", {"timestep_spacing": "uniform"}), "PLMS": ("plms", {"timestep_spacing": "uniform"}),
    # AUTOMATIC1111 runs its own UniPC (bh1, order 3) and an LCM without the boundary condition: these aliases
    # give diffusers' UniPC and LCM, the same methods but not AUTOMATIC1111's images.
    "UniPC": ("unipc", {"timestep_spacing": "linspace", "drop_last_timestep": True}),
    "LCM": ("lcm", {"timestep_spacing": "lcm"}),
}
A1111_ALIASES = {"k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_euler": "Euler", "k_lms": "LMS",
                 "k_heun": "Heun", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_dpmpp_2s_a": "DPM++ 2S a",
                 "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_2m_sde": "DPM++ 2M SDE"}
# AUTOMATIC1111's scheduler names (modules/sd_schedulers.py) -> ldmrt grids.
# The web UI takes a scheduler by its label ("Karras") or its name ("karras", what webuiapi sends): names -> labels.
# (Its "uniform" is k-diffusion's grid, not ldmrt's CompVis "uniform": names are read through this table first.)
A1111_SCHEDULER_NAMES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
                         "exponential": "Exponential", "sgm_uniform": "SGM Uniform", "simple": "Simple"}
A1111_SCHEDULERS = {"Automatic": None, "Uniform": KDIFFUSION_GRID, "Karras": "karras", "Exponential": "exponential",
                    "SGM Uniform": "sgm_uniform", "Simple": "simple"}


def resolve(sampler: str, scheduler: str | None = None) -> dict:
    """A sampler name (ldmrt's, AUTOMATIC1111's "DPM++ 2M Karras" style, or a k_* alias) and an optional
    AUTOMATIC1111 scheduler name -> {"sampler", "timestep_spacing" (absent: the caller's), plan options}."""
    if not isinstance(sampler, str):
        raise InputError(f"sampler must be a name, not {sampler!r}")
    if sampler in SAMPLERS:
        choice = {"sampler": sampler}
    else:
        name = A1111_ALIASES.get(sampler, sampler)
        grid = None
        for label, spacing in (("Karras", "karras"), ("Exponential", "exponential")):
            if name.endswith(" " + label) and name[:-len(label) - 1] in A1111_SAMPLERS:  # "DPM++ 2M Karras"
                name, grid = name[:-len(label) - 1], spacing
        if name not in A1111_SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}: ldmrt's are {', '.join(SAMPLERS)}; AUTOMATIC1111's "
                             f"{', '.join(A1111_SAMPLERS)} (with ' Karras' or ' Exponential')")
        ldmrt_name, options = A1111_SAMPLERS[name]
        choice = {"sampler": ldmrt_name, **options}
        if "timestep_spacing" not in choice and ldmrt_name not in ("ddim", "plms"):
            choice["timestep_spacing"] = KDIFFUSION_GRID
        if grid:
            choice["timestep_spacing"] = grid
    if scheduler is not None:
        if scheduler not in A1111_SCHEDULERS and scheduler not in SPACINGS:
            raise InputError(f"unknown scheduler {scheduler!r}: AUTOMATIC1111's are {', '.join(A1111_SCHEDULERS)}; "
                             f"ldmrt's grids {', '.join(SPACINGS)}")
        grid = A1111_SCHEDULERS.get(scheduler, scheduler)
        if grid is not None:
            choice["timestep_spacing"] = grid
    return choice


# --- diffusers ------------------------------------------------------------------------------------------------
# The diffusers classes whose step is k-diffusion's over sigmas (Euler family), and the ldmrt sampler of each.
_DISCRETE = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
             "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms", "KDPM2DiscreteScheduler": "dpm_2",
             "KDPM2AncestralDiscreteScheduler": "dpm_2_ancestral"}
_MULTISTEP = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler")
DIFFUSERS_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler", *_DISCRETE, *_MULTISTEP)


def from_diffusers(config: dict) -> dict:
    """A diffusers scheduler config (scheduler_config.json, with its "_class_name") -> ldmrt's choice, exactly
    that scheduler's conventions. Raises InputError naming the setting ldmrt does not reproduce."""
    cls = config.get("_class_name")
    if cls not in DIFFUSERS_SCHEDULERS:
        raise InputError(f"diffusers scheduler {cls!r} has no ldmrt equivalent (supported: "
                         f"{', '.join(DIFFUSERS_SCHEDULERS)}); pass sampler= to choose one")

    def get(key, default):
        return config.get(key, default)

    def refuse(setting, why="ldmrt does not reproduce it"):
        raise InputError(f"{cls} with {setting}: {why}; choose another scheduler or pass sampler=")

    if get("prediction_type", "epsilon") != "epsilon":
        refuse(f"prediction_type={get('prediction_type', None)!r}", "ldmrt's models predict epsilon")
    for flag in ("thresholding", "rescale_betas_zero_snr", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
        if get(flag, False):
            refuse(f"{flag}=True")
    spacing = "linspace" if cls == "DPMSolverSinglestepScheduler" else get("timestep_spacing", "leading" if cls in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler")
                  else "linspace")
    if spacing not in ("leading", "trailing", "linspace"):
        refuse(f"timestep_spacing={spacing!r}")
    offset = int(get("steps_offset", 0))
    final_one = {"final_alpha_cumprod": 1.0} if get("set_alpha_to_one", True) else {}

    if cls in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler"):
        if get("clip_sample", cls in ("DDIMScheduler", "DDPMScheduler")) and cls != "PNDMScheduler":  # their defaults
            refuse("clip_sample=True", "latent models sample unclipped")
        choice = {"timestep_spacing": spacing, "steps_offset": offset}
        if cls == "DDIMScheduler":
            choice.update(sampler="ddim", prev_timestep_stride=True, **final_one)
        elif cls == "DDPMScheduler":
            if get("variance_type", "fixed_small") != "fixed_small":
                refuse(f"variance_type={get('variance_type', None)!r}")
            choice.update(sampler="ddpm", prev_timestep_stride=True)
        elif cls == "PNDMScheduler":
            if not get("skip_prk_steps", False):
                refuse("skip_prk_steps=False", "ldmrt runs PNDM's PLMS steps only (Stable Diffusion's setting)")
            choice.update(sampler="plms", **final_one)
        else:
            if float(get("timestep_scaling", 10.0)) != 10.0:
                refuse(f"timestep_scaling={get('timestep_scaling', None)}")
            choice = {"sampler": "lcm", "timestep_spacing": "lcm",
                      "original_steps": int(get("original_inference_steps", 50)), **final_one}
        return choice

    karras, exponential = get("use_karras_sigmas", False), get("use_exponential_sigmas", False)
    respaced = "karras" if karras else "exponential" if exponential else ""
    if cls in _DISCRETE:
        if get("interpolation_type", "linear") != "linear":
            refuse(f"interpolation_type={get('interpolation_type', None)!r}")
        if get("timestep_type", "discrete") != "discrete":
            refuse(f"timestep_type={get('timestep_type', None)!r}")
        # linspace is fractional with sigma interpolated linearly (np.interp); leading/trailing are integers.
        choice = {"sampler": _DISCRETE[cls], "sigma_interpolation": "linear", "steps_offset": offset,
                  "timestep_spacing": "kdiffusion" if spacing == "linspace" else spacing,
                  "start_noise": "unit" if spacing == "leading" else "sigma"}
        if respaced:  # over the spaced grid's range: the whole schedule for linspace
            if spacing == "linspace":
                choice["timestep_spacing"] = respaced
            else:
                choice["respace"] = respaced
            if karras and cls.startswith("KDPM2"):
                choice["round_timesteps"] = True
        if get("final_sigmas_type", "zero") == "sigma_min":
            choice["final_alpha_cumprod"] = FIRST_ALPHA
        return choice

    # DPMSolverMultistep, UniPC: the VP multistep solvers on diffusers' multistep grid.
    final = get("final_sigmas_type", "zero")
    if final != "zero" and not (final == "sigma_min" and cls != "DPMSolverMultistepScheduler"):
        refuse(f"final_sigmas_type={final!r}", "ldmrt's DPM++ samplers land on sigma 0")
    if respaced:
        choice = {"timestep_spacing": respaced, "round_timesteps": karras}
    else:
        choice = {"timestep_spacing": spacing, "steps_offset": offset, "drop_last_timestep": spacing != "trailing"}
    choice.update(start_noise="unit", lower_order_final=bool(get("lower_order_final", cls != "DPMSolverSinglestepScheduler")))
    if final == "sigma_min":
        choice["final_alpha_cumprod"] = FIRST_ALPHA
    order = int(get("solver_order", 2))
    if cls == "UniPCMultistepScheduler":
        if not get("predict_x0", True) or get("disable_corrector", []) or get("solver_p", None):
            refuse("predict_x0=False, disable_corrector or solver_p")
        if order not in (1, 2, 3):
            refuse(f"solver_order={order}")
        choice.update(sampler="unipc", solver_order=order, solver_type=get("solver_type", "bh2"))
        return choice
    if get("lambda_min_clipped", -float("inf")) != -float("inf") or get("variance_type", None):
        refuse("lambda_min_clipped or variance_type")
    algorithm = get("algorithm_type", "dpmsolver++")
    if cls == "DPMSolverSinglestepScheduler":
        if algorithm != "dpmsolver++" or order not in (1, 2):
            refuse(f"algorithm_type={algorithm!r}, solver_order={order}", "ldmrt runs its dpmsolver++ orders 1 and 2")
        choice.update(sampler="dpmpp_2s" if order == 2 else "dpmpp_2m", solver_type=get("solver_type", "midpoint"))
        if order == 1:  # every step first order: 2M with its order capped, which euler_at_final does not do
            refuse("solver_order=1")
        return choice
    if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
        refuse(f"algorithm_type={algorithm!r}", "ldmrt's DPM-Solver samplers are the data-prediction (++) forms")
    if order not in (2, 3):
        refuse(f"solver_order={order}")
    sde = algorithm == "sde-dpmsolver++"
    if sde and order == 3:
        refuse("algorithm_type='sde-dpmsolver++' and solver_order=3", "diffusers' third-order SDE update differs from "
               "k-diffusion's DPM++ 3M SDE in its second-difference term; pass sampler='dpmpp_3m_sde' for k-diffusion's")
    choice.update(sampler=("dpmpp_2m" if order == 2 else "dpmpp_3m") + ("_sde" if sde else ""),
                  solver_type=get("solver_type", "midpoint"), euler_at_final=bool(get("euler_at_final", False)))
    return choice


def plan_arguments(choice: dict, alphas_cumprod) -> dict:
    """make_plan's keyword arguments for a resolved choice (the model's alphas_cumprod resolves a final sigma_min)."""
    unknown = set(choice) - set(PLAN_OPTIONS) - {"sampler", "timestep_spacing", "eta"}
    if unknown:
        raise InputError(f"unknown scheduler settings {sorted(unknown)}")
    out = dict(choice)
    if out.get("final_alpha_cumprod") == FIRST_ALPHA:
        out["final_alpha_cumprod"] = float(alphas_cumprod[0])
    return out


# CompVis' DDIM on CompVis' grid: what an engine runs when neither the request nor the engine names a sampler.
BUILTIN_DEFAULT = {"sampler": "ddim", "timestep_spacing": "uniform"}


def choose(default: dict | None, sampler: str | None = None, timestep_spacing: str | None = None) -> dict:
    """The sampler settings of a request: with no sampler named, the engine's default (a diffusers folder's
    scheduler, else BUILTIN_DEFAULT); a named sampler (ldmrt's, on CompVis' grid unless told, or AUTOMATIC1111's,
    on its grid); timestep_spacing (an ldmrt grid or an AUTOMATIC1111 scheduler name) over either."""
    if timestep_spacing is not None and not isinstance(timestep_spacing, str):
        raise InputError(f"timestep_spacing must be a name, not {timestep_spacing!r}")
    if sampler is None:
        choice = dict(default or BUILTIN_DEFAULT)
        if timestep_spacing is not None:
            choice.update(resolve(choice["sampler"], timestep_spacing), sampler=choice["sampler"])
    else:
        choice = resolve(sampler, timestep_spacing)
    choice.setdefault("timestep_spacing", "uniform")
    return choice
