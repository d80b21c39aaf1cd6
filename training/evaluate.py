"""Prompt adherence of the `shapes` model on held-out wordings, per backend, sampler and step count.

Prompts come from dataset.HELDOUT_TEMPLATES (phrase orders never used in training) and state every
attribute; `ldmrt.testing.adherence` parses each prompt and measures each image. Prompt i uses seed i.

Backends:
  eager-fp32, eager-bf16   ldmrt.load_model + the C++ sampling loop (ldmrt.testing.adherence.eager_generate)
  onnxruntime-fp32         an engine built with `Engine.build(backend="onnxruntime")`
  torch-bf16               an engine built with `Engine.build(backend="torch", fp16=True)` (bf16 on CPU)

    python training/evaluate.py --backends eager-fp32 onnxruntime-fp32 torch-bf16 \
        --samplers ddim dpmpp_2m --steps 20 50 --prompts 90

Fast modes (engine backends): --modes exact cache2 cache3 cache5 cut30 cut50 cache3+cut30 ... runs each mode and
reports, beside adherence, the PSNR and rel L2 of its images against the exact images of the same seeds:
  cacheN   feature caching (DeepCache): the full UNet every N-th step, its shallow branch between
  cutP     guidance truncation: no guidance on the last P% of the steps (guidance_interval (0, 1 - P/100))

Beyond the training size (engine backends): --sizes 128 256 generates at those sizes; mode hiresS makes them by the
hires fix instead (the model's 64 px, upscaled, img2img at strength S/100), mode tiled decodes in tiles:
    python training/evaluate.py --backends onnxruntime-fp32 --sizes 128 256 --modes exact tiled hires30 hires50 \
        hires30+tiled --prompts 90
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dataset
import ldmrt
from ldmrt.testing import adherence, mode_settings

ASSETS = Path(ldmrt.__file__).with_name("assets") / "shapes"
BACKENDS = ("eager-fp32", "eager-bf16", "onnxruntime-fp32", "torch-bf16")


def eager_images(model_dir: Path, dtype: torch.dtype):
    model = ldmrt.load_model(model_dir / "config.yaml", model_dir / "model.ckpt", dtype=dtype)

    def generate(prompts, sampler, steps, guidance):
        _, images = adherence.eager_generate(model, prompts, sampler=sampler, steps=steps, guidance_scale=guidance)
        return list(images)
    return generate


def engine_images(model_dir: Path, backend: str, fp16: bool, workdir: Path):
    from ldmrt.engine import Engine
    engine = Engine.build(config=str(model_dir / "config.yaml"), ckpt=str(model_dir / "model.ckpt"),
                          out_dir=workdir / f"{backend}-{fp16}", backend=backend, fp16=fp16, progress=None)

    def generate(prompts, sampler, steps, guidance, **fast):
        return [engine.generate(p, sampler=sampler, steps=steps, guidance_scale=guidance, seed=i,
                                output_type="np", **fast)[0] for i, p in enumerate(prompts)]
    return generate


def psnr(images, reference) -> float:
    mse = float(np.mean([(np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
                         for a, b in zip(images, reference)]))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def rel_l2(images, reference) -> float:
    a, b = np.stack(images).astype(np.float64), np.stack(reference).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_uint8(image) -> np.ndarray:
    """Engine images are HWC in [0, 1]; eager ones CHW in [-1, 1]."""
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return adherence.to_uint8_image(image)


def save_grid(images, path: Path, columns: int = 8, scale: int = 2):
    from PIL import Image
    tiles = [Image.fromarray(to_uint8(im)).resize((64 * scale, 64 * scale), Image.NEAREST) for im in images]
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * 64 * scale + (columns - 1) * 2, rows * 64 * scale + (rows - 1) * 2), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * (64 * scale + 2), (i // columns) * (64 * scale + 2)))
    grid.save(path)


def size_settings(mode: str, side: int) -> dict:
    """generate's settings of a mode at an image side. Parts joined by "+": hiresS (the hires fix from the model's
    size at strength S/100), tiled (tiled_decode=True), or a fast mode; without hiresS the images are made at that
    size directly (64: the model's own, no size given, as before)."""
    settings, direct = {}, True
    for part in mode.split("+"):
        if part.startswith("hires"):
            settings.update(hires=side, hires_strength=int(part[5:]) / 100)
            direct = False
        elif part == "tiled":
            settings["tiled_decode"] = True
        else:
            settings.update(mode_settings(part))
    if direct and side != 64:
        settings.update(height=side, width=side)
    return settings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ASSETS, help="folder with config.yaml, model.ckpt, vocab.txt")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=["eager-fp32"])
    ap.add_argument("--samplers", nargs="+", default=["ddim"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20])
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--prompts", type=int, default=90)
    ap.add_argument("--two-shape-prob", type=float, default=0.0, help="share of two-shape prompts")
    ap.add_argument("--grid", type=Path, help="save the first run's first 32 images as a PNG grid")
    ap.add_argument("--list-prompts", action="store_true", help="print the prompts and their scores")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["exact"], help="fast modes of engine backends (see above)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[64], help="image sizes (engine backends)")
    args = ap.parse_args(argv)
    if (args.modes != ["exact"] or args.sizes != [64]) and any(b.startswith("eager") for b in args.backends):
        raise SystemExit("--modes and --sizes need engine backends (onnxruntime-fp32, torch-bf16)")
    torch.set_num_threads(args.threads)
    prompts = [p for p, _ in dataset.evaluation_prompts(args.prompts, two_shape_prob=args.two_shape_prob)]

    print(f"{len(prompts)} held-out prompts, guidance {args.guidance}")
    print("| backend | sampler | steps | image | mode | background | colour | position | size | kind | all attributes "
          "| whole prompt | s/image | PSNR vs exact | rel L2 vs exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for backend in args.backends:
            if backend.startswith("eager"):
                generate = eager_images(args.model, torch.float32 if backend == "eager-fp32" else torch.bfloat16)
            else:
                name = backend.split("-")[0]
                generate = engine_images(args.model, name, backend.endswith("bf16"), Path(work))
            for sampler, steps, side in ((a, n, z) for a in args.samplers for n in args.steps for z in args.sizes):
                exact = None
                for mode in (["exact"] + [m for m in args.modes if m != "exact"]):
                    t0 = time.perf_counter()
                    images = generate(prompts, sampler, steps, args.guidance, **size_settings(mode, side))
                    per_image = (time.perf_counter() - t0) / len(prompts)
                    exact = images if exact is None else exact
                    if mode not in args.modes:
                        continue
                    scores = [adherence.score(p, to_uint8(im)) for p, im in zip(prompts, images)]
                    s = adherence.summarize(scores)
                    print(f"| {backend} | {sampler} | {steps} | {side}² | {mode} | " + " | ".join(
                        f"{100 * s.get(k, float('nan')):.0f}%" for k in
                        ("background", "colour", "position", "size", "kind", "attributes", "all"))
                        + f" | {per_image:.2f} | {psnr(images, exact):.1f} | {rel_l2(images, exact):.3f} |",
                        flush=True)
                if args.list_prompts:
                    for p, sc in zip(prompts, scores):
                        print("   ", "ok  " if all(sc.values()) else "FAIL", p,
                              " ".join(k for k, v in sc.items() if not v))
                if args.grid is not None:
                    save_grid(images[:32], args.grid)
                    args.grid = None


if __name__ == "__main__":
    main()
