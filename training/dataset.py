"""The procedural data set of the shipped `shapes` model: captioned 64x64 images of one or two shapes.

A scene is a background colour and one or two shapes (colour, kind, size, position on a 3x3 grid, with
a few pixels of jitter), drawn antialiased with PIL. Its caption is written from the scene with a
randomly chosen wording: synonyms, articles, phrase order, and optional attributes. The attribute
names, colours and positions come from `ldmrt.testing.adherence`, the evaluator, so what is trained is what
is measured.

Wordings are split by template: TRAIN_TEMPLATES are used for training, HELDOUT_TEMPLATES (other phrase
orders) only for evaluation, so evaluation prompts are never seen verbatim in training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ldmrt.testing.adherence import BACKGROUNDS, POSITIONS, RES, SHAPE_COLOURS, SHAPES, SIZES

SUPERSAMPLE = 4  # drawn at 4x and downsampled: antialiased edges
RADIUS = {"small": (6.0, 8.0), "large": (13.0, 16.0)}  # half the bounding-box side, pixels at RES
JITTER = 3.0  # pixels of position jitter around the grid point
COLOUR_JITTER = 8  # per channel


@dataclass
class Shape:
    colour: str
    kind: str
    size: str
    position: str
    cx: float
    cy: float
    r: float


@dataclass
class Scene:
    background: str
    shapes: list[Shape]


def random_shape(rng: np.random.Generator, **fixed) -> Shape:
    colour = fixed.get("colour") or rng.choice(list(SHAPE_COLOURS))
    kind = fixed.get("kind") or rng.choice(SHAPES)
    size = fixed.get("size") or rng.choice(SIZES)
    position = fixed.get("position") or rng.choice(list(POSITIONS))
    r = rng.uniform(*RADIUS[size])
    fx, fy = POSITIONS[position]
    # Jittered, then kept inside the image.
    cx = float(np.clip(fx * RES + rng.uniform(-JITTER, JITTER), r, RES - r))
    cy = float(np.clip(fy * RES + rng.uniform(-JITTER, JITTER), r, RES - r))
    return Shape(str(colour), str(kind), str(size), str(position), cx, cy, r)


def _apart(a: Shape, b: Shape) -> bool:
    # sqrt(2) r bounds a square's corners: shapes never touch.
    return np.hypot(a.cx - b.cx, a.cy - b.cy) > 1.42 * (a.r + b.r) + 1


def random_scene(rng: np.random.Generator, two_shape_prob: float = 0.25) -> Scene:
    background = str(rng.choice(list(BACKGROUNDS)))
    first = random_shape(rng)
    shapes = [first]
    if rng.random() < two_shape_prob:
        for _ in range(50):
            colour = rng.choice([c for c in SHAPE_COLOURS if c != first.colour])
            position = rng.choice([p for p in POSITIONS if p != first.position])
            second = random_shape(rng, colour=colour, position=position)
            if _apart(first, second):
                shapes.append(second)
                break
    return Scene(background, shapes)


def _jittered(rgb, rng) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in rgb)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """RES x RES x 3 uint8."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (RES * s, RES * s), _jittered(BACKGROUNDS[scene.background], rng))
    draw = ImageDraw.Draw(img)
    for sh in scene.shapes:
        cx, cy, r = sh.cx * s, sh.cy * s, sh.r * s
        fill = _jittered(SHAPE_COLOURS[sh.colour], rng)
        if sh.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif sh.kind == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:  # upright triangle filling its bounding box's lower corners and top middle
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return np.asarray(img.resize((RES, RES), Image.BOX))


# ---- captions --------------------------------------------------------------------------------------

