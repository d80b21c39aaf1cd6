"""What tiled first-stage decoding and encoding (ldmrt/tiling.py) change, on the shipped model's trained autoencoder.

Pictures of known content: mosaics of N x N scenes rendered as in training (training/dataset.py, 64 px each),
so 128 px (N = 2) and 256 px (N = 4) pictures made of what the autoencoder was trained on. For each: the whole
encode -> decode, and the same in tiles of the model's own latent size (16, overlap 8, margin 2: what
`tiled_decode` uses, ldmrt.tiling.overlap_and_margin),
compared with each other (max and mean absolute difference in 0..255 levels) and with the picture (PSNR, dB).
The seam check, on flat pictures (any step there is a seam): the largest step between neighbouring pixel columns
where tiles meet against the largest elsewhere, for this tiling, a quarter's overlap without margin and a hard cut.

    python -m benchmarks.tiling [--mosaics 2 4] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def mosaic(n: int, seed: int) -> torch.Tensor:
    """(1, 3, 64n, 64n) in [-1, 1]: n x n training scenes."""
    sys.path.insert(0, str(ROOT / "training"))
    import dataset
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([dataset.render(dataset.random_scene(rng), rng) for _ in range(n)], axis=1)
            for _ in range(n)]
    return torch.from_numpy(np.concatenate(rows, axis=0)).permute(2, 0, 1)[None].float() / 127.5 - 1


def seam_steps(image: torch.Tensor, factor: int, tile: int, overlap: int, border: int = 8) -> tuple[float, float]:
    """(largest step between neighbouring pixel columns where tiles meet, largest elsewhere), each step the mean over
    rows and channels, in 0..255 levels for images in [-1, 1]: a seam is a step down a whole column. Where tiles
    meet: their overlaps (with overlap 0, the columns either side of a cut); elsewhere excludes `border` pixels at
    the picture's edges, where a decoder has border effects of its own."""
    from ldmrt.tiling import tile_starts
    steps = image.diff(dim=-1).abs().mean(dim=(0, 1, 2)) * 127.5
    length = image.shape[-1] // factor
    starts = tile_starts(length, tile, overlap)
    meet = set()
    for prev, nxt in zip(starts, starts[1:]):
        lo, hi = nxt * factor, (prev + tile) * factor  # the shared pixels (none for a hard cut)
        meet |= set(range(lo - 1, max(hi, lo + 1)))
    inside = [i for i in sorted(meet) if 0 <= i < steps.numel()]
    outside = [i for i in range(border, steps.numel() - border) if i not in meet]
    return float(steps[inside].max()) if inside else float("nan"), float(steps[outside].max())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(-1, 1) - b) ** 2).mean()) / 4  # on [0, 1]
    return 10 * np.log10(1 / mse)


def flat_pictures(side: int) -> dict[str, torch.Tensor]:
    """Pictures with no edges of their own, where any step is a seam: backgrounds of the training set, a gradient."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    ones = torch.ones(side, side)
    return {"white": torch.ones(1, 3, side, side), "gray": torch.zeros(1, 3, side, side),
            "black": -torch.ones(1, 3, side, side), "blue": torch.stack([-ones, -ones, ones])[None],
            "gradient": torch.stack([xx * 2 - 1, yy * 2 - 1, xx - yy])[None]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mosaics", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import ldmrt
    from ldmrt.export.graphs import DecoderGraph, EncoderGraph
    from ldmrt.tiling import decode_tiled, encode_tiled, overlap_and_margin
    torch.set_num_threads(2)
    model = ldmrt.load_model("shapes").eval()
    decoder, encoder = DecoderGraph(model), EncoderGraph(model)
    factor, tile = 4, 64 // 4
    overlap, margin = overlap_and_margin(tile)
    print(f"tiles of {tile} latent px, overlap {overlap}, margin {margin}\n")
    print("| picture | decode: tiled vs whole, max / mean (levels) | PSNR whole | PSNR tiled | encode: tiled vs whole "
          "latent mean, rel L2 | PSNR of decode(tiled encode) |\n|---|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for n in args.mosaics:
            picture = mosaic(n, args.seed)
            mean, _ = encoder(picture)
            whole = decoder(mean)
            tiled = decode_tiled(decoder, mean, factor, tile, overlap, margin)
            diff = (tiled.clamp(-1, 1) - whole.clamp(-1, 1)).abs() * 127.5
            tiled_mean, _ = encode_tiled(encoder, picture, factor, tile, overlap, margin)
            rel = float((tiled_mean - mean).norm() / mean.norm())
            again = decode_tiled(decoder, tiled_mean, factor, tile, overlap, margin)
            print(f"| {64 * n}² ({n}x{n} scenes) | {diff.max():.0f} / {diff.mean():.1f} | {psnr(whole, picture):.1f} | "
                  f"{psnr(tiled, picture):.1f} | {rel:.3f} | {psnr(again, picture):.1f} |", flush=True)
        layouts = {"whole": None, f"overlap {overlap}, margin {margin}": (overlap, margin),
                   f"overlap {tile // 4}, no margin": (tile // 4, 0), "hard cut": (0, 0)}
        print("\nDecoded 128² flat pictures: the largest column step where tiles meet / elsewhere (levels)\n")
        print("| picture | " + " | ".join(layouts) + " |\n|---|" + "---:|" * len(layouts))
        for name, picture in flat_pictures(128).items():
            mean, _ = encoder(picture)
            cells = []
            for layout in layouts.values():
                ov, mg = layout or (overlap, margin)
                image = decoder(mean) if layout is None else decode_tiled(decoder, mean, factor, tile, ov, mg)
                cells.append("%.2f / %.2f" % seam_steps(image, factor, tile, ov))
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
