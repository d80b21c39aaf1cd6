"""AUTOMATIC1111's web UI API (/sdapi/v1/...), the subset clients use, as ldmrt requests.

Its conventions: seed -1 is a random seed, reported back; sampler names such as "Euler a" and "DPM++ 2M Karras"
(ldmrt.schedulers.resolve), an optional scheduler name; n_iter batches of batch_size images, image k with seed
seed + k (ldmrt runs each image as its own request, so that seed + k alone reproduces image k; the step batcher
batches them anyway). Fields ldmrt has no use for are accepted and listed in `info` as ignored.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import secrets

from ..errors import InputError
from ..images import open_image
from ..pipeline import MAX_SEED
from ..schedulers import A1111_SCHEDULER_NAMES

# The request fields ldmrt acts on; any other field a client sends is ignored and said so.
TXT2IMG_FIELDS = ("prompt", "negative_prompt", "steps", "sampler_name", "sampler_index", "scheduler", "cfg_scale",
                  "seed", "width", "height", "batch_size", "n_iter", "eta")
IMG2IMG_FIELDS = TXT2IMG_FIELDS + ("init_images", "mask", "denoising_strength", "inpainting_mask_invert")
DEFAULTS = {"prompt": "", "negative_prompt": "", "steps": 20, "cfg_scale": 7.0, "seed": -1, "batch_size": 1,
            "n_iter": 1, "denoising_strength": 0.75}  # the web UI's own defaults
# Its "Automatic" scheduler is the sampler's own grid: no override.
AUTOMATIC = ("", "Automatic", None)
MAX_IMAGES = 64  # n_iter x batch_size per request


class Named(io.BytesIO):
    """Decoded bytes that name themselves in error messages ("init_images[0]", not a BytesIO repr)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self):
        return self.label


def decode_image(value, name: str, max_bytes: int):
    """A base64 image (optionally a data: URL, as the web UI's own front end sends) -> PIL image."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be a base64 PNG or JPEG string, not {type(value).__name__}")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    if len(value) * 3 // 4 > max_bytes:
        raise InputError(f"{name} is larger than this server's {max_bytes:,}-byte limit per image: resize it")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{name} is not valid base64") from None
    return open_image(Named(data, name))


def requests(body: dict, *, img2img: bool, max_image_bytes: int) -> tuple[list[dict], dict]:
    """An A1111 body -> (one ldmrt settings dict per image, what to report: seeds, ignored fields)."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    known = IMG2IMG_FIELDS if img2img else TXT2IMG_FIELDS
    ignored = sorted(k for k in body if k not in known)
    get = {**DEFAULTS, **{k: v for k, v in body.items() if v is not None}}.get
    seed = get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed <= MAX_SEED:
        raise InputError(f"seed must be an integer in 0..{MAX_SEED}, or -1 for a random one, not {seed!r}")
    if seed == -1:
        seed = secrets.randbelow(2 ** 32)  # the web UI's random seeds are 32-bit too
    batch, n_iter = get("batch_size"), get("n_iter")
    for name, value in (("batch_size", batch), ("n_iter", n_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, not {value!r}")
    if batch * n_iter > MAX_IMAGES:
        raise InputError(f"n_iter x batch_size = {batch * n_iter} images: this server makes at most {MAX_IMAGES} per "
                         "request; send several requests")
    sampler = get("sampler_name") or get("sampler_index")
    scheduler = get("scheduler")
    scheduler = A1111_SCHEDULER_NAMES.get(scheduler, scheduler) if isinstance(scheduler, str) else scheduler
    common = {"prompt": get("prompt"), "negative_prompt": get("negative_prompt"), "steps": get("steps"),
              "guidance_scale": get("cfg_scale"), "height": get("height"), "width": get("width"), "eta": get("eta"),
              **({"sampler": sampler} if sampler else {}),
              **({"timestep_spacing": scheduler} if scheduler not in AUTOMATIC else {})}
    if img2img:
        images = get("init_images") or []
        if not isinstance(images, list) or not images:
            raise InputError("img2img needs init_images: a list with one base64 image (or one per image)")
        inits = [decode_image(v, f"init_images[{i}]", max_image_bytes) for i, v in enumerate(images)]
        common["strength"] = get("denoising_strength")
        if body.get("mask"):
            mask = decode_image(body["mask"], "mask", max_image_bytes).convert("L")
            if body.get("inpainting_mask_invert"):
                from PIL import ImageOps
                mask = ImageOps.invert(mask)
            common["mask"] = mask
    seeds = [seed + k for k in range(batch * n_iter)]
    if seeds[-1] > MAX_SEED:
        raise InputError(f"seed + {len(seeds) - 1} passes {MAX_SEED}: choose a smaller seed")
    out = []
    for k, s in enumerate(seeds):
        settings = {**common, "seed": s, "batch_size": 1}
        if img2img:
            settings["init_image"] = inits[k % len(inits)]  # the web UI cycles through its init images
        out.append(settings)
    return out, {"seed": seed, "all_seeds": seeds, "ignored": ignored, "batch_size": batch, "n_iter": n_iter}


def response(images_b64: list[str], records: list[dict], body: dict, report: dict) -> dict:
    """The web UI's response shape: images, the request's parameters, and `info` as a JSON string."""
    first = records[0] if records else {}
    info = {"prompt": first.get("prompt"), "all_prompts": [r.get("prompt") for r in records],
            "negative_prompt": first.get("negative_prompt"), "seed": report["seed"], "all_seeds": report["all_seeds"],
            "subseed": -1, "all_subseeds": [-1] * len(records), "width": first.get("width"),
            "height": first.get("height"), "sampler_name": body.get("sampler_name") or first.get("sampler"),
            "steps": first.get("steps"), "cfg_scale": first.get("guidance_scale"),
            "batch_size": report["batch_size"], "n_iter": report["n_iter"], "ignored_fields": report["ignored"],
            "sd_model_name": first.get("model"), "infotexts": [json.dumps(r) for r in records], "ldmrt": records}
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    parameters["seed"] = report["seed"]
    return {"images": images_b64, "parameters": parameters, "info": json.dumps(info)}
