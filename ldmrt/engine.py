"""`Engine`: build an engine folder from a model, load one, open either, and generate images with it.

The folder format and its checks are ldmrt/manifest.py, the graph files each backend's (ldmrt/backends/), the
generate pipeline ldmrt/pipeline.py. A build is written to a temporary folder beside the target and renamed
into place; an existing target is replaced only when it is an ldmrt engine (a user's other files are never
touched).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .backends import backend_module, check_available, graphs_needed
from .errors import EngineError, LdmrtError
from .files import cache_root
from .machine import device_record
from .manifest import (check_target, is_engine, listed_file, model_summary, new_build_folder, new_manifest, read_manifest,
                       rebuild_hint, replace_dir, write_manifest)
from .pipeline import ContextCache

DEFAULT_MODEL = "shapes"  # the model that ships in the package (ldmrt/assets/shapes)
DEFAULT_BACKEND = "onnxruntime"


class Engine:
    def __init__(self, path: Path, manifest: dict, backend, tokenizer=None):
        self.path, self.manifest, self.backend, self.tokenizer = path, manifest, backend, tokenizer
        self.summary = manifest["model"]["summary"]
        self.alphas_cumprod = np.asarray(self.summary["alphas_cumprod"], dtype=np.float64)
        self.context_cache = ContextCache()

    @property
    def precision(self) -> str:
        """What the engine computes in on this machine (the manifest records what its builder chose)."""
        running = getattr(self.backend, "running_precision", None) or getattr(self.backend, "precision", None)
        return running if isinstance(running, str) else self.manifest["precision"]

    # --- build ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, model=None, out_dir="engines/default", *, ckpt=None, config=None, fp16: bool = False,
              backend: str = DEFAULT_BACKEND, random_weights: bool = False, tokenizer=None, tensorrt=None,
              onnx_fusions: str | None = None, device: str | None = None, progress=print) -> "Engine":
        """Load a model (preset name, config.yaml, diffusers folder; default: the shipped model), export its
        graphs for `backend`, write the engine folder atomically, and return it loaded on `device`.

        out_dir: absent (created), an empty folder, or an ldmrt engine (replaced once the new one is complete);
        anything else is refused before any work. tensorrt: ldmrt.export.tensorrt.BuildOptions (shape ranges,
        bf16, refit, timing cache). onnx_fusions: None, or "cuda" (see backends/onnxruntime.py)."""
        from .checkpoint import load_model
        from .config import shipped_checkpoint

        module = check_available(backend)
        options = {k: v for k, v in (("tensorrt", tensorrt), ("onnx_fusions", onnx_fusions)) if v is not None}
        for name in options:
            if name not in module.OPTIONS:
                raise EngineError(f"{name} is not an option of the {backend} backend (it takes "
                                  f"{', '.join(module.OPTIONS) or 'none'})")
        if hasattr(module, "check_build"):  # say what this machine lacks before loading any weights
            module.check_build()
        out_dir = Path(out_dir)
        check_target(out_dir)
        model = DEFAULT_MODEL if model is None and ckpt is None and config is None else model
        if ckpt is None and not random_weights and isinstance(model, str):
            ckpt = shipped_checkpoint(model)
        t0 = time.perf_counter()
        ldm = load_model(config if config is not None else model, ckpt, random_weights=random_weights,
                         tokenizer=tokenizer)
        cfg = ldm.ldmrt_config
        tmp = new_build_folder(out_dir)
        try:
            summary = model_summary(ldm, cfg)
            exported = module.export(ldm, tmp, summary=summary, fp16=fp16, progress=progress, **options)
            tok = getattr(ldm.cond_stage_model, "tokenizer", None) if ldm.cond_stage_model is not None else None
            tokenizer_entry = None
            if tok is not None:
                (tmp / "tokenizer").mkdir()
                for f in tok.files:
                    shutil.copyfile(f, tmp / "tokenizer" / Path(f).name)
                tokenizer_entry = {"kind": tok.kind, "max_length": tok.max_length,
                                   "files": [f"tokenizer/{Path(f).name}" for f in tok.files]}
            device_entry = exported.device if isinstance(exported.device, dict) else device_record(exported.device)
            manifest = new_manifest(tmp, backend=backend, precision=exported.precision,
                                    model_name=str(model) if isinstance(model, (str, os.PathLike)) else None,
                                    cfg=cfg, summary=summary, tokenizer=tokenizer_entry, graphs=exported.graphs,
                                    shapes=exported.shapes, device=device_entry)
            write_manifest(tmp, manifest)
            replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress:
            progress(f"ldmrt build: wrote {out_dir} ({backend}, {exported.precision}) in "
                     f"{time.perf_counter() - t0:.1f} s")
        # Its files were hashed as they were written: loaded once, without hashing them again.
        return cls.load(out_dir, verify=False, device=device)

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
        name = manifest["backend"]
        try:
            module = backend_module(name)
        except EngineError:
            from .version import __version__
            raise EngineError(f"{path}: backend {name!r} is not supported by ldmrt {__version__}; "
                              f"{rebuild_hint(manifest, path)}") from None
        missing = graphs_needed(module, manifest["model"]["summary"]) - set(manifest["graphs"])
        if missing:
            raise EngineError(f"{path} lacks the {', '.join(sorted(missing))} graph(s) that a {name} engine of this "
                              f"model needs: {rebuild_hint(manifest, path)}")
        tokenizer = None
        if manifest["tokenizer"]:
            from .tokenizer import find_tokenizer
            tok = manifest["tokenizer"]
            for f in tok["files"]:
                listed_file(path, manifest, f)
            tokenizer = find_tokenizer(path / "tokenizer", tok["kind"], tok["max_length"])
        try:
            backend = module.load(path, manifest, device=device, providers=providers, threads=threads,
                                                tokenizer=tokenizer)
        except LdmrtError:
            raise
        except Exception as e:  # a runtime's own error on files that passed the checks: say what to do
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"{path} cannot be loaded by {name} ({type(e).__name__}: {msg}): "
                              f"{rebuild_hint(manifest, path)}") from None
        return cls(path, manifest, backend, tokenizer)

    # --- open -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, source=None, *, ckpt=None, backend: str = DEFAULT_BACKEND, engine_dir=None,
             device: str | None = None, progress=print) -> "Engine":
        """An engine folder (loaded and checked), or a model (preset, config.yaml, diffusers folder; None: the
        shipped model) whose engine is built once into `engine_dir` (default: one folder per model, checkpoint
        and backend in the user cache, see engine_cache_dir) and reused while it holds that model and loads."""
        if source is not None and ckpt is None and engine_dir is None and (Path(source) / "manifest.json").exists():
            return cls.load(source, device=device)
        model = source or DEFAULT_MODEL
        if ckpt is not None and not Path(ckpt).exists():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        folder = Path(engine_dir) if engine_dir is not None else engine_cache_dir(model, ckpt, backend)
        if folder.exists():
            try:
                engine = cls.load(folder, device=device)
                if engine.manifest["model"].get("name") == str(model) and engine.manifest["backend"] == backend:
                    return engine
                why = f"it holds {engine.manifest['model'].get('name')} ({engine.manifest['backend']})"
            except LdmrtError as e:  # whatever is wrong with it, ldmrt can rebuild what it built
                why = str(e)
            if progress:
                progress(f"ldmrt: rebuilding {folder} ({why})")
            if engine_dir is None and not is_engine(folder):  # ldmrt's own cache entry, damaged past recognition
                shutil.rmtree(folder)
        return cls.build(model, folder, ckpt=ckpt, backend=backend, device=device, progress=progress)

    # --- generate -------------------------------------------------------------------------------
    def generate(self, prompt=None, **settings):
        """Images from the engine: a list of PIL images (each with its parameters in `.info`, which
        ldmrt.images.write_png saves), or see output_type.

        prompt: a string, or a list of strings, one per image (negative_prompt likewise); batch_size defaults to
        the list's length. Settings (README "Python"): negative_prompt="", steps=50, sampler="ddim",
        guidance_scale=None (5.0 where the model has an unconditional input, none elsewhere), eta=None, seed=0
        (0..2^64-1), height/width=None (the model's size), batch_size=None, init_image=None, strength=0.75,
        mask=None (1/white = repaint; with an ordinary model masked img2img), class_label=None,
        low_res_image=None, latents=None (caller-given x_T, e.g. from torch.Generator, to reproduce other
        tools' images), timestep_spacing="uniform", output_type="pil" ("np": (B, H, W, 3) float32 in [0, 1];
        "latent"), progress=False.
        Doing less per image (approximate; measured in the README): cache_interval=N (DeepCache: the full UNet
        every N-th step, its shallow branch on the cached deep feature between; cache_schedule="quadratic" places as
        many full steps denser around 30% of the schedule), guidance_interval=(from, until)
        (guidance only on that fraction of the steps, one conditional UNet call elsewhere).
        """
        from .pipeline import generate
        return generate(self, prompt, **settings)


def engine_cache_dir(model, ckpt=None, backend: str = DEFAULT_BACKEND) -> Path:
    """One cached engine per (model, checkpoint file as it is now, backend)."""
    key = str(model)
    if ckpt:
        st = Path(ckpt).stat()
        key += f"|{Path(ckpt).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(str(model)).stem)
    return cache_root() / "engines" / f"{safe}-{backend}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
