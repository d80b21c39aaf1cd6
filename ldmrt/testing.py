"""Reduced-width versions of the zoo configs: the same architecture families, small enough for tests.

Used by the test suite and by `ldmrt demo` (until the shipped model lands) to run every model family
end to end on a CPU in seconds.
"""
from __future__ import annotations

from .config import load_config

WIDTH = 32  # GroupNorm uses 32 groups: every channel count must stay a multiple of 32


def reduced_config(model, width: int = WIDTH) -> dict:
    """`model`'s config with channels, depths, codebook and text encoder shrunk; conditioning kept."""
    cfg = load_config(model)
    p = cfg["params"]
    unet = p["unet_config"]["params"]
    unet.update(model_channels=width, num_res_blocks=1)
    if "context_dim" in unet:
        unet["context_dim"] = width
    if unet.get("transformer_depth"):
        unet["transformer_depth"] = 1
    first = p["first_stage_config"]["params"]
    first["ddconfig"].update(ch=width, num_res_blocks=1)
    if "n_embed" in first:
        first["n_embed"] = 64
    cond = p["cond_stage_config"]
    if isinstance(cond, dict):
        target, cp = cond["target"].rsplit(".", 1)[-1], cond.setdefault("params", {})
        if target in ("BERTEmbedder", "TransformerEmbedder"):
            cp.update(n_embed=width, n_layer=1)
        elif target == "FrozenCLIPEmbedder":
            cp.update(hidden_size=width, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * width)
        elif target == "ClassEmbedder":
            cp.update(embed_dim=width)
    return cfg
