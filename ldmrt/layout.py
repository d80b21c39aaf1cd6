"""Layout-to-image conditioning: boxes -> the token sequence CompVis's layout2img-openimages256 was trained on.

That model's data are taming-transformers' OpenImages objects through its ObjectsBoundingBoxConditionalBuilder
(latent-diffusion's Layout2ImgDiffusion plots its conditioning with that builder), with the settings of taming's
open_images_scene_images_transformer.yaml: 8192 tokens, at most 30 objects, group/occluded/depiction/inside flags,
the crop encoded. The sequence, (max_seq_len,) = 30 * 3 + 2 = 92 ids:

    per object  class + classes * flags,  corner(x0, y0),  corner(x1, y1)      flags: group_of 1, occluded 2,
    unused      none, none, none  (none = vocab - 1)                                  depiction 4, inside 8
    last two    corner(0, 0), corner(1, 1): the crop, here the whole image

corner(x, y) = round(y * (n - 1)) * n + round(x * (n - 1)), n = int(sqrt(vocab)) = 90 (Python's round, half to
even, as the builder's). Objects keep the caller's order (the builder shuffles them in training: the model saw
every order). Class numbers are OpenImages categories as taming numbers them (ldmrt/assets/
openimages_layout_classes.json, with names that taming's loader folds into another class, e.g. Man -> Person).
"""
from __future__ import annotations

import json
import math
import numbers
import os
from functools import lru_cache
from pathlib import Path

import torch

from .errors import ConfigError, InputError

CLASSES_FILE = Path(__file__).with_name("assets") / "openimages_layout_classes.json"
FLAGS = ("group_of", "occluded", "depiction", "inside")  # the builder's modifier bits 1, 2, 4, 8, in this order
MAX_LAYOUT_BYTES = 1 << 20


@lru_cache(maxsize=1)
def class_numbers() -> dict[str, int]:
    """Class name -> category number (names folded into another category included)."""
    data = json.loads(CLASSES_FILE.read_text(encoding="utf-8"))
    by_name = {name: i for i, (_, name) in enumerate(data["classes"])}
    return by_name | {alias: by_name[target] for alias, target in data["aliases"].items()}


@lru_cache(maxsize=1)
def num_classes() -> int:
    return len(set(class_numbers().values()))


def read_layout(source):
    """A layout as given: a JSON file's path (`ldmrt generate --layout boxes.json`) or the objects themselves."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    try:
        if path.stat().st_size > MAX_LAYOUT_BYTES:
            raise InputError(f"layout file {path} is {path.stat().st_size >> 10} KB, not a layout (a JSON list of "
                             f"at most 30 boxes)")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read layout file {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"layout file {path} is not JSON ({e}): write a list of "
                         '{"class": NAME_OR_ID, "box": [x0, y0, x1, y1]} objects') from None


def layout_tokens(layout, vocab: int, length: int) -> torch.Tensor:
    """(length,) int64 ids of one layout: a list of {"class": name or number, "box": [x0, y0, x1, y1]} (fractions
    of the image, x to the right, y down), each optionally with the flags group_of, occluded, depiction, inside."""
    if (length - 2) % 3 or length < 5:
        raise ConfigError(f"a layout model's max_seq_len is 3 tokens per object + 2, not {length}")
    max_objects, n = (length - 2) // 3, int(math.sqrt(vocab))
    classes, none = num_classes(), vocab - 1
    if classes * 2 ** len(FLAGS) > none:
        raise ConfigError(f"vocab_size {vocab} is too small for {classes} classes with flags (the published model has "
                          "8192)")
    layout = normalized(layout)
    if len(layout) > max_objects:
        raise InputError(f"layout has {len(layout)} objects; this model takes at most {max_objects}: drop the "
                         "smallest ones")

    def corner(x: float, y: float) -> int:  # the builder's tokenize_coordinates
        return int(round(y * (n - 1))) * n + int(round(x * (n - 1)))

    tokens = []
    for i, obj in enumerate(layout):
        number, (x0, y0, x1, y1), modifier = _object(obj, i, classes)
        # The builder's arithmetic step by step (its bbox is x0, y0, w, h), so that ties round as they did there.
        w, h = min(x1 - x0, 1 - x0), min(y1 - y0, 1 - y0)
        tokens += [number + classes * modifier, corner(x0, y0), corner(x0 + w, y0 + h)]
    tokens += [none] * (3 * max_objects - len(tokens)) + [corner(0.0, 0.0), corner(1.0, 1.0)]
    return torch.tensor(tokens, dtype=torch.long)


def normalized(layout) -> list[dict]:
    """The layout in plain JSON types (what a PNG records): numpy numbers and arrays as Python's."""
    if not isinstance(layout, (list, tuple)):
        raise InputError(f"layout must be a list of objects {{'class': ..., 'box': [x0, y0, x1, y1]}}, not "
                         f"{type(layout).__name__}")
    return [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in obj.items()} if isinstance(obj, dict) else obj
            for obj in layout]


def _object(obj, i: int, classes: int) -> tuple[int, tuple[float, ...], int]:
    where = f"layout object {i}"
    if not isinstance(obj, dict) or "class" not in obj or "box" not in obj:
        raise InputError(f"{where} must be {{'class': name or number, 'box': [x0, y0, x1, y1]}}, not {obj!r}")
    unknown = set(obj) - {"class", "box", *FLAGS}
    if unknown:
        raise InputError(f"{where} has unknown keys {sorted(unknown)}: it takes class, box and the flags "
                         f"{', '.join(FLAGS)}")
    label = obj["class"]
    if isinstance(label, str):
        number = class_numbers().get(label)
        if number is None:
            close = sorted(name for name in class_numbers() if name.lower().startswith(label.lower()[:3]))[:5]
            raise InputError(f"{where}: {label!r} is not an OpenImages class of this model"
                             + (f" (close: {', '.join(close)})" if close else "")
                             + f"; the {classes} names are in {CLASSES_FILE.name}")
    elif isinstance(label, numbers.Integral) and not isinstance(label, bool) and 0 <= label < classes:
        number = int(label)
    else:
        raise InputError(f"{where}: class must be a name or a number in 0..{classes - 1}, not {label!r}")
    box = obj["box"]
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box)):
        raise InputError(f"{where}: box must be [x0, y0, x1, y1], four numbers in [0, 1], not {box!r}")
    x0, y0, x1, y1 = map(float, box)
    if not all(0 <= v <= 1 for v in (x0, y0, x1, y1)) or not (x0 < x1 and y0 < y1):
        raise InputError(f"{where}: box {list(box)} must have 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions "
                         "of the width and height, from the top left)")
    modifier = 0
    for bit, flag in enumerate(FLAGS):
        value = obj.get(flag, False)
        if not isinstance(value, bool):
            raise InputError(f"{where}: {flag} must be true or false, not {value!r}")
        modifier |= value << bit
    return number, (x0, y0, x1, y1), modifier
