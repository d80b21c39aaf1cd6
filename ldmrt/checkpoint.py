"""Weights in and out: CompVis `.ckpt`, `.safetensors`, SD-v1 diffusers folders.

Every key is accounted for: a checkpoint that does not fit its config raises one `CheckpointError`
naming the missing, unexpected and mis-shaped keys, never a half-loaded model.
"""
from __future__ import annotations

import copy
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .config import instantiate_from_config, load_config
from .errors import CheckpointError

# Keys real checkpoints carry that inference does not use.
IGNORED_PREFIXES = ("model_ema.",)  # EMA shadows: read only when ema=True
IGNORED_SUFFIXES = (".position_ids",)  # old transformers' CLIP buffer, recomputed
IGNORED_KEYS = {"lvlb_weights", "logvar"}  # CompVis training buffers/params
# Schedule buffers: taken from the checkpoint when present, computed from the config when not
# (diffusers folders do not carry them).
SCHEDULE_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}
CONFIG_NAMES = ("config.yaml", "model.yaml", "v1-inference.yaml")


def is_diffusers_folder(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def _inert_class(qualname: str):
    """A do-nothing stand-in for a class pickled next to the weights (Lightning callbacks, numpy scalars).

    The real class is never imported or run: loading stays as safe as `weights_only=True`.
    """
    def ignore(self, *args, **kwargs):
        return None

    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": ignore, "__setstate__": ignore})


def checkpoint_format(path: Path) -> str | None:
    """"torch-zip", "torch" (legacy pickle), "safetensors", or None, from the file's first bytes (not its name)."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":  # a legacy (pre-1.6) torch.save pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return None


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise CheckpointError(f"{path} is truncated or corrupt (not a PyTorch checkpoint that loads safely "
                                  "with weights_only=True): download or save it again") from None
    # Lightning checkpoints pickle training state (callbacks, hparams) beside `state_dict`.
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    with torch.serialization.safe_globals([(_inert_class(n), n) for n in names]):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """The flat state dict of a `.ckpt`/`.pt`/`.pth`/`.bin` or `.safetensors` file.

    `ema=True` takes the EMA weights of a CompVis training checkpoint (`model_ema.*`) for the UNet.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (" as a file" if path.exists() else ""))
    kind = checkpoint_format(path)
    if kind is None:
        raise CheckpointError(f"{path} is not a checkpoint: neither a PyTorch file (zip or pickle) nor safetensors; "
                              "pass the .ckpt / .safetensors file itself")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
            # safetensors packs tensors back to back: realign them (torch allocates at 64 bytes), or
            # CPU kernels take other code paths and outputs differ in the last bits from the saved model's.
            for k, v in sd.items():
                if v.data_ptr() % 64:
                    sd[k] = v.clone()
        else:
            if kind == "torch-zip":  # torch does not check the zip's CRCs: a bad download would load as noise
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad is not None:
                    raise CheckpointError(f"{path} is corrupt ({bad} fails its CRC check): download or save it again")
            sd = _torch_load(path)
    except CheckpointError:
        raise
    except MemoryError:
        raise CheckpointError(f"{path} does not fit in memory (or its header claims so): is it a checkpoint?") from None
    except Exception as e:  # a damaged file fails in any of the unpickler's or safetensors' own ways
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({msg}): download or save it again") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state dict (a dict of tensors, possibly under 'state_dict')")
    return apply_ema(sd, path) if ema else sd


def apply_ema(sd: dict, path="checkpoint") -> dict:
    """Replace `model.*` weights by their CompVis LitEma shadows (named without dots)."""
    shadows = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith("model_ema.")}
    if not shadows:
        raise CheckpointError(f"{path} has no EMA weights (no model_ema.* keys): load it with ema=False")
    out = dict(sd)
    missing = []
    for k in sd:
        if k.startswith("model."):
            shadow = k[len("model."):].replace(".", "")
            if shadow in shadows:
                out[k] = shadows[shadow]
            else:
                missing.append(k)
    if missing:
        raise CheckpointError(f"{path}: EMA weights missing for {len(missing)} keys "
                              f"(first: {', '.join(missing[:3])}); load it with ema=False")
    return out


