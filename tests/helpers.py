"""What many test modules share: the relative L2 error every numerical claim is stated in, and the CompVis
source (LDMRT_COMPVIS_SRC, LDMRT_TAMING_SRC) that the parity tests import, with its optional dependencies
stubbed where they are not installed."""
from __future__ import annotations

import importlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldmrt.testing import write_clip_tokenizer

COMPVIS_SRC = os.environ.get("LDMRT_COMPVIS_SRC")
needs_compvis = pytest.mark.skipif(not COMPVIS_SRC, reason="set LDMRT_COMPVIS_SRC to a CompVis latent-diffusion "
                                   "checkout to run parity tests")


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64, for tensors or arrays (0 when both are 0)."""
    a = a.detach().double().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = b.detach().double().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def import_compvis(mp: pytest.MonkeyPatch, module: str):
    """`module` from the CompVis source (skips without LDMRT_COMPVIS_SRC). Its imports that inference does not
    need are stubbed when not installed: omegaconf's ListConfig (an isinstance check), pytorch_lightning (a base
    class), clip and kornia (unused encoders), tqdm (progress), taming's quantizer (VQ models; the real one with
    LDMRT_TAMING_SRC)."""
    if not COMPVIS_SRC:
        pytest.skip("set LDMRT_COMPVIS_SRC to a CompVis latent-diffusion checkout to run parity tests")
    mp.syspath_prepend(COMPVIS_SRC)
    if os.environ.get("LDMRT_TAMING_SRC"):
        mp.syspath_prepend(os.environ["LDMRT_TAMING_SRC"])
    listconfig = types.ModuleType("omegaconf.listconfig")
    listconfig.ListConfig = type("ListConfig", (list,), {})
    quantize = types.ModuleType("taming.modules.vqvae.quantize")
    quantize.VectorQuantizer2 = None
    stubs = {"omegaconf.listconfig": {"omegaconf": types.ModuleType("omegaconf"), "omegaconf.listconfig": listconfig},
             "pytorch_lightning": {"pytorch_lightning": types.SimpleNamespace(LightningModule=nn.Module)},
             "clip": {"clip": types.ModuleType("clip")}, "kornia": {"kornia": types.ModuleType("kornia")},
             "tqdm": {"tqdm": types.SimpleNamespace(tqdm=lambda it, **kw: it)},
             "taming.modules.vqvae.quantize": {**{n: types.ModuleType(n) for n in
                                                  ("taming", "taming.modules", "taming.modules.vqvae")},
                                               "taming.modules.vqvae.quantize": quantize}}
    for needed, modules in stubs.items():
        try:
            importlib.import_module(needed)
        except ImportError:
            for name, stub in modules.items():
                mp.setitem(sys.modules, name, stub)
    return importlib.import_module(module)


def has_real_taming() -> bool:
    return getattr(sys.modules.get("taming.modules.vqvae.quantize"), "VectorQuantizer2", None) is not None


# --- diffusers folders, written here in the real format -------------------------------------------------------


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    # Default inits zero some outputs (or leave norms at identity): perturb everything so that every
    # tensor, and so every renamed key, matters for the outputs compared.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def tiny_sd_components(vocab_size: int = 99, bos: int = 0, eos: int = 2, pad: int = 1, max_positions: int = 12,
                       unet_in_channels: int = 4):
    """diffusers' UNet and VAE and transformers' CLIP text model of the SD-v1 layout, tiny and random
    (unet_in_channels=9: the SD inpainting UNet's, latent + mask + masked-image latent)."""
    import diffusers
    import transformers
    torch.manual_seed(0)
    # SD v1's block pattern on 3 levels: attention on the first two, none on the deepest, so both
    # output-block upsampler positions (after a resnet, after an attention) occur.
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=unet_in_channels, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_positions, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad))
    return _randomize(unet), _randomize(vae), _randomize(text)


