"""Tiled first-stage decode and encode: a latent (or image) too large to go through the decoder (encoder) whole goes
through it in overlapping tiles, blended so that no seam shows.

Tiles are squares of `tile` latent pixels placed `tile - overlap` apart (the last one flush with the far edge, so
every tile has the same shape: one compiled shape for OpenVINO, one TensorRT profile). Each tile's output is
weighted, on every side that borders another tile, by 0 over an outer margin and then a linear ramp across the
rest of the overlap (flat at the picture's own edges); the weighted outputs are summed and divided by the summed
weights: in an overlap the picture crossfades from one tile to the next (diffusers' enable_vae_tiling crossfades
too, with no margin).

What tiling changes: a tile sees only its own pixels, so the decoder's GroupNorm statistics and its mid-block
attention are computed per tile, not over the whole latent; convolutions near a tile's border see zero padding
instead of their neighbours. Measured in tests/test_tiling.py and README "Beyond the training size".
"""
from __future__ import annotations

from typing import Callable

import torch


def overlap_and_margin(tile: int) -> tuple[int, int]:
    """(overlap, margin) in latent pixels for tiles of `tile`: neighbours share half a tile, and the outer eighth of
    a tile's side that borders another tile is not used. Measured on the shipped model's autoencoder (tiles of 16):
    a quarter's overlap without a margin (diffusers' tile_overlap_factor 0.25) left a visible grid on flat dark
    backgrounds, a bump of up to 24 levels in the column means over each overlap; this leaves none (README "Beyond
    the training size"; tests/test_tiling.py)."""
    return tile // 2, tile // 8


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering 0..length with at least `overlap` shared between neighbours."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(size: int, overlap: int, margin: int, rise: bool, fall: bool) -> torch.Tensor:
    """Weights along one axis of a tile: on a side where another tile overlaps it, 0 over the outer `margin` samples
    (a tile's border, decoded next to zero padding instead of its neighbours, is not used at all), then linear up
    over the rest of the overlap; 1 elsewhere. Two overlapping tiles' weights sum to 1 across their overlap."""
    w = torch.ones(size, dtype=torch.float64)
    span = overlap - 2 * margin
    if overlap == 0 or not (rise or fall):  # tiles that only touch (a hard cut), or no neighbour on this axis
        return w
    if span <= 0:
        raise ValueError(f"overlap {overlap} leaves no blend beyond two margins of {margin}")
    edge = torch.cat([torch.zeros(margin, dtype=torch.float64),
                      (torch.arange(span, dtype=torch.float64) + 0.5) / span,
                      torch.ones(margin, dtype=torch.float64)])
    if rise:
        w[:overlap] = edge
    if fall:
        w[size - overlap:] = torch.minimum(w[size - overlap:], edge.flip(0))
    return w


def _blend(tiles_of: Callable, in_h: int, in_w: int, tile: int, overlap: int, margin: int, scale: float,
           outputs: int):
    """Run tiles_of(y0, x0) -> tuple of `outputs` tensors (B, C, tile*scale, tile*scale) over the tile grid of an
    (in_h, in_w) input and blend them into full-size tensors."""
    rows, cols = tile_starts(in_h, tile, overlap), tile_starts(in_w, tile, overlap)
    sums = weight = None
    for y0 in rows:
        for x0 in cols:
            parts = tiles_of(y0, x0)
            th, tw = parts[0].shape[-2:]
            oy, ox = round(y0 * scale), round(x0 * scale)
            ov, mg = round(overlap * scale), round(margin * scale)
            wy = _ramp(th, min(ov, th), mg, y0 > 0, y0 + min(tile, in_h) < in_h)
            wx = _ramp(tw, min(ov, tw), mg, x0 > 0, x0 + min(tile, in_w) < in_w)
            w = (wy[:, None] * wx[None, :]).to(parts[0].dtype)
            if sums is None:
                b = parts[0].shape[0]
                out_h, out_w = round(in_h * scale), round(in_w * scale)
                sums = [torch.zeros(b, p.shape[1], out_h, out_w, dtype=p.dtype) for p in parts]
                weight = torch.zeros(out_h, out_w, dtype=parts[0].dtype)
            for s, p in zip(sums, parts):
                s[:, :, oy:oy + th, ox:ox + tw] += p * w
            weight[oy:oy + th, ox:ox + tw] += w
    return tuple(s / weight for s in sums)[:outputs]


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, factor: int, tile: int,
                 overlap: int, margin: int = 0) -> torch.Tensor:
    """decode (B, C, h, w) -> (B, 3, h*factor, w*factor), tile by tile (`tile`, `overlap`, `margin` in latent
    pixels)."""
    h, w = latent.shape[-2:]

    def one(y0, x0):
        return (decode(latent[:, :, y0:y0 + tile, x0:x0 + tile].contiguous()).float(),)
    return _blend(one, h, w, tile, overlap, margin, factor, 1)[0]


def encode_tiled(encode: Callable[[torch.Tensor], tuple], image: torch.Tensor, factor: int, tile: int,
                 overlap: int, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """encode (B, 3, H, W) -> (mean, std) (B, C, H/factor, W/factor), tile by tile (`tile`, `overlap`, `margin` in
    latent pixels; the image tiles are `tile * factor` wide). std is blended as mean is (a crossfade of two posteriors'
    spreads, not their mixture's: the noise it scales stays Gaussian)."""
    h, w = image.shape[-2] // factor, image.shape[-1] // factor
    t = tile * factor

    def one(y0, x0):
        mean, std = encode(image[:, :, y0 * factor:y0 * factor + t, x0 * factor:x0 * factor + t].contiguous())
        return mean.float(), std.float()
    return _blend(one, h, w, tile, overlap, margin, 1, 2)
