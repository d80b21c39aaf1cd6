"""LoRA files as weight deltas on ldmrt's parameter names (the CompVis module tree).

Two layouts are read, both naming modules the way diffusers does for SD v1:

- kohya / AUTOMATIC1111: `lora_unet_<module with _ for .>.lora_up.weight`, `.lora_down.weight`, `.alpha`, and
  `lora_te_...` for the CLIP text encoder; LoCon convolutions too (a kxk down conv, a 1x1 up conv).
- diffusers / PEFT: `unet.<module>.lora_A.weight` (down) / `.lora_B.weight` (up), `text_encoder.<module>...`, and
  diffusers' older `<module>.lora.down.weight`, `<module>.lora_linear_layer.down.weight` and attention-processor
  `<attn>.processor.to_q_lora.down.weight` forms.

Module names are matched by converting every target parameter's CompVis name to its diffusers name (the renaming
table is ldmrt/diffusers_convert.py's, read backwards), not by parsing the underscored kohya names, which are
ambiguous (`to_q`, `ff_net_0_proj`).

delta W = strength * (alpha / rank) * up @ down (alpha = rank when the file has none), convolutions flattened
to (out, in * kh * kw) for the product. What a backend applies is always base + the sum of the deltas of the
active set, computed from the stored base weights, so that any sequence of switches ends on the same bits.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from .diffusers_convert import unet_prefixes
from .errors import CheckpointError, InputError

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer."
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
# Suffix -> which factor; diffusers' forms first (they end in the kohya ones' words too).
FACTORS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
           ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
           ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
           "_lora.down.weight": "down", "_lora.up.weight": "up"}  # attention processors: to_q_lora.up.weight
# diffusers' attention processors hold to_q_lora ... beside the attention: the module they adapt.
ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' save_lora_weights: the PEFT configs, as JSON
PROCESSOR_LORAS = {"processor.to_q_lora": "to_q", "processor.to_k_lora": "to_k", "processor.to_v_lora": "to_v",
                   "processor.to_out_lora": "to_out.0"}


class LoraModule(NamedTuple):
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None


class LoraFile(NamedTuple):
    path: Path
    modules: dict[tuple[str, str], LoraModule]  # (component, diffusers-style module name) -> factors
    ignored: list[str]  # keys that are not LoRA factors this reader knows (DoRA scales, LoHa, ...)


class Applied(NamedTuple):
    """What one file of the active set changed: `matched` modules; left out: the file's modules this model lacks
    (`unmatched`) and its keys that are no LoRA factor ldmrt reads (`ignored`: DoRA scales, LoHa, ...)."""
    path: str
    strength: float
    matched: int
    unmatched: list[str]
    ignored: list[str]


def parse_specs(loras) -> list[tuple[str, float]]:
    """[(path, strength)] from a list of paths, (path, strength) pairs or "path:strength" strings."""
    if loras is None:
        return []
    if isinstance(loras, (str, Path)) or (isinstance(loras, tuple) and len(loras) == 2
                                          and isinstance(loras[1], (int, float))):
        raise InputError("loras takes a list, e.g. loras=[('file.safetensors', 0.8)]; [] is the base model")
    specs = []
    for item in loras:
        path, strength = (item if isinstance(item, (tuple, list)) else parse_spec(str(item)))
        strength = float(strength)
        if not math.isfinite(strength):
            raise InputError(f"LoRA strength of {path} is {strength}: give a finite number (1.0 is full strength)")
        specs.append((str(path), strength))
    return specs


def parse_spec(text: str) -> tuple[str, float]:
    """"file.safetensors:0.8" -> (file, 0.8); without ":strength" 1.0 (a path may itself hold ':')."""
    path, sep, strength = text.rpartition(":")
    if sep:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def read_lora(path) -> LoraFile:
    """The LoRA modules of a file in either layout (CheckpointError for unreadable files and bad factors)."""
    from .checkpoint import read_state_dict
    path = Path(path)
    state = read_state_dict(path)
    peft = adapter_configs(path)
    factors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    ignored = []
    for key, value in state.items():
        name = _module_name(key)
        if name is None:
            ignored.append(key)
            continue
        component, module, factor = name
        factors.setdefault((component, module), {})[factor] = value
    modules = {}
    for (component, module), parts in factors.items():
        if "up" not in parts or "down" not in parts:
            raise CheckpointError(f"{path}: LoRA module {module} has {', '.join(sorted(parts))} but not both up and "
                                  "down weights: the file is damaged or not a LoRA; download or save it again")
        up, down = parts["up"], parts["down"]
        if up.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] \
                or (up.dim() == 4 and up.shape[2:] != (1, 1)):
            raise CheckpointError(f"{path}: LoRA module {module} has up {tuple(up.shape)} and down "
                                  f"{tuple(down.shape)}, which do not multiply (up (out, rank[, 1, 1]) @ down (rank, "
                                  "in[, kh, kw])): the file is damaged or not a LoRA")
        alpha = float(parts["alpha"]) if "alpha" in parts else peft_alpha(peft.get(component), module, down.shape[0])
        modules[(component, module)] = LoraModule(up, down, alpha)
    if not modules:
        raise CheckpointError(f"{path} holds no LoRA weights (no lora_unet_*/lora_te_* .lora_up/.lora_down or "
                              f"unet.*/text_encoder.* .lora_A/.lora_B keys; first key: {next(iter(state), None)}): "
                              "pass a LoRA file in the kohya or diffusers layout")
    return LoraFile(path, modules, ignored)


def adapter_configs(path: Path) -> dict[str, dict]:
    """{component: PEFT LoraConfig fields} from the metadata diffusers saves beside PEFT weights (empty when the
    file has none: then alpha = rank)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(ADAPTER_METADATA)
    except Exception:  # not safetensors (read_state_dict took it as a PyTorch file): no such metadata
        return {}
    try:
        fields = json.loads(raw) if raw else {}
    except ValueError:
        raise CheckpointError(f"{path}: its {ADAPTER_METADATA} metadata is not JSON: the file is damaged; download "
                              "or save it again") from None
    configs: dict[str, dict] = {}
    for key, value in fields.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        if config.get("use_dora"):
            raise CheckpointError(f"{path}: its {component} adapter is DoRA (use_dora), which ldmrt does not apply; "
                                  "pass a plain LoRA file")
    return configs


