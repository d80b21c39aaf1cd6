"""Peak memory and seconds beyond the training size: SD v1's architecture (random weights, fp32) on CPU, one guided
UNet step (batch 2) and one VAE decode (batch 1) per image size, ldmrt against diffusers in the same run.

Variants:
    unet     ldmrt-onnxruntime (fused attention), ldmrt-torch (SDPA), diffusers (SDPA), diffusers-sliced
             (unet.set_attention_slice("auto"))
    decoder  ldmrt-onnxruntime and ldmrt-torch, whole and tiled (tiled_decode: tiles of 64 latent pixels,
             ldmrt.tiling.overlap_and_margin), diffusers whole and diffusers-tiled (vae.enable_tiling())
Every configuration runs in a fresh process (peaks do not mix): it loads its model, reads its weights, makes one
warm-up call at 128 px, resets the kernel's peak-RSS mark (VmHWM), makes one call, and reports seconds and the peak
RSS growth over what it held before that call. The
weights are the same in every runtime (benchmarks/models.py: diffusers' random initialisation, saved as a
diffusers folder that ldmrt converts). A configuration whose estimate (ldmrt.memory) exceeds the machine, or that
fails, is reported and skipped.

    python -m benchmarks.resolution [--sizes 512 1024 2048] [--unet-sizes 512 1024] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UNET_VARIANTS = ("ldmrt-onnxruntime", "ldmrt-torch", "diffusers", "diffusers-sliced")
DECODER_VARIANTS = ("ldmrt-onnxruntime", "ldmrt-onnxruntime-tiled", "ldmrt-torch", "ldmrt-torch-tiled", "diffusers",
                    "diffusers-tiled")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _inputs(component: str, size: int):
    import torch
    g = torch.Generator().manual_seed(0)
    latent = size // 8
    if component == "unet":
        return (torch.randn(2, 4, latent, latent, generator=g), torch.full((2,), 500.0),
                torch.randn(2, 77, 768, generator=g))
    return (torch.randn(1, 4, latent, latent, generator=g),)


def _resident(module):
    """Read every weight once: from_pretrained maps safetensors files, whose pages would otherwise be counted in
    the measured call's peak."""
    for tensor in module.state_dict().values():
        tensor.sum()
    return module


def _prepare(component: str, variant: str, work: Path):
    """A call running `component` once in `variant`, with everything it needs loaded."""
    if variant.startswith("ldmrt"):
        from ldmrt import Engine
        from ldmrt.pipeline import decode
        engine = Engine.load(work / variant.split("-")[1], device="cpu") if "torch" in variant else \
            Engine.load(work / variant.split("-")[1])
        if component == "unet":
            return lambda x, t, c: engine.backend.run("unet", x=x, t=t, context=c)["eps"]
        tile = engine.summary["default_size"] // engine.summary["latent_factor"] if variant.endswith("tiled") else None
        return lambda z: decode(engine, z, tile)
    import diffusers
    if component == "unet":
        unet = _resident(diffusers.UNet2DConditionModel.from_pretrained(work / "diffusers" / "unet").eval())
        if variant == "diffusers-sliced":
            unet.set_attention_slice("auto")
        return lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample
    vae = _resident(diffusers.AutoencoderKL.from_pretrained(work / "diffusers" / "vae").eval())
    if variant == "diffusers-tiled":
        vae.enable_tiling()
    return lambda z: vae.decode(z / vae.config.scaling_factor).sample


def measure(component: str, variant: str, size: int, work: Path, threads: int) -> dict:
    """In this process: one call's seconds and peak RSS growth."""
    import torch
    torch.set_num_threads(threads)
    call = _prepare(component, variant, work)
    with torch.no_grad():  # a warm-up at 128 px: kernels chosen, buffers and weights touched, outside the measure
        call(*_inputs(component, 128))
    inputs = _inputs(component, size)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = call(*inputs)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak": _rss("VmHWM") - before, "finite": bool(torch.isfinite(out).all())}


