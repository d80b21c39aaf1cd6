"""The engine folder's `manifest.json`: what it holds, the facts about its model, and the checks on loading.

    engines/NAME/
      manifest.json      format and versions, model config and summary, precision, backend, shape
                         ranges, per-file size and sha256, the libraries and device that built it
      <graph files>      written by the backend's export (ldmrt/backends/*.py): .onnx, .plan, .pt2, or
                         model.safetensors + config.yaml
      tokenizer/         the tokenizer's standard files (vocab.txt, or vocab.json + merges.txt)
      token_embedding.safetensors   CLIP engines: the token table, for prompts with textual-inversion embeddings
      lora_targets.json  aoti engines: LoRA module name -> weight name (ldmrt.lora.target_names), for C++ hosts

An engine folder is a closed world. Every path in the manifest is relative, normalised, inside the folder,
reached through no symlink, names a regular file and is listed in "files" with its size and sha256; those are
checked (sha256 by default) before anything heavy is loaded. The whole manifest is schema-checked first, so
that an edited or damaged one gives one EngineError naming the field, not a KeyError from deep inside a loader.

`model_summary` computes once the facts about a model that generate, the exports and the C++ host read
(csrc/engine.cpp reads the same fields): never re-derive them from the config elsewhere.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath

from .errors import EngineError
from .files import TMP_SUFFIX, atomic_write, sha256
from .memory import profile as memory_profile
from .version import __version__

FORMAT = "ldmrt-engine"
FORMAT_VERSION = 2  # 2: summary.unconditional_input; every path checked to stay inside the folder
MANIFEST = "manifest.json"
BUILDING = ".building."  # temporary build folders: .NAME.building.XXXX, holding BUILD_MARKER
BUILD_MARKER = ".ldmrt-build"
CONDITIONING = {"none", "text", "class", "low_res_image", "inpainting", "segmentation", "tokens", "text_inpainting"}
PRECISIONS = ("fp32", "fp16", "bf16")
RUNTIME_CACHES = {"trt_cache"}  # written at run time by ONNX Runtime's TensorRT provider (backends/onnxruntime.py)


def model_summary(model, cfg: dict) -> dict:
    """What generate, the exports and the C++ host need to know about a model, without loading it."""
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
    if kind == "text" and model.conditioning_key == "hybrid":
        kind = "text_inpainting"  # SD inpainting: the prompt, and [mask, masked-image latent] concatenated
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
    uncond_class = None
    if kind == "class":
        n = model.cond_stage_model.embedding.num_embeddings
        # CompVis's cin256-v2 has one more class than ImageNet: label 1000 is its null class.
        uncond_class = 1000 if n > 1000 else None
        summary.update(num_classes=n, uncond_class=uncond_class)
    elif kind == "segmentation":  # SpatialRescaler: a one-hot map of in_channels classes, downsampled to the latent
        cp = cond_cfg.get("params", {})
        summary.update(segmentation_classes=int(cp.get("in_channels", 3)),
                       segmentation_factor=round(cp.get("multiplier", 0.5) ** -cp.get("n_stages", 1)))
    elif kind == "tokens":  # layout2img: bounding-box tokens (ldmrt/layout.py), vocab_size ids, max_seq_len of them
        cp = cond_cfg.get("params", {})
        summary.update(layout_vocab=int(cp.get("vocab_size", 30522)), layout_length=int(cp.get("max_seq_len", 77)))
    elif kind in ("text", "text_inpainting"):
        from .models.conditioners import long_prompt_window
        window = long_prompt_window(model.cond_stage_model)
        if window:  # CLIP: prompts of any length as windows of this many tokens, and the layers CLIP skip takes
            summary.update(long_prompts=True, context_window=window,
                           clip_layers=len(model.cond_stage_model.transformer.text_model.encoder.layers))
    # Classifier-free guidance needs an unconditional input: text models (the "" prompt), class models with
    # a null class.
    summary["unconditional_input"] = kind in ("text", "text_inpainting") or uncond_class is not None
    summary["memory"] = memory_profile(cfg)  # the constants of the request estimate (ldmrt/memory.py)
    return summary


def new_manifest(folder: Path, *, backend: str, precision: str, model_name, cfg: dict, summary: dict,
                 tokenizer: dict | None, graphs: dict, shapes: dict | None, device: dict,
                 default_sampler: dict | None = None) -> dict:
    """The manifest of a finished build in `folder`, listing (and hashing) every file in it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != BUILD_MARKER)
    from .machine import library_versions
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "ldmrt_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend, "precision": precision,
        "model": {"name": model_name, "config": cfg, "summary": summary},
        "tokenizer": tokenizer,
        "graphs": graphs,
        # "batch" counts images (a guided UNet runs twice as many); backends that compile shape ranges
        # (TensorRT profiles, AOTInductor guards) record their limits, which generate checks.
        "shapes": shapes or {"size_multiple": summary["size_multiple"]},
        "files": {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files},
        "built_with": library_versions(),
        "device": device,
        # The sampler a request without one runs (ldmrt.schedulers: a diffusers folder's scheduler), or null.
        "default_sampler": default_sampler,
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(Path(folder) / MANIFEST, json.dumps(manifest, indent=1))


