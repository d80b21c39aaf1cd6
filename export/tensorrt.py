"""Build TensorRT engines (`<graph>.plan`) from a model's ONNX graphs (export/onnx.py), for ldmrt.backends.tensorrt.

Precision. TensorRT 11 builds strongly typed networks only (the types come from the graph), and 10.x
deprecates the weakly typed precision flags, so:
- fp32 and fp16 build strongly typed networks from ONNX graphs exported in that precision (export_onnx keeps
  the cond stage, GroupNorm statistics, the timestep embedding and the x0->eps conversion in fp32): the
  precision decisions stay in the model code, the same for ONNX Runtime and TensorRT. fp32 also turns TF32
  off, so that fp32 means fp32.
- bf16 builds the fp32 graphs weakly typed with BuilderFlag.BF16 (TensorRT picks bf16 kernels per layer with
  fp32 fallback). That flag exists in TensorRT 10.x only; under 11 bf16 needs bf16 graphs, which the ONNX
  exporter does not write yet, and the build says so.

Shapes. One optimization profile per graph, from the batch and image size ranges of `ldmrt build`
(BuildOptions): batch min..max (the UNet runs twice the batch with classifier-free guidance, the cond stage
from 1: prompts are encoded one at a time), image height and width min..max pixels (multiples of the model's
size multiple), latents those over the latent factor. The graphs' dynamic axes are named (export/graphs.py:
batch, height/width for latents, image_height/image_width and map_height/map_width at image resolution,
context_length for the UNet's context of a CLIP model: one window opt, MAX_CONTEXT_WINDOWS max);
every other axis is fixed in the ONNX graph. TensorRT tunes kernels for the `opt` shapes; a request outside
min..max is refused by the backend with the flags to rebuild with.

Timing cache. Kernel timings are kept in the user's cache, not the engine folder: they depend only on the
TensorRT version and the GPU, speed up every later build of any model there (the same layers recur), and are
not needed to run an engine: <ldmrt.cache_root()>/tensorrt/timing-<trt>-<gpu>-sm<cc>.cache.
A cache TensorRT refuses (another version or GPU) is replaced by a fresh one.

Refit. With `refit`, engines are built refittable: `refit_engine(plan, onnx)` (or TensorRTBackend.refit)
swaps in the weights of the same graph exported from another checkpoint, in the engine's precision, in
seconds instead of a rebuild. Such engines also hold `<graph>.lora.safetensors`, the exported values of the
UNet's and text encoder's weights, from which TensorRTBackend.set_weight_deltas refits LoRAs (Engine.set_loras)
and the base weights back.

Nothing here has run with TensorRT yet (no GPU with TensorRT was available): the profile computation, the
option checks and the calls into TensorRT's documented Python API (against a stand-in) are tested.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ldmrt.errors import EngineError
from ldmrt.files import atomic_write, cache_root, sha256
from ldmrt.manifest import MANIFEST, write_manifest

from .graphs import COND_STAGE_GRAPHS, MAX_CONTEXT_WINDOWS
from .trt import fingerprint, import_tensorrt, refit, require_cuda, trt_logger

BATCH_AXES = ("batch",)
LATENT_AXES = ("height", "width")
IMAGE_AXES = ("image_height", "image_width", "map_height", "map_width")
CONTEXT_AXES = ("context_length",)  # the UNet's context of a long-prompt model: 1..MAX_CONTEXT_WINDOWS windows


@dataclass(frozen=True)
class BuildOptions:
    """`ldmrt build --backend tensorrt` options; None means a default resolved per model (resolve_ranges).

    Batches count images (the UNet's profile doubles them for guidance): min 1, opt = min, max max(4, opt).
    Sizes are image pixels, for height and width alike: opt the model's default size (within min..max when
    those are given), min half of it, max twice it.
    """
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    min_size: int | None = None
    opt_size: int | None = None
    max_size: int | None = None
    bf16: bool = False
    refit: bool = False
    timing_cache: str | bool | None = None  # a path; None: the user cache (see above); False: none

    def precision(self, fp16: bool) -> str:
        if fp16 and self.bf16:
            raise ValueError("choose one of --fp16 and --bf16")
        return "bf16" if self.bf16 else "fp16" if fp16 else "fp32"


@dataclass(frozen=True)
class Ranges:
    """Resolved (min, opt, max) ranges: batch in images, size in pixels, and the model's latent geometry."""
    batch: tuple[int, int, int]
    size: tuple[int, int, int]
    latent_factor: int
    guidance: bool  # the UNet may run the doubled [uncond; cond] batch
    text: bool  # the cond stage encodes one prompt at a time
    context: tuple[int, int, int] | None = None  # the UNet's context length (long prompts): opt one window