KIND_WORDS = {"circle": ["circle", "ball", "disc", "dot"], "square": ["square", "box", "block"],
              "triangle": ["triangle"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
ARTICLES = ["a", "a", "one", ""]
CORNER_NAMES = {"top": ["top", "upper"], "bottom": ["bottom", "lower"]}
EDGE_PHRASES = {
    "left": ["on the left", "at the left", "to the left", "on the left side", "at the left edge"],
    "right": ["on the right", "at the right", "to the right", "on the right side", "at the right edge"],
    "top": ["at the top", "near the top", "at the upper edge", "in the upper part"],
    "bottom": ["at the bottom", "near the bottom", "at the lower edge", "in the lower part"],
    "center": ["in the center", "in the middle", "at the centre", "centered", "in the centre"],
}
BG_TRAILING = ["on a {} background", "over a {} background", "against a {} background", "on {}",
               "on a {} backdrop"]
BG_NOUN = ["{} background", "a {} background", "{} backdrop", "the background is {}"]


def obj_phrase(sh: Shape, rng, with_size: bool) -> str:
    words = [rng.choice(ARTICLES)]
    if with_size:
        words.append(rng.choice(SIZE_WORDS[sh.size]))
    words += [sh.colour, rng.choice(KIND_WORDS[sh.kind])]
    return " ".join(w for w in words if w)


def pos_phrase(position: str, rng) -> str:
    if position in EDGE_PHRASES:
        return str(rng.choice(EDGE_PHRASES[position]))
    vertical, horizontal = position.split()
    name = f"{rng.choice(CORNER_NAMES[vertical])} {horizontal}"
    return str(rng.choice([f"in the {name}", f"at the {name}", f"in the {name} corner", name]))


def _grey(bg: str, rng) -> str:
    return "grey" if bg == "gray" and rng.random() < 0.3 else bg


# A template writes a caption from phrases: obj[i] (+ pos[i]) per shape, bg_trailing and bg_noun.
def _t_obj_pos_bg(p):
    return " ".join([p.shape_parts(), p.bg_trailing]).strip()


def _t_obj_pos_comma_bg(p):
    return f"{p.shape_parts()}, {p.bg_noun}" if p.bg_noun else p.shape_parts()


def _t_bg_with_obj(p):
    return f"{p.bg_noun} with {p.shape_parts()}" if p.bg_noun else p.shape_parts()


def _t_pos_first(p):  # held out: the position leads
    parts = [f"{pos}, {obj}" if pos else obj for obj, pos in zip(p.objs, p.poss)]
    return " ".join([" and ".join(parts), p.bg_trailing]).strip()


def _t_bg_comma_obj(p):  # held out: background first, then a comma
    return f"{p.bg_noun}, {p.shape_parts()}" if p.bg_noun else p.shape_parts()


def _t_obj_bg_pos(p):  # held out: the background between the shape and its position
    if len(p.objs) > 1 or not p.bg_trailing:
        return f"{p.shape_parts(sep=', ')}, {p.bg_noun}" if p.bg_noun else p.shape_parts(sep=", ")
    return " ".join(x for x in (p.objs[0], p.bg_trailing, p.poss[0]) if x)


TRAIN_TEMPLATES = (_t_obj_pos_bg, _t_obj_pos_comma_bg, _t_bg_with_obj)
HELDOUT_TEMPLATES = (_t_pos_first, _t_bg_comma_obj, _t_obj_bg_pos)


class _Phrases:
    def __init__(self, scene: Scene, rng, with_size, with_pos, with_bg):
        self.objs = [obj_phrase(s, rng, with_size) for s in scene.shapes]
        self.poss = [pos_phrase(s.position, rng) if with_pos else "" for s in scene.shapes]
        bg = _grey(scene.background, rng)
        self.bg_trailing = rng.choice(BG_TRAILING).format(bg) if with_bg else ""
        self.bg_noun = rng.choice(BG_NOUN).format(bg) if with_bg else ""

    def shape_parts(self, sep=" and ") -> str:
        return sep.join(" ".join(x for x in (o, p) if x) for o, p in zip(self.objs, self.poss))


# The attributes a caption can state, and their values: the targets of the text encoder's pretraining.
ATTRIBUTES = {"background": list(BACKGROUNDS), "colour": list(SHAPE_COLOURS), "kind": list(SHAPES),
              "size": list(SIZES), "position": list(POSITIONS)}


def caption(scene: Scene, rng: np.random.Generator, templates=TRAIN_TEMPLATES, *, complete: bool = False) -> str:
    """A caption of `scene`. Unless `complete`, size (30%), position (10%) and background (15%) may be
    left unsaid; with two shapes the positions are always said (they tell the shapes apart)."""
    return captioned(scene, rng, templates, complete=complete)[0]


def captioned(scene: Scene, rng: np.random.Generator, templates=TRAIN_TEMPLATES, *, complete: bool = False):
    """(caption, labels): `caption`'s text, and what it says as ATTRIBUTES indices (-1: not said). Shape
    attributes are labelled for one-shape scenes only: a sentence-level label cannot say which of two
    shapes it means."""
    two = len(scene.shapes) > 1
    with_size = complete or rng.random() > 0.3
    with_pos = complete or two or rng.random() > 0.1
    with_bg = complete or rng.random() > 0.15
    template = templates[rng.integers(len(templates))]
    text = " ".join(template(_Phrases(scene, rng, with_size, with_pos, with_bg)).split())
    shape = None if two else scene.shapes[0]
    said = {"background": scene.background if with_bg else None,
            "colour": shape and shape.colour, "kind": shape and shape.kind,
            "size": shape and with_size and shape.size, "position": shape and with_pos and shape.position}
    return text, {k: ATTRIBUTES[k].index(v) if v else -1 for k, v in said.items()}


def caption_vocabulary() -> list[str]:
    """Every word any caption (training or held out) can use, sorted."""
    words = set(ARTICLES) | set(SHAPE_COLOURS) | set(BACKGROUNDS) | {"grey", "and", "with"}
    for group in (KIND_WORDS, SIZE_WORDS, CORNER_NAMES, EDGE_PHRASES):
        for values in group.values():
            for v in values:
                words.update(v.split())
    for v in BG_TRAILING + BG_NOUN:
        words.update(v.replace("{}", "").split())
    words.update(["left", "right", "corner", "in", "at", "the"])
    return sorted(w for w in words if w)


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(path) -> int:
    """WordPiece vocab.txt: the special tokens, punctuation, then the caption words. Returns its size."""
    tokens = SPECIAL_TOKENS + [",", ".", ":", ";", "-"] + caption_vocabulary()
    with open(path, "w") as f:
        f.write("\n".join(tokens) + "\n")
    return len(tokens)


def evaluation_prompts(n: int, seed: int = 1234, two_shape_prob: float = 0.0) -> list[tuple[str, Scene]]:
    """n held-out prompts stating every attribute, with their scenes (attributes drawn independently)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, two_shape_prob)
        out.append((caption(scene, rng, HELDOUT_TEMPLATES, complete=True), scene))
    return out


def batch(rng: np.random.Generator, n: int, two_shape_prob: float = 0.25):
    """n random scenes: (images uint8 (n, RES, RES, 3), scenes)."""
    scenes = [random_scene(rng, two_shape_prob) for _ in range(n)]
    return np.stack([render(s, rng) for s in scenes]), scenes


def to_tensor(images: np.ndarray):
    """uint8 (n, H, W, 3) -> float32 torch (n, 3, H, W) in [-1, 1]."""
    import torch
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
