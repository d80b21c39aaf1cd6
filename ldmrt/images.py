"""Images in and out: decoding the inputs of generate (each once per call), and PNGs with their parameters.

Inputs (init_image, mask, low_res_image) are a path, a PIL image, an (H, W, 3) array or a (B, 3, H, W)
tensor in [-1, 1]; segmentation maps a path, a PIL image of class indices or an integer (H, W) array. A path
is opened through PIL with a pixel limit (MAX_INPUT_PIXELS, far below PIL's own decompression-bomb limit), so a
hostile file is refused before it is decoded.

Every PNG ldmrt writes, from the CLI, `ldmrt demo` or Python (`write_png(image, path)` on an image that
`Engine.generate` returned), carries the same text chunks: `parameters` (JSON: the prompt and every setting of
the call, the model, backend, precision, ldmrt version and the image's index in its batch), and, from the
CLI, `ldmrt-command`.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from .errors import InputError
from .files import atomic_write

MAX_INPUT_PIXELS = 8192 * 8192  # larger inputs are refused before decoding (a PNG bomb decodes to GBs)
PARAMETERS = "parameters"  # the PNG text chunk with the JSON record of the call


def open_image(path):
    """A PIL image from a file, decoded, or InputError naming the file and the problem."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise InputError(f"image {path} is {image.width}x{image.height} pixels, too large for an input (the "
                                 f"limit is {MAX_INPUT_PIXELS:,} pixels): resize it first")
            image.load()
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image {path} is too large to decode safely ({e}): resize it first") from None
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def image_tensor(image) -> torch.Tensor:
    """An input image -> (1 or B, 3, H, W) float32 in [-1, 1], at its own size."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"an image array must be (H, W, 3), got shape {image.shape}")
        arr = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        t = torch.from_numpy(arr * 2 - 1).permute(2, 0, 1)[None]
    else:
        t = torch.as_tensor(image, dtype=torch.float32)
        t = t[None] if t.dim() == 3 else t
        if t.dim() != 4 or t.shape[1] != 3:
            raise InputError(f"an image tensor must be (3, H, W) or (B, 3, H, W), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError("the image has NaN or infinite values")
    return t


def mask_tensor(mask) -> torch.Tensor:
    """A mask (1 or white = repaint) -> (1 or B, 1, H, W) float32 in [0, 1], at its own size."""
    if isinstance(mask, (str, os.PathLike)):
        mask = open_image(mask)
    if hasattr(mask, "convert"):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    if m.dim() > 4 or m.dim() < 2:
        raise InputError(f"a mask must be (H, W), (1, H, W) or (B, 1, H, W), got shape {tuple(m.shape)}")
    while m.dim() < 4:
        m = m[None]
    return m


def segmentation_tensor(segmentation, classes: int) -> torch.Tensor:
    """A map of class indices (a PNG of mode L, P or I, or an integer (H, W) / (B, H, W) array) -> (1 or B, 1, H, W)
    int64 at its own size, every index checked to be in 0..classes-1."""
    if isinstance(segmentation, (str, os.PathLike)):
        segmentation = open_image(segmentation)
    if hasattr(segmentation, "convert"):  # PIL: the pixel values are the indices (a palette's too), never colours
        if segmentation.mode not in ("L", "P", "I", "I;16"):
            raise InputError(f"a segmentation map is an image of class indices (PNG mode L, P or I), not mode "
                             f"{segmentation.mode}: save the label map itself, not a coloured rendering of it")
        segmentation = np.array(segmentation)
    s = torch.as_tensor(np.asarray(segmentation))
    if s.is_floating_point() or s.is_complex() or s.dtype == torch.bool:
        raise InputError(f"a segmentation map holds integer class indices, not {s.dtype}: pass e.g. "
                         "array.astype(np.int64)")
    if s.dim() not in (2, 3) or min(s.shape) < 1:
        raise InputError(f"a segmentation map must be (H, W) or (B, H, W) class indices, got shape {tuple(s.shape)}")
    low, high = int(s.min()), int(s.max())
    if low < 0 or high >= classes:
        raise InputError(f"segmentation map has class index {high if high >= classes else low}; this model knows "
                         f"{classes} classes (0..{classes - 1}): remap the labels (e.g. 255 'unlabeled' has no class)")
    s = s.long()
    return (s[None] if s.dim() == 2 else s)[:, None]


def resized(t: torch.Tensor, height: int, width: int, batch: int, *, binary: bool = False) -> torch.Tensor:
    """`t` at (height, width) (bicubic; nearest and thresholded at 0.5 for masks) and `batch` images."""
    if tuple(t.shape[2:]) != (height, width):
        t = torch.nn.functional.interpolate(t, size=(height, width), mode="nearest" if binary else "bicubic",
                                            **({} if binary else {"align_corners": False}))
    if binary:
        t = (t > 0.5).float()
    if t.shape[0] not in (1, batch):
        raise InputError(f"{t.shape[0]} images given for a batch of {batch}: give one, or one per image")
    return t.expand(batch, -1, -1, -1).contiguous()


def to_pil(images: np.ndarray, records: list[dict]):
    """(B, H, W, 3) floats in [0, 1] -> PIL images, each with its `parameters` record in `.info`."""
    from PIL import Image
    out = []
    for im, record in zip(images, records):
        pil = Image.fromarray((im * 255).round().astype(np.uint8))
        pil.info[PARAMETERS] = json.dumps(record)
        out.append(pil)
    return out


def write_png(image, path, text: dict[str, str] | None = None):
    """Save a PIL image as PNG with its `parameters` (from Engine.generate) and `text` chunks, atomically."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    chunks = {k: v for k, v in image.info.items() if k == PARAMETERS and isinstance(v, str)} | (text or {})
    for k, v in chunks.items():
        info.add_text(k, v)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