def resolve_ranges(options: BuildOptions, summary: dict) -> Ranges:
    """Fill size defaults from the model summary (ldmrt.manifest.model_summary) and check every range."""
    multiple, default = summary["size_multiple"], summary["default_size"]
    o = options
    lo = _given(o.min_batch, 1)
    opt = _given(o.opt_batch, lo)
    batch = (lo, opt, _given(o.max_batch, max(4, opt)))
    if not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ValueError(f"batch sizes must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, got {batch}")
    opt = o.opt_size
    if opt is None:  # the model's size, moved into min..max when those exclude it
        opt = max(default, _given(o.min_size, default))
        opt = min(opt, _given(o.max_size, opt))
    size = (_given(o.min_size, min(opt, max(multiple, default // 2 // multiple * multiple))), opt,
            _given(o.max_size, max(opt, default * 2)))
    if not 0 < size[0] <= size[1] <= size[2]:
        raise ValueError(f"image sizes must satisfy 0 < --min-size <= --opt-size <= --max-size, got {size}")
    bad = [s for s in size if s % multiple]
    if bad:
        raise ValueError(f"image sizes must be multiples of {multiple} for this model (latent factor "
                         f"{summary['latent_factor']} times the UNet's downsampling); {bad[0]} is not")
    window = summary.get("context_window") if summary.get("long_prompts") else None
    context = (window, window, window * MAX_CONTEXT_WINDOWS) if window else None
    return Ranges(batch, size, summary["latent_factor"], summary["unconditional_input"],
                  summary["conditioning"] in ("text", "text_inpainting"), context)


def _given(value, default):
    return default if value is None else value


def graph_batch(graph: str, r: Ranges) -> tuple[int, int, int]:
    lo, opt, hi = r.batch
    g = 2 if r.guidance else 1
    if graph in ("unet", "unet_shallow"):
        return lo, g * opt, g * hi
    if graph in COND_STAGE_GRAPHS:
        return 1, 1 if r.text else g * opt, g * hi
    return r.batch  # decoder, encoder: the images themselves


def graph_profiles(graph_inputs: dict[str, list[dict]], r: Ranges) -> dict[str, dict[str, dict]]:
    """Per graph, per input: {"min", "opt", "max"} shapes.

    graph_inputs: {graph: [{"name", "shape"}]} as export_onnx describes inputs: ints for fixed axes, names
    for dynamic ones.
    """
    profiles = {}
    for graph, inputs in graph_inputs.items():
        batch = graph_batch(graph, r)
        latent = tuple(s // r.latent_factor for s in r.size)
        profile = {}
        for desc in inputs:
            dims = []
            for d in desc["shape"]:
                if isinstance(d, int) and d > 0:
                    dims.append((d, d, d))
                elif d in BATCH_AXES:
                    dims.append(batch)
                elif d in LATENT_AXES:
                    dims.append(latent)
                elif d in IMAGE_AXES:
                    dims.append(r.size)
                elif d in CONTEXT_AXES and r.context:
                    dims.append(r.context)
                else:
                    raise ValueError(f"{graph} input {desc['name']} has an axis {d!r} with no size range "
                                     f"(known dynamic axes: {BATCH_AXES + LATENT_AXES + IMAGE_AXES + CONTEXT_AXES})")
            profile[desc["name"]] = {k: [dim[i] for dim in dims] for i, k in enumerate(("min", "opt", "max"))}
        profiles[graph] = profile
    return profiles


def network_typing(onnx_precision: str, precision: str, builder_flags) -> tuple[bool, tuple, tuple]:
    """(strongly typed, builder flags to set, builder flags to clear) for a graph exported in `onnx_precision`
    built as `precision`; builder_flags: the names trt.BuilderFlag has in this TensorRT."""
    if precision == "fp32" and onnx_precision == "fp32":
        return True, (), ("TF32",)
    if precision == "fp16" and onnx_precision in ("fp16", "fp32"):  # fp32: the cond stage, kept fp32 by export
        return True, (), ()
    if precision == "bf16" and onnx_precision == "fp32":
        if "BF16" not in builder_flags:
            raise ValueError("this TensorRT builds strongly typed networks only (no BuilderFlag.BF16): bf16 "
                             "engines need TensorRT 10.x here; build with --fp16 instead")
        return False, ("BF16",), ()
    raise ValueError(f"cannot build a {precision} engine from a {onnx_precision} ONNX graph")


def default_timing_cache(fp: dict) -> Path:
    root = cache_root()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", fp["name"]).strip("-").lower()
    return root / "tensorrt" / f"timing-{fp['tensorrt']}-{gpu}-sm{fp['capability'].replace('.', '')}.cache"


def build_engine(onnx_path, engine_path, profile: dict, *, precision: str, onnx_precision: str,
                 refit: bool = False, timing_cache: Path | None = None, progress=print) -> Path:
    """Parse `onnx_path`, build a serialized engine for `profile` ({input: {"min","opt","max"}}), write it to
    `engine_path` (atomically) and the updated timing cache back to `timing_cache` (when given)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt = import_tensorrt("TensorRT builds")
    logger = trt_logger(trt)
    try:
        strongly_typed, set_flags, clear_flags = network_typing(onnx_precision, precision, trt.BuilderFlag.__members__)
    except ValueError as e:
        raise EngineError(f"{onnx_path.name}: {e}") from None
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed
                                      else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external weight data beside the file too
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}:\n{errors}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profile):
        raise EngineError(f"{onnx_path.name} has inputs {names}; the profile covers {sorted(profile)}")
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    for name in names:
        opt_profile.set_shape(name, *(profile[name][k] for k in ("min", "opt", "max")))
    config.add_optimization_profile(opt_profile)
    for flag in set_flags + (("REFIT",) if refit else ()):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    cache = _attach_timing_cache(config, timing_cache, progress) if timing_cache else None
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} failed to build {onnx_path.name} (see its log above)")
    atomic_write(engine_path, serialized)
    if cache is not None:
        atomic_write(timing_cache, config.get_timing_cache().serialize())
    return engine_path


def _attach_timing_cache(config, path: Path, progress):
    """Load `path` into the config (a fresh cache when it is absent or TensorRT refuses it); returns the cache,
    which must outlive the build."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data) if data else None
    except RuntimeError:  # unreadable: treated as absent
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if data and progress:
            progress(f"ldmrt build: starting a new TensorRT timing cache ({path} is from another TensorRT or GPU)")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def check_build_environment():
    """The tensorrt module, or an EngineError saying what this machine lacks to build TensorRT engines (Engine.build
    calls it before loading a model, so that the answer comes at once)."""
    trt = import_tensorrt("TensorRT builds")
    require_cuda("TensorRT engines")
    return trt


def export_tensorrt(model, out_dir, *, summary: dict, fp16: bool = False, options: BuildOptions | None = None,
                    progress=print):
    """Export `model`'s graphs to ONNX (in a scratch folder, deleted afterwards) and build `<graph>.plan` files in
    `out_dir`. Returns (precision, graphs, device fingerprint, shapes) for the engine manifest; each graph entry
    has "file", "inputs", "outputs", "precision", "profile" and "refittable"."""
    from .onnx import export_onnx

    options = options or BuildOptions()
    precision = options.precision(fp16)
    ranges = resolve_ranges(options, summary)  # bad flags fail before anything slow
    fp = fingerprint(check_build_environment())
    cache = (default_timing_cache(fp) if options.timing_cache is None
             else Path(options.timing_cache) if options.timing_cache else None)
    out_dir = Path(out_dir)
    graphs = {}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx.") as scratch:
        # Plain ONNX (no onnxruntime fusions: TensorRT reads standard operators and fuses them itself).
        onnx_graphs = export_onnx(model, scratch, fp16=precision == "fp16")
        profiles = graph_profiles({g: d["inputs"] for g, d in onnx_graphs.items()}, ranges)
        for name, desc in onnx_graphs.items():
            t0 = time.perf_counter()
            plan = build_engine(Path(scratch) / desc["file"], out_dir / f"{name}.plan", profiles[name],
                                precision=precision, onnx_precision=desc["precision"], refit=options.refit,
                                timing_cache=cache, progress=progress)
            graphs[name] = {"file": plan.name, "inputs": desc["inputs"], "outputs": desc["outputs"],
                            "precision": "bf16" if precision == "bf16" else desc["precision"],
                            "profile": profiles[name], "refittable": options.refit}
            if options.refit:
                graphs[name].update(save_lora_weights(Path(scratch) / desc["file"], out_dir / f"{name}.lora.safetensors"))
            if progress:
                progress(f"ldmrt build: TensorRT {name} ({graphs[name]['precision']}) in "
                         f"{time.perf_counter() - t0:.1f} s")
    shapes = {"batch": list(ranges.batch), "size": list(ranges.size), "size_multiple": summary["size_multiple"],
              "unet_batch": list(graph_batch("unet", ranges)),
              **({"max_context_windows": MAX_CONTEXT_WINDOWS} if ranges.context else {})}
    return precision, graphs, fp, shapes


# The weights a LoRA can change (ldmrt/lora.py: the UNet's and the text encoder's).
LORA_PREFIXES = ("model.diffusion_model.", "cond_stage_model.")


def save_lora_weights(onnx_path: Path, out: Path) -> dict:
    """For refittable engines: the exported values of the graph's LoRA-targetable weights, by initializer name (what
    TensorRT's ONNX parser names the engine's weights), in `out`, since a refitter cannot read an engine's weights
    back and a switch back to the base must set them. Returns the manifest entries: "lora_weights" (the file, or
    None when the graph has none of these weights) and "weight_names" ({torch weight name: [initializer,
    transposed]})."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import save_file

    from .weight_names import weight_initializers
    proto = onnx.load(str(onnx_path))
    weights = {name: w for name, w in weight_initializers(proto.graph).items() if name.startswith(LORA_PREFIXES)}
    if not weights:
        return {"lora_weights": None, "weight_names": {}}
    wanted = {w.initializer for w in weights.values()}
    arrays = {t.name: numpy_helper.to_array(t, base_dir=str(onnx_path.parent)) for t in proto.graph.initializer
              if t.name in wanted}
    atomic_write(out, lambda path: save_file(arrays, str(path)))
    return {"lora_weights": out.name,
            "weight_names": {name: [w.initializer, w.transposed] for name, w in weights.items()}}


def refit_engine(engine_path, onnx_path) -> Path:
    """Refit the TensorRT plan `engine_path` (built with refit) with the weights of `onnx_path`, in place.

    onnx_path: the same graph exported from other weights in the engine's precision (export_onnx). When the
    plan sits in an engine folder, its size and sha256 in manifest.json are updated too.
    """
    engine_path, onnx_path = Path(engine_path), Path(onnx_path)
    if engine_path.suffix != ".plan" or not engine_path.is_file():
        raise FileNotFoundError(f"no TensorRT plan at {engine_path} (engine folders hold <graph>.plan files)")
    if onnx_path.suffix != ".onnx" or not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {onnx_path} (export one with ldmrt.export.onnx.export_onnx)")
    trt = import_tensorrt("TensorRT refits")
    require_cuda("TensorRT engines")
    engine = trt.Runtime(trt_logger(trt)).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT {trt.__version__} could not deserialize {engine_path} (see its log above)")
    refit(trt, engine, onnx_path)
    atomic_write(engine_path, engine.serialize())
    _update_manifest_entry(engine_path)
    return engine_path


def _update_manifest_entry(file: Path) -> None:
    manifest_path = file.parent / MANIFEST
    if not manifest_path.is_file():
        return
    manifest = json.loads(manifest_path.read_text())
    entry = manifest.get("files", {}).get(file.name)
    if entry is None:
        return
    entry.update(bytes=file.stat().st_size, sha256=sha256(file))
    write_manifest(file.parent, manifest)
