"""Prompt adherence for the shipped `shapes` model: what a prompt asks for, and what an image shows.

The world of the shapes model (shared with the training data set, training/dataset.py):
- one or two shapes (circle, square, triangle) in a named colour (SHAPE_COLOURS), small or large,
  at one of nine named positions of a 3x3 grid;
- a plain background in one of BACKGROUNDS. Background colours are never shape colours, so a colour
  word alone says which of the two it is.

`parse_prompt` reads the attributes a prompt states (by keywords, not by matching training templates,
so any wording works); `measure_image` finds the background and the coloured objects in an RGB image;
`score` compares the two attribute by attribute (attributes a prompt does not state are not scored) and
`summarize` pools scores. `eager_generate` makes the images to score from a loaded model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

RES = 64  # the model's image size; measurements scale to any size

SHAPE_COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (240, 215, 30), "purple": (140, 50, 180), "orange": (245, 135, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Position names -> centre as a fraction of the image side (x, y), y downwards.
POSITIONS = {
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}

# Words a prompt may use for each attribute value.
COLOUR_WORDS = {**{c: c for c in SHAPE_COLOURS}, **{c: c for c in BACKGROUNDS}, "grey": "gray"}
SHAPE_WORDS = {"circle": "circle", "ball": "circle", "disc": "circle", "disk": "circle", "dot": "circle",
               "square": "square", "box": "square", "block": "square",
               "triangle": "triangle", "triangular": "triangle", "wedge": "triangle"}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small",
              "large": "large", "big": "large", "huge": "large"}
VERTICAL_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
HORIZONTAL_WORDS = {"left": "left", "right": "right"}
CENTER_WORDS = {"center", "centre", "middle", "centered", "centred"}
# A multi-shape prompt is split into one clause per shape at these.
CLAUSE_SPLIT = re.compile(r",|;|:|\band\b|\bwith\b|\bplus\b|\bbeside\b")

# Measurement thresholds, in pixels of a RES x RES image (scaled for other sizes).
MIN_OBJECT_PIXELS = 12  # a colour with fewer pixels is noise, not an object
LARGE_SIDE = 21  # bounding-box side separating small (12-16 px) from large (26-32 px) shapes
COLOUR_RADIUS = 90  # RGB distance within which a pixel has a named colour
# Fill ratio (area / bounding-box area): square 1.0, circle pi/4 = 0.785; upper-half share of the
# area: triangle 0.25, circle and square 0.5.
SQUARE_FILL, TRIANGLE_UPPER_SHARE = 0.89, 0.37


@dataclass
class ShapeSpec:
    """One shape a prompt asks for; None = not stated."""
    colour: str | None = None
    kind: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass
class PromptSpec:
    shapes: list[ShapeSpec] = field(default_factory=list)
    background: str | None = None


def _position(words: list[str]) -> str | None:
    vertical = next((VERTICAL_WORDS[w] for w in words if w in VERTICAL_WORDS), None)
    horizontal = next((HORIZONTAL_WORDS[w] for w in words if w in HORIZONTAL_WORDS), None)
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    if vertical or horizontal:
        return vertical or horizontal
    return "center" if any(w in CENTER_WORDS for w in words) else None


def parse_prompt(prompt: str) -> PromptSpec:
    """The attributes a prompt states. Each clause (split at , ; : and with) naming a shape colour is one
    shape; a clause's position words belong to its shape. With one shape, position and size words
    anywhere in the prompt belong to it."""
    text = prompt.lower()
    spec = PromptSpec()
    for word in re.findall(r"[a-z]+", text):
        if COLOUR_WORDS.get(word) in BACKGROUNDS:
            spec.background = COLOUR_WORDS[word]
    clauses = [re.findall(r"[a-z]+", c) for c in CLAUSE_SPLIT.split(text)]
    shape_clauses = [c for c in clauses if any(COLOUR_WORDS.get(w) in SHAPE_COLOURS for w in c)]
    if len(shape_clauses) <= 1:  # one shape: its words may be spread over the whole prompt
        shape_clauses = [re.findall(r"[a-z]+", text)]
    for words in shape_clauses:
        s = ShapeSpec(
            colour=next((COLOUR_WORDS[w] for w in words if COLOUR_WORDS.get(w) in SHAPE_COLOURS), None),
            kind=next((SHAPE_WORDS[w] for w in words if w in SHAPE_WORDS), None),
            size=next((SIZE_WORDS[w] for w in words if w in SIZE_WORDS), None),
            position=_position(words))
        if s != ShapeSpec():
            spec.shapes.append(s)
    return spec


@dataclass
class MeasuredObject:
    colour: str
    pixels: int
    centre: tuple[float, float]  # bounding-box centre (x, y) as fractions of the image side
    bbox_side: float  # larger side of the bounding box, in RES-pixel units
    fill: float  # pixels / bounding-box area
    top_heavy: float  # share of the pixels in the upper half of the bounding box

    @property
    def position(self) -> str:
        def third(v):
            return 0 if v < 3 / 8 else (2 if v > 5 / 8 else 1)
        col, row = third(self.centre[0]), third(self.centre[1])
        return next(name for name, (x, y) in POSITIONS.items() if (third(x), third(y)) == (col, row))

    @property
    def size(self) -> str:
        return "large" if self.bbox_side >= LARGE_SIDE else "small"

    @property
    def kind(self) -> str:
        if self.top_heavy < TRIANGLE_UPPER_SHARE:
            return "triangle"
        return "square" if self.fill >= SQUARE_FILL else "circle"


@dataclass
class Measurement:
    background: str
    objects: list[MeasuredObject]  # largest first

    def find(self, colour: str | None) -> MeasuredObject | None:
        if colour is None:
            return self.objects[0] if self.objects else None
        return next((o for o in self.objects if o.colour == colour), None)


def to_uint8_image(image) -> np.ndarray:
    """HWC uint8 RGB from a PIL image, an HWC uint8 array, or a CHW/HWC float array/tensor in [-1, 1]."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image)
    if a.dtype != np.uint8:
        if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
            a = a.transpose(1, 2, 0)
        a = np.clip((a.astype(np.float64) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got shape {a.shape}")
    return a


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (a breadth-first fill; masks are small)."""
    seen = np.zeros_like(mask)
    best: list = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        component, frontier = [(y0, x0)], [(y0, x0)]
        while frontier:
            y, x = frontier.pop()
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        component.append((ny, nx))
                        frontier.append((ny, nx))
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def measure_image(image) -> Measurement:
    """Each pixel is labelled with the nearest named colour (backgrounds and shape colours); background =
    the background colour most pixels have (shapes never use background colours, so no border or
    position is assumed), and per shape colour present, the largest connected patch of pixels of that
    colour within COLOUR_RADIUS (antialiased edges, blends of two colours, belong to no object)."""
    a = to_uint8_image(image).astype(np.float64)
    h, w, _ = a.shape
    names = list(BACKGROUNDS) + list(SHAPE_COLOURS)
    palette = np.array([BACKGROUNDS.get(n) or SHAPE_COLOURS[n] for n in names], dtype=np.float64)
    dist2 = ((a[:, :, None, :] - palette) ** 2).sum(-1)
    labels = np.argmin(dist2, axis=-1)
    counts = np.bincount(labels.ravel(), minlength=len(names))
    background = names[int(np.argmax(counts[:len(BACKGROUNDS)]))]
    labels[np.min(dist2, axis=-1) > COLOUR_RADIUS ** 2] = -1
    scale = RES / max(h, w)
    objects = []
    for i, name in enumerate(names):
        if name in BACKGROUNDS:
            continue
        mask = labels == i
        if mask.sum() * scale ** 2 < MIN_OBJECT_PIXELS:
            continue
        mask = _largest_component(mask)
        n = int(mask.sum())
        if n * scale ** 2 < MIN_OBJECT_PIXELS:
            continue
        ys, xs = np.nonzero(mask)
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        # An upright triangle has a quarter of its area in the upper half of its box; circle and square half.
        upper = int((ys < (ys.min() + ys.max()) / 2).sum())
        objects.append(MeasuredObject(
            colour=name, pixels=n, centre=((xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h),
            bbox_side=max(bw, bh) * scale, fill=n / (bw * bh), top_heavy=upper / n))
    objects.sort(key=lambda o: -o.pixels)
    return Measurement(background, objects)


def score(prompt: str | PromptSpec, image) -> dict[str, bool]:
    """Per stated attribute, whether the image obeys it: keys `background`, and per shape i (0, 1)
    `colour`, `position`, `size`, `kind` (suffixed `.1` for the second shape). A shape's colour counts
    as obeyed when an object of that colour is there (for a one-shape prompt: the largest object);
    its other attributes are measured on that object and fail when it is missing."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    m = measure_image(image)
    result = {}
    if spec.background is not None:
        result["background"] = m.background == spec.background
    for i, s in enumerate(spec.shapes):
        suffix = "" if i == 0 else f".{i}"
        if len(spec.shapes) == 1:
            obj = m.objects[0] if m.objects else None
            if s.colour is not None:
                result["colour"] = obj is not None and obj.colour == s.colour
                obj = m.find(s.colour)
        else:
            obj = m.find(s.colour)
            if s.colour is not None:
                result["colour" + suffix] = obj is not None
        for attr in ("position", "size", "kind"):
            wanted = getattr(s, attr)
            if wanted is not None:
                result[attr + suffix] = obj is not None and getattr(obj, attr) == wanted
    return result


def summarize(scores: list[dict[str, bool]]) -> dict[str, float]:
    """Fraction obeyed per attribute (shape index suffixes merged), `all` = images obeying everything,
    and `attributes` = all attribute checks pooled."""
    per: dict[str, list[bool]] = {}
    for s in scores:
        for k, v in s.items():
            per.setdefault(k.split(".")[0], []).append(v)
    out = {k: float(np.mean(v)) for k, v in sorted(per.items())}
    out["attributes"] = float(np.mean([v for s in scores for v in s.values()])) if scores else float("nan")
    out["all"] = float(np.mean([all(s.values()) for s in scores])) if scores else float("nan")
    return out


def eager_generate(model, prompts: list[str], *, sampler: str = "ddim", steps: int = 20,
                   guidance_scale: float | None = 5.0, seed: int = 0, batch_size: int = 32, **plan):
    """Images for `prompts` from a text-conditioned shapes LatentDiffusion, run eagerly in its own dtype.

    Prompt i starts from `ldmrt.sampling.randn(seed + i, (1, C, h, w))`, as `Engine.generate(prompt,
    seed=seed + i)` does, and is sampled by the C++ loop with classifier-free guidance against the empty
    prompt (stochastic samplers draw their noise per batch, so only deterministic ones match the engine).
    plan: the sampler's grid and options (ldmrt.sampling.make_plan), e.g. timestep_spacing.
    Returns (latents, images): float32 CPU tensors, images (n, 3, H, W) in about [-1, 1]."""
    import torch

    from .. import sampling

    unet = model.model.diffusion_model
    c = unet.out[2].out_channels
    dtype = next(model.parameters()).dtype
    h = w = _latent_side(model)
    x_T = torch.cat([torch.from_numpy(sampling.randn(seed + i, (1, c, h, w))) for i in range(len(prompts))])
    latents, images = [], []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            cond = model.get_learned_conditioning(chunk)
            if guidance_scale is not None:
                cond = torch.cat([model.get_learned_conditioning([""] * len(chunk)), cond])

            def eps_fn(x, t, cond=cond):
                tt = torch.full((x.shape[0],), t, dtype=torch.float32)
                return model.predict_eps(x, tt, model.apply_model(x.to(dtype), tt, cond)).float()

            z = sampling.sample(eps_fn, x_T[i:i + len(chunk)], sampler=sampler, steps=steps,
                                alphas_cumprod=model.schedule_alphas_cumprod, guidance_scale=guidance_scale,
                                seed=seed, **plan)
            latents.append(z)
            images.append(model.decode_first_stage(z.to(dtype)).float())
    return torch.cat(latents), torch.cat(images)


def _latent_side(model) -> int:
    """The latent side of a shapes model (RES x RES images): RES / the first stage's downsampling."""
    enc = model.first_stage_model.encoder
    return RES // 2 ** (enc.num_resolutions - 1)
