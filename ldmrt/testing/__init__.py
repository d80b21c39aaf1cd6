"""What the tests, benchmarks and training share, and the runtime does not use.

    reduced_config        the zoo's configs at reduced width: every model family end to end on a CPU in seconds
    write_clip_tokenizer  CLIP BPE files (vocab.json + merges.txt) for a few words, in the real format
    mode_settings         generate's settings of a named fast mode (cacheN, cutP, joined by +; the benchmarks')
    adherence             the shipped model's prompt-adherence evaluator (training, tests, the GPU benchmark)
    sampling_reference    float64 reference loops the C++ samplers are held to (tests, benchmarks)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import load_config

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


def clip_alphabet() -> dict[int, str]:
    """CLIP's byte -> unicode table (printable bytes as themselves, the rest shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = dict(zip(keep, map(chr, keep)))
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


def write_clip_tokenizer(folder, words) -> int:
    """vocab.json + merges.txt of a byte-level BPE whose merges assemble each of `words`; returns the vocab size."""
    folder = Path(folder)
    alphabet = clip_alphabet()
    merges = []
    for word in words:  # merges that assemble each word left to right, the last symbol ending in </w>
        symbols = [alphabet[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
    tokens = [*alphabet.values(), *(c + "</w>" for c in alphabet.values()), *("".join(m) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    return len(tokens)


def mode_settings(mode: str) -> dict:
    """generate's settings of a fast mode: "exact", "cacheN" (feature caching every N-th step), "cutP" (no
    guidance on the last P% of the steps), or several joined by "+"."""
    settings = {}
    for part in mode.split("+"):
        if part.startswith("cache"):  # cacheN, or cacheNq: the quadratic schedule
            settings["cache_interval"] = int(part[5:].rstrip("q"))
            if part.endswith("q"):
                settings["cache_schedule"] = "quadratic"
        elif part.startswith("cut"):
            settings["guidance_interval"] = (0.0, 1 - int(part[3:]) / 100)
        elif part != "exact":
            raise ValueError(f"unknown mode {part!r}: exact, cacheN, cutP, joined by +")
    return settings
