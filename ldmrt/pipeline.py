"""The generate pipeline: a request checked whole, conditioning, the C++ sampler loop over the UNet, decoding.

    prompt(s) --tokenizer--> ids --cond_stage--> context      once per distinct prompt (LRU cache)
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
from dataclasses import dataclass

import numpy as np
import torch

from .errors import EngineError, InputError, NumericalError
from .images import image_tensor, mask_tensor, resized, to_pil
from .version import __version__

# guidance_scale=None means this where the model has an unconditional input, no guidance elsewhere.
DEFAULT_GUIDANCE = 5.0
OUTPUT_TYPES = ("pil", "np", "latent")
MAX_SEED = 2 ** 64 - 1
CONTEXT_CACHE_SIZE = 64  # prompt embeddings kept per engine (SD v1: 230 KB each)
# `ldmrt generate --fast`: chosen from the quality table of README "Doing less per image" (the shipped model's
# adherence within 2 points of exact).
FAST_PRESET = {"cache_interval": 2, "guidance_interval": (0.0, 0.7)}


class ContextCache:
    """Prompt -> (1, L, D) embedding, least recently used evicted: memory stays flat over any number of prompts."""

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

    def record(self, engine, index: int) -> dict:
        """The `parameters` of image `index`: what reproduces it (the PNG metadata schema, ldmrt/images.py)."""
        m = engine.manifest
        return {"prompt": None if self.prompts is None else self.prompts[index],
                "negative_prompt": self.negative_prompts[index], "steps": self.steps, "sampler": self.sampler,
                "guidance_scale": self.guidance_scale, "eta": self.eta, "seed": self.seed, "height": self.height,
                "width": self.width, "batch_size": self.batch_size, "batch_index": index,
                "timestep_spacing": self.timestep_spacing, "cache_interval": self.cache_interval,
                **({"cache_schedule": self.cache_schedule} if self.cache_schedule != "uniform" else {}),
                "guidance_interval": None if self.guidance_interval is None else list(self.guidance_interval),
                **({"strength": self.strength} if self.init_image is not None else {}),
                **({"class_label": _label(self.class_label, index)} if self.class_label is not None else {}),
                "model": m["model"].get("name"), "engine": str(engine.path), "backend": m["backend"],
                "precision": engine.precision, "ldmrt": __version__}  # what ran here


def generate(engine, prompt=None, *, negative_prompt="", steps: int = 50, sampler: str = "ddim",
             guidance_scale=None, eta=None, seed: int = 0, height=None, width=None, batch_size=None, init_image=None,
             strength: float = 0.75, mask=None, class_label=None, low_res_image=None, latents=None,
             timestep_spacing: str = "uniform", output_type: str = "pil", progress: bool = False,
             cache_interval: int = 1, guidance_interval=None, cache_schedule: str = "uniform"):
    """See Engine.generate."""
    from .sampling import make_plan, randn, run

    req = check_request(engine, prompt, negative_prompt, steps, sampler, guidance_scale, eta, seed, height, width,
                        batch_size, init_image, strength, mask, class_label, low_res_image, latents,
                        timestep_spacing, output_type, cache_interval, guidance_interval, cache_schedule)
    s = engine.summary
    # The plan is compiled before any graph runs: a bad sampler, spacing or step count costs nothing.
    img2img = req.init_image is not None and s["conditioning"] != "inpainting"
    try:
        plan = make_plan(sampler=req.sampler, steps=req.steps, alphas_cumprod=engine.alphas_cumprod, eta=req.eta,
                         timestep_spacing=req.timestep_spacing, strength=req.strength if img2img else 1.0,
                         cache_interval=req.cache_interval, guidance_interval=req.guidance_interval,
                         cache_schedule=req.cache_schedule)
    except ValueError as e:
        raise InputError(str(e)) from None
    from .memory import check_request_memory
    check_request_memory(engine, req.batch_size, req.height, req.width, req.guidance_scale is not None,
                         encode=req.init_image is not None)

    shape = (req.batch_size, s["latent_channels"], req.height // s["latent_factor"], req.width // s["latent_factor"])
    context, concat = conditioning(engine, req, shape)
    device = getattr(engine.backend, "device", None)
    if device is not None and torch.device(device).type == "cuda":  # constant per step: copied to the GPU once
        context, concat = (None if c is None else c.to(device) for c in (context, concat))
    x_T = req.latents if req.latents is not None else torch.from_numpy(randn(req.seed, shape))
    x0 = sample_mask = None
    if img2img:
        x0 = encode(engine, resized(req.init_image, req.height, req.width, req.batch_size), req.seed)
        if req.mask is not None:  # keep the latent where the mask is 0 (CompVis: mask 1 = keep x0)
            sample_mask = 1.0 - resized(req.mask, shape[2], shape[3], req.batch_size, binary=True)

    unet = UNetCalls(engine, req, plan, context, concat)
    if progress:
        from tqdm import tqdm
        unet.bar = bar = tqdm(total=len(plan.stages), desc="ldmrt", unit="step")
    else:
        bar = None

    try:
        latent = run(plan, unet, x_T, guidance_scale=req.guidance_scale, x0=x0, mask=sample_mask, seed=req.seed)
    finally:
        if bar is not None:
            bar.close()
    if not torch.isfinite(latent).all():
        raise numerical_error(engine, req, "the final latent")
    if req.output_type == "latent":
        return latent
    image = engine.backend.run("decoder", latent=latent)["image"].float()
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
                  output_type, cache_interval=1, guidance_interval=None, cache_schedule="uniform") -> Request:
    s = engine.summary
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be 'pil', 'np' or 'latent', not {output_type!r}")
    prompts = _texts(prompt, "prompt")
    if batch_size is None:
        batch_size = len(prompts) if prompts else 1
    batch_size = _integer(batch_size, "batch_size", 1)
    if prompts is not None:
        prompts = _per_image(prompts, batch_size, "prompt")
    negatives = _per_image(_texts(negative_prompt, "negative_prompt") or [""], batch_size, "negative_prompt")
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
    if not isinstance(sampler, str) or not isinstance(timestep_spacing, str):
        raise InputError("sampler and timestep_spacing are names (see `ldmrt generate --help`)")
    init = None if init_image is None else image_tensor(init_image)
    low_res = None if low_res_image is None else image_tensor(low_res_image)
    mask_t = None if mask is None else mask_tensor(mask)
    height, width = _size(s, height, width, init, low_res)
    _check_limits(engine.manifest.get("shapes", {}), batch_size, height, width)
    guided = _guided(s, guidance_scale)
    scale = (DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)) if guided else None
    if latents is not None:
        latents = torch.as_tensor(latents, dtype=torch.float32)
        shape = (batch_size, s["latent_channels"], height // s["latent_factor"], width // s["latent_factor"])
        if tuple(latents.shape) != shape:
            raise InputError(f"latents have shape {tuple(latents.shape)}; this request needs {shape}")
        if not torch.isfinite(latents).all():
            raise InputError("latents have NaN or infinite values")
    if mask_t is not None and init is None and s["conditioning"] != "inpainting":
        raise InputError("mask needs init_image (the image to inpaint)")
    return Request(prompts, negatives, steps, sampler, scale, None if eta is None else float(eta), seed, height,
                   width, batch_size, float(strength), timestep_spacing, init, mask_t, low_res, class_label, latents,
                   output_type, cache_interval, guidance_interval, cache_schedule)


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


def _size(s: dict, height, width, init, low_res) -> tuple[int, int]:
    if s["conditioning"] == "low_res_image" and low_res is not None:
        default = (low_res.shape[2] * s["latent_factor"], low_res.shape[3] * s["latent_factor"])
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
    if kind in ("text", "class"):
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
    """(context, concat) for the UNet: [uncond; cond] along the batch when guided."""
    s = engine.summary
    kind, batch, guided = s["conditioning"], req.batch_size, req.guidance_scale is not None
    context = concat = None
    if kind == "text":
        if req.prompts is None:
            raise InputError("this is a text-to-image model: give a prompt")
        cond = torch.cat([text_context(engine, p) for p in req.prompts])
        context = torch.cat([torch.cat([text_context(engine, p) for p in req.negative_prompts]), cond]) if guided else cond
        context = context.contiguous()  # once here, not per step in the backends
    elif kind == "class":
        if req.class_label is None:
            raise InputError(f"this is a class-conditional model: give class_label (0..{s['num_classes'] - 1})")
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
        if req.prompts and any(req.prompts):
            raise InputError("this model is unconditional: it takes no prompt")
    elif kind == "low_res_image":
        if req.low_res_image is None:
            raise InputError("this is a super-resolution model: give low_res_image")
        concat = resized(req.low_res_image, shape[2], shape[3], batch)
    elif kind == "inpainting":
        if req.init_image is None or req.mask is None:
            raise InputError("this is an inpainting model: give init_image and mask (white = repaint)")
        h, w = shape[2] * s["latent_factor"], shape[3] * s["latent_factor"]
        image = resized(req.init_image, h, w, batch)
        m = resized(req.mask, h, w, batch, binary=True)
        # CompVis inpaint.py: the encoded masked image (pre-quantisation, unscaled) + the downsampled mask
        masked = engine.backend.run("encoder", image=(1 - m) * image)["mean"] / s["scale_factor"]
        concat = torch.cat([masked, torch.nn.functional.interpolate(m, size=masked.shape[-2:])], dim=1)
    else:
        raise InputError(f"generate does not support {kind}-conditioned models yet; use ldmrt.load_model")
    return context, concat


def text_context(engine, text: str) -> torch.Tensor:
    """(1, L, D) embedding of one prompt, cached: prompts repeat across calls and batches."""
    if engine.tokenizer is None:
        raise EngineError(f"{engine.path} has no tokenizer files: rebuild it from a checkpoint that has them")
    return engine.context_cache.get(text, lambda t: engine.backend.run("cond_stage", cond=engine.tokenizer([t]))["context"])


def encode(engine, image: torch.Tensor, seed: int) -> torch.Tensor:
    """init_image -> latent: the posterior mean + std * noise (Philox stream 2^32, apart from the loop's)."""
    from .sampling import randn
    out = engine.backend.run("encoder", image=image)
    noise = torch.from_numpy(randn(seed, tuple(out["mean"].shape), stream=1 << 32))
    return (out["mean"] + out["std"] * noise).contiguous()
