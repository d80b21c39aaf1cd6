"""diffusers SD-v1 folder -> CompVis layout: ldmrt's models loaded from the converted weights must
compute what the diffusers/transformers models compute (tiny random models, float64, rel L2 <= 1e-10).

Needs the test extras diffusers and transformers (references only, never runtime dependencies).
"""
import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldmrt.config import instantiate_from_config  # noqa: E402
from ldmrt.diffusers_convert import convert_diffusers_folder  # noqa: E402
from ldmrt.models import ops  # noqa: E402
from helpers import import_compvis, model_index, needs_compvis, rel_l2, tiny_sd_components  # noqa: E402

TOL = 1e-10
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture(autouse=True)
def group_norm_in_input_precision(monkeypatch):
    """ldmrt's GroupNorm, as CompVis's GroupNorm32, computes in float32 even for float64 inputs (~1e-7
    off diffusers). Keeping float64 here lets the comparisons check the weights to 1e-10."""
    def group_norm(x, norm, silu=False):
        y = torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return torch.nn.functional.silu(y) if silu else y
    monkeypatch.setattr(ops, "group_norm", group_norm)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """(diffusers folder path, (unet, vae, text_encoder, scheduler) reference models in float64)."""
    root = tmp_path_factory.mktemp("diffusers") / "tiny-sd"
    unet, vae, text = tiny_sd_components()
    scheduler = diffusers.PNDMScheduler(**SCHEDULE, skip_prk_steps=True)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(model_index()))
    return root, (unet.double(), vae.double(), text.double(), scheduler)


@pytest.fixture(scope="module")
def converted(sd_folder):
    return convert_diffusers_folder(sd_folder[0])


def _build(cfg: dict, state: dict, prefix: str) -> torch.nn.Module:
    model = instantiate_from_config(cfg)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(sub, strict=True)
    return model.double().eval()


def test_config(converted):
    _, cfg = converted
    p = cfg["params"]
    assert cfg["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    schedule = (p["linear_start"], p["linear_end"], p["timesteps"], p["beta_schedule"])
    assert schedule == (0.00085, 0.012, 1000, "linear")
    assert p["scale_factor"] == 0.18215 and p["conditioning_key"] == "crossattn"
    unet = p["unet_config"]["params"]
    assert (unet["model_channels"], unet["channel_mult"], unet["num_res_blocks"]) == (32, [1, 2, 2], 2)
    assert (unet["attention_resolutions"], unet["num_heads"], unet["context_dim"]) == ([1, 2], 8, 32)
    dd = p["first_stage_config"]["params"]["ddconfig"]
    assert (dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]) == (32, [1, 2], 1, 4)
    assert p["cond_stage_config"]["params"]["num_hidden_layers"] == 2


def test_unet_matches_diffusers(sd_folder, converted):
    (_, (ref, _, _, _)), (state, cfg) = sd_folder, converted
    unet = _build(cfg["params"]["unet_config"], state, "model.diffusion_model.")
    torch.manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    t = torch.tensor([17, 903])
    with torch.no_grad():
        err = rel_l2(unet(x, t, context=context), ref(x, t, encoder_hidden_states=context).sample)
    print(f"unet eps rel L2 {err:.2e}")
    assert err <= TOL


def test_vae_matches_diffusers(sd_folder, converted):
    (_, (_, ref, _, _)), (state, cfg) = sd_folder, converted
    vae = _build(cfg["params"]["first_stage_config"], state, "first_stage_model.")
    torch.manual_seed(2)
    image, z = torch.randn(1, 3, 16, 16, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        decode_err = rel_l2(vae.decode(z), ref.decode(z).sample)
        encode_err = rel_l2(vae.encode(image).mean, ref.encode(image).latent_dist.mean)
    print(f"vae decode rel L2 {decode_err:.2e}, encode mean rel L2 {encode_err:.2e}")
    assert decode_err <= TOL and encode_err <= TOL


def test_text_encoder_matches_transformers(sd_folder, converted):
    (_, (_, _, ref, _)), (state, cfg) = sd_folder, converted
    text = _build(cfg["params"]["cond_stage_config"], state, "cond_stage_model.")
    ids = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = rel_l2(text(ids), ref(ids).last_hidden_state)
    print(f"text encoder rel L2 {err:.2e}")
    assert err <= TOL


def test_latent_diffusion_from_folder(sd_folder):
    """The whole model through the loader: eps, decoding of scaled latents, conditioning, schedule."""
    from ldmrt.checkpoint import load_model
    root, (unet, vae, text, scheduler) = sd_folder
    model = load_model(root, dtype=torch.float64)
    torch.manual_seed(4)
    ids = torch.randint(0, 99, (1, 12))
    x, z = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([500])
    with torch.no_grad():
        context = model.get_learned_conditioning(ids)
        errs = {
            "conditioning": rel_l2(context, text(ids).last_hidden_state),
            "eps": rel_l2(model.apply_model(x, t, context), unet(x, t, encoder_hidden_states=context).sample),
            "decode": rel_l2(model.decode_first_stage(z), vae.decode(z / vae.config.scaling_factor).sample),
        }
    schedule_err = rel_l2(model.alphas_cumprod, scheduler.alphas_cumprod)
    print(errs, f"alphas_cumprod rel L2 {schedule_err:.2e}")
    assert all(e <= TOL for e in errs.values())
    assert schedule_err <= 1e-6  # both float32 buffers, computed in float64 (CompVis) / float32 (diffusers)


def test_full_size_sd_v1_layout():
    """Stable Diffusion v1's real sizes (built on the meta device): the converted keys and shapes are
    exactly those of ldmrt's models built from the converted params, which equal the sd-v1 preset's."""
    from ldmrt.config import load_config
    from ldmrt.diffusers_convert import (convert_text_encoder_state_dict, convert_unet_state_dict,
                                         convert_vae_state_dict, scheduler_config, text_encoder_config,
                                         unet_config, vae_config)
    from ldmrt.models import AutoencoderKL, FrozenCLIPEmbedder, UNetModel
    preset = load_config("sd-v1")["params"]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # defaults: SD v1
        vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77))
        unet_params, vae_params = unet_config(dict(unet.config)), vae_config(dict(vae.config))
        text_params = text_encoder_config(text.config.to_dict())
        pairs = {
            "unet": (convert_unet_state_dict(unet.state_dict(), dict(unet.config)), UNetModel(**unet_params)),
            "vae": (convert_vae_state_dict(vae.state_dict(), dict(vae.config)), AutoencoderKL(**vae_params)),
            "text": (convert_text_encoder_state_dict(text.state_dict()),
                     FrozenCLIPEmbedder(**text_params).transformer),
        }
    for name, (converted_sd, model) in pairs.items():
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in converted_sd.items()} == shapes, name
    assert sum(v.numel() for v in pairs["unet"][0].values()) == 859_520_964

    # image_size / resolution are unused by these networks; use_checkpoint is training-only.
    expected_unet = {k: v for k, v in preset["unet_config"]["params"].items()
                     if k not in ("image_size", "use_checkpoint")}
    got_unet = {k: v for k, v in unet_params.items() if k != "image_size"}
    assert sorted(got_unet.pop("attention_resolutions")) == sorted(expected_unet.pop("attention_resolutions"))
    assert got_unet == expected_unet
    expected_vae = preset["first_stage_config"]["params"]
    assert vae_params["embed_dim"] == expected_vae["embed_dim"]
    assert {**vae_params["ddconfig"], "resolution": 256} == expected_vae["ddconfig"]
    sd_scheduler = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    assert {k: v for k, v in scheduler_config(sd_scheduler).items() if k in preset} == \
        {k: preset[k] for k in ("linear_start", "linear_end", "timesteps")}


