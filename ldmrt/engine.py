"""Engines: a folder of compiled graphs plus `manifest.json`, and `Engine` to build, load and run one.

    engines/NAME/
      manifest.json      format and versions, model config and summary, precision, backend, shape
                         ranges, per-file sha256, the libraries and device that built it
      cond_stage.onnx    the graphs of the model family (see ldmrt.export.graphs), or model.safetensors
      unet.onnx          + config.yaml for the torch backend, or <graph>.plan for TensorRT, or
                         <graph>.pt2 AOTInductor packages (backend "aoti": export/aoti.py; the same files
                         run in C++ hosts, csrc/include/ldmrt/engine.h; their manifest "graphs" entries
                         list each graph's inputs and outputs in call order)
      decoder.onnx
      encoder.onnx
      tokenizer/         the tokenizer's standard files (vocab.txt, or vocab.json + merges.txt)

A build is written to a temporary folder beside the target and renamed into place. `Engine.load` reads
and checks the manifest and the files before anything heavy is loaded, and says how to rebuild.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__

FORMAT = "ldmrt-engine"
FORMAT_VERSION = 1
BACKENDS = ("onnxruntime", "torch", "tensorrt", "aoti", "openvino")
ONNX_RUNTIMES = {"onnxruntime": "onnx", "openvino": "openvino"}  # backends that run the ONNX export: pip extra
DEFAULT_MODEL = "shapes"
# Where classifier-free guidance has an unconditional input: text models ("" prompt) and class models
# whose embedder has one more class than the data set (CompVis's cin256-v2 uses label 1000).
DEFAULT_GUIDANCE = 5.0


class EngineError(ValueError):
    """An engine folder that cannot be used here, with how to rebuild it."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _device_record(backend_device: str) -> dict:
    from .info import cpu_features
    if backend_device.startswith("cuda"):
        i = torch.device(backend_device).index or 0
        return {"type": "cuda", "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
    cpu = cpu_features()
    return {"type": "cpu", "machine": cpu["machine"], "flags": [f for f, on in cpu["flags"].items() if on]}


def _library_versions() -> dict:
    from .info import _version
    return {name: _version(name) for name in ("torch", "onnx", "onnxruntime", "numpy")} | {
        "python": platform.python_version()}


def model_summary(model, cfg: dict) -> dict:
    """What `generate` needs to know about a model, without loading it."""
    p = cfg["params"]
    unet = p["unet_config"]["params"]
    ddconfig = p["first_stage_config"]["params"].get("ddconfig", {})
    factor = 2 ** (len(ddconfig.get("ch_mult", [1])) - 1)
    cond_cfg = p["cond_stage_config"]
    cond_target = cond_cfg if isinstance(cond_cfg, str) else cond_cfg["target"].rsplit(".", 1)[-1]
    kind = {"__is_unconditional__": "none", "BERTEmbedder": "text", "FrozenCLIPEmbedder": "text",
            "ClassEmbedder": "class", "Identity": "low_res_image", "__is_first_stage__": "inpainting",
            "SpatialRescaler": "segmentation", "TransformerEmbedder": "tokens"}[cond_target]
    if kind == "text" and cond_target == "BERTEmbedder" and not cond_cfg.get("params", {}).get("use_tokenizer", True):
        kind = "tokens"  # layout2img: token ids of bounding boxes, no text
    summary = {
        "conditioning": kind,
        "conditioning_key": model.conditioning_key,
        "latent_channels": p["first_stage_config"]["params"]["embed_dim"],
        "latent_factor": factor,
        "size_multiple": factor * 2 ** (len(unet.get("channel_mult", [1])) - 1),
        "default_size": p.get("image_size", unet.get("image_size", 64)) * factor,
        "scale_factor": float(model.scale_factor),
        "parameterization": model.parameterization,
        "alphas_cumprod": [float(a) for a in model.schedule_alphas_cumprod],
    }
    if kind == "class":
        n = model.cond_stage_model.embedding.num_embeddings
        summary["num_classes"] = n
        summary["uncond_class"] = 1000 if n > 1000 else None
    return summary


@dataclass
class _Prepared:
    """Everything the sampler loop needs, per call of generate."""
    context: torch.Tensor | None  # (2B or B, L, D): [uncond; cond] when guided
    concat: torch.Tensor | None
    guided: bool


class Engine:
    def __init__(self, path: Path, manifest: dict, backend, tokenizer=None):
        self.path, self.manifest, self.backend, self.tokenizer = path, manifest, backend, tokenizer
        self.summary = manifest["model"]["summary"]
        self.alphas_cumprod = np.asarray(self.summary["alphas_cumprod"], dtype=np.float64)
        self._context_cache: dict[str, torch.Tensor] = {}

    # --- build ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, model=None, out_dir="engines/default", *, ckpt=None, config=None, fp16: bool = False,
              backend: str = "onnxruntime", random_weights: bool = False, tokenizer=None,
              tensorrt=None, onnx_fusions: str | None = None, progress=print) -> "Engine":
        """Load a model (preset name, config.yaml, diffusers folder; default: the shipped model), export
        its graphs for `backend`, write the engine folder atomically, and return the loaded engine.
        tensorrt: ldmrt.export.tensorrt.BuildOptions (shape ranges, bf16, refit, timing cache).
        onnx_fusions: None, or "cuda" to fuse onto ONNX Runtime's CUDA contrib operators (such an engine
        needs the CUDA execution provider; on CPUs no fusion measured faster, see export/optimize.py)."""
        from .checkpoint import load_model
        from .config import shipped_checkpoint

        if backend not in BACKENDS:
            raise EngineError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if backend == "tensorrt":  # say what this machine lacks before loading any weights
            from .export.tensorrt import check_build_environment
            check_build_environment()
        if backend in ONNX_RUNTIMES:
            extra = ONNX_RUNTIMES[backend]
            try:
                for module in ("onnx", backend):
                    importlib.import_module(module)
            except ImportError as e:
                raise EngineError(f"the {backend} backend needs onnx and {backend} ({e}): "
                                  f"pip install 'ldmrt[{extra}]', or build with --backend torch") from None
        model = DEFAULT_MODEL if model is None and ckpt is None and config is None else model
        if ckpt is None and not random_weights and isinstance(model, str):
            ckpt = shipped_checkpoint(model)
        t0 = time.perf_counter()
        ldm = load_model(config if config is not None else model, ckpt, random_weights=random_weights,
                         tokenizer=tokenizer)
        cfg = ldm.ldmrt_config
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building."))
        try:
            summary = model_summary(ldm, cfg)
            precision, graphs, device, shapes = cls._export(ldm, summary, cfg, tmp, backend, fp16, progress,
                                                            tensorrt, onnx_fusions)
            tok = getattr(ldm.cond_stage_model, "tokenizer", None) if ldm.cond_stage_model is not None else None
            tokenizer = None
            if tok is not None:
                (tmp / "tokenizer").mkdir()
                for f in tok.files:
                    shutil.copyfile(f, tmp / "tokenizer" / Path(f).name)
                tokenizer = {"kind": tok.kind, "max_length": tok.max_length,
                             "files": [f"tokenizer/{Path(f).name}" for f in tok.files]}
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "ldmrt_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "backend": backend, "precision": precision,
                "model": {"name": str(model) if isinstance(model, (str, os.PathLike)) else None, "config": cfg,
                          "summary": summary},
                "tokenizer": tokenizer,
                "graphs": graphs,
                # "batch" counts images (a guided UNet runs twice as many); backends that compile shape
                # ranges (TensorRT profiles, AOTInductor guards) record their limits, which generate checks.
                "shapes": shapes or {"size_multiple": summary["size_multiple"]},
                "files": {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                          for p in files},
                "built_with": _library_versions(),
                "device": device if isinstance(device, dict) else _device_record(device),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress:
            progress(f"ldmrt build: wrote {out_dir} ({backend}, {precision}) in {time.perf_counter() - t0:.1f} s")
        return cls.load(out_dir)

    @staticmethod
    def _export(ldm, summary: dict, cfg, out: Path, backend: str, fp16: bool, progress, tensorrt=None,
                onnx_fusions=None):
        if backend == "torch":
            import yaml

            from .checkpoint import save_checkpoint
            # On a CPU the reduced precision that runs well is bf16 (fp16 CPU kernels are slow or missing).
            precision = "bf16" if fp16 else "fp32"
            save_checkpoint(ldm, out / "model.safetensors")
            (out / "config.yaml").write_text(yaml.safe_dump({"model": cfg}, sort_keys=False))
            return precision, {"model": {"file": "model.safetensors", "config": "config.yaml"}}, "cpu", None
        if backend == "tensorrt":
            from .export.tensorrt import export_tensorrt
            return export_tensorrt(ldm, out, summary=summary, fp16=fp16, options=tensorrt, progress=progress)
        if backend == "aoti":
            from .export.aoti import MAX_BATCH, MAX_LATENT, export_aoti
            graphs = export_aoti(ldm, out, fp16=fp16, progress=progress)
            # MAX_BATCH bounds the UNet's batch, which guidance doubles.
            return "fp16" if fp16 else "fp32", graphs, "cpu", {
                "batch": [1, MAX_BATCH // 2], "size_multiple": summary["size_multiple"],
                "max_size": MAX_LATENT * summary["latent_factor"]}
        from .export.onnx import export_onnx
        if backend == "openvino":
            # fp32 graphs: OpenVINO's CPU plugin lowers them to bf16 itself when asked (the fastest CPU path
            # measured, benchmarks/README.md), keeping its own fp32 islands.
            return "bf16" if fp16 else "fp32", export_onnx(ldm, out), "cpu", None
        graphs = export_onnx(ldm, out, fp16=fp16, fusions=onnx_fusions)
        precision = "fp16" if fp16 else "fp32"
        return precision, graphs, "cpu", None

    # --- load -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path, *, verify: bool = True, device: str | None = None, providers=None,
             threads: int | None = None) -> "Engine":
        """Check the manifest and files (sha256 when `verify`), then load the backend.

        device: for torch engines, "cpu" or "cuda[:i]" (default: CUDA when available). providers: ONNX Runtime
        execution providers (default: the best available). threads: ONNX Runtime's intra-op threads or
        OpenVINO's inference threads (default: theirs)."""
        path = Path(path)
        manifest = read_manifest(path, verify=verify)
        rebuild = f"rebuild it: ldmrt build --model {manifest['model'].get('name') or 'MODEL'} -o {path}"
        backend_name = manifest["backend"]
        tokenizer = None
        if backend_name == "torch":
            from .backends.torch import TorchBackend
            from .checkpoint import load_model
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[manifest["precision"]]
            ldm = load_model(path / "config.yaml", path / "model.safetensors", tokenizer=path / "tokenizer"
                             if manifest.get("tokenizer") else None)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if dtype == torch.bfloat16 and device.startswith("cuda"):
                dtype = torch.float16  # "--fp16" engines: bf16 is the CPU's stand-in, GPUs run fp16
            backend = TorchBackend(ldm, device=device, dtype=dtype)
            tokenizer = getattr(ldm.cond_stage_model, "tokenizer", None)  # loaded from path / "tokenizer"
        elif backend_name in ONNX_RUNTIMES:
            files = {name: path / g["file"] for name, g in manifest["graphs"].items()}
            try:
                if backend_name == "onnxruntime":
                    from .backends.onnxruntime import OnnxRuntimeBackend
                    backend = OnnxRuntimeBackend(files, providers=providers, threads=threads)
                else:
                    from .backends.openvino import OpenVinoBackend
                    backend = OpenVinoBackend(files, precision=manifest["precision"], threads=threads)
            except ImportError as e:
                raise EngineError(f"{path} is an {backend_name} engine and {backend_name} is not installed ({e}): "
                                  f"pip install 'ldmrt[{ONNX_RUNTIMES[backend_name]}]'") from None
        elif backend_name == "aoti":
            from .backends.aoti import AotiBackend
            backend = AotiBackend(manifest["graphs"], path)
        elif backend_name == "tensorrt":
            from .backends.tensorrt import TensorRTBackend  # checks TensorRT, CUDA and the engine's fingerprint
            backend = TensorRTBackend.from_manifest(path, manifest)
        else:
            raise EngineError(f"{path}: backend {backend_name!r} is not supported by ldmrt {__version__}; {rebuild}")
        if manifest.get("tokenizer") and tokenizer is None:
            from .tokenizer import find_tokenizer
            tok = manifest["tokenizer"]
            tokenizer = find_tokenizer(path / "tokenizer", tok["kind"], tok["max_length"])
        return cls(path, manifest, backend, tokenizer)

    # --- generate -------------------------------------------------------------------------------
    def generate(self, prompt=None, *, negative_prompt: str = "", steps: int = 50, sampler: str = "ddim",
                 guidance_scale: float | None = None, eta: float | None = None, seed: int = 0,
                 height: int | None = None, width: int | None = None, batch_size: int = 1, init_image=None,
                 strength: float = 0.75, mask=None, class_label=None, low_res_image=None, latents=None,
                 timestep_spacing: str = "uniform", output_type: str = "pil", progress: bool = False):
        """Images from the engine. See README "Engine.generate" for each model family's inputs.

        guidance_scale: None means 5.0 where the model has an unconditional input (text models, class
        models with a null class), 1.0 (no guidance) otherwise. mask: 1/white marks what to repaint; with
        an ordinary model it is masked img2img, and `strength` applies to it too (1.0 repaints from noise).
        latents: caller-given x_T (B, C, h, w), e.g. from torch.Generator, to reproduce other tools' images.
        output_type: "pil" (list of PIL images), "np" (B, H, W, 3) float32 in [0, 1], or "latent".
        """
        from .sampling import make_plan, randn, run

        s = self.summary
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', not {output_type!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        height, width = self._check_size(height, width, init_image, low_res_image)
        self._check_limits(batch_size, height, width)
        shape = (batch_size, s["latent_channels"], height // s["latent_factor"], width // s["latent_factor"])
        prep = self._conditioning(prompt, negative_prompt, guidance_scale, batch_size, class_label,
                                  low_res_image, init_image, mask, shape)
        scale = (DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale) if prep.guided else None
        device = getattr(self.backend, "device", None)
        if device is not None and torch.device(device).type == "cuda":  # constant per step: copied to the GPU once
            prep = _Prepared(*(None if c is None else c.to(device) for c in (prep.context, prep.concat)), prep.guided)

        if latents is not None:
            x_T = torch.as_tensor(latents, dtype=torch.float32)
            if tuple(x_T.shape) != shape:
                raise ValueError(f"latents have shape {tuple(x_T.shape)}; this request needs {shape}")
        else:
            x_T = torch.from_numpy(randn(seed, shape))
        x0 = sample_mask = None
        img2img = init_image is not None and s["conditioning"] != "inpainting"
        if img2img:
            x0 = self._encode(init_image, seed, height, width, batch_size)
            if mask is not None:  # keep the latent where the mask is 0 (CompVis: mask 1 = keep x0)
                sample_mask = 1.0 - _mask_tensor(mask, shape[2], shape[3], batch_size)
        elif mask is not None and s["conditioning"] != "inpainting":
            raise ValueError("mask needs init_image (the image to inpaint)")
        plan = make_plan(sampler=sampler, steps=steps, alphas_cumprod=self.alphas_cumprod, eta=eta,
                         timestep_spacing=timestep_spacing,
                         strength=strength if img2img else 1.0)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(plan.stages), desc="ldmrt", unit="step")

        # The UNet's inputs are built once; per step only x (the loop's own buffer) and t change.
        unet_batch = batch_size * (2 if scale is not None else 1)
        inputs = {"t": torch.zeros(unet_batch, dtype=torch.float32)}
        if prep.context is not None:
            inputs["context"] = prep.context
        if prep.concat is not None:
            inputs["concat"] = prep.concat

        def eps_fn(x, t):
            inputs["t"].fill_(t)
            eps = self.backend.run("unet", x=x, **inputs)["eps"]
            if bar is not None:
                bar.update(1)
            return eps

        try:
            latent = run(plan, eps_fn, x_T, guidance_scale=scale, x0=x0, mask=sample_mask, seed=seed)
        finally:
            if bar is not None:
                bar.close()
        if output_type == "latent":
            return latent
        image = self.backend.run("decoder", latent=latent)["image"].float()
        if s["conditioning"] == "inpainting":  # CompVis inpaint.py: keep the known pixels
            m = _mask_tensor(mask, height, width, batch_size)
            image = (1 - m) * _image_tensor(init_image, height, width, batch_size) + m * image
        images = ((image.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous().numpy()
        if output_type == "np":
            return images
        from PIL import Image
        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]

    # --- helpers --------------------------------------------------------------------------------
    def _check_size(self, height, width, init_image, low_res_image):
        s = self.summary
        if s["conditioning"] == "low_res_image" and low_res_image is not None:
            lr = _image_tensor(low_res_image, None, None, 1)
            default = (lr.shape[2] * s["latent_factor"], lr.shape[3] * s["latent_factor"])
        elif init_image is not None:
            im = _image_tensor(init_image, None, None, 1)
            default = (im.shape[2], im.shape[3])
        else:
            default = (s["default_size"], s["default_size"])
        height = default[0] if height is None else int(height)
        width = default[1] if width is None else int(width)
        m = s["size_multiple"]
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"size {width}x{height} is not supported by this model: width and height must be "
                             f"positive multiples of {m} (latent factor {s['latent_factor']} times the UNet's "
                             f"downsampling); e.g. {max(m, round(width / m) * m)}x{max(m, round(height / m) * m)}")
        return height, width

    def _check_limits(self, batch, height, width):
        """The shape ranges compiled into the engine (TensorRT profiles, AOTInductor guards)."""
        shapes = self.manifest.get("shapes", {})
        lo, hi = shapes.get("batch", [1, None])
        if batch < lo or (hi is not None and batch > hi):
            raise ValueError(f"batch_size {batch} is outside this engine's range {lo}..{hi}: rebuild it for "
                             "larger batches (see `ldmrt build --help`)")
        for name, side in (("height", height), ("width", width)):
            if shapes.get("max_size") and side > shapes["max_size"]:
                raise ValueError(f"{name} {side} exceeds this engine's maximum {shapes['max_size']}")

    def _conditioning(self, prompt, negative_prompt, guidance_scale, batch, class_label, low_res_image,
                      init_image, mask, shape) -> _Prepared:
        s = self.summary
        kind = s["conditioning"]
        guided = False
        if kind in ("text", "class"):
            has_uncond = kind == "text" or s.get("uncond_class") is not None
            wants = guidance_scale is None or guidance_scale != 1.0
            if guidance_scale is not None and guidance_scale != 1.0 and not has_uncond:
                raise ValueError("this model has no unconditional input, so no classifier-free guidance: "
                                 "pass guidance_scale=1 (or None)")
            guided = wants and has_uncond
        elif guidance_scale not in (None, 1.0):
            raise ValueError(f"classifier-free guidance needs a text or class-conditional model; this one is "
                             f"conditioned on {kind}: pass guidance_scale=None")
        context = concat = None
        if kind == "text":
            if prompt is None:
                raise ValueError("this is a text-to-image model: give a prompt")
            cond = self._text_context(prompt).expand(batch, -1, -1)
            context = torch.cat([self._text_context(negative_prompt).expand(batch, -1, -1), cond]) if guided else cond
            context = context.contiguous()  # once here, not per step in the backends
        elif kind == "class":
            if class_label is None:
                raise ValueError(f"this is a class-conditional model: give class_label (0..{s['num_classes'] - 1})")
            labels = torch.as_tensor(class_label, dtype=torch.long).reshape(-1)
            if labels.numel() not in (1, batch):
                raise ValueError(f"class_label: give one label or batch_size={batch} labels, not {labels.numel()}")
            labels = labels.expand(batch).contiguous()
            if (labels < 0).any() or (labels >= s["num_classes"]).any():
                raise ValueError(f"class_label must be in 0..{s['num_classes'] - 1}")
            if guided:
                labels = torch.cat([torch.full_like(labels, s["uncond_class"]), labels])
            context = self.backend.run("cond_stage", cond=labels)["context"]
        elif kind == "none":
            if prompt:
                raise ValueError("this model is unconditional: it takes no prompt")
        elif kind == "low_res_image":
            if low_res_image is None:
                raise ValueError("this is a super-resolution model: give low_res_image")
            concat = _image_tensor(low_res_image, shape[2], shape[3], batch)
        elif kind == "inpainting":
            if init_image is None or mask is None:
                raise ValueError("this is an inpainting model: give init_image and mask (white = repaint)")
            h, w = shape[2] * s["latent_factor"], shape[3] * s["latent_factor"]
            image = _image_tensor(init_image, h, w, batch)
            m = _mask_tensor(mask, h, w, batch)
            # CompVis inpaint.py: the encoded masked image (pre-quantisation, unscaled) + the downsampled mask
            masked = self.backend.run("encoder", image=(1 - m) * image)["mean"] / s["scale_factor"]
            concat = torch.cat([masked, torch.nn.functional.interpolate(m, size=masked.shape[-2:])], dim=1)
        else:
            raise ValueError(f"generate does not support {kind}-conditioned models yet; use ldmrt.load_model")
        return _Prepared(context, concat, guided)

    def _text_context(self, text: str) -> torch.Tensor:
        """(1, L, D) embedding of one prompt, cached: prompts repeat across calls and batches."""
        if text not in self._context_cache:
            if self.tokenizer is None:
                raise EngineError(f"{self.path} has no tokenizer files: rebuild it from a checkpoint that has them")
            ids = self.tokenizer([text])
            self._context_cache[text] = self.backend.run("cond_stage", cond=ids)["context"]
        return self._context_cache[text]

    def _encode(self, init_image, seed, height, width, batch) -> torch.Tensor:
        """init_image -> latent: the posterior mean + std * noise (Philox stream 2^32, apart from the loop's)."""
        from .sampling import randn
        out = self.backend.run("encoder", image=_image_tensor(init_image, height, width, batch))
        noise = torch.from_numpy(randn(seed, tuple(out["mean"].shape), stream=1 << 32))
        return (out["mean"] + out["std"] * noise).contiguous()


