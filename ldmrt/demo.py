"""`ldmrt demo`: the README's main job, the best end-to-end path that exists.

Today: the txt2img architecture at reduced width with random weights (no trained weights ship yet),
eager PyTorch on the CPU, classifier-free guidance, the C++ DDIM loop, the decoder, a PNG. The
image is noise-like by construction; the point is the whole path running.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "a red circle on a blue background"


def _vocab_tokenizer(words: list[str], max_length: int):
    """A WordPiece tokenizer over the demo prompt's words (random weights have no vocabulary of their own)."""
    from .tokenizer import BertTokenizer
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n")
        return BertTokenizer.from_file(path, max_length=max_length)


def save_png(image: torch.Tensor, path: Path):
    """(3, H, W) in [-1, 1] -> PNG, written to a temporary name and renamed."""
    from PIL import Image
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)


def run_demo(output="out.png", steps: int = 20, seed: int = 0, guidance_scale: float = 5.0):
    import ldmrt
    from .sampling import randn, sample
    from .testing import reduced_config

    t0 = time.perf_counter()
    cfg = reduced_config("txt2img")
    model = ldmrt.load_model(cfg, random_weights=True, seed=seed)
    max_len = cfg["params"]["cond_stage_config"]["params"].get("max_seq_len", 77)
    model.cond_stage_model.tokenizer = _vocab_tokenizer(PROMPT.split(), max_len)
    with torch.no_grad():
        context = model.get_learned_conditioning([PROMPT])
        uncond = model.get_learned_conditioning([""])
        both = torch.cat([uncond, context])
        x_T = torch.from_numpy(randn(seed, (1, 4, 32, 32)))

        def eps_fn(x, t):
            return model.apply_model(x, torch.full((x.shape[0],), t), both)

        latent = sample(eps_fn, x_T, sampler="ddim", steps=steps, alphas_cumprod=model.schedule_alphas_cumprod,
                        guidance_scale=guidance_scale, seed=seed)
        image = model.decode_first_stage(latent)[0]
    out = Path(output)
    save_png(image, out)
    print(f"ldmrt demo: wrote {out} ({image.shape[2]}x{image.shape[1]}) in {time.perf_counter() - t0:.1f} s\n"
          f"  path: txt2img architecture at reduced width, RANDOM weights (no trained model ships yet),\n"
          f"  eager PyTorch on CPU, prompt {PROMPT!r}, C++ DDIM loop, {steps} steps, guidance {guidance_scale},"
          f" seed {seed}")
    return np.asarray(image)