def estimate(component: str, variant: str, size: int, work: Path) -> int | None:
    """ldmrt's estimate of the configuration (ldmrt variants), to skip what cannot fit."""
    if not variant.startswith("ldmrt"):
        return None
    from ldmrt import memory
    from ldmrt.manifest import read_manifest
    m = read_manifest(work / variant.split("-")[1])
    s = m["model"]["summary"]
    tile = s["default_size"] // s["latent_factor"] if variant.endswith("tiled") else None
    need = memory.estimate(s, m["backend"], m["precision"], 1, size, size, guided=component == "unet",
                           fused_attention=memory.fused_attention(m), tile=tile)
    return need["unet" if component == "unet" else "decoder"]


def build(work: Path, backends: set[str]) -> None:
    """The diffusers folder and ldmrt's engines of `backends` on its weights."""
    from ldmrt import Engine
    from ldmrt.testing import write_clip_tokenizer

    from .models import make_peers, save_diffusers_folder
    save_diffusers_folder(make_peers("sd-v1"), work / "diffusers")
    tokenizer = work / "tokenizer"
    write_clip_tokenizer(tokenizer, ["a", "photo"])
    for backend in sorted(backends):
        Engine.build(str(work / "diffusers"), work / backend, backend=backend, tokenizer=tokenizer, progress=None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="decoder image sizes")
    parser.add_argument("--unet-sizes", type=int, nargs="*", default=[512, 1024], help="UNet image sizes")
    parser.add_argument("--unet-variants", nargs="+", default=list(UNET_VARIANTS), choices=UNET_VARIANTS)
    parser.add_argument("--decoder-variants", nargs="+", default=list(DECODER_VARIANTS), choices=DECODER_VARIANTS)
    parser.add_argument("--large-decoder-variants", nargs="+", default=["ldmrt-onnxruntime-tiled", "diffusers-tiled"],
                        choices=DECODER_VARIANTS, help="the only decoder variants run at sizes over 1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-gb", type=float, default=20.0, help="skip configurations estimated above this")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="keep the weights and engines here (built when absent)")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        component, variant, size, work = args.measure
        print(json.dumps(measure(component, variant, int(size), Path(work), args.threads)))
        return
    from ldmrt.machine import cpu_features
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldmrt-resolution-") as scratch:
        work = args.work or Path(scratch)
        t0 = time.perf_counter()
        backends = {v.split("-")[1] for v in args.unet_variants + args.decoder_variants if v.startswith("ldmrt")}
        if not all((work / b).is_dir() for b in backends) or not (work / "diffusers").is_dir():
            build(work, backends)
        print(f"models and engines ready in {time.perf_counter() - t0:.0f} s", flush=True)
        configs = []  # smallest size first, decoder then UNet: what finishes first is a whole size
        for size in sorted(set(args.sizes) | set(args.unet_sizes)):
            if size in args.sizes:
                configs += [("decoder", v, size) for v in args.decoder_variants
                            if size <= 1024 or v in args.large_decoder_variants]
            if size in args.unet_sizes:
                configs += [("unet", v, size) for v in args.unet_variants]
        print("| component | size | variant | seconds | peak MB | ldmrt estimate MB |\n|---|---:|---|---:|---:|---:|")
        for component, variant, size in configs:
            est = estimate(component, variant, size, work)
            row = {"component": component, "variant": variant, "size": size, "estimate": est}
            if est is not None and est > args.limit_gb * 2 ** 30:
                row["skipped"] = f"estimate {est / 2 ** 30:.1f} GB over --limit-gb"
            else:
                done = subprocess.run([sys.executable, "-m", "benchmarks.resolution", "--threads", str(args.threads),
                                       "--measure", component, variant, str(size), str(work)],
                                      capture_output=True, text=True)
                if done.returncode:
                    row["failed"] = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:120]
                else:
                    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            rows.append(row)
            est_mb = "" if est is None else f"{est / 2 ** 20:.0f}"
            if "seconds" in row:
                print(f"| {component} | {size}² | {variant} | {row['seconds']:.1f} | {row['peak'] / 2 ** 20:.0f} | "
                      f"{est_mb} |", flush=True)
            else:
                print(f"| {component} | {size}² | {variant} | {row.get('skipped') or row.get('failed')} | | {est_mb} |",
                      flush=True)
    cpu = cpu_features()
    print(f"machine: {cpu['machine']}, {cpu['processor'] or ''}, {args.threads} threads; "
          f"{time.perf_counter() - t0:.0f} s in all")
    if args.out:
        from ldmrt.files import atomic_write
        atomic_write(args.out, json.dumps({"rows": rows, "cpu": cpu, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
