"""Model configurations: CompVis `config.yaml` files (target/params) and the presets of the zoo.

A config is the dict under `model:` of a CompVis yaml: {"target": "ldm....", "params": {...}}.
`instantiate_from_config` builds ldmrt's classes from the CompVis target names, so a user's
`config.yaml` is read as it is (training-only sections such as `data:` or `lossconfig` are ignored).
"""
from __future__ import annotations

import copy
import importlib
from pathlib import Path

import yaml

from .errors import ConfigError

PRESET_DIR = Path(__file__).with_name("presets")
MAX_CONFIG_BYTES = 4 << 20  # configs are kilobytes; a larger file is something else
ASSET_DIR = Path(__file__).with_name("assets")  # models that ship with their weights

# CompVis target -> ldmrt class ("module:attr"). Anything else is refused with the list of targets.
TARGETS = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": "ldmrt.models.ldm:LatentDiffusion",
    "ldm.models.diffusion.ddpm.Layout2ImgDiffusion": "ldmrt.models.ldm:LatentDiffusion",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": "ldmrt.models.ldm:LatentInpaintDiffusion",
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": "ldmrt.models.unet:UNetModel",
    "ldm.models.autoencoder.AutoencoderKL": "ldmrt.models.autoencoder:AutoencoderKL",
    "ldm.models.autoencoder.VQModel": "ldmrt.models.autoencoder:VQModel",
    "ldm.models.autoencoder.VQModelInterface": "ldmrt.models.autoencoder:VQModelInterface",
    "ldm.models.autoencoder.IdentityFirstStage": "ldmrt.models.autoencoder:IdentityFirstStage",
    "ldm.modules.encoders.modules.BERTEmbedder": "ldmrt.models.conditioners:BERTEmbedder",
    "ldm.modules.encoders.modules.TransformerEmbedder": "ldmrt.models.conditioners:TransformerEmbedder",
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": "ldmrt.models.conditioners:FrozenCLIPEmbedder",
    "ldm.modules.encoders.modules.ClassEmbedder": "ldmrt.models.conditioners:ClassEmbedder",
    "ldm.modules.encoders.modules.SpatialRescaler": "ldmrt.models.conditioners:SpatialRescaler",
    "torch.nn.Identity": "torch.nn:Identity",
}


def preset_names() -> list[str]:
    shipped = [p.parent.name for p in ASSET_DIR.glob("*/config.yaml")]
    return sorted({p.stem for p in PRESET_DIR.glob("*.yaml")} | set(shipped))


def shipped_checkpoint(name) -> Path | None:
    """The weights that ship inside the package for preset `name` (ldmrt/assets/NAME/model.ckpt), if any."""
    path = ASSET_DIR / str(name) / "model.ckpt"
    return path if isinstance(name, str) and path.is_file() else None


def load_config(model: str | Path | dict) -> dict:
    """The `model` config ({"target", "params"}) of a preset name, a CompVis yaml path, or a dict."""
    if isinstance(model, dict):
        cfg = model
    else:
        path = Path(model)
        if not path.suffix and (PRESET_DIR / f"{model}.yaml").exists():
            path = PRESET_DIR / f"{model}.yaml"
        elif not path.suffix and (ASSET_DIR / str(model) / "config.yaml").exists():
            path = ASSET_DIR / str(model) / "config.yaml"
        if path.is_dir() and (path / "model_index.json").is_file():
            raise ConfigError(f"{path} is a diffusers folder: pass it as the model (or as the checkpoint)")
        if not path.is_file():
            raise ConfigError(f"unknown model {str(model)!r}: presets are {', '.join(preset_names())}; or pass a "
                              "CompVis config.yaml or a diffusers folder")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {path.stat().st_size >> 20} MB, not a model config (a YAML text file)")
        try:
            cfg = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file, so not a model config (a CompVis config.yaml): did you "
                              "pass the checkpoint as the config?") from None
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if isinstance(cfg, dict) and "model" in cfg:
        cfg = cfg["model"]
    if not isinstance(cfg, dict) or "target" not in cfg:
        raise ConfigError("a model config needs `target` and `params` (the `model:` section of a CompVis "
                          "config.yaml)")
    return copy.deepcopy(cfg)


def resolve_target(target: str):
    if not isinstance(target, str) or target not in TARGETS:
        raise ConfigError(f"unsupported target {target!r}; ldmrt builds: {', '.join(sorted(TARGETS))}")
    module, attr = TARGETS[target].split(":")
    return getattr(importlib.import_module(module), attr)


def instantiate_from_config(cfg: dict):
    if not isinstance(cfg, dict) or "target" not in cfg:
        raise ConfigError(f"a model config needs `target` and `params`; got {type(cfg).__name__} {str(cfg)[:80]!r}")
    cls = resolve_target(cfg["target"])
    params = cfg.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"the params of {cfg['target']} must be a mapping, not {type(params).__name__}")
    try:
        return cls(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, AssertionError,
            RuntimeError, OverflowError) as e:  # a config the network cannot be built from, said where
        raise ConfigError(f"cannot build {cfg['target']} from its params ({type(e).__name__}: {e})") from None
