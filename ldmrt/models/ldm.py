"""LatentDiffusion: the CompVis `ldm.models.diffusion.ddpm.LatentDiffusion` for inference.

Same module tree and buffers as CompVis (`model.diffusion_model`, `first_stage_model`,
`cond_stage_model`, the DDPM schedule buffers), so a CompVis checkpoint's `state_dict` loads
unchanged. Training machinery (losses, EMA bookkeeping, Lightning) is left out; the loader handles
the `model_ema.*` keys of EMA checkpoints.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import instantiate_from_config
from .autoencoder import DiagonalGaussianDistribution, VQModelInterface

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")

# LatentDiffusion/DDPM params that only matter for training: accepted so that zoo configs load.
TRAINING_ONLY = {
    "loss_type", "ckpt_path", "ignore_keys", "load_only_unet", "monitor", "log_every_t", "clip_denoised",
    "original_elbo_weight", "l_simple_weight", "scheduler_config", "use_positional_encodings", "learn_logvar",
    "logvar_init", "cond_stage_trainable", "num_timesteps_cond", "first_stage_key", "cond_stage_key",
    "image_size", "channels", "cond_stage_forward_kwargs",
}


def make_beta_schedule(schedule: str, timesteps: int, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """Betas in float64, as CompVis `make_beta_schedule`. Its "linear" is linear in sqrt(beta)."""
    if schedule == "linear":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    if schedule == "cosine":
        steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64) ** 0.5
    raise ValueError(f"unknown beta_schedule {schedule!r}: use linear, cosine, sqrt_linear or sqrt")


class DiffusionWrapper(nn.Module):
    """Routes conditioning into the UNet: concat to the input, cross-attention context, or class label."""

    def __init__(self, diff_model_config: dict, conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key {conditioning_key!r} not in {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list | None = None, c_crossattn: list | None = None, **cache):
        """cache: keep=k (also return the UNet's deep feature) or deep=feature, keep=k (its shallow branch
        only): DeepCache, see UNetModel.forward and UNetModel.shallow."""
        key = self.conditioning_key
        if key in ("concat", "hybrid"):
            x = torch.cat([x, *c_concat], dim=1)
        run = self.diffusion_model.shallow if "deep" in cache else self.diffusion_model
        if key in ("crossattn", "hybrid"):  # (a shallow branch without cross-attention is given no context)
            return run(x, t, context=torch.cat(c_crossattn, 1) if c_crossattn else None, **cache)
        if key == "adm":
            return run(x, t, y=c_crossattn[0], **cache)
        return run(x, t, **cache)


class LatentDiffusion(nn.Module):
    def __init__(self, unet_config: dict, first_stage_config: dict, cond_stage_config: dict | str, *,
                 timesteps: int = 1000, beta_schedule: str = "linear", linear_start: float = 1e-4,
                 linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas=None, v_posterior: float = 0.0,
                 parameterization: str = "eps", conditioning_key: str | None = None, concat_mode: bool = True,
                 scale_factor: float = 1.0, scale_by_std: bool = False, use_ema: bool = True,
                 cond_stage_forward: str | None = None, **training_only):
        super().__init__()
        unknown = set(training_only) - TRAINING_ONLY
        if unknown:
            raise TypeError(f"LatentDiffusion got unexpected params {sorted(unknown)}")
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization {parameterization!r}: ldmrt runs 'eps' and 'x0' models")
        # CompVis's backward-compatible defaulting of the conditioning route.
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        self.parameterization = parameterization
        self.use_ema = use_ema  # the loader reads `model_ema.*` keys when asked for EMA weights
        self.cond_stage_forward = cond_stage_forward
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        if cond_stage_config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        elif cond_stage_config == "__is_unconditional__":
            self.cond_stage_model = None
        else:
            self.cond_stage_model = instantiate_from_config(cond_stage_config).eval()
        if scale_by_std:  # then CompVis stores the factor it measured in the checkpoint
            self.register_buffer("scale_factor", torch.tensor(scale_factor, device="cpu"))
        else:
            self.scale_factor = scale_factor
        betas = (np.asarray(given_betas, dtype=np.float64) if given_betas is not None else
                 make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        self.register_schedule(betas, v_posterior)

    @property
    def conditioning_key(self) -> str | None:
        return self.model.conditioning_key

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def register_schedule(self, betas: np.ndarray, v_posterior: float = 0.0):
        """The DDPM buffers of CompVis, float32, computed in float64 (checkpoints carry them too)."""
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = (1 - v_posterior) * betas * (1 - ac_prev) / (1 - ac) + v_posterior * betas
        buffers = {
            "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac),
            "log_one_minus_alphas_cumprod": np.log(1 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1), "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1 - ac),
            "posterior_mean_coef2": (1 - ac_prev) * np.sqrt(alphas) / (1 - ac),
        }
        # float64 for the samplers: the float32 buffers (fp16 after a cast) would lose digits.
        self.schedule_alphas_cumprod = ac
        for name, value in buffers.items():
            # explicit device: the loader builds the networks on the meta device, never these.
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32, device="cpu"))

    # --- the CompVis inference API -------------------------------------------------------------
    def get_learned_conditioning(self, c):
        """Conditioning input (prompts, class labels, images...) -> what `apply_model` takes."""
        if self.cond_stage_model is None:
            raise ValueError("this model is unconditional: it takes no conditioning")
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        encode = getattr(self.cond_stage_model, "encode", None)
        c = encode(c) if callable(encode) else self.cond_stage_model(c)
        return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The network's prediction (eps or x0) at timesteps t. `cond`: tensor, list, or CompVis dict."""
        if cond is None:
            cond = {}
        elif not isinstance(cond, dict):
            cond = cond if isinstance(cond, list) else [cond]
            cond = {"c_concat" if self.conditioning_key == "concat" else "c_crossattn": cond}
        return self.model(x_noisy, t, **cond)

    def encode_first_stage(self, x: torch.Tensor):
        """Image in [-1, 1] -> the first stage's encoding (a distribution for KL, pre-quant h for VQ)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior, generator: torch.Generator | None = None):
        """Encoding -> scaled latent; samples a KL posterior (with `generator` for reproducibility)."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        else:
            z = encoder_posterior
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Scaled latent -> image in about [-1, 1]. VQ first stages quantize first, as in CompVis."""
        z = z / self.scale_factor
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """eps from the network's output, for x0-parameterised models too (samplers run on eps)."""
        if self.parameterization == "eps":
            return model_output
        return eps_from_x0(torch.from_numpy(self.schedule_alphas_cumprod), x, t, model_output)


