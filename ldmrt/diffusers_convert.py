"""Read a diffusers Stable Diffusion v1 folder as a CompVis LatentDiffusion checkpoint + config.

A diffusers folder splits the model into unet/, vae/, text_encoder/ (plus tokenizer/, scheduler/)
with diffusers' own module names. `convert_diffusers_folder` renames every tensor to the CompVis
layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`) and
builds the CompVis-style config, so the result loads exactly like an original `sd-v1-*.ckpt`.

Only what SD v1 uses is accepted; anything else (SD2's linear projections and per-block heads,
v-prediction, upcast attention, inpainting/class-conditioned UNets, SDXL...) raises ValueError
naming the setting, rather than producing a model that loads but computes something else.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

# Renames inside one module: diffusers sub-module path -> CompVis sub-module path. A prefix rule
# without a table keeps the rest of the key as is (e.g. SpatialTransformer == Transformer2DModel).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
# The VAE mid-block attention, current (to_q...) and legacy (query...) diffusers names.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}

# Settings whose SD v1 value is the only one the CompVis modules implement: key -> SD v1 value, or a
# tuple of equivalent values (also diffusers' default, so a missing key passes).
UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "upcast_attention": False, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": None,
}
VAE_FIXED = {
    "act_fn": "silu", "norm_num_groups": 32, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
# What the unsupported settings are, for the error message.
WHAT_IT_IS = {
    "use_linear_projection": "SD2-style linear proj_in/proj_out",
    "upcast_attention": "fp32-upcast attention (SD2.1)",
    "class_embed_type": "class-conditioned UNet (e.g. SD x4 upscaler)",
    "num_class_embeds": "class-conditioned UNet",
    "addition_embed_type": "added text/time embeddings (SDXL)",
}

# diffusers beta_schedule -> CompVis beta_schedule (CompVis "linear" is linear in sqrt(beta)).
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}

# In order of preference; the fp16 variants are what `save_pretrained(variant="fp16")` writes.
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"),
}
TEXT_MODEL_PREFIXES = ("text_model.embeddings.", "text_model.encoder.", "text_model.final_layer_norm.")
COMPONENT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}


def convert_diffusers_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(CompVis LatentDiffusion state dict without schedule buffers, CompVis model config) of a
    diffusers SD v1 folder. Tensors keep the dtype they are stored in."""
    root = Path(path)
    index = _read_json(root / "model_index.json", "a diffusers pipeline folder needs model_index.json")
    for name, cls in COMPONENT_CLASSES.items():
        if name not in index or list(index[name])[-1] != cls:
            raise ValueError(f"{root} is not a Stable Diffusion v1 diffusers folder: model_index.json "
                             f"needs {name}={cls}, has {index.get(name)}")
    unet_cfg = _read_json(root / "unet" / "config.json")
    vae_cfg = _read_json(root / "vae" / "config.json")
    text_cfg = _read_json(root / "text_encoder" / "config.json")
    sched_cfg = _read_json(root / "scheduler" / "scheduler_config.json")

    unet_params = unet_config(unet_cfg)
    vae_params = vae_config(vae_cfg)
    text_params = text_encoder_config(text_cfg)
    if unet_params["context_dim"] != text_cfg["hidden_size"]:
        raise ValueError(f"inconsistent folder: unet cross_attention_dim {unet_params['context_dim']} != "
                         f"text encoder hidden_size {text_cfg['hidden_size']}")
    # SD inpainting UNets (StableDiffusionInpaintPipeline) take [latent, mask, masked-image latent]: RunwayML's
    # LatentInpaintDiffusion. Other widths (depth, instruct-pix2pix) are other models.
    inpainting = unet_params["in_channels"] == 2 * vae_cfg["latent_channels"] + 1
    if unet_params["in_channels"] != vae_cfg["latent_channels"] and not inpainting:
        raise ValueError(f"unsupported: unet in_channels={unet_params['in_channels']} but "
                         f"{vae_cfg['latent_channels']} latent channels (SD v1 has {vae_cfg['latent_channels']}, its "
                         f"inpainting UNet {2 * vae_cfg['latent_channels'] + 1}; depth UNets are not SD v1)")

    unet = convert_unet_state_dict(_load_weights(root / "unet", WEIGHT_FILES["unet"]), unet_cfg)
    vae = convert_vae_state_dict(_load_weights(root / "vae", WEIGHT_FILES["vae"]), vae_cfg)
    state = {"model.diffusion_model." + key: value for key, value in unet.items()}
    state.update({"first_stage_model." + key: value for key, value in vae.items()})
    text = convert_text_encoder_state_dict(_load_weights(root / "text_encoder", WEIGHT_FILES["text_encoder"]))
    state.update({"cond_stage_model.transformer." + key: value for key, value in text.items()})

    model_config = {
        "target": "ldm.models.diffusion.ddpm." + ("LatentInpaintDiffusion" if inpainting else "LatentDiffusion"),
        "params": {
            **scheduler_config(sched_cfg),
            "num_timesteps_cond": 1,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": unet_params["image_size"],
            "channels": vae_params["embed_dim"],
            "cond_stage_trainable": False,
            "conditioning_key": "hybrid" if inpainting else "crossattn",
            "scale_factor": vae_cfg.get("scaling_factor", 0.18215),
            "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae_params},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": text_params},
        },
    }
    # The folder's scheduler, as saved (with its _class_name): the engine's default sampler (ldmrt.schedulers).
    model_config["scheduler"] = sched_cfg
    return state, model_config