def peft_alpha(config: dict | None, module: str, rank: int) -> float | None:
    """The alpha PEFT scales `module` with (alpha_pattern as PEFT matches it, else lora_alpha), as the alpha of
    alpha / rank (rsLoRA's alpha / sqrt(rank) folded in); None without a config."""
    if not config or config.get("lora_alpha") is None:
        return None
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)


def _module_name(key: str) -> tuple[str, str, str] | None:
    """(component, module, factor) of a LoRA key; module is diffusers' dotted name or, for kohya keys, the
    underscored one (matched against the underscored target names)."""
    factor = next((f for f in FACTORS if key.endswith(f)), None)
    if factor is None:
        return None
    stem = key[: -len(factor)]
    for prefix, component in KOHYA_PREFIXES.items():
        if stem.startswith(prefix) and "." not in stem:
            return component, stem[len(prefix):], FACTORS[factor]
    # diffusers' unet.save_attn_procs files name UNet modules without a component prefix
    component = "unet" if stem.startswith(UNET_BLOCKS) else "unknown"
    for prefix, name in DIFFUSERS_PREFIXES.items():
        if stem.startswith(prefix):
            component, stem = name, stem[len(prefix):]
            break
    if factor.startswith("_lora."):
        stem += "_lora"
        processor = next((p for p in PROCESSOR_LORAS if stem.endswith("." + p)), None)
        if processor is None:
            return None
        stem = stem[: -len(processor)] + PROCESSOR_LORAS[processor]
    return component, stem, FACTORS[factor]


# --- names ---------------------------------------------------------------------------------------------
def target_names(param_names, model_config: dict) -> dict[tuple[str, str], str]:
    """{(component, module name in diffusers' dotted and kohya's underscored forms): ldmrt weight name} for
    the UNet and CLIP text-encoder weights among `param_names`. model_config: the CompVis LatentDiffusion
    config (manifest["model"]["config"])."""
    params = model_config.get("params", {})
    unet_params = params.get("unet_config", {}).get("params")
    rules = unet_prefixes(_diffusers_unet_layout(unet_params)) if unet_params else {}
    inverse = [(new_prefix, prefix, {v: k for k, v in renames.items()} if renames else None)
               for prefix, (new_prefix, renames) in rules.items()]
    names = {}
    for name in param_names:
        if not name.endswith(".weight"):
            continue
        if name.startswith(UNET) and inverse:
            module = _diffusers_unet_module(name[len(UNET): -len(".weight")], inverse)
            component = "unet"
        elif name.startswith(TEXT + "text_model.") and ".embeddings." not in name:
            # not the token table: engines look tokens up from their own copy of it (textual inversion)
            module = name[len(TEXT): -len(".weight")]
            component = "text_encoder"
            names[(component, module[len("text_model."):])] = name  # PEFT files of transformers 5's layout
        else:
            continue
        if module is not None:
            names[(component, module)] = name
            names[(component, module.replace(".", "_"))] = name
    return names