def _listing(keys: list, n: int = 5) -> str:
    return ", ".join(str(k) for k in keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_checked(model: nn.Module, sd: dict, source="checkpoint", assign: bool = False):
    """Load `sd` into `model`, or raise one error naming every key that does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and k not in SCHEDULE_KEYS]
    unexpected = [k for k in sd if k not in expected and not (
        k.startswith(IGNORED_PREFIXES) or k.endswith(IGNORED_SUFFIXES) or k in IGNORED_KEYS)]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = [f"{len(ks)} {what} ({_listing(ks)})" for what, ks in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("keys with wrong shapes", mismatched))
                 if ks]
        raise CheckpointError(f"{source} does not fit the model config: " + "; ".join(parts) +
                              ". Use the config the checkpoint was trained with (a preset such as sd-v1 or "
                              "txt2img, or the config.yaml published beside the checkpoint).")
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False, assign=assign)


def find_config_beside(ckpt) -> Path | None:
    folder = Path(ckpt).parent
    for name in CONFIG_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_model(model_or_config=None, ckpt=None, *, random_weights: bool = False, device="cpu",
               dtype: torch.dtype = torch.float32, ema: bool = False, tokenizer=None, seed: int = 0):
    """Build a `LatentDiffusion` (or any zoo module) and load its weights.

    model_or_config: a preset name (`ldmrt.config.preset_names()`), a CompVis config.yaml path, a config
    dict, or a diffusers folder; None takes the config.yaml beside `ckpt`. ckpt: `.ckpt`, `.safetensors`
    or a diffusers folder. `random_weights=True` (seeded by `seed`) needs no checkpoint. tokenizer: a
    tokenizer object or a folder with its files; by default it is looked for beside the checkpoint.
    """
    if is_diffusers_folder(model_or_config) and ckpt is None:
        model_or_config, ckpt = None, model_or_config
    if model_or_config is not None:
        load_config(model_or_config)  # an unknown model is said as such, before any question about weights
    if ckpt is None and not random_weights:
        from .config import shipped_checkpoint
        ckpt = shipped_checkpoint(model_or_config)
    sd = None
    if ckpt is not None and random_weights:
        raise ValueError("give a checkpoint or random_weights=True, not both")
    if ckpt is not None and is_diffusers_folder(ckpt):
        from .diffusers_convert import convert_diffusers_folder
        sd, diffusers_cfg = convert_diffusers_folder(ckpt)
        model_or_config = diffusers_cfg if model_or_config is None else model_or_config
    elif ckpt is not None:
        if model_or_config is None:
            model_or_config = find_config_beside(ckpt)
            if model_or_config is None:
                raise CheckpointError(f"no config for {ckpt}: name a preset or a config.yaml, or put the "
                                      "config.yaml published with the checkpoint beside it")
        sd = read_state_dict(ckpt, ema=ema)
    elif not random_weights:
        raise CheckpointError(f"no weights for {model_or_config}: it has none in the package; give its checkpoint "
                              "(--ckpt / ckpt=: a .ckpt, .safetensors or diffusers folder), or random weights "
                              "(--random-weights / random_weights=True) to test")
    if model_or_config is None:
        raise ValueError("no model: pass a preset name, a config.yaml or a config dict")
    cfg = load_config(model_or_config)
    if sd is not None:
        cfg = inpainting_config_for(cfg, sd)

    # Networks are built on the meta device first: their size is checked before anything is allocated, and a
    # checkpoint's tensors are then taken as they are (no random init, no second copy of the weights).
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    from .memory import check_model_memory
    check_model_memory(sum(t.numel() for t in [*model.parameters(), *model.buffers()]),
                       str(model_or_config if isinstance(model_or_config, (str, os.PathLike)) else "the model config"))
    if sd is None:
        with torch.random.fork_rng():  # seeded random weights, without reseeding the caller's generator
            torch.manual_seed(seed)
            model = instantiate_from_config(cfg)
    else:
        load_state_dict_checked(model, sd, source=str(ckpt), assign=True)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise CheckpointError(f"{ckpt} left {len(leftover)} tensors unset ({_listing(leftover)})")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.ldmrt_config = cfg  # the config it was built from: engines record it
    _attach_tokenizer(model, tokenizer, ckpt)
    return model


def inpainting_config_for(cfg: dict, sd: dict) -> dict:
    """`cfg`, or its SD inpainting variant (sd-v1-inpainting) when `sd` holds an SD inpainting UNet (a 9-channel
    conv_in: latent + mask + masked-image latent) and `cfg` is the text-to-image SD model (`--model sd-v1`); the
    reverse (a text-to-image checkpoint with the inpainting config) is refused naming the model to use."""
    conv_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    p = cfg.get("params", {})
    unet = p.get("unet_config", {}).get("params", {})
    latent = p.get("first_stage_config", {}).get("params", {}).get("embed_dim")
    cond = p.get("cond_stage_config")
    clip = isinstance(cond, dict) and str(cond.get("target", "")).endswith("FrozenCLIPEmbedder")
    if conv_in is None or conv_in.dim() != 4 or not clip or latent is None:
        return cfg
    channels, key = conv_in.shape[1], p.get("conditioning_key")
    if key == "hybrid" and channels == latent:
        raise CheckpointError("this checkpoint's UNet takes the latent alone (a text-to-image SD model), the config "
                              "is SD inpainting's: use --model sd-v1 (model='sd-v1') for it")
    if key not in (None, "crossattn") or unet.get("in_channels") != latent or channels != 2 * latent + 1:
        return cfg
    inpainting = copy.deepcopy(cfg)
    inpainting["target"] = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    inpainting["params"]["conditioning_key"] = "hybrid"
    inpainting["params"]["unet_config"]["params"]["in_channels"] = channels
    return inpainting


def tokenizer_spec(model) -> tuple[str, int] | None:
    """(kind, max_length) of the tokenizer the model's text encoder needs, or None if it takes no text."""
    cond = getattr(model, "cond_stage_model", None)
    if cond is None or not hasattr(cond, "tokenizer"):
        return None
    from .models.conditioners import FrozenCLIPEmbedder
    if isinstance(cond, FrozenCLIPEmbedder):
        return "clip", cond.max_length
    return "bert", cond.transformer.max_seq_len


def _attach_tokenizer(model, tokenizer, ckpt):
    spec = tokenizer_spec(model)
    if spec is None:
        return
    from .tokenizer import TokenizerNotFoundError, find_tokenizer
    kind, max_length = spec
    if tokenizer is False:  # the caller has none to give and wants no search (engine folders are closed)
        return
    if tokenizer is None and ckpt is not None:
        try:
            tokenizer = find_tokenizer(Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent, kind, max_length)
        except TokenizerNotFoundError:
            tokenizer = None  # the text encoder raises a clear error if text arrives without one
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = find_tokenizer(Path(tokenizer), kind, max_length)
    if tokenizer is not None:
        model.cond_stage_model.tokenizer = tokenizer


def save_checkpoint(model: nn.Module, path, *, extra: dict | None = None):
    """Write `model`'s state dict as a CompVis `.ckpt` ({"state_dict": ...}) or a `.safetensors` file,
    atomically: never a half-written checkpoint."""
    from .files import atomic_write
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        # safetensors refuses shared storage (e.g. first stage reused as cond stage): copy.
        seen, flat = set(), {}
        for k, v in sd.items():
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            flat[k] = v.clone() if key in seen else v
            seen.add(key)
        metadata = {"format": "pt", **{k: str(v) for k, v in (extra or {}).items()}}
        atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": sd, **(extra or {})}, tmp))