# --- configs -----------------------------------------------------------------------------------
def unet_config(cfg: dict) -> dict:
    """CompVis openaimodel.UNetModel params of a diffusers UNet2DConditionModel config."""
    _check_fixed("unet", cfg, UNET_FIXED)
    levels = _attention_levels(cfg)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    depth = cfg.get("transformer_layers_per_block", 1)
    for name, value in (("attention_head_dim/num_attention_heads", heads), ("transformer_layers_per_block", depth)):
        if not isinstance(value, int):
            raise ValueError(f"unsupported: unet {name}={value!r} per block (SD v1 has one int)")
    model_channels, channel_mult = _channel_mult("unet", cfg["block_out_channels"])
    sample_size = cfg.get("sample_size") or 64
    return {
        "image_size": sample_size if isinstance(sample_size, int) else sample_size[0],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "model_channels": model_channels,
        # CompVis names levels by their downsampling factor ds = 2**level.
        "attention_resolutions": [2 ** level for level, attn in enumerate(levels) if attn],
        "num_res_blocks": cfg["layers_per_block"],
        "channel_mult": channel_mult,
        # diffusers' SD v1 config stores the head *count* as attention_head_dim; so does num_heads.
        "num_heads": heads,
        "use_spatial_transformer": True,
        "transformer_depth": depth,
        "context_dim": cfg["cross_attention_dim"],
        "legacy": False,
    }


def vae_config(cfg: dict) -> dict:
    """CompVis AutoencoderKL params of a diffusers AutoencoderKL config."""
    _check_fixed("vae", cfg, VAE_FIXED)
    n = len(cfg["block_out_channels"])
    if list(cfg["down_block_types"]) != ["DownEncoderBlock2D"] * n or \
            list(cfg["up_block_types"]) != ["UpDecoderBlock2D"] * n:
        raise ValueError(f"unsupported: vae blocks {cfg['down_block_types']} / {cfg['up_block_types']} "
                         "(SD v1 has DownEncoderBlock2D / UpDecoderBlock2D only, no attention in them)")
    ch, ch_mult = _channel_mult("vae", cfg["block_out_channels"])
    sample_size = cfg.get("sample_size") or 256
    return {
        "embed_dim": cfg["latent_channels"],
        "ddconfig": {
            "double_z": True,
            "z_channels": cfg["latent_channels"],
            "resolution": sample_size if isinstance(sample_size, int) else sample_size[0],
            "in_channels": cfg["in_channels"],
            "out_ch": cfg["out_channels"],
            "ch": ch,
            "ch_mult": ch_mult,
            "num_res_blocks": cfg["layers_per_block"],
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }


def text_encoder_config(cfg: dict) -> dict:
    """FrozenCLIPEmbedder params of a transformers CLIPTextModel config (its size keywords use
    transformers' names). The tokenizer/ files are found by the loader, not named in the config."""
    if (cfg.get("architectures") or ["CLIPTextModel"]) != ["CLIPTextModel"]:
        raise ValueError(f"unsupported text encoder {cfg.get('architectures')} (SD v1 has CLIPTextModel)")
    if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"unsupported: text encoder hidden_act={cfg['hidden_act']!r} (SD v1 has quick_gelu)")
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings")
    return {
        # SD v1 tokenizes to the full context of the text encoder (77 tokens).
        "max_length": cfg["max_position_embeddings"],
        **{name: cfg[name] for name in sizes},
        "layer_norm_eps": cfg.get("layer_norm_eps", 1e-5),
    }