def rebuild_hint(manifest: dict | None, path) -> str:
    model = manifest.get("model") if isinstance(manifest, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    return f"rebuild it: ldmrt build --model {name if isinstance(name, str) else 'MODEL'} -o {path}"


# --- reading ----------------------------------------------------------------------------------------
def read_manifest(path, verify: bool = True) -> dict:
    """The manifest of an engine folder, schema-checked, checked against this ldmrt, and its files checked
    (size always, sha256 when `verify`) before any of them is opened by a backend."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise EngineError(f"no engine at {path}: build one with `ldmrt build -o {path}`")
    if not _is_regular(mpath):
        raise EngineError(f"{path} has no manifest.json: not an ldmrt engine, or an interrupted build; "
                          f"rebuild it with `ldmrt build -o {path}`")
    if mpath.stat().st_size > 64 << 20:
        raise EngineError(f"{mpath} is {mpath.stat().st_size >> 20} MB, not an ldmrt manifest: rebuild the engine")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise EngineError(f"{mpath} is corrupt ({type(e).__name__}: {e}): rebuild the engine with "
                          f"`ldmrt build -o {path}`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EngineError(f"{mpath} is not an ldmrt engine manifest (format {fmt!r})")
    rebuild = rebuild_hint(manifest, path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineError(f"{path} has engine format {version}, this ldmrt {__version__} reads format "
                          f"{FORMAT_VERSION}: {rebuild}")
    built = manifest.get("ldmrt_version")
    if not isinstance(built, str) or built.split(".")[:2] != __version__.split(".")[:2]:
        raise EngineError(f"{path} was built by ldmrt {built}, this is ldmrt {__version__}: {rebuild}")
    problem = schema_problem(manifest)
    if problem:
        raise EngineError(f"{mpath}: {problem}: the manifest was edited or damaged; {rebuild}")
    device = manifest["device"]
    if device["type"] == "cuda":
        import torch
        from .machine import device_record
        here = device_record("cuda") if torch.cuda.is_available() else None
        if here is None or here["name"] != device.get("name"):
            raise EngineError(f"{path} was built for {device.get('name')} (CUDA {device.get('capability')}); "
                              f"this machine has {here['name'] if here else 'no CUDA device'}: {rebuild}")
    unlisted = _unlisted_entries(path, manifest["files"])
    if unlisted:
        raise EngineError(f"{path} holds {unlisted[0]!r}, which its manifest does not list (engine folders are closed: "
                          f"a backend could open it unchecked): remove it, or {rebuild}")
    for rel, meta in manifest["files"].items():
        f = engine_file(path, rel, manifest)
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise EngineError(f"{path}/{rel} has {size} bytes, the manifest says {meta['bytes']} "
                              f"(truncated or replaced): {rebuild}")
        if verify and sha256(f) != meta["sha256"]:
            raise EngineError(f"{path}/{rel} does not match its sha256 in the manifest (corrupt or replaced): "
                              f"{rebuild}")
    return manifest


def engine_file(folder, rel, manifest: dict | None = None) -> Path:
    """`folder`/`rel` after checking that it stays inside the folder: `rel` relative and normalised, no
    component a symlink, the file a regular one (never a FIFO or device, which could hang or leak)."""
    folder = Path(folder)
    rebuild = rebuild_hint(manifest, folder)
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise EngineError(f"{folder}: the manifest names a file {rel!r}, not a relative path: {rebuild}")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or PurePosixPath(*parts).as_posix() != rel or any(
            p in ("..", ".") for p in parts):
        raise EngineError(f"{folder}: the manifest names {rel!r}, which is not a normalised path inside the "
                          f"engine folder: {rebuild}")
    f = folder
    for part in parts:
        f = f / part
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            raise EngineError(f"{folder} is missing {rel}: {rebuild}") from None
        if stat.S_ISLNK(st.st_mode):
            raise EngineError(f"{folder}/{rel} goes through a symlink ({f.relative_to(folder)}); engine folders "
                              f"hold plain files only: {rebuild}")
    if not stat.S_ISREG(st.st_mode):
        raise EngineError(f"{folder}/{rel} is not a regular file: {rebuild}")
    return f


def _unlisted_entries(folder: Path, files: dict) -> list[str]:
    """Entries of the folder that are neither listed files nor folders on the way to one (symlinks, FIFOs and
    stray files included), apart from the manifest and the runtime caches a backend keeps there."""
    listed = set(files)
    dirs = {PurePosixPath(rel).parents[i].as_posix() for rel in listed if isinstance(rel, str)
            for i in range(len(PurePosixPath(rel).parents) - 1)}
    found = []
    for root, subdirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder).as_posix()
        for name in names + [d for d in subdirs if os.path.islink(os.path.join(root, d))]:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if rel not in listed and rel != MANIFEST:
                found.append(rel)
        keep = []
        for d in subdirs:
            rel = d if rel_root == "." else f"{rel_root}/{d}"
            if os.path.islink(os.path.join(root, d)):
                continue
            if rel in RUNTIME_CACHES:
                continue
            if rel not in dirs:
                found.append(rel + "/")
                continue
            keep.append(d)
        subdirs[:] = keep
    return sorted(found)


def listed_file(folder, manifest: dict, rel) -> Path:
    """A file a backend is about to open: inside the folder and listed (hence checked) in "files"."""
    f = engine_file(folder, rel, manifest)
    if rel not in manifest["files"]:
        raise EngineError(f"{folder}: the manifest names {rel} but does not list it in 'files' (so it was never "
                          f"checked): {rebuild_hint(manifest, folder)}")
    return f


def graph_files(folder, manifest: dict) -> dict[str, Path]:
    """{graph: its checked file} for backends whose graphs are one file each (ONNX, TensorRT, AOTInductor)."""
    return {name: listed_file(folder, manifest, g["file"]) for name, g in manifest["graphs"].items()}


def _is_regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        return False


# --- the schema ---------------------------------------------------------------------------------------
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _int(lo=None, hi=None):
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool):
            return "must be an integer"
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"must be in {lo}..{hi if hi is not None else ''}, not {v}"
    return check


def _number(positive=False):
    def check(v):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return "must be a finite number"
        if positive and v <= 0:
            return f"must be > 0, not {v}"
    return check


def _str(choices=None, pattern=None):
    def check(v):
        if not isinstance(v, str):
            return "must be a string"
        if choices is not None and v not in choices:
            return f"must be one of {', '.join(sorted(choices))}, not {v!r}"
        if pattern is not None and not pattern.fullmatch(v):
            return f"has the wrong form ({v!r})"
    return check


def _of(kind, name):
    def check(v):
        if not isinstance(v, kind):
            return f"must be {name}"
    return check


def _optional(check):
    return lambda v: None if v is None else check(v)


def _list_of(check, min_len=0):
    def run(v):
        if not isinstance(v, list) or len(v) < min_len:
            return f"must be a list of at least {min_len} items"
        for i, item in enumerate(v):
            problem = check(item)
            if problem:
                return f"item {i} {problem}"
    return run


def _fields(spec: dict, value, where: str, required=True) -> str | None:
    if not isinstance(value, dict):
        return f"{where} must be an object"
    for key, check in spec.items():
        if key not in value:
            if required:
                return f"{where}.{key} is missing"
            continue
        problem = check(value[key]) if callable(check) else _fields(check, value[key], f"{where}.{key}")
        if problem:
            return problem if problem.startswith(f"{where}.") else f"{where}.{key} {problem}"
    return None


def _unit_interval(v):
    return None if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 else "must be in (0, 1]"


SUMMARY = {
    "conditioning": _str(CONDITIONING), "conditioning_key": _optional(_str()),
    "latent_channels": _int(1, 4096), "latent_factor": _int(1, 64), "size_multiple": _int(1, 4096),
    "default_size": _int(1, 1 << 16), "scale_factor": _number(positive=True),
    "parameterization": _str({"eps", "x0"}), "alphas_cumprod": _list_of(_unit_interval, min_len=2),
    "unconditional_input": _of(bool, "true or false"),
    "memory": {"unet_per_latent_px": _number(), "decoder_per_px": _number(), "encoder_per_px": _number(),
               "unet_attention": _list_of(_list_of(_int(1), 2)), "first_stage_attention": _of(bool, "true or false")},
}


def _files(v):
    if not isinstance(v, dict) or not v:
        return "must be an object of {path: {bytes, sha256}}"
    for rel, meta in v.items():
        problem = _fields({"bytes": _int(0), "sha256": _str(pattern=_SHA256)}, meta, f"files[{rel!r}]")
        if problem:
            return problem


def _dimension(v):
    return None if isinstance(v, str) and v or isinstance(v, int) and not isinstance(v, bool) and v >= 0 else \
        "must be a size or a dimension's name"


def _value(v):
    """A graph's input or output: its name (AOTInductor, TensorRT), or name, dtype and shape (ONNX)."""
    if isinstance(v, str):
        return None if v else "must be a name"
    return _fields({"name": _str(pattern=re.compile(r".+")), "dtype": _str(pattern=re.compile(r"[a-z0-9]+")),
                    "shape": _list_of(_dimension)}, v, "the value")


# What each graph records: its file, its values (the backends look inputs up by name) and how it was made.
GRAPH = {"file": _str()}
GRAPH_OPTIONAL = {"inputs": _list_of(_value, 1), "outputs": _list_of(_value, 1), "precision": _str(set(PRECISIONS)), "opset": _int(1, 1000), "external_data": _optional(_str()),
                  "fusions": _list_of(_str()), "fused_for": _optional(_str()), "attention": _str()}


def _graphs(v):
    if not isinstance(v, dict) or not v:
        return "must be an object of {graph: {file, inputs, outputs, ...}}"
    for name, g in v.items():
        where = f"manifest.graphs.{name}"  # schema_problem says it without "manifest."
        problem = _fields(GRAPH, g, where) or _fields(GRAPH_OPTIONAL, g, where, required=False)
        if problem:
            return problem


def schema_problem(m: dict) -> str | None:
    """The first field of manifest `m` with a wrong type or an out-of-range value, said in words; None if none."""
    top = {"backend": _str(),  # which backends exist is the registry's to say (Engine.load)
           "precision": _str(set(PRECISIONS)), "created": _str(),
           "model": _of(dict, "an object"), "graphs": _graphs, "files": _files, "shapes": _of(dict, "an object"),
           "device": _of(dict, "an object"), "tokenizer": _optional(_of(dict, "an object or null"))}
    problem = _fields(top, m, "manifest")
    if problem:
        return problem.removeprefix("manifest.")
    if m.get("default_sampler") is not None:  # optional: engines of older builds have none
        problem = _fields({"sampler": _str(), "timestep_spacing": _str()}, m["default_sampler"], "default_sampler")
        if problem:
            return problem
    problem = (_fields({"config": _of(dict, "an object"), "name": _optional(_str())}, m["model"], "model")
               or _fields(SUMMARY, m["model"].get("summary"), "model.summary")
               or _fields({"type": _str({"cpu", "cuda"})}, m["device"], "device")
               or _fields({"size_multiple": _int(1, 4096), "batch": _list_of(_optional(_int(1)), 2),
                           "max_size": _int(1), "max_context_windows": _int(1)}, m["shapes"], "shapes", required=False))
    if problem:
        return problem
    s = m["model"]["summary"]
    if s["conditioning"] == "class":
        problem = _fields({"num_classes": _int(1), "uncond_class": _optional(_int(0, s.get("num_classes", 1) - 1)
                                                                             if isinstance(s.get("num_classes"), int)
                                                                             else _int(0))},
                          s, "model.summary")
        if problem:
            return problem
    extra = {"segmentation": {"segmentation_classes": _int(1, 1 << 16), "segmentation_factor": _int(1, 64)},
             "tokens": {"layout_vocab": _int(2, 1 << 20), "layout_length": _int(2, 4096)}}.get(s["conditioning"])
    if "long_prompts" in s:  # CLIP: the UNet's context is k windows of this many tokens (ldmrt/prompts.py)
        extra = {"long_prompts": _of(bool, "true or false"), "context_window": _int(1, 4096),
                 "clip_layers": _int(1, 4096)}
    problem = extra and _fields(extra, s, "model.summary")
    if problem:
        return problem
    if s["size_multiple"] % s["latent_factor"]:
        return "model.summary.size_multiple must be a multiple of latent_factor"
    if m["tokenizer"] is not None:
        problem = _fields({"kind": _str({"bert", "clip"}), "max_length": _int(1, 4096),
                           "files": _list_of(_str(), 1)}, m["tokenizer"], "tokenizer")
        if problem:
            return problem
    for name, g in m["graphs"].items():
        for key in ("file", "config", "external_data", "lora_weights"):
            if g.get(key) is None:
                continue
            if not isinstance(g[key], str):
                return f"graphs.{name}.{key} must be a path (a string)"
            if g[key] not in m["files"]:
                return f"graphs.{name}.{key} names {g[key]!r}, which 'files' does not list"
    for f in (m["tokenizer"] or {}).get("files", []):
        if f not in m["files"]:
            return f"tokenizer.files names {f!r}, which 'files' does not list"
    table = (m["tokenizer"] or {}).get("token_embedding")  # CLIP's token table (textual inversion)
    if table is not None and (not isinstance(table, str) or table not in m["files"]):
        return f"tokenizer.token_embedding names {table!r}, which 'files' does not list"
    return None


# --- writing folders ----------------------------------------------------------------------------------
def is_engine(path: Path) -> bool:
    """An ldmrt engine folder (by its manifest's format), whatever its state otherwise."""
    try:
        return json.loads((path / MANIFEST).read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def check_target(target: Path) -> None:
    """Refuse an output folder that would lose a user's files: only an absent path, an empty folder or an
    ldmrt engine (replaced whole) may be written."""
    if target.is_symlink() and not target.exists():
        raise EngineError(f"-o {target} is a dangling symlink: name a new folder or an existing engine")
    if not target.exists():
        return
    if not target.is_dir():
        raise EngineError(f"-o {target} is a file, not an engine folder: nothing was written; name a new folder "
                          f"(or remove the file yourself)")
    if any(target.iterdir()) and not is_engine(target):
        raise EngineError(f"-o {target} is a folder that is not an ldmrt engine and not empty: nothing was written; "
                          f"name a new folder, or an existing engine to replace it")


def new_build_folder(target: Path) -> Path:
    """A fresh temporary folder beside `target`, after removing the leftovers of earlier killed builds of the
    same target (only folders with ldmrt's name pattern and its marker inside, so never a user's)."""
    import tempfile
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}{BUILDING}"
    for old in target.parent.glob(f"{prefix}*"):
        if old.is_dir() and not old.is_symlink() and (old / BUILD_MARKER).is_file() and _owner_gone(old):
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    (tmp / BUILD_MARKER).write_text(str(os.getpid()))
    return tmp


def _owner_gone(folder: Path) -> bool:
    """The build that made `folder` is no longer running (its pid is dead), so the folder is a leftover."""
    try:
        pid = int((folder / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def replace_dir(new: Path, target: Path) -> None:
    """Move a finished build into place; an existing engine (checked by check_target) is swapped out only
    once the new one is complete."""
    (new / BUILD_MARKER).unlink(missing_ok=True)
    check_target(target)  # again: the target may have changed during a long build
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}{TMP_SUFFIX}")
        target.rename(old)
        try:
            new.rename(target)
        except BaseException:
            old.rename(target)  # put the working engine back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
