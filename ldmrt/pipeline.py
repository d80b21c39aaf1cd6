"""The generate pipeline: a request checked whole, conditioning, the C++ sampler loop over the UNet, decoding.

    prompt(s) --prompts.chunks--> windows of ids --cond_stage--> context   once per distinct prompt (LRU cache)
                 (emphasis, BREAK, long CLIP prompts as 77-token windows; textual inversion rows, CLIP skip)
    seed --Philox--> x_T;  [init_image --encoder--> x0]
    sampling.run(plan, eps_fn, x_T): eps = unet(x, t, context[, concat]) per stage, NaN/inf checked
    latent --decoder--> image (inpainting models: known pixels kept) --> PIL images with their parameters

Every input is checked, and each image input decoded once, before the first graph runs, so that a bad request
costs nothing and says what to fix (InputError); a request larger than the machine is refused with its memory
estimate (ldmrt/memory.py).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import EngineError, InputError, NumericalError
from .images import image_tensor, mask_tensor, resized, segmentation_tensor, to_pil
from .layout import layout_tokens, normalized, read_layout
from .schedulers import choose, plan_arguments
from .version import __version__

# guidance_scale=None means this where the model has an unconditional input, no guidance elsewhere.
DEFAULT_GUIDANCE = 5.0
OUTPUT_TYPES = ("pil", "np", "latent")
MAX_SEED = 2 ** 64 - 1
CONTEXT_CACHE_SIZE = 64  # prompt embeddings kept per engine (SD v1: 230 KB each)
# `ldmrt generate --fast`: chosen from the quality table of README "Doing less per image" (the shipped model's
# adherence within 2 points of exact).
FAST_PRESET = {"cache_interval": 2, "guidance_interval": (0.0, 0.7)}
# The hires fix's img2img strength: the better of 0.3 and 0.5 on the shipped model at 128² and 256² (README "Beyond
# the training size").
HIRES_STRENGTH = 0.3


class ContextCache:
    """(prompt, clip skip) -> (1, L, D) embedding, least recently used evicted: memory stays flat over any number of
    prompts."""

    def __init__(self, size: int = CONTEXT_CACHE_SIZE):
        self.size, self._items = size, OrderedDict()

    def get(self, text: str, compute):
        if text in self._items:
            self._items.move_to_end(text)
            return self._items[text]
        value = self._items[text] = compute(text)
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __len__(self):
        return len(self._items)


@dataclass
class Request:
    """One call of generate, checked and with its inputs decoded."""
    prompts: list[str] | None
    negative_prompts: list[str]
    steps: int
    sampler: str
    guidance_scale: float | None  # None: unguided
    eta: float | None
    seed: int
    height: int
    width: int
    batch_size: int
    strength: float
    timestep_spacing: str
    init_image: torch.Tensor | None  # (1|B, 3, H, W) at its own size
    mask: torch.Tensor | None  # (1|B, 1, H, W) at its own size
    low_res_image: torch.Tensor | None
    class_label: object
    latents: torch.Tensor | None
    output_type: str
    cache_interval: int  # DeepCache: the full UNet every N-th step (1: always, exact)
    guidance_interval: tuple[float, float] | None  # fractions of the steps with guidance (None: all)
    cache_schedule: str  # where the full steps go: "uniform" or "quadratic"
    layout: list | None = None  # layout-to-image: one list of objects per image (ldmrt/layout.py), as given
    layout_tokens: torch.Tensor | None = None  # (B, max_seq_len) int64: the layouts as the model's token ids
    segmentation: torch.Tensor | None = None  # (1|B, 1, H, W) int64 class indices at their own size
    clip_skip: int = 1  # CLIP text models: the text encoder layer counted from the last (AUTOMATIC1111's numbering)
    sampler_options: dict = field(default_factory=dict)  # make_plan's options of the resolved sampler (schedulers)

    def record(self, engine, index: int) -> dict:
        """The `parameters` of image `index`: what reproduces it (the PNG metadata schema, ldmrt/images.py)."""
        m = engine.manifest
        return {"prompt": None if self.prompts is None else self.prompts[index],
                "negative_prompt": self.negative_prompts[index], "steps": self.steps, "sampler": self.sampler,
                "guidance_scale": self.guidance_scale, "eta": self.eta, "seed": self.seed, "height": self.height,
                "width": self.width, "batch_size": self.batch_size, "batch_index": index,
                "timestep_spacing": self.timestep_spacing,
                **({"sampler_options": self.sampler_options} if self.sampler_options else {}),
                "cache_interval": self.cache_interval,
                **({"cache_schedule": self.cache_schedule} if self.cache_schedule != "uniform" else {}),
                "guidance_interval": None if self.guidance_interval is None else list(self.guidance_interval),
                **({"strength": self.strength} if self.init_image is not None else {}),
                **({"class_label": _label(self.class_label, index)} if self.class_label is not None else {}),
                **({"layout": self.layout[index]} if self.layout is not None else {}),
                **({"clip_skip": self.clip_skip} if self.clip_skip != 1 else {}),
                **({"loras": [list(spec) for spec in engine.loras]} if engine.loras else {}),
                "model": m["model"].get("name"), "engine": str(engine.path), "backend": m["backend"],
                "precision": engine.precision, "ldmrt": __version__}  # what ran here


def generate(engine, prompt=None, *, negative_prompt="", steps: int = 50, sampler: str | None = None,
             guidance_scale=None, eta=None, seed: int = 0, height=None, width=None, batch_size=None, init_image=None,
             strength: float = 0.75, mask=None, class_label=None, low_res_image=None, latents=None,
             timestep_spacing: str | None = None, output_type: str = "pil", progress: bool = False,
             cache_interval: int = 1, guidance_interval=None, cache_schedule: str = "uniform", layout=None,
             segmentation=None, clip_skip: int = 1, tiled_decode=None, hires=None,
             hires_strength: float = HIRES_STRENGTH):
    """See Engine.generate."""
    if hires is not None:  # every other argument (the parameters alone are local yet) goes to both passes
        settings = {k: v for k, v in locals().items() if k not in ("engine", "prompt", "hires", "hires_strength")}
        return hires_fix(engine, prompt, hires, hires_strength, settings)
    from .sampling import run

    p = prepare(engine, prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler,
                guidance_scale=guidance_scale, eta=eta, seed=seed, height=height, width=width, batch_size=batch_size,
                init_image=init_image, strength=strength, mask=mask, class_label=class_label,
                low_res_image=low_res_image, latents=latents, timestep_spacing=timestep_spacing,
                output_type=output_type, cache_interval=cache_interval, guidance_interval=guidance_interval,
                cache_schedule=cache_schedule, layout=layout, segmentation=segmentation, clip_skip=clip_skip,
                tiled_decode=tiled_decode)
    req, plan = p.req, p.plan
    unet = UNetCalls(engine, req, plan, p.context, p.concat)
    if progress:
        from tqdm import tqdm
        unet.bar = bar = tqdm(total=len(plan.stages), desc="ldmrt", unit="step")
    else:
        bar = None

    try:
        latent = run(plan, unet, p.x_T, guidance_scale=req.guidance_scale, x0=p.x0, mask=p.sample_mask, seed=req.seed)
    finally:
        if bar is not None:
            bar.close()
    if not torch.isfinite(latent).all():
        raise numerical_error(engine, req, "the final latent")
    if req.output_type == "latent":
        return latent
    return finish(engine, req, decode(engine, latent, p.tile))


@dataclass
class Prepared:
    """A request ready to sample: checked, its plan compiled, its conditioning and start latents made."""
    req: Request
    plan: object  # ldmrt._C.Plan
    context: torch.Tensor | None
    concat: torch.Tensor | None
    x_T: torch.Tensor
    x0: torch.Tensor | None  # img2img's start (and masked img2img's known latent)
    sample_mask: torch.Tensor | None  # masked img2img, the loop's mask: 1 keeps x0 (CompVis), 0 is sampled
    tile: int | None  # first_stage_tile


def prepare(engine, prompt=None, *, negative_prompt="", steps=50, sampler=None, guidance_scale=None, eta=None, seed=0,
            height=None, width=None, batch_size=None, init_image=None, strength=0.75, mask=None, class_label=None,
            low_res_image=None, latents=None, timestep_spacing=None, output_type="pil", cache_interval=1,
            guidance_interval=None, cache_schedule="uniform", layout=None, segmentation=None, clip_skip=1,
            tiled_decode=None) -> Prepared:
    """Everything generate does before the sampler loop (also what a server does before stepping a request)."""
    from .sampling import make_plan, randn
    req = check_request(engine, prompt, negative_prompt, steps, sampler, guidance_scale, eta, seed, height, width,
                        batch_size, init_image, strength, mask, class_label, low_res_image, latents,
                        timestep_spacing, output_type, cache_interval, guidance_interval, cache_schedule,
                        layout=layout, segmentation=segmentation, clip_skip=clip_skip)
    s = engine.summary
    # The plan is compiled before any graph runs: a bad sampler, spacing or step count costs nothing.
    img2img = req.init_image is not None and s["conditioning"] not in ("inpainting", "text_inpainting")
    try:
        plan = make_plan(sampler=req.sampler, steps=req.steps, alphas_cumprod=engine.alphas_cumprod, eta=req.eta,
                         timestep_spacing=req.timestep_spacing, strength=req.strength if img2img else 1.0,
                         cache_interval=req.cache_interval, guidance_interval=req.guidance_interval,
                         cache_schedule=req.cache_schedule,
                         **plan_arguments(req.sampler_options, engine.alphas_cumprod))
    except ValueError as e:
        raise InputError(str(e)) from None
    from .memory import check_request_memory
    tile = first_stage_tile(engine, req, tiled_decode)
    check_request_memory(engine, req.batch_size, req.height, req.width, req.guidance_scale is not None,
                         encode=req.init_image is not None, tile=tile)

    shape = (req.batch_size, s["latent_channels"], req.height // s["latent_factor"], req.width // s["latent_factor"])
    context, concat = conditioning(engine, req, shape)
    device = getattr(engine.backend, "device", None)
    if device is not None and torch.device(device).type == "cuda":  # constant per step: copied to the GPU once
        context, concat = (None if c is None else c.to(device) for c in (context, concat))
    x_T = req.latents if req.latents is not None else torch.from_numpy(randn(req.seed, shape))
    x0 = sample_mask = None
    if img2img:
        x0 = encode(engine, resized(req.init_image, req.height, req.width, req.batch_size), req.seed, tile)
        if req.mask is not None:  # keep the latent where the mask is 0 (CompVis: mask 1 = keep x0)
            sample_mask = 1.0 - resized(req.mask, shape[2], shape[3], req.batch_size, binary=True)

    return Prepared(req, plan, context, concat, x_T, x0, sample_mask, tile)


def finish(engine, req: Request, image: torch.Tensor):
    """The decoded image (B, 3, H, W) of a request -> its output (output_type "pil" or "np")."""
    s = engine.summary
    if s["conditioning"] == "inpainting":  # CompVis inpaint.py: keep the known pixels
        m = resized(req.mask, req.height, req.width, req.batch_size, binary=True)
        image = (1 - m) * resized(req.init_image, req.height, req.width, req.batch_size) + m * image
    images = ((image.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous().numpy()
    if req.output_type == "np":
        return images
    return to_pil(images, [req.record(engine, i) for i in range(req.batch_size)])


class UNetCalls:
    """The model the C++ loop calls, once per plan stage in order: the stage says which evaluation it is.

    A guided stage gets the doubled batch [uncond; cond]; an unguided one in a guided run (guidance interval)
    the batch alone, evaluated with the conditional inputs. A full stage runs "unet" and keeps its deep feature;
    a shallow one runs "unet_shallow" on it (DeepCache; the conditional half when the kept feature is doubled).
    The inputs that are constant over the steps are built once; per call only x and t change."""

    def __init__(self, engine, req: Request, plan, context, concat, bar=None):
        self.engine, self.req, self.stages, self.bar = engine, req, plan.stages, bar
        self.calls, self.deep = 0, None
        b, guided = req.batch_size, req.guidance_scale is not None
        full = {k: v for k, v in (("context", context), ("concat", concat)) if v is not None}
        cond = {k: v[b:] if guided and v.shape[0] == 2 * b else v for k, v in full.items()}  # the conditional half
        self.inputs = {b: {"t": torch.zeros(b, dtype=torch.float32), **cond}}  # keyed by the call's batch
        if guided:
            self.inputs[2 * b] = {"t": torch.zeros(2 * b, dtype=torch.float32), **full}
        if any(s["shallow"] for s in self.stages) and "unet_shallow" not in engine.backend.graphs:
            raise EngineError(f"{engine.path} has no unet_shallow graph (feature caching): rebuild it with this ldmrt")
        self.shallow_inputs = set(engine.backend.input_names("unet_shallow"))  # a branch may not take the context

    def __call__(self, x, t):
        stage = self.stages[self.calls]
        self.calls += 1
        where = f"UNet call {self.calls} of {len(self.stages)} (t={t:g})"
        if not torch.isfinite(x).all():
            raise numerical_error(self.engine, self.req, f"the latent before {where}")
        inputs = self.inputs[x.shape[0]]
        inputs["t"].fill_(t)
        if stage["shallow"]:
            deep = self.deep if self.deep.shape[0] == x.shape[0] else self.deep[-x.shape[0]:]
            eps = self.engine.backend.run("unet_shallow", x=x, deep=deep,
                                          **{k: v for k, v in inputs.items() if k in self.shallow_inputs})["eps"]
        else:
            out = self.engine.backend.run("unet", x=x, **inputs)
            eps, self.deep = out["eps"], out.get("deep")
        if not torch.isfinite(eps).all():
            raise numerical_error(self.engine, self.req, f"the output of {where}")
        if self.bar is not None:
            self.bar.update(1)
        return eps


# --- checks -----------------------------------------------------------------------------------------------
def check_request(engine, prompt, negative_prompt, steps, sampler, guidance_scale, eta, seed, height, width,
                  batch_size, init_image, strength, mask, class_label, low_res_image, latents, timestep_spacing,
                  output_type, cache_interval=1, guidance_interval=None, cache_schedule="uniform", *, layout=None,
                  segmentation=None, clip_skip=1) -> Request:
    s = engine.summary
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be 'pil', 'np' or 'latent', not {output_type!r}")
    prompts = _texts(prompt, "prompt")
    negatives = _texts(negative_prompt, "negative_prompt") or [""]
    # "" is a text model's unconditional prompt, and no prompt at all to the others
    _check_inputs(s, {"prompt": prompts is not None and (s["conditioning"] in TEXT or any(prompts)),
                      "negative_prompt": any(negatives),
                      "class_label": class_label is not None, "low_res_image": low_res_image is not None,
                      "init_image": init_image is not None, "mask": mask is not None, "layout": layout is not None,
                      "segmentation": segmentation is not None})
    layouts = None if layout is None else _layouts(read_layout(layout))
    if batch_size is None:
        batch_size = len(prompts) if prompts else len(layouts) if layouts else 1
    batch_size = _integer(batch_size, "batch_size", 1)
    if prompts is not None:
        prompts = _per_image(prompts, batch_size, "prompt")
    negatives = _per_image(negatives, batch_size, "negative_prompt")
    tokens = None
    if layouts is not None:
        layouts = [normalized(objects) for objects in _per_image(layouts, batch_size, "layout")]
        tokens = torch.stack([layout_tokens(objects, s["layout_vocab"], s["layout_length"]) for objects in layouts])
    steps = _integer(steps, "steps", 1)
    seed = _integer(seed, "seed", 0, MAX_SEED)
    for name, value in (("guidance_scale", guidance_scale), ("eta", eta)):
        if value is not None and not _finite(value):
            raise InputError(f"{name} must be a finite number, not {value!r}")
    if not _finite(strength) or not 0 <= strength <= 1:
        raise InputError(f"strength must be a number in [0, 1], not {strength!r}")
    cache_interval = _integer(cache_interval, "cache_interval", 1)
    if not isinstance(cache_schedule, str):  # its values are make_plan's to check, with the sampler's
        raise InputError(f"cache_schedule must be 'uniform' or 'quadratic', not {cache_schedule!r}")
    if guidance_interval is not None:
        try:
            lo, hi = (float(v) for v in guidance_interval)
        except (TypeError, ValueError):
            raise InputError(f"guidance_interval must be (from, until), fractions of the steps, not "
                             f"{guidance_interval!r}") from None
        guidance_interval = (lo, hi)
    choice = choose(engine.manifest.get("default_sampler"), sampler, timestep_spacing)
    sampler, timestep_spacing = choice.pop("sampler"), choice.pop("timestep_spacing")
    init = None if init_image is None else image_tensor(init_image)
    low_res = None if low_res_image is None else image_tensor(low_res_image)
    mask_t = None if mask is None else mask_tensor(mask)
    seg = None if segmentation is None else segmentation_tensor(segmentation, s["segmentation_classes"])
    height, width = _size(s, height, width, init, low_res, seg)
    _check_limits(engine.manifest.get("shapes", {}), batch_size, height, width)
    guided = _guided(s, guidance_scale)
    scale = (DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)) if guided else None
    if not guided and any(negatives):  # the negative prompt is the guidance's unconditional input, nothing else
        raise InputError("negative_prompt needs classifier-free guidance: drop guidance_scale=1 (or give another "
                         "scale), or the negative prompt")
    if latents is not None:
        latents = torch.as_tensor(latents, dtype=torch.float32)
        shape = (batch_size, s["latent_channels"], height // s["latent_factor"], width // s["latent_factor"])
        if tuple(latents.shape) != shape:
            raise InputError(f"latents have shape {tuple(latents.shape)}; this request needs {shape}")
        if not torch.isfinite(latents).all():
            raise InputError("latents have NaN or infinite values")
    if mask_t is not None and init is None and s["conditioning"] != "inpainting":
        raise InputError("mask needs init_image (the image to inpaint)")
    clip_skip = _clip_skip(s, clip_skip)
    return Request(prompts, negatives, steps, sampler, scale, None if eta is None else float(eta), seed, height,
                   width, batch_size, float(strength), timestep_spacing, init, mask_t, low_res, class_label, latents,
                   output_type, cache_interval, guidance_interval, cache_schedule, layouts, tokens, seg,
                   clip_skip=clip_skip, sampler_options=choice)


# What conditions each family (manifest.model_summary "conditioning"): all of it required, the others' refused.
FAMILIES = {"text": "text-to-image model", "class": "class-conditional model", "none": "unconditional model",
            "low_res_image": "super-resolution model", "inpainting": "inpainting model",
            "segmentation": "semantic-synthesis model", "tokens": "layout-to-image model",
            "text_inpainting": "text-guided inpainting model"}
CONDITION_INPUTS = {"text": ("prompt",), "class": ("class_label",), "none": (), "low_res_image": ("low_res_image",),
                    "inpainting": ("init_image", "mask"), "segmentation": ("segmentation",), "tokens": ("layout",),
                    "text_inpainting": ("prompt", "init_image", "mask")}
# The inputs that only some families take, and which ones (init_image and mask: img2img with any model).
TEXT = ("text", "text_inpainting")
TAKEN_BY = {"prompt": TEXT, "negative_prompt": TEXT, "class_label": ("class",), "low_res_image": ("low_res_image",),
            "segmentation": ("segmentation",), "layout": ("tokens",)}
HOW = {"prompt": "a prompt", "low_res_image": "low_res_image (the image to upscale)", "init_image": "init_image",
       "mask": "mask (white = repaint)", "segmentation": "segmentation (a PNG or (H, W) array of class indices)",
       "layout": 'layout (a list of {"class": name or number, "box": [x0, y0, x1, y1]}, or a JSON file of it)'}


def _check_inputs(s: dict, given: dict) -> None:
    """Refuse a request that lacks its model's conditioning or brings another family's: nothing is ignored."""
    kind = s["conditioning"]
    family, needs = FAMILIES[kind], CONDITION_INPUTS[kind]  # every kind the manifest schema admits
    for name, takers in TAKEN_BY.items():
        if given[name] and kind not in takers:
            takes = " and ".join(needs) or "no conditioning (only the seed, and init_image for img2img)"
            raise InputError(f"this {family} takes no {name} ({name} is for {FAMILIES[takers[0]]}s); it takes {takes}")
    missing = [name for name in needs if not given[name]]
    if missing:
        how = HOW | ({"class_label": f"class_label (0..{s['num_classes'] - 1}, or one per image)"} if kind == "class"
                     else {})
        raise InputError(f"this is a {family}: give {' and '.join(how[name] for name in missing)}")


def _layouts(value) -> list[list]:
    """One layout (a list of objects) or one per image (a list of such lists)."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return [list(v) for v in value]
    return [value]


