"""Install a trained `shapes` model into the package: ldmrt/assets/shapes/{config.yaml, model.ckpt,
vocab.txt} from a train_ldm.py output folder, and golden.npz: the final latent of one held-out prompt
(eager fp32, fixed seed and sampler) that tests/test_shapes_model.py checks reproduction against.

    python training/export_assets.py /work/scratch/shapes
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

import ldmrt
from ldmrt.testing import adherence

ASSETS = Path(ldmrt.__file__).with_name("assets") / "shapes"
GOLDEN = dict(prompt="in the top left, a large red circle on a white background", sampler="ddim", steps=10,
              guidance=5.0, seed=0)
FILES = ("config.yaml", "model.ckpt", "vocab.txt")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trained", type=Path, help="the --out folder of train_ldm.py")
    ap.add_argument("--assets", type=Path, default=ASSETS)
    args = ap.parse_args(argv)
    args.assets.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(args.trained / name, args.assets / name)
    torch.set_num_threads(1)
    model = ldmrt.load_model(args.assets / "config.yaml", args.assets / "model.ckpt")
    latents, _ = adherence.eager_generate(model, [GOLDEN["prompt"]], sampler=GOLDEN["sampler"], steps=GOLDEN["steps"],
                                          guidance_scale=GOLDEN["guidance"], seed=GOLDEN["seed"])
    np.savez(args.assets / "golden.npz", latent=latents.numpy(), **GOLDEN)
    total = sum((args.assets / f).stat().st_size for f in (*FILES, "golden.npz"))
    print(f"wrote {args.assets} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
