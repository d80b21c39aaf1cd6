"""The same random weights for every runtime: diffusers components saved as a diffusers SD-v1 folder, which
ldmrt loads through its converter (ldmrt.diffusers_convert), so ldmrt and the peers compute the same network.

Two sizes: "sd-v1" (the real SD-v1 architecture: UNet 860M, VAE 84M, CLIP ViT-L/14 text tower 123M parameters)
and "tiny" (the same block structure at width 32, for tests).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

# diffusers / transformers constructor arguments per architecture
ARCHITECTURES = {
    "sd-v1": {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                     layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "vae": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    latent_channels=4, sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4),
        "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
    },
    "tiny": {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                     layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        "vae": dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                    latent_channels=4, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2),
        "text_encoder": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu"),
    },
}


@dataclass
class Peers:
    """The diffusers/transformers modules (float32, eval) and facts the harness needs about them."""
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    latent_factor: int  # image pixels per latent pixel
    context_dim: int
    max_length: int
    vocab_size: int
    scaling_factor: float


def make_peers(architecture: str, seed: int = 0) -> Peers:
    """Random diffusers SD-v1 components of `architecture` (diffusers' own initialisation, seeded)."""
    import diffusers
    import transformers

    arch = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**arch["unet"])
    vae = diffusers.AutoencoderKL(**arch["vae"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **arch["text_encoder"], bos_token_id=0, eos_token_id=2, pad_token_id=1))
    for module in (unet, vae, text):
        module.eval().requires_grad_(False)
    return Peers(unet, vae, text, latent_factor=2 ** (len(arch["vae"]["block_out_channels"]) - 1),
                 context_dim=arch["unet"]["cross_attention_dim"],
                 max_length=arch["text_encoder"]["max_position_embeddings"],
                 vocab_size=arch["text_encoder"]["vocab_size"], scaling_factor=vae.config.scaling_factor)


def save_diffusers_folder(peers: Peers, root: Path) -> Path:
    """Write `peers` as a diffusers StableDiffusionPipeline folder (what ldmrt.load_model reads)."""
    import diffusers

    root = Path(root)
    peers.unet.save_pretrained(root / "unet")
    peers.vae.save_pretrained(root / "vae")
    peers.text_encoder.save_pretrained(root / "text_encoder")
    diffusers.PNDMScheduler(**SCHEDULE, skip_prk_steps=True).save_pretrained(root / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root