def _clip_skip(s: dict, clip_skip) -> int:
    if clip_skip == 1:
        return 1
    layers = s.get("clip_layers")
    if not layers:
        raise InputError("clip_skip is for CLIP text encoders (SD v1); this model's engine has none (engines built "
                         "before clip_skip existed: rebuild them)")
    return _integer(clip_skip, "clip_skip", 1, layers)


def _texts(value, name) -> list[str] | None:
    if value is None:
        return None
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts) or not texts:
        raise InputError(f"{name} must be a string or a non-empty list of strings (one per image), not "
                         f"{type(value).__name__}")
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{name} {t!r} is not valid text (it holds bytes that are not UTF-8): retype it, or "
                             f"pass it from a UTF-8 terminal") from None
    return list(texts)


def _per_image(texts: list[str], batch: int, name: str) -> list[str]:
    if len(texts) == batch:
        return texts
    if len(texts) == 1:
        return texts * batch
    raise InputError(f"{len(texts)} {name}s for batch_size={batch}: give one {name}, or one per image")


def _integer(value, name, lo, hi=None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (
            hi is not None and value > hi):
        raise InputError(f"{name} must be an integer in {lo}..{'' if hi is None else hi}, not {value!r}")
    return int(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def _label(class_label, index):
    labels = np.asarray(class_label).reshape(-1)
    return int(labels[index if labels.size > 1 else 0])


def _size(s: dict, height, width, init, low_res, seg=None) -> tuple[int, int]:
    if s["conditioning"] == "low_res_image" and low_res is not None:
        default = (low_res.shape[2] * s["latent_factor"], low_res.shape[3] * s["latent_factor"])
    elif seg is not None:  # the map is at segmentation_factor pixels per latent pixel
        default = tuple(side * s["latent_factor"] // s["segmentation_factor"] for side in seg.shape[2:])
    elif init is not None:
        default = (init.shape[2], init.shape[3])
    else:
        default = (s["default_size"], s["default_size"])
    height = default[0] if height is None else _integer(height, "height", 1)
    width = default[1] if width is None else _integer(width, "width", 1)
    m = s["size_multiple"]
    if height % m or width % m:
        raise InputError(f"size {width}x{height} is not supported by this model: width and height must be "
                         f"positive multiples of {m} (latent factor {s['latent_factor']} times the UNet's "
                         f"downsampling); e.g. {max(m, round(width / m) * m)}x{max(m, round(height / m) * m)}")
    return height, width


def _check_limits(shapes: dict, batch, height, width):
    """The shape ranges compiled into the engine (TensorRT profiles, AOTInductor guards)."""
    lo, hi = shapes.get("batch", [1, None])
    if batch < lo or (hi is not None and batch > hi):
        raise InputError(f"batch_size {batch} is outside this engine's range {lo}..{hi}: rebuild it for "
                         "larger batches (see `ldmrt build --help`)")
    for name, side in (("height", height), ("width", width)):
        if shapes.get("max_size") and side > shapes["max_size"]:
            raise InputError(f"{name} {side} exceeds this engine's maximum {shapes['max_size']}")


def _guided(s: dict, guidance_scale) -> bool:
    kind = s["conditioning"]
    if kind in ("text", "class", "text_inpainting"):
        custom = guidance_scale is not None and guidance_scale != 1.0
        if custom and not s["unconditional_input"]:
            raise InputError("this model has no unconditional input, so no classifier-free guidance: "
                             "pass guidance_scale=1 (or None)")
        return (guidance_scale is None or custom) and s["unconditional_input"]
    if guidance_scale not in (None, 1.0):
        raise InputError(f"classifier-free guidance needs a text or class-conditional model; this one is "
                         f"conditioned on {kind}: pass guidance_scale=None")
    return False


def numerical_error(engine, req: Request, where: str) -> NumericalError:
    precision = engine.manifest["precision"]
    causes = []
    if precision != "fp32":
        causes.append(f"{precision} overflow (rebuild without --fp16)")
    if req.guidance_scale is not None and abs(req.guidance_scale) > 20:
        causes.append(f"the guidance scale {req.guidance_scale:g} (usual: 1-15)")
    causes.append("weights that do not fit the model (check the checkpoint)")
    return NumericalError(f"NaN or inf in {where}: stopped before writing a garbage image. Likely cause: "
                          + "; or ".join(causes))


# --- conditioning -----------------------------------------------------------------------------------------
def conditioning(engine, req: Request, shape) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(context, concat) for the UNet: [uncond; cond] along the batch when guided. The request has its model's
    inputs (check_request)."""
    s = engine.summary
    kind, batch, guided = s["conditioning"], req.batch_size, req.guidance_scale is not None
    context = concat = None
    if kind in TEXT:
        context = text_contexts(engine, [*req.negative_prompts, *req.prompts] if guided else req.prompts,
                                req.clip_skip)
    elif kind == "class":
        try:
            labels = torch.as_tensor(req.class_label, dtype=torch.long).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"class_label must be an integer or a list of integers, not {req.class_label!r}") from None
        if labels.numel() not in (1, batch):
            raise InputError(f"class_label: give one label or batch_size={batch} labels, not {labels.numel()}")
        labels = labels.expand(batch).contiguous()
        if (labels < 0).any() or (labels >= s["num_classes"]).any():
            raise InputError(f"class_label must be in 0..{s['num_classes'] - 1}")
        if guided:
            labels = torch.cat([torch.full_like(labels, s["uncond_class"]), labels])
        context = engine.backend.run("cond_stage", cond=labels)["context"]
    elif kind == "none":
        pass  # the seed alone: check_request refused any conditioning
    elif kind == "low_res_image":
        concat = resized(req.low_res_image, shape[2], shape[3], batch)
    elif kind == "tokens":
        context = engine.backend.run("cond_stage", cond=req.layout_tokens)["context"]
    elif kind == "segmentation":
        # CompVis's data: a one-hot float map of the classes at segmentation_factor pixels per latent pixel, which
        # the SpatialRescaler scales down to the latent (any size: the map is resized nearest to the request's).
        f = s["segmentation_factor"]
        seg = torch.nn.functional.interpolate(req.segmentation.float(), size=(shape[2] * f, shape[3] * f),
                                              mode="nearest").long()
        if seg.shape[0] not in (1, batch):
            raise InputError(f"{seg.shape[0]} segmentation maps for batch_size={batch}: give one, or one per image")
        # Scattered straight into float32 (F.one_hot's int64 map and its float copy held 3x the maps: 2.2 GB more at
        # 1024² for 182 classes); what it holds is counted in ldmrt/memory.py segmentation_maps.
        one_hot = torch.zeros(seg.shape[0], s["segmentation_classes"], *seg.shape[2:]).scatter_(1, seg, 1.0)
        maps = one_hot.expand(batch, -1, -1, -1).contiguous()
        concat = engine.backend.run("cond_stage", cond=maps)["context"]
    elif kind == "inpainting":
        h, w = shape[2] * s["latent_factor"], shape[3] * s["latent_factor"]
        image = resized(req.init_image, h, w, batch)
        m = resized(req.mask, h, w, batch, binary=True)
        # CompVis inpaint.py: the encoded masked image (pre-quantisation, unscaled) + the downsampled mask
        masked = engine.backend.run("encoder", image=(1 - m) * image)["mean"] / s["scale_factor"]
        concat = torch.cat([masked, torch.nn.functional.interpolate(m, size=masked.shape[-2:])], dim=1)
    if kind == "text_inpainting":
        h, w = shape[2] * s["latent_factor"], shape[3] * s["latent_factor"]
        m = resized(req.mask, h, w, batch, binary=True)
        # RunwayML's LatentInpaintDiffusion (and diffusers' StableDiffusionInpaintPipeline): the UNet takes
        # [x, mask, masked-image latent]; masked pixels are 0, the latent a posterior sample (Philox, as img2img's).
        masked = encode(engine, resized(req.init_image, h, w, batch) * (1 - m), req.seed)
        concat = torch.cat([torch.nn.functional.interpolate(m, size=masked.shape[-2:]), masked], dim=1)
        concat = torch.cat([concat, concat]) if guided else concat  # the same for the unconditional half
    return context, concat


def text_contexts(engine, texts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """(len(texts), L, D): each prompt's embedding, the shorter ones padded with the empty prompt's chunk to the
    longest (as the web UI pads prompt and negative prompt, so that they batch)."""
    contexts = [text_context(engine, t, clip_skip) for t in texts]
    longest = max(c.shape[1] for c in contexts)
    limit = engine.manifest["shapes"].get("max_context_windows")  # compiled shape ranges (AOTInductor, TensorRT)
    if limit and longest > limit * engine.summary["context_window"]:
        raise InputError(f"the prompt needs {longest // engine.summary['context_window']} windows of 75 tokens; this "
                         f"{engine.manifest['backend']} engine was compiled for at most {limit}: shorten it")
    if any(c.shape[1] < longest for c in contexts):
        empty = text_context(engine, "", clip_skip)
        contexts = [torch.cat([c, empty.repeat(1, (longest - c.shape[1]) // empty.shape[1], 1)], dim=1)
                    for c in contexts]
    return torch.cat(contexts).contiguous()  # once here, not per step in the backends


def text_context(engine, text: str, clip_skip: int = 1) -> torch.Tensor:
    """(1, L, D) embedding of one prompt, cached: prompts repeat across calls and batches. Emphasis, BREAK and
    long prompts as AUTOMATIC1111's web UI (ldmrt/prompts.py): CLIP takes any number of 77-token windows, L = 77 k."""
    if engine.tokenizer is None:
        raise EngineError(f"{engine.path} has no tokenizer files: rebuild it from a checkpoint that has them")
    return engine.context_cache.get((text, clip_skip), lambda key: _encode_prompt(engine, *key))


def _encode_prompt(engine, text: str, clip_skip: int) -> torch.Tensor:
    from .prompts import chunks, emphasized
    # Engines built before long prompts have a UNet of one window: those keep the single-window rule.
    windows = chunks(text, engine.tokenizer, long=engine.summary.get("long_prompts", False),
                     embeddings={name: len(rows) for name, rows in engine.embeddings.items()})
    # One window at a time at batch 1, as the C++ host (batching changes the GEMM blocking).
    return torch.cat([emphasized(_window_context(engine, w, clip_skip), w.weights) for w in windows], dim=1)


def _window_context(engine, window, clip_skip: int) -> torch.Tensor:
    """(1, window, D): one text-encoder window, from the layer CLIP skip names (1: the last, the graph's context).
    A window with textual-inversion rows is looked up here and runs the graph that takes token embeddings."""
    if window.fixes:
        rows = engine.token_table()[torch.tensor(window.ids)]
        for offset, name in window.fixes:
            vectors = engine.embeddings[name]
            rows[offset:offset + len(vectors)] = vectors
        out = engine.backend.run("cond_stage_embeds", token_embeds=rows[None])
    else:
        out = engine.backend.run("cond_stage", cond=torch.tensor([window.ids]))
    return out["context"] if clip_skip == 1 else out["layer_contexts"][:, -clip_skip]


def encode(engine, image: torch.Tensor, seed: int, tile: int | None = None) -> torch.Tensor:
    """init_image -> latent: the posterior mean + std * noise (Philox stream 2^32, apart from the loop's); in tiles
    of `tile` latent pixels when given (ldmrt/tiling.py)."""
    from .sampling import randn

    def whole(im):
        out = engine.backend.run("encoder", image=im)
        return out["mean"], out["std"]
    if tile is None:
        mean, std = whole(image)
    else:
        from .tiling import encode_tiled, overlap_and_margin
        mean, std = encode_tiled(whole, image, engine.summary["latent_factor"], tile, *overlap_and_margin(tile))
    noise = torch.from_numpy(randn(seed, tuple(mean.shape), stream=1 << 32))
    return (mean + std * noise).contiguous()


def decode(engine, latent: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """latent -> image (B, 3, H, W) float32 in about [-1, 1]; in tiles of `tile` latent pixels when given."""
    def whole(z):
        return engine.backend.run("decoder", latent=z)["image"].float()
    if tile is None:
        return whole(latent)
    from .tiling import decode_tiled, overlap_and_margin
    return decode_tiled(whole, latent, engine.summary["latent_factor"], tile, *overlap_and_margin(tile))


def first_stage_tile(engine, req: Request, tiled_decode) -> int | None:
    """The side in latent pixels of the first stage's tiles, or None to decode (and encode) whole. Tiles are the
    model's own latent size (SD v1: 64, as diffusers' enable_vae_tiling; the decoder's GroupNorm statistics then
    come from as many pixels as in training). tiled_decode: True/False force it; None tiles exactly when the
    estimate says the whole first stage would not fit (ldmrt/memory.py)."""
    from .memory import first_stage_fits
    if tiled_decode not in (None, True, False):
        raise InputError(f"tiled_decode must be True, False or None (automatic), not {tiled_decode!r}")
    s = engine.summary
    tile = s["default_size"] // s["latent_factor"]
    encodes = req.init_image is not None
    if tiled_decode is False or (req.output_type == "latent" and not encodes):
        return None
    if tiled_decode is None:
        larger = max(req.height, req.width) // s["latent_factor"] > tile
        if not larger or first_stage_fits(engine, req.batch_size, req.height, req.width, encode=encodes):
            return None
    return tile


# --- hires fix ---------------------------------------------------------------------------------------------
def hires_fix(engine, prompt, hires, strength, settings: dict):
    """Two passes (AUTOMATIC1111's "hires fix"): the images at height x width (default the model's own size), their
    pixels upscaled (bicubic) to `hires` (a side, or (height, width)), then img2img there at `strength`. A model
    beyond the size it was trained at repeats content; the first pass fixes the composition at its size."""
    s = engine.summary
    try:
        target = (int(hires), int(hires)) if isinstance(hires, (int, np.integer)) else tuple(int(v) for v in hires)
    except (TypeError, ValueError):
        target = ()
    if len(target) != 2 or isinstance(hires, bool):
        raise InputError(f"hires must be a size (an integer) or (height, width), not {hires!r}")
    if not _finite(strength) or not 0 < strength <= 1:
        raise InputError(f"hires_strength must be a number in (0, 1], not {strength!r}")
    if s["conditioning"] not in ("text", "class", "none"):
        raise InputError(f"hires is for text-to-image, class-conditional and unconditional models, not this "
                         f"{s['conditioning']}-conditioned one")
    for name in ("init_image", "mask", "latents"):
        if settings.get(name) is not None:
            raise InputError(f"hires makes its own init_image (the first pass's images): it takes no {name}")
    target = _size(s, target[0], target[1], None, None)  # checked before the first pass runs
    _check_limits(engine.manifest.get("shapes", {}), 1, *target)
    first = generate(engine, prompt, **{**settings, "output_type": "np"})
    first_size = first.shape[1:3]
    init = torch.from_numpy(first).permute(0, 3, 1, 2) * 2 - 1
    out = generate(engine, prompt, **{**settings, "height": target[0], "width": target[1], "init_image": init,
                                      "strength": float(strength)})
    if settings["output_type"] == "pil":  # the record reproduces the call: first-pass size, hires and its strength
        import json

        from .images import PARAMETERS
        for image in out:
            record = json.loads(image.info[PARAMETERS])
            record.pop("strength", None)
            record.update(height=int(first_size[0]), width=int(first_size[1]), hires=list(target),
                          hires_strength=float(strength))
            image.info[PARAMETERS] = json.dumps(record)
    return out
