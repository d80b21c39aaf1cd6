"""The `ldmrt` command: build engines, generate images, describe the machine and models."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from . import cache_root


def cmd_info(args) -> int:
    from .info import format_info, model_info, system_info
    info = model_info(args.model) if args.model else system_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_build(args) -> int:
    from .engine import Engine
    from .export.tensorrt import options_from_args
    Engine.build(args.model, args.output, ckpt=args.ckpt, fp16=args.fp16, backend=args.backend,
                 random_weights=args.random_weights, tensorrt=options_from_args(args),
                 onnx_fusions=args.onnx_fusions)
    return 0


def engine_cache_dir(model: str, ckpt: str | None, backend: str) -> Path:
    """One cached engine per (model, checkpoint file as it is now, backend)."""
    import hashlib
    key = str(model)
    if ckpt:
        st = Path(ckpt).stat()
        key += f"|{Path(ckpt).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(str(model)).stem)
    return cache_root() / "engines" / f"{safe}-{backend}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _open_engine(args):
    """--engine DIR, or an engine for --model [--ckpt] built once into the cache and reused."""
    from .engine import DEFAULT_MODEL, Engine, EngineError
    if args.engine:
        if args.ckpt:
            raise ValueError("--ckpt goes with --model (an engine folder already holds its weights)")
        return Engine.load(args.engine, device=args.device)
    model = args.model or DEFAULT_MODEL
    if args.ckpt and not Path(args.ckpt).exists():
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist")
    cache = engine_cache_dir(model, args.ckpt, args.backend)
    if cache.exists():
        try:
            return Engine.load(cache, verify=False, device=args.device)
        except EngineError as e:
            print(f"ldmrt: rebuilding the cached engine ({e})", file=sys.stderr)
    Engine.build(model, cache, ckpt=args.ckpt, backend=args.backend)
    return Engine.load(cache, verify=False, device=args.device)


def write_png(image, path: Path, text: dict[str, str] | None = None):
    """Save a PIL image as PNG with text chunks, through a temporary file: never a half-written image."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cmd_generate(args) -> int:
    t0 = time.perf_counter()
    engine = _open_engine(args)
    t1 = time.perf_counter()
    params = dict(negative_prompt=args.negative_prompt, steps=args.steps, sampler=args.sampler,
                  guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed, height=args.height,
                  width=args.width, batch_size=args.batch_size, init_image=args.init_image, strength=args.strength,
                  mask=args.mask, class_label=args.class_label, low_res_image=args.low_res_image,
                  timestep_spacing=args.timestep_spacing)
    images = engine.generate(args.prompt, **params, progress=not args.quiet)
    t2 = time.perf_counter()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"prompt": args.prompt, **{k: v for k, v in params.items() if v is not None},
              "engine": str(engine.path), "model": engine.manifest["model"].get("name"),
              "backend": engine.manifest["backend"], "precision": engine.manifest["precision"],
              "ldmrt": engine.manifest["ldmrt_version"]}
    paths = []
    for i, image in enumerate(images):
        path = out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        command = shlex.join(["ldmrt", *(sys.argv[1:] if args.argv is None else args.argv)])
        write_png(image, path, {"parameters": json.dumps({**record, "batch_index": i}), "ldmrt-command": command})
        paths.append(str(path))
    print(f"ldmrt generate: wrote {', '.join(paths)} ({images[0].width}x{images[0].height}, {args.steps} "
          f"{args.sampler} steps) in {t2 - t1:.1f} s (+{t1 - t0:.1f} s loading {engine.path})")
    return 0


def cmd_demo(args) -> int:
    from .demo import PROMPT, run_demo
    run_demo(args.output, prompt=args.prompt or PROMPT, steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .engine import BACKENDS
    from .export.tensorrt import add_build_arguments as add_tensorrt_arguments
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
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="aoti: AOTInductor packages, also runnable from C++ hosts (examples/cpp)")
    p.add_argument("--random-weights", action="store_true", help="no checkpoint: random weights (testing)")
    p.add_argument("--onnx-fusions", choices=("cuda",), help="fuse onto ONNX Runtime's CUDA operators (the engine "
                   "then needs the CUDA execution provider; no fusion measured faster on CPUs)")
    p.add_argument("-o", "--output", required=True, help="engine folder to write")
    add_tensorrt_arguments(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("generate", help="generate images")
    p.add_argument("prompt", nargs="?", help="the text prompt (text-to-image models)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--engine", help="an engine folder from `ldmrt build`")
    src.add_argument("--model", help="a model to build (once, cached) and run; default: the shipped model")
    p.add_argument("--ckpt", help="weights for --model")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--timestep-spacing", default="uniform",
                   choices=SPACINGS)
    p.add_argument("--device", help="torch engines: cpu or cuda[:i] (default: CUDA when available)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default 5 where the model supports it)")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--init-image", help="image for img2img / inpainting")
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--mask", help="mask image for inpainting (white = repaint)")
    p.add_argument("--class-label", type=int)
    p.add_argument("--low-res-image", help="input of super-resolution models")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", default="out.png")
    p.set_defaults(func=cmd_generate, argv=None)

    p = sub.add_parser("demo", help="the README's main job: build the shipped model's engine, generate an image")
    p.add_argument("prompt", nargs="?")
    p.add_argument("-o", "--output", default="out.png")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        args.argv = list(argv) if argv is not None else None
    from .checkpoint import CheckpointError
    from .config import ConfigError
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"ldmrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