def test_legacy_folder_layout(sd_folder, converted, tmp_path):
    """Older folders: .bin files, `text_model.`-prefixed CLIP keys with position_ids, and the VAE
    attention as query/key/value/proj_attn; and an fp16-variant file name. Same tensors must come out."""
    src, _ = sd_folder
    root = shutil.copytree(src, tmp_path / "legacy")
    from safetensors.torch import load_file
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae = {}
    for key, value in load_file(root / "vae" / "diffusion_pytorch_model.safetensors").items():
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        vae[key] = value
    torch.save(vae, root / "vae" / "diffusion_pytorch_model.bin")
    text = {"text_model." + k: v for k, v in load_file(root / "text_encoder" / "model.safetensors").items()}
    text["text_model.embeddings.position_ids"] = torch.arange(12)[None]
    torch.save(text, root / "text_encoder" / "pytorch_model.bin")
    for path in (root / "vae" / "diffusion_pytorch_model.safetensors", root / "text_encoder" / "model.safetensors"):
        path.unlink()
    unet_file = root / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.rename(unet_file.with_suffix(".fp16.safetensors"))

    state, cfg = convert_diffusers_folder(root)
    expected, expected_cfg = converted
    assert cfg == expected_cfg
    assert set(state) == set(expected) | {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.parametrize("file, change, message", [
    ("unet/config.json", {"use_linear_projection": True}, "SD2-style linear"),
    ("unet/config.json", {"upcast_attention": True}, "upcast"),
    ("unet/config.json", {"attention_head_dim": [5, 10, 20]}, "per block"),
    ("unet/config.json", {"in_channels": 5}, "in_channels=5"),  # a depth UNet (9: SD inpainting, supported)
    ("unet/config.json", {"addition_embed_type": "text_time"}, "SDXL"),
    ("scheduler/scheduler_config.json", {"prediction_type": "v_prediction"}, "v_prediction"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
    ("vae/config.json", {"down_block_types": ["AttnDownEncoderBlock2D"] * 2}, "vae blocks"),
    ("model_index.json", {"unet": ["diffusers", "UNet2DModel"]}, "not a Stable Diffusion v1"),
])
def test_unsupported_folders_raise(sd_folder, tmp_path, file, change, message):
    root = tmp_path / "folder"
    shutil.copytree(sd_folder[0], root)
    cfg = json.loads((root / file).read_text())
    (root / file).write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        convert_diffusers_folder(root)


@needs_compvis
def test_keys_match_compvis_modules(converted, monkeypatch):
    """The converted UNet/VAE keys and shapes equal those of CompVis's own modules built from the config."""
    import_compvis(monkeypatch, "ldm.modules.diffusionmodules.openaimodel")
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    state, cfg = converted
    unet = UNetModel(**cfg["params"]["unet_config"]["params"])
    vae_params = cfg["params"]["first_stage_config"]["params"]
    dd, embed_dim = vae_params["ddconfig"], vae_params["embed_dim"]
    vae = torch.nn.ModuleDict({"encoder": Encoder(**dd), "decoder": Decoder(**dd),
                               "quant_conv": torch.nn.Conv2d(2 * dd["z_channels"], 2 * embed_dim, 1),
                               "post_quant_conv": torch.nn.Conv2d(embed_dim, dd["z_channels"], 1)})
    reference = {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in unet.state_dict().items()}
    reference |= {f"first_stage_model.{k}": tuple(v.shape) for k, v in vae.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("cond_stage_model.")}
    assert ours == reference
