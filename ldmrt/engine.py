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
from .errors import EngineError, LdmrtError, TokenizerNotFoundError
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
        self.loras: list[tuple[str, float]] = []  # the active LoRA set, (path, strength) each (set_loras)
        self.lora_report: list = []  # what each of its files matched (ldmrt.lora.Applied)
        self._lora_key = ()  # the active set with each file's size and mtime: a file changed on disk is read again
        self.embeddings: dict[str, "torch.Tensor"] = {}  # textual inversion: trigger word -> (n, width) rows
        self._token_table = None  # read from the engine folder on the first prompt that needs it

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
        from .checkpoint import load_model, tokenizer_spec
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
        tok = getattr(ldm.cond_stage_model, "tokenizer", None) if ldm.cond_stage_model is not None else None
        if tok is None and getattr(ldm.cond_stage_model, "use_tknz_fn", True) and tokenizer_spec(ldm) is not None:
            raise _missing_tokenizer(ldm, model, ckpt)  # before any export: such an engine could take no prompt
        tmp = new_build_folder(out_dir)
        try:
            summary = model_summary(ldm, cfg)
            exported = module.export(ldm, tmp, summary=summary, fp16=fp16, progress=progress, **options)
            tokenizer_entry = None
            if tok is not None:  # the standard files whatever it was read from: C++ hosts read only those
                (tmp / "tokenizer").mkdir()
                for name, content in tok.standard_files.items():
                    (tmp / "tokenizer" / name).write_bytes(content)
                tokenizer_entry = {"kind": tok.kind, "max_length": tok.max_length,
                                   "files": [f"tokenizer/{name}" for name in tok.standard_files]}
                if hasattr(ldm.cond_stage_model, "token_embedding"):  # CLIP: hosts look tokens up (textual inversion)
                    tokenizer_entry["token_embedding"] = write_token_table(ldm.cond_stage_model, tmp)
            device_entry = exported.device if isinstance(exported.device, dict) else device_record(exported.device)
            default_sampler = _default_sampler(cfg, progress)
            manifest = new_manifest(tmp, backend=backend, precision=exported.precision,
                                    model_name=str(model) if isinstance(model, (str, os.PathLike)) else None,
                                    cfg=cfg, summary=summary, tokenizer=tokenizer_entry, graphs=exported.graphs,
                                    shapes=exported.shapes, device=device_entry, default_sampler=default_sampler)
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

    # --- LoRA ---------------------------------------------------------------------------------------
    def set_loras(self, loras) -> list:
        """Make `loras` the active set: [(path, strength), ...] (or "path:strength" strings); [] is the base
        model. The weights become base + the sum of the files' deltas (ldmrt/lora.py), changed in the loaded
        engine without a rebuild; the same bits as before come back with []. Returns what each file matched
        (ldmrt.lora.Applied); a file with modules this model lacks is applied with a warning, one with none
        raises CheckpointError. The files are read where they are; nothing is written to the engine folder."""
        from .lora import lora_deltas, parse_specs
        specs = parse_specs(loras)
        key = tuple((path, strength, *_file_stamp(path)) for path, strength in specs)
        if key == self._lora_key:
            return self.lora_report
        deltas, report = lora_deltas(specs, self.backend.weight_shapes(), self.manifest["model"]["config"]) \
            if specs else ({}, [])
        self.context_cache = ContextCache()  # the text encoder may change
        try:
            self.backend.set_weight_deltas(deltas)
        except BaseException:  # never leave some graphs merged and others not: back to the base
            self.backend.set_weight_deltas({})
            self.loras, self.lora_report, self._lora_key = [], [], ()
            raise
        self.loras, self.lora_report, self._lora_key = specs, report, key
        return report

    # --- textual inversion ------------------------------------------------------------------------
    def load_embedding(self, path) -> list[str]:
        """Read a textual-inversion file (AUTOMATIC1111 .pt / .safetensors, diffusers learned_embeds) and return its
        trigger words: where one stands in a later prompt, its vectors take the place of its tokens. Reading a file
        again replaces what it held."""
        from .embeddings import read_embedding_file
        from .errors import InputError
        entry = self.manifest["tokenizer"] or {}
        if "token_embedding" not in entry or "cond_stage_embeds" not in self.backend.graphs:
            raise InputError(f"{self.path} takes no textual-inversion embeddings: they are for CLIP text encoders "
                             f"(SD v1), in engines built by this ldmrt ({rebuild_hint(self.manifest, self.path)})")
        found = read_embedding_file(path, self.token_table().shape[1])
        self.embeddings.update(found)
        self.context_cache = ContextCache()  # cached prompts may hold a trigger word
        return list(found)

    def token_table(self):
        """The text encoder's token embeddings (vocab, width), float32, from the engine folder."""
        if self._token_table is None:
            from safetensors.torch import load_file
            file = listed_file(self.path, self.manifest, self.manifest["tokenizer"]["token_embedding"])
            self._token_table = load_file(str(file))[TOKEN_TABLE_KEY]
        return self._token_table

    # --- generate -------------------------------------------------------------------------------
    def generate(self, prompt=None, *, loras=None, embeddings=None, **settings):
        """Images from the engine: a list of PIL images (each with its parameters in `.info`, which
        ldmrt.images.write_png saves), or see output_type.

        prompt: a string, or a list of strings, one per image (negative_prompt likewise); batch_size defaults to
        the list's length. Settings (README "Python"): negative_prompt="", steps=50, sampler=None (the engine's
        default: a diffusers folder's scheduler, else "ddim"; ldmrt's names (ldmrt.sampling.SAMPLERS) or
        AUTOMATIC1111's, e.g. "DPM++ 2M Karras", "Euler a"),
        guidance_scale=None (5.0 where the model has an unconditional input, none elsewhere), eta=None, seed=0
        (0..2^64-1), height/width=None (the model's size), batch_size=None, init_image=None, strength=0.75,
        mask=None (1/white = repaint; with an ordinary model masked img2img), class_label=None,
        low_res_image=None, layout=None (layout-to-image: [{"class": name or number, "box": [x0, y0, x1, y1]}, ...]
        or a JSON file of it), segmentation=None (semantic synthesis: class indices, a PNG or an (H, W) integer
        array); each family takes its own inputs and refuses others (README "Python" table),
        latents=None (caller-given x_T, e.g. from torch.Generator, to reproduce other
        tools' images), timestep_spacing=None (an ldmrt grid (ldmrt.sampling.SPACINGS) or an AUTOMATIC1111
        scheduler name; default: the sampler's, CompVis' "uniform" for ldmrt names), output_type="pil" ("np": (B, H, W, 3) float32 in [0, 1];
        "latent"), progress=False. loras=None keeps the active LoRA set; a list makes it the active set first
        (set_loras: [(path, strength), ...], [] for the base model). embeddings=[path, ...]: textual-inversion
        files loaded first (load_embedding; they stay loaded).
        Prompts (README "Prompts"): AUTOMATIC1111's emphasis `(word:1.3)`, `[word]` and BREAK; CLIP models take
        prompts of any length (75-token windows). clip_skip=1 (CLIP: the layer counted from the last whose output,
        through the final layer norm, conditions the UNet; AUTOMATIC1111's numbering, diffusers' clip_skip + 1).
        Doing less per image (approximate; measured in the README): cache_interval=N (DeepCache: the full UNet
        every N-th step, its shallow branch on the cached deep feature between; cache_schedule="quadratic" places as
        many full steps denser around 30% of the schedule), guidance_interval=(from, until)
        (guidance only on that fraction of the steps, one conditional UNet call elsewhere).
        Beyond the model's size (README "Beyond the training size"): tiled_decode=None (the first stage decodes,
        and encodes init_image, in overlapping tiles exactly when the whole would not fit in memory; True/False
        force it), hires=SIZE or (height, width) with hires_strength=0.3 (the hires fix: the image at height x
        width, default the model's size, upscaled to hires and refined there by img2img at that strength).
        """
        if loras is not None:
            self.set_loras(loras)
        for path in embeddings or ():
            self.load_embedding(path)
        from .pipeline import generate
        return generate(self, prompt, **settings)