def scheduler_config(cfg: dict) -> dict:
    """CompVis DDPM schedule params of a diffusers scheduler config."""
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"unsupported: prediction_type={cfg['prediction_type']!r} (SD v1 predicts epsilon)")
    if cfg.get("trained_betas") is not None:
        raise ValueError("unsupported: scheduler trained_betas (SD v1 uses a beta_schedule)")
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unsupported: beta_schedule={schedule!r} (supported: {', '.join(BETA_SCHEDULES)})")
    return {
        "linear_start": cfg.get("beta_start", 0.0001),
        "linear_end": cfg.get("beta_end", 0.02),
        "timesteps": cfg.get("num_train_timesteps", 1000),
        "beta_schedule": BETA_SCHEDULES[schedule],
        "parameterization": "eps",
    }


def _check_fixed(component: str, cfg: dict, fixed: dict):
    for key, sd1_value in fixed.items():
        allowed = sd1_value if isinstance(sd1_value, tuple) else (sd1_value,)
        value = cfg.get(key, allowed[0])
        if value not in allowed:
            what = f" ({WHAT_IT_IS[key]})" if key in WHAT_IT_IS else ""
            raise ValueError(f"unsupported: {component} {key}={value!r}{what}; SD v1 has {sd1_value!r}")


def _channel_mult(component: str, block_out_channels) -> tuple[int, list[int]]:
    base = block_out_channels[0]
    if any(c % base for c in block_out_channels):
        raise ValueError(f"unsupported: {component} block_out_channels {block_out_channels} are not multiples "
                         "of the first")
    return base, [c // base for c in block_out_channels]


def _attention_levels(cfg: dict) -> list[bool]:
    """Per resolution level, whether its blocks have cross-attention (same going down and up, as CompVis)."""
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    up_kinds = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    if any(b not in kinds for b in down) or any(b not in up_kinds for b in up):
        raise ValueError(f"unsupported unet blocks {down} / {up} (SD v1 has CrossAttn/plain Down/UpBlock2D)")
    levels = [kinds[b] for b in down]
    if [up_kinds[b] for b in reversed(up)] != levels:
        raise ValueError(f"unsupported: unet up blocks {up} do not mirror down blocks {down}")
    if len(cfg["block_out_channels"]) != len(levels):
        raise ValueError("unet block_out_channels and down_block_types differ in length")
    return levels


# --- state dict keys ---------------------------------------------------------------------------
def unet_prefixes(cfg: dict) -> dict[str, tuple[str, dict | None]]:
    """diffusers module prefix -> (CompVis prefix, renames inside it), for every UNet module."""
    levels, per_level = _attention_levels(cfg), cfg["layers_per_block"]
    rules = {
        "conv_in.": ("input_blocks.0.0.", None),
        "time_embedding.linear_1.": ("time_embed.0.", None),
        "time_embedding.linear_2.": ("time_embed.2.", None),
        "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", None),
        "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET),
        "conv_norm_out.": ("out.0.", None),
        "conv_out.": ("out.2.", None),
    }
    # CompVis numbers input_blocks consecutively: conv_in, then per level its resnet(+attention)
    # blocks and, except on the last level, a downsampler.
    block = 1
    for level, attn in enumerate(levels):
        for i in range(per_level):
            rules[f"down_blocks.{level}.resnets.{i}."] = (f"input_blocks.{block}.0.", UNET_RESNET)
            if attn:
                rules[f"down_blocks.{level}.attentions.{i}."] = (f"input_blocks.{block}.1.", None)
            block += 1
        if level < len(levels) - 1:
            rules[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{block}.0.op.", None)
            block += 1
    # output_blocks: per level (deepest first) per_level + 1 blocks; the last one of each level but
    # the top carries the upsampler after its resnet (and attention, if any).
    block = 0
    for up_level, attn in enumerate(reversed(levels)):
        for i in range(per_level + 1):
            rules[f"up_blocks.{up_level}.resnets.{i}."] = (f"output_blocks.{block}.0.", UNET_RESNET)
            if attn:
                rules[f"up_blocks.{up_level}.attentions.{i}."] = (f"output_blocks.{block}.1.", None)
            block += 1
        if up_level < len(levels) - 1:
            upsampler = f"output_blocks.{block - 1}.{2 if attn else 1}.conv."
            rules[f"up_blocks.{up_level}.upsamplers.0.conv."] = (upsampler, None)
    return rules


def vae_prefixes(cfg: dict) -> dict[str, tuple[str, dict | None]]:
    """diffusers module prefix -> (CompVis prefix, renames inside it), for every AutoencoderKL module."""
    n, per_level = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    rules = {"quant_conv.": ("quant_conv.", None), "post_quant_conv.": ("post_quant_conv.", None)}
    for part in ("encoder", "decoder"):
        rules[f"{part}.conv_in."] = (f"{part}.conv_in.", None)
        rules[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", VAE_RESNET)
        rules[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
        rules[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", VAE_RESNET)
        rules[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", None)
        rules[f"{part}.conv_out."] = (f"{part}.conv_out.", None)
    for level in range(n):
        for i in range(per_level):
            rules[f"encoder.down_blocks.{level}.resnets.{i}."] = (f"encoder.down.{level}.block.{i}.", VAE_RESNET)
        if level < n - 1:
            rules[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = (f"encoder.down.{level}.downsample.conv.",
                                                                         None)
    # The decoder's up_blocks run deepest first; CompVis indexes `up` by level, so reversed.
    for up_level in range(n):
        level = n - 1 - up_level
        for i in range(per_level + 1):
            rules[f"decoder.up_blocks.{up_level}.resnets.{i}."] = (f"decoder.up.{level}.block.{i}.", VAE_RESNET)
        if up_level < n - 1:
            rules[f"decoder.up_blocks.{up_level}.upsamplers.0.conv."] = (f"decoder.up.{level}.upsample.conv.", None)
    return rules


def convert_unet_state_dict(weights: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel weights -> CompVis UNetModel weights (keys without prefix)."""
    rules = unet_prefixes(cfg)
    return {_rename(key, rules, "unet"): value for key, value in weights.items()}


def convert_vae_state_dict(weights: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL weights -> CompVis AutoencoderKL weights (keys without prefix)."""
    rules = vae_prefixes(cfg)
    converted = {}
    for key, value in weights.items():
        new_key = _rename(key, rules, "vae")
        if ".mid.attn_1." in new_key and value.dim() == 2:
            value = value[:, :, None, None]  # diffusers Linear -> CompVis 1x1 Conv2d
        converted[new_key] = value
    return converted


def convert_text_encoder_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel weights -> keys under CompVis's `cond_stage_model.transformer.`."""
    converted = {}
    for key, value in weights.items():
        # transformers < 5 saves CLIPTextModel under `text_model.`; 5.x saves the text model's own keys.
        key = key if key.startswith("text_model.") else "text_model." + key
        if not key.startswith(TEXT_MODEL_PREFIXES):
            raise ValueError(f"unexpected text encoder weight {key!r}: SD v1 uses a plain CLIPTextModel")
        converted[key] = value
    return converted


def _rename(key: str, rules: dict[str, tuple[str, dict | None]], component: str) -> str:
    # Module prefixes end in "." and never nest, so at most one matches.
    for prefix, (new_prefix, renames) in rules.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if renames is None:
                return new_prefix + rest
            module, _, param = rest.rpartition(".")
            if module in renames:
                return f"{new_prefix}{renames[module]}.{param}"
    raise ValueError(f"unexpected {component} weight {key!r}: not part of an SD v1 {component}")


# --- files -------------------------------------------------------------------------------------
def _read_json(path: Path, hint: str = "") -> dict:
    if not path.is_file():
        raise ValueError(f"missing {path}" + (f" ({hint})" if hint else ""))
    return json.loads(path.read_text())


def _load_weights(folder: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in names:
        file = folder / name
        if file.is_file() and name.endswith(".safetensors"):
            return load_file(file)
        if file.is_file():
            return torch.load(file, map_location="cpu", weights_only=True)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise ValueError(f"no weights in {folder}: expected one of {', '.join(names)}; found {present}")
