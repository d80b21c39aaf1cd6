"""The `ldmrt` command: build engines, generate images, run the demo, describe the machine and models.

Every user mistake ends as `ldmrt CMD: error: MESSAGE` on stderr and exit status 2, never a traceback; an
output is written only once the work succeeded, atomically.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from .errors import LdmrtError

DEMO_PROMPT = "a large red circle in the top left on a gray background"  # states every attribute the model follows
DEMO_ENGINE = "engines/shapes"


def cmd_info(args) -> int:
    from .info import format_info, model_info, system_info
    info = model_info(args.model) if args.model else system_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_build(args) -> int:
    from .engine import Engine
    Engine.build(args.model, args.output, ckpt=args.ckpt, fp16=args.fp16, backend=args.backend,
                 random_weights=args.random_weights, tensorrt=tensorrt_options(args), onnx_fusions=args.onnx_fusions)
    return 0


def cmd_generate(args) -> int:
    from .engine import Engine
    from .files import check_writable
    out = check_writable(args.output)
    if args.engine and args.ckpt:
        raise LdmrtError("--ckpt goes with --model (an engine folder already holds its weights)")
    t0 = time.perf_counter()
    if args.engine:
        engine = Engine.load(args.engine, device=args.device)
    else:
        engine = Engine.open(args.model, ckpt=args.ckpt, backend=args.backend, device=args.device,
                             progress=_stderr)
    t1 = time.perf_counter()
    images = engine.generate(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                             sampler=args.sampler, guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed,
                             height=args.height, width=args.width, batch_size=args.batch_size,
                             init_image=args.init_image, strength=args.strength, mask=args.mask,
                             class_label=args.class_label, low_res_image=args.low_res_image,
                             layout=args.layout, segmentation=args.segmentation, clip_skip=args.clip_skip,
                             embeddings=args.embedding,
                             timestep_spacing=args.timestep_spacing, progress=not args.quiet, loras=args.lora,
                             **fast_settings(args), **size_settings(args))
    t2 = time.perf_counter()
    paths = write_images(images, out, args.argv)
    print(f"ldmrt generate: wrote {', '.join(map(str, paths))} ({images[0].width}x{images[0].height}, {args.steps} "
          f"{args.sampler} steps) in {t2 - t1:.1f} s (+{t1 - t0:.1f} s loading {engine.path})")
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve.app import serve
    except ImportError as e:
        raise LdmrtError(f"ldmrt serve needs the serve extra ({e}): pip install 'ldmrt[serve]'") from None
    app_options = dict(batching=not args.one_at_a_time, max_batch=args.max_batch, max_queue=args.max_queue,
                       timeout_s=args.timeout, drain_s=args.drain)
    if not args.ray:
        serve(args.engine, host=args.host, port=args.port, **app_options)
        return 0
    try:
        from .serve.ray_serve import run
    except ImportError as e:
        raise LdmrtError(f"ldmrt serve --ray needs Ray Serve ({e}): pip install 'ray[serve]'") from None
    from .engine import Engine
    engine_dir = str(Engine.load(args.engine).path.resolve())  # checked here, before any replica starts
    run(engine_dir, host=args.host, port=args.port, address=args.ray_address, replicas=args.replicas,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas, num_gpus=args.num_gpus, **app_options)
    return 0


def cmd_demo(args) -> int:
    """The README's main job: the shipped model's engine (built once into engines/shapes), one image."""
    from .engine import DEFAULT_MODEL, Engine
    from .files import check_writable
    out = check_writable(args.output)
    t0 = time.perf_counter()
    engine = Engine.open(DEFAULT_MODEL, engine_dir=DEMO_ENGINE, progress=print)
    t1 = time.perf_counter()
    image = engine.generate(args.prompt or DEMO_PROMPT, steps=args.steps, seed=args.seed, progress=True)[0]
    t2 = time.perf_counter()
    write_images([image], out, args.argv)
    print(f"ldmrt demo: wrote {out.resolve()} ({image.width}x{image.height}), prompt {args.prompt or DEMO_PROMPT!r}\n"
          f"  engine: {engine.path} ({engine.manifest['backend']}, {engine.manifest['precision']}) in {t1 - t0:.1f} s\n"
          f"  generate: {args.steps} DDIM steps with guidance, C++ sampler loop, in {t2 - t1:.1f} s")
    return 0


def fast_settings(args) -> dict:
    """--fast (FAST_PRESET), overridden by --cache / --guidance-interval where given."""
    from .pipeline import FAST_PRESET
    settings = dict(FAST_PRESET) if args.fast else {}
    if args.cache is not None:
        settings["cache_interval"] = args.cache
    if args.cache_schedule is not None:
        settings["cache_schedule"] = args.cache_schedule
    if args.guidance_interval is not None:
        settings["guidance_interval"] = tuple(args.guidance_interval)
    return settings


def size_settings(args) -> dict:
    """--tiled-vae / --no-tiled-vae (default: tiles only when the whole first stage would not fit), --hires."""
    settings = {"tiled_decode": args.tiled_vae}
    if args.hires is not None:
        settings["hires"] = args.hires
    if args.hires_strength is not None:
        settings["hires_strength"] = args.hires_strength
    return settings


def write_images(images, out: Path, argv) -> list[Path]:
    """out.png, out-1.png, ...: each with its parameters and the command that made it."""
    from .images import write_png
    command = shlex.join(["ldmrt", *(sys.argv[1:] if argv is None else argv)])
    return [write_png(image, out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}"),
                      {"ldmrt-command": command}) for i, image in enumerate(images)]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --- arguments -------------------------------------------------------------------------------------------
def seed(text: str) -> int:
    from .pipeline import MAX_SEED
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..2^64-1")
    return value


def image_size(text: str):
    """SIZE or WIDTHxHEIGHT -> an int or (height, width)."""
    try:
        if "x" in text:
            width, height = (int(v) for v in text.split("x"))
            return height, width
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give SIZE or WIDTHxHEIGHT, e.g. 256 or 384x256") \
            from None


def add_tensorrt_arguments(parser) -> None:
    """The `ldmrt build` flags of export.tensorrt.BuildOptions."""
    g = parser.add_argument_group("TensorRT (--backend tensorrt)")
    g.add_argument("--bf16", action="store_true", help="bf16 engines (TensorRT 10.x; --fp16 is the usual choice)")
    for what, default in (("min", "1"), ("opt", "min"), ("max", "max(4, opt)")):
        g.add_argument(f"--{what}-batch", type=int, help=f"{what} images per call (default {default}; the UNet's "
                       "profile doubles it for guidance)")
    for what, default in (("min", "half the model's size"), ("opt", "the model's size"), ("max", "twice it")):
        g.add_argument(f"--{what}-size", type=int, help=f"{what} image height and width in pixels (default {default})")
    g.add_argument("--refit", action="store_true", help="refittable engines (swap weights without a rebuild)")
    g.add_argument("--timing-cache", default=None, help="TensorRT timing cache file (default: in the user cache)")
    g.add_argument("--no-timing-cache", action="store_true", help="build without a timing cache")


def tensorrt_options(args):
    """BuildOptions from parsed `ldmrt build` arguments; None for other backends (which take none of them)."""
    given = {k: getattr(args, k) for k in ("min_batch", "opt_batch", "max_batch", "min_size", "opt_size", "max_size")
             if getattr(args, k) is not None}
    flags = {k: getattr(args, k) for k in ("bf16", "refit", "no_timing_cache") if getattr(args, k)}
    if args.timing_cache is not None:
        flags["timing_cache"] = args.timing_cache
    if args.backend != "tensorrt":
        if given or flags:
            names = ", ".join("--" + k.replace("_", "-") for k in (*given, *flags))
            raise ValueError(f"{names}: TensorRT options, for --backend tensorrt only")
        return None
    if args.no_timing_cache and args.timing_cache is not None:
        raise ValueError("--timing-cache and --no-timing-cache exclude each other")
    from .export.tensorrt import BuildOptions
    return BuildOptions(**given, bf16=args.bf16, refit=args.refit,
                        timing_cache=False if args.no_timing_cache else args.timing_cache)


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS
    from .engine import DEFAULT_BACKEND
    from .sampling import SAMPLERS, SPACINGS
    parser = argparse.ArgumentParser(prog="ldmrt", description="A compiled inference runtime for Latent "
                                     "Diffusion Models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, CPU features, devices and backends; or a model's architecture")
    p.add_argument("--model", help="a preset name or config.yaml: show its architecture and parameter counts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("build", help="export and compile a model into an engine folder")
    p.add_argument("--model", help="preset name, CompVis config.yaml or diffusers folder (default: the shipped "
                   "model)")
    p.add_argument("--ckpt", help=".ckpt, .safetensors or diffusers folder with the weights")
    p.add_argument("--fp16", action="store_true", help="reduced precision (fp16 graphs; bf16 on CPU torch)")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS,
                   help="aoti: AOTInductor packages, also runnable from C++ hosts (examples/cpp)")
    p.add_argument("--random-weights", action="store_true", help="no checkpoint: random weights (testing)")
    p.add_argument("--onnx-fusions", choices=("cuda",), help="fuse onto ONNX Runtime's CUDA operators (the engine "
                   "then needs the CUDA execution provider; no fusion measured faster on CPUs)")
    p.add_argument("-o", "--output", required=True, help="engine folder to write: new, empty, or an engine to "
                   "replace (any other folder or file is refused)")
    add_tensorrt_arguments(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("generate", help="generate images")
    p.add_argument("prompt", nargs="?", help="the text prompt (text-to-image models)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--engine", help="an engine folder from `ldmrt build`")
    src.add_argument("--model", help="a model to build (once, cached) and run; default: the shipped model")
    p.add_argument("--ckpt", help="weights for --model")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS)
    p.add_argument("--steps", type=int, default=50)
    # Names are checked by ldmrt.schedulers (exit 2 naming the known ones), so AUTOMATIC1111's are accepted too.
    p.add_argument("--sampler", default=None, metavar="NAME",
                   help=f"default: the engine's (a diffusers folder's scheduler, else ddim); ldmrt's: "
                        f"{', '.join(SAMPLERS)}; or AUTOMATIC1111's, e.g. 'DPM++ 2M Karras', 'Euler a'")
    p.add_argument("--timestep-spacing", "--scheduler", default=None, metavar="GRID",
                   help=f"{', '.join(SPACINGS)}, or an AUTOMATIC1111 scheduler name (Karras, SGM Uniform, ...); "
                        f"default: the sampler's")
    p.add_argument("--device", help="torch engines: cpu or cuda[:i] (default: CUDA when available)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default 5 where the model supports it)")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--seed", type=seed, default=0, help="0..2^64-1")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="apply a LoRA (kohya or diffusers .safetensors) at STRENGTH (default 1.0); repeatable; "
                        "no rebuild (torch, onnxruntime, openvino engines; tensorrt built with --refit)")
    p.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="CLIP models: condition on the N-th layer from the last (1: the last; AUTOMATIC1111's "
                        "numbering, diffusers' clip_skip + 1)")
    p.add_argument("--embedding", action="append", metavar="FILE",
                   help="CLIP models: a textual-inversion embedding (AUTOMATIC1111 .pt/.safetensors, diffusers "
                        "learned_embeds); its trigger word (the file's stem, or diffusers' token) in the prompt "
                        "uses it. Repeatable")
    p.add_argument("--init-image", help="image for img2img / inpainting")
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--mask", help="mask image for inpainting (white = repaint)")
    p.add_argument("--class-label", type=int)
    p.add_argument("--low-res-image", help="input of super-resolution models")
    p.add_argument("--layout", help='layout-to-image models: a JSON file of [{"class": NAME_OR_ID, "box": [x0, y0, '
                   'x1, y1]}, ...], coordinates in [0, 1] from the top left')
    p.add_argument("--segmentation", help="semantic-synthesis models: a PNG of class indices (mode L, P or I)")
    p.add_argument("--cache", type=int, metavar="N", help="feature caching (DeepCache): the full UNet every N-th "
                   "step, its shallow branch between (approximate: README 'Doing less per image')")
    p.add_argument("--cache-schedule", choices=("uniform", "quadratic"), help="where --cache puts its full steps: "
                   "every N-th (default), or as many denser around 30%% of the schedule")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("FROM", "UNTIL"),
                   help="guidance only on the steps in [FROM, UNTIL) (fractions of the steps); one conditional "
                   "UNet call elsewhere (approximate)")
    p.add_argument("--fast", action="store_true", help="the measured fast preset of --cache and --guidance-interval")
    p.add_argument("--tiled-vae", action=argparse.BooleanOptionalAction, default=None,
                   help="decode (and encode --init-image) in overlapping tiles; default: only when the whole would "
                   "not fit in memory")
    p.add_argument("--hires", type=image_size, metavar="SIZE",
                   help="hires fix: generate at --height/--width (default the model's size), upscale to SIZE "
                   "(or WIDTHxHEIGHT) and refine there by img2img")
    p.add_argument("--hires-strength", type=float, metavar="S",
                   help="img2img strength of the --hires pass (default 0.3, measured: README 'Beyond the training "
                   "size')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", default="out.png")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an HTTP server over an engine: step-batched, its own and AUTOMATIC1111's API")
    p.add_argument("--engine", required=True, help="the engine folder to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-batch", type=int, default=16, help="samples per UNet call (a guided image counts 2)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; past it 503")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take before 504")
    p.add_argument("--drain", type=float, default=30.0, help="on SIGTERM, seconds in-flight requests may finish in")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="no step batching: one request at a time (the baseline of benchmarks/serve_load.py)")
    ray = p.add_argument_group("Ray Serve (--ray): one engine per replica")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of one uvicorn process")
    ray.add_argument("--ray-address", help="a Ray cluster to join (e.g. auto, ray://head:10001); default: start one")
    ray.add_argument("--replicas", type=int, help="a fixed number of replicas (default 1)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling: at least this many replicas")
    ray.add_argument("--max-replicas", type=int, help="autoscaling: at most this many replicas")
    ray.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (e.g. 1, or 0.5 to share one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the README's main job: build the shipped model's engine, generate an image")
    p.add_argument("prompt", nargs="?")
    p.add_argument("-o", "--output", default="out.png")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=seed, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    # Arguments that are not UTF-8 arrive as surrogate escapes: echo them back escaped, never crash on them.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    try:
        return args.func(args)
    except (LdmrtError, ValueError, OSError) as e:
        print(f"ldmrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
