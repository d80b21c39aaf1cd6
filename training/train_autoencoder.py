"""Stage 1 of the `shapes` model: the KL-regularised autoencoder (KL-f4, 64x64x3 -> 16x16x3).

The loss is the paper's first-stage objective without its perceptual and adversarial terms (flat
shapes need neither): a per-image reconstruction loss summed over pixels plus kl_weight times the KL
divergence of the posterior to N(0, 1), as CompVis's LPIPSWithDiscriminator weighs them. The
reconstruction loss is L1 + L2: L2 weighs the few large errors (a shape's colour) over the many small
ones of the background.

The network is convolutional (its one attention layer is global at the lowest resolution): most
steps train on random 32x32 crops, 4x cheaper, and the last --full-res-share on whole images.

    python training/train_autoencoder.py --out shapes-run
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import dataset
from ldmrt.config import instantiate_from_config, load_config

CONFIG = Path(__file__).with_name("shapes.yaml")


def kl_to_standard_normal(posterior) -> torch.Tensor:
    """Per-image KL(posterior || N(0, I)), summed over latent dims (CompVis DiagonalGaussianDistribution.kl)."""
    return 0.5 * (posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar).flatten(1).sum(1)


def crop_near(image: torch.Tensor, shape, size: int, rng) -> torch.Tensor:
    """A size x size crop of a (3, RES, RES) image whose centre lies within size/3 of the shape's."""
    lo, hi = 0, dataset.RES - size
    i = int(np.clip(shape.cy - size / 2 + rng.uniform(-size / 3, size / 3), lo, hi))
    j = int(np.clip(shape.cx - size / 2 + rng.uniform(-size / 3, size / 3), lo, hi))
    return image[:, i:i + size, j:j + size]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for autoencoder.pt and the log")
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=16, help="images (crops) per step")
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--full-res-share", type=float, default=0.2, help="share of final steps on whole images")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bfloat16 autocast (about 2x faster on CPUs with AVX512-BF16/AMX)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    ae = instantiate_from_config(load_config(CONFIG)["params"]["first_stage_config"]).train()
    opt = torch.optim.AdamW(ae.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    start = time.time()
    for step in range(1, args.steps + 1):
        full_res = step > args.steps * (1 - args.full_res_share)
        images, scenes = dataset.batch(rng, args.batch // 4 if full_res else args.batch)
        x = dataset.to_tensor(images)
        if not full_res:  # crops around a shape (most of an image is background)
            x = torch.stack([crop_near(im, sc.shapes[0], args.crop, rng) for im, sc in zip(x, scenes)])
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            posterior = ae.encode(x)
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape)
            rec = ae.decode(z)
        err = rec.float() - x
        rec_loss = (err.abs() + err ** 2).flatten(1).sum(1).mean()
        kl = kl_to_standard_normal(posterior).float().mean()
        loss = rec_loss + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step} L1/px {err.abs().mean().item():.4f} kl {kl.item():.1f} "
                  f"lr {sched.get_last_lr()[0]:.2e} {time.time() - start:.0f}s", flush=True)
        if step % 250 == 0 or step == args.steps:
            torch.save(ae.state_dict(), args.out / "autoencoder.pt")
    print(f"done in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