def _file_stamp(path) -> tuple[int, int]:
    """(size, mtime) of a LoRA file; a missing one is said by the reader (CheckpointError)."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return st.st_size, st.st_mtime_ns


TOKEN_TABLE = "token_embedding.safetensors"
TOKEN_TABLE_KEY = "weight"


def write_token_table(cond_stage, folder: Path) -> str:
    """The CLIP token table as its own file, float32: the host looks prompts' tokens up in it when a textual-inversion
    embedding replaces some rows (the cond_stage_embeds graph then takes the looked-up rows)."""
    from safetensors.torch import save_file
    save_file({TOKEN_TABLE_KEY: cond_stage.token_embedding.weight.detach().float().cpu().contiguous()},
              str(folder / TOKEN_TABLE))
    return TOKEN_TABLE


def _missing_tokenizer(ldm, model, ckpt) -> TokenizerNotFoundError:
    """A text model without a tokenizer would make an engine that cannot take a prompt: say what it needs."""
    from .checkpoint import tokenizer_spec
    from .tokenizer import BERT_FILES, CLIP_FILES, TOKENIZER_JSON
    kind, _ = tokenizer_spec(ldm)
    files = " + ".join(CLIP_FILES if kind == "clip" else BERT_FILES)
    name = model if isinstance(model, (str, os.PathLike)) else "this model"
    where = f" beside {ckpt} (or in its tokenizer/ folder), or" if ckpt else ""
    return TokenizerNotFoundError(
        f"{name} has a text encoder but no tokenizer was found, so its engine could take no prompt: put the "
        f"{kind.upper()} tokenizer's {files} (or its {TOKENIZER_JSON}){where} in a folder and pass "
        f"Engine.build(..., tokenizer=FOLDER)")


def _default_sampler(cfg: dict, progress) -> dict | None:
    """A diffusers folder's scheduler as the engine's default sampler, when ldmrt reproduces it (else DDIM)."""
    scheduler = cfg.get("scheduler")
    if not scheduler:
        return None
    from .errors import InputError
    from .schedulers import from_diffusers
    try:
        return from_diffusers(scheduler)
    except InputError as e:
        if progress:
            progress(f"ldmrt build: the folder's scheduler is not the default ({e}); the engine's default is DDIM")
        return None


def engine_cache_dir(model, ckpt=None, backend: str = DEFAULT_BACKEND) -> Path:
    """One cached engine per (model, checkpoint file as it is now, backend)."""
    key = str(model)
    if ckpt:
        st = Path(ckpt).stat()
        key += f"|{Path(ckpt).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(str(model)).stem)
    return cache_root() / "engines" / f"{safe}-{backend}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