def _diffusers_unet_layout(unet: dict) -> dict:
    """The diffusers UNet config fields diffusers_convert.unet_prefixes reads, of a CompVis UNetModel config."""
    mult = unet.get("channel_mult", (1, 2, 4, 4))
    attention = [2 ** level in unet.get("attention_resolutions", ()) for level in range(len(mult))]
    return {"down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            "layers_per_block": unet["num_res_blocks"],
            "block_out_channels": [unet["model_channels"] * m for m in mult]}


def _diffusers_unet_module(compvis_module: str, inverse) -> str | None:
    key = compvis_module + "."
    for compvis_prefix, diffusers_prefix, renames in inverse:
        if key.startswith(compvis_prefix):
            rest = key[len(compvis_prefix):-1]
            if renames is None:
                return diffusers_prefix + rest if rest else diffusers_prefix[:-1]
            return diffusers_prefix + renames[rest] if rest in renames else None
    return None


# --- deltas --------------------------------------------------------------------------------------------
def lora_deltas(specs: list[tuple[str, float]], targets: dict[str, tuple[int, ...]],
                model_config: dict) -> tuple[dict[str, torch.Tensor], list[Applied]]:
    """({ldmrt weight name: float32 delta summed over the files}, what each file matched) for the active set
    `specs` [(path, strength)]. targets: {weight name: shape} of what the backend can change.

    A file none of whose modules matches a target raises CheckpointError; files with some unmatched modules
    are applied and reported (a warning and Applied.unmatched)."""
    names = target_names(targets, model_config)
    deltas: dict[str, torch.Tensor] = {}
    applied = []
    for path, strength in specs:
        lora = read_lora(path)
        matched, unmatched = 0, []
        for (component, module), factors in lora.modules.items():
            name = names.get((component, module))
            if name is None:
                unmatched.append(f"{component}:{module}")
                continue
            delta = module_delta(factors, targets[name], f"{path}: LoRA module {module} for {name}")
            deltas[name] = deltas[name] + strength * delta if name in deltas else strength * delta
            matched += 1
        if not matched:
            raise CheckpointError(f"{path}: none of its {len(lora.modules)} LoRA modules is a module of this "
                                  f"engine's UNet or text encoder (first: {unmatched[0]}); ldmrt reads LoRAs of "
                                  "SD v1 models (kohya or diffusers layout): pass a LoRA made for this model")
        if unmatched:
            warnings.warn(f"{path}: {len(unmatched)} of its {len(lora.modules)} LoRA modules are not in this engine "
                          f"and were left out (first: {unmatched[0]})", stacklevel=3)
        if lora.ignored:
            warnings.warn(f"{path}: {len(lora.ignored)} keys are not LoRA up/down/alpha weights and were left out "
                          f"(first: {lora.ignored[0]}); the result may differ from the tool that made the file",
                          stacklevel=3)
        applied.append(Applied(str(path), strength, matched, unmatched, lora.ignored))
    return deltas, applied


def module_delta(factors: LoraModule, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """(alpha / rank) * up @ down, shaped as the weight (float32)."""
    up, down = factors.up.float().flatten(1), factors.down.float().flatten(1)
    rank = down.shape[0]
    fits = up.shape[0] == shape[0] and down.shape[1] == math.prod(shape[1:]) and \
        (factors.down.dim() == 2 or tuple(factors.down.shape[1:]) == tuple(shape[1:]))
    if not fits:
        raise CheckpointError(f"{where}: up {tuple(factors.up.shape)} @ down {tuple(factors.down.shape)} does not "
                              f"fit the weight {tuple(shape)}: the LoRA was made for another model (another size "
                              "or SD version); pass one made for this model")
    scale = 1.0 if factors.alpha is None else factors.alpha / rank
    return (scale * (up @ down)).reshape(shape)