def _image_tensor(image, height, width, batch) -> torch.Tensor:
    """PIL image, path, (H, W, 3) uint8/float array or (B, 3, H, W) tensor in [-1, 1] -> (B, 3, H, W) in [-1, 1]."""
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(image)
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (H, W, 3), got shape {image.shape}")
        arr = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        t = torch.from_numpy(arr * 2 - 1).permute(2, 0, 1)[None]
    else:
        t = torch.as_tensor(image, dtype=torch.float32)
        t = t[None] if t.dim() == 3 else t
    if height is not None and tuple(t.shape[2:]) != (height, width):
        t = torch.nn.functional.interpolate(t, size=(height, width), mode="bicubic", align_corners=False)
    return t.expand(batch, -1, -1, -1).contiguous() if t.shape[0] == 1 else t


def _open_image(path):
    from PIL import Image, UnidentifiedImageError
    try:
        return Image.open(path)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _mask_tensor(mask, height, width, batch) -> torch.Tensor:
    """PIL/array/tensor mask (1 or white = repaint) -> (B, 1, H, W) float in {0, 1}."""
    if isinstance(mask, (str, os.PathLike)):
        mask = _open_image(mask)
    if hasattr(mask, "convert"):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    while m.dim() < 4:
        m = m[None]
    m = torch.nn.functional.interpolate(m, size=(height, width), mode="nearest")
    return (m > 0.5).float().expand(batch, 1, -1, -1).contiguous()