def eps_from_x0(alphas_cumprod: torch.Tensor, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t), in float64 (sqrt(1 - a) is small near t = 0), with a_t
    interpolated linearly for the fractional timesteps of Karras sigmas."""
    ac = alphas_cumprod.to(x.device, torch.float64)
    t = t.to(torch.float64).clamp(0, ac.shape[0] - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=ac.shape[0] - 1)
    a = (ac[lo] + (t - lo) * (ac[hi] - ac[lo])).view(-1, *[1] * (x.dim() - 1))
    return ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).to(x.dtype)


class LatentInpaintDiffusion(LatentDiffusion):
    """RunwayML's SD inpainting model (`ldm.models.diffusion.ddpm.LatentInpaintDiffusion`): conditioning_key hybrid,
    the UNet's input [x, mask, masked-image latent] (its concat_keys order) and CLIP text by cross-attention.
    Only the data keys differ from LatentDiffusion, so the module tree and checkpoints are the same."""

    CONCAT_KEYS = ("mask", "masked_image")

    def __init__(self, *args, concat_keys=CONCAT_KEYS, masked_image_key: str = "masked_image", finetune_keys=None,
                 **kwargs):
        if tuple(concat_keys) != self.CONCAT_KEYS or masked_image_key != "masked_image":
            # generate builds exactly this concat; another order would be fed the wrong channels
            raise ValueError(f"concat_keys {list(concat_keys)} / masked_image_key {masked_image_key!r}: ldmrt runs "
                             f"RunwayML's {list(self.CONCAT_KEYS)} with masked_image_key 'masked_image'")
        super().__init__(*args, **kwargs)
        if self.conditioning_key != "hybrid":
            raise ValueError(f"LatentInpaintDiffusion needs conditioning_key 'hybrid', not {self.conditioning_key!r}")
