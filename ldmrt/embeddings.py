"""Textual-inversion embeddings: the files SD v1 users bring, read into {trigger word: vectors (n, width)}.

- AUTOMATIC1111 `.pt`: {"string_to_param": {"*": tensor (n, width)}, "name": ..., ...}; trigger: the file's stem.
- AUTOMATIC1111 `.safetensors`: {"emb_params": tensor (n, width)}; trigger: the file's stem.
- diffusers `learned_embeds.safetensors` / `.bin`: {token: tensor (width,) or (n, width)}; trigger: the token.

Where a trigger word stands in a prompt (matched on its token ids, as the web UI does) it becomes n tokens whose
token-embedding rows are the file's vectors (ldmrt/prompts.py places them; ldmrt/pipeline.py looks them up).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError

A1111_SAFETENSORS_KEY = "emb_params"


def read_embedding_file(path, width: int) -> dict[str, torch.Tensor]:
    """{trigger word: float32 (n, width)} of a textual-inversion file; a CheckpointError names what does not fit."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"embedding file {path} does not exist")
    data = _read(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a textual-inversion embedding (it holds a {type(data).__name__})")
    if "string_to_param" in data:  # AUTOMATIC1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param must hold one tensor, it holds {len(params)}")
        found = {path.stem: next(iter(params.values()))}
    elif set(data) == {A1111_SAFETENSORS_KEY}:  # AUTOMATIC1111 .safetensors
        found = {path.stem: data[A1111_SAFETENSORS_KEY]}
    else:  # diffusers: {token: vector(s)}
        found = dict(data)
    out = {}
    for trigger, vectors in found.items():
        if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
            raise CheckpointError(f"{path}: the vectors of {trigger!r} are not a float tensor: not a textual-inversion "
                                  f"embedding (AUTOMATIC1111 .pt/.safetensors or diffusers learned_embeds)")
        vectors = (vectors[None] if vectors.dim() == 1 else vectors).detach().float()  # diffusers: one (width,)
        if vectors.dim() != 2 or vectors.shape[1] != width or not vectors.shape[0]:
            raise CheckpointError(f"{path}: {trigger!r} has vectors of shape {tuple(vectors.shape)}; this model's text "
                                  f"encoder takes (n, {width}): the embedding was trained for another model")
        if not trigger.strip():
            raise CheckpointError(f"{path}: an embedding has an empty trigger word: rename the file")
        out[trigger] = vectors.contiguous()
    return out


def _read(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None
    try:  # weights_only: tensors, dicts and plain values, never code (A1111 .pt files hold nothing else)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that wants code, or not a torch file at all
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be read as a textual-inversion embedding ({type(e).__name__}: "
                              f"{msg[:200]})") from None