def model_index(pipeline: str = "StableDiffusionPipeline") -> dict:
    import diffusers
    return {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"]}



def write_tiny_sd_folder(root, words, inpainting: bool = False) -> Path:
    """A diffusers SD-v1 folder as diffusers saves it (tiny random models), with a CLIP tokenizer for `words`;
    `inpainting`: an SD inpainting folder (StableDiffusionInpaintPipeline, 9-channel UNet)."""

    import diffusers
    root = Path(root)
    vocab = write_clip_tokenizer(root / "tokenizer", words)
    unet, vae, text = tiny_sd_components(vocab_size=vocab, bos=vocab - 2, eos=vocab - 1, pad=vocab - 1,
                                         max_positions=77, unet_in_channels=9 if inpainting else 4)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            skip_prk_steps=True).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(model_index("StableDiffusionInpaintPipeline" if inpainting
                                                                  else "StableDiffusionPipeline")))
    return root


def diffusers_pipeline(folder):
    """diffusers' StableDiffusionPipeline of a folder write_tiny_sd_folder wrote."""
    import warnings

    import diffusers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny scheduler config's deprecation notices
        return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False)


def write_kohya_lora(path, folder, *, seed: int, rank: int = 4, alpha: float = 2.0) -> Path:
    """A random LoRA in the kohya layout (lora_up/lora_down/alpha) for the diffusers SD-v1 folder `folder`: every
    Linear and Conv2d of the UNet's blocks (LoCon: kxk down convs, 1x1 up convs) and of the text encoder, named
    as kohya's scripts name them (diffusers' module names with `_` for `.`)."""
    from safetensors.torch import save_file
    pipe = diffusers_pipeline(folder)
    modules = [("lora_unet_" + name, m) for name, m in pipe.unet.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and name.startswith(("down_blocks", "mid_block", "up_blocks"))
               and "samplers" not in name]
    # transformers 5 saves CLIPTextModel without its `text_model.` level; kohya's names have it
    modules += [("lora_te_" + (name if name.startswith("text_model.") else "text_model." + name), m)
                for name, m in pipe.text_encoder.named_modules() if isinstance(m, nn.Linear)]
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in modules:
        key = name.replace(".", "_")
        out_features, *rest = module.weight.shape
        up = (out_features, rank, *([1] * len(rest[1:])))
        state[f"{key}.lora_down.weight"] = 0.1 * torch.randn(rank, *rest, generator=gen)
        state[f"{key}.lora_up.weight"] = 0.1 * torch.randn(up, generator=gen)
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return Path(path)


def write_peft(folder, out_dir, *, seed, rank=4):
    """A random LoRA saved by diffusers itself from PEFT adapters (unet.*/text_encoder.* lora_A/lora_B keys, the
    adapter configs with lora_alpha != rank in the file's metadata)."""
    import diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(seed)
    pipe = diffusers_pipeline(folder)
    unet_cfg = LoraConfig(r=rank, lora_alpha=8, init_lora_weights=False,
                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                          "ff.net.2", "conv1", "conv2", "time_emb_proj"])
    text_cfg = LoraConfig(r=rank, lora_alpha=2, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    inject_adapter_in_model(unet_cfg, pipe.unet)
    inject_adapter_in_model(text_cfg, pipe.text_encoder)  # transformers' add_adapter wants a newer peft
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    return out_dir / "pytorch_lora_weights.safetensors"


# --- the READMEs' code blocks ---------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def code_blocks(readme) -> list[tuple[str, str]]:
    """(language, text) of each fenced block of `readme` (a path relative to the repository)."""
    import re
    text = (ROOT / readme).read_text(encoding="utf-8")
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.M | re.S)]


def substitute(text: str, table: dict[str, str]) -> str:
    """`text` with each key of `table` replaced; every key must occur (a stale entry fails the test)."""
    for old, new in table.items():
        assert old in text, f"substitution {old!r} no longer matches the README block:\n{text}"
        text = text.replace(old, new)
    return text


def run_sh(text: str, cwd, env: dict | None = None, timeout: int = 900):
    """Run a README shell block with bash -e in `cwd`, the test's Python first on PATH; fail with its output."""
    import subprocess
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=cwd, env=environ, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"README block failed ({result.returncode}):\n{text}\n{result.stdout}\n{result.stderr}"
    return result