def read_manifest(path: Path, verify: bool = True) -> dict:
    """The manifest of an engine folder, checked against this ldmrt and the files beside it."""
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise EngineError(f"no engine at {path}: build one with `ldmrt build -o {path}`")
    if not mpath.is_file():
        raise EngineError(f"{path} has no manifest.json: not an ldmrt engine, or an interrupted build; "
                          f"rebuild it with `ldmrt build -o {path}`")
    try:
        manifest = json.loads(mpath.read_text())
        fmt, version = manifest["format"], manifest["format_version"]
        name = manifest["model"].get("name") or "MODEL"
        manifest["backend"], manifest["graphs"], manifest["files"], manifest["model"]["summary"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise EngineError(f"{mpath} is corrupt ({type(e).__name__}: {e}): rebuild the engine with "
                          f"`ldmrt build -o {path}`") from None
    rebuild = f"rebuild it: ldmrt build --model {name} -o {path}"
    if fmt != FORMAT:
        raise EngineError(f"{mpath} is not an ldmrt engine manifest (format {fmt!r})")
    if version != FORMAT_VERSION:
        raise EngineError(f"{path} has engine format {version}, this ldmrt {__version__} reads format "
                          f"{FORMAT_VERSION}: {rebuild}")
    built = manifest.get("ldmrt_version", "?")
    if built.split(".")[:2] != __version__.split(".")[:2]:
        raise EngineError(f"{path} was built by ldmrt {built}, this is ldmrt {__version__}: {rebuild}")
    device = manifest.get("device", {})
    if device.get("type") == "cuda":
        here = _device_record("cuda") if torch.cuda.is_available() else None
        if here is None or here["name"] != device.get("name"):
            raise EngineError(f"{path} was built for {device.get('name')} (CUDA {device.get('capability')}); "
                              f"this machine has {here['name'] if here else 'no CUDA device'}: {rebuild}")
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise EngineError(f"{path} is missing {rel}: {rebuild}")
        if f.stat().st_size != meta["bytes"]:
            raise EngineError(f"{path}/{rel} has {f.stat().st_size} bytes, the manifest says {meta['bytes']} "
                              f"(truncated or replaced): {rebuild}")
        if verify and _sha256(f) != meta["sha256"]:
            raise EngineError(f"{path}/{rel} does not match its sha256 in the manifest (corrupt or replaced): "
                              f"{rebuild}")
    return manifest


def _replace_dir(new: Path, target: Path):
    """Move a finished build into place; an existing engine is swapped out only once the new one is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        target.rename(old)
        try:
            new.rename(target)
        except BaseException:
            old.rename(target)  # put the working engine back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
