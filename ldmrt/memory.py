"""Memory: what a model and a request need, checked against what the machine has before anything allocates.

A model's weights are counted on the meta device (no allocation) before they are created or read. A request's
activations are estimated from the model's memory profile (computed once at build time into the manifest's
summary, `profile`) and its batch and size:

    UNet     batch (x2 when guided) * latent pixels * bytes * (skip maps kept for the decoder half + the
             widest working set: GEGLU feed-forward of a transformer block), + the attention matrices
             heads * tokens^2 where the backend materialises them (ONNX graphs: MatMul + Softmax)
    decoder  batch * image pixels * bytes * channels at full resolution * DECODER_LIVE_MAPS, + the mid-block
             attention tokens^2 at latent resolution where materialised; decoded in tiles (ldmrt/tiling.py),
             the same for one tile's pixels, + the blended full-size image
    encoder  the same for img2img inputs

The largest of them is the request's peak, beyond the loaded weights. Its accuracy against measured peaks
is stated in the README (benchmarks/memory.py measures it). A request whose estimate exceeds what is available
(RAM: MemAvailable and the cgroup limit; CUDA: free device memory) is refused with a ResourceError giving the
estimate, the limit and what to change.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ResourceError

# Full-resolution maps alive at once in the decoder's last blocks (input, conv out, norm, skip, the upsampler's):
# measured 7.3-9.6 at 512² once attention no longer dominates (benchmarks/memory.py, 2026-12-01).
DECODER_LIVE_MAPS = 8
ENCODER_LIVE_MAPS = 3
ATTENTION_COPIES = 2  # scores and their softmax
OVERHEAD = 64 << 20  # allocator, thread pools, convolution workspaces: 30-90 MB measured at 256²
# Where whole attention matrices are held on a CPU (measured, benchmarks/memory.py): ONNX graphs with materialised
# attention (exported MatMul + Softmax; engines built before fused attention, OpenVINO's); not graphs whose
# attention is fused (the manifest's graphs say "attention": "fused"); torch's SDPA runs fused in both layouts
# (the first stage's q, k, v are made contiguous for it); AOTInductor is not measured. On CUDA (Triton flash
# attention) and TensorRT none is.
MATERIALISED_UNET = {"onnxruntime", "openvino"}
MATERIALISED_FIRST_STAGE = {"onnxruntime", "openvino", "aoti"}
HEADROOM = 0.9  # of the available memory a request may plan to use


def profile(cfg: dict) -> dict:
    """The per-model constants of the estimate, from a LatentDiffusion config (stored in the summary)."""
    p = cfg["params"]
    unet = p["unet_config"]["params"]
    mc, mult = unet["model_channels"], unet.get("channel_mult", [1])
    nrb = unet.get("num_res_blocks", 1)
    attn = set(unet.get("attention_resolutions", []))
    skip = work = 0.0
    attention = []
    for level, m in enumerate(mult):
        ds, ch = 2 ** level, mc * m
        skip += (nrb + 1) * ch / ds ** 2  # every resnet/attention output and the downsampler are kept
        if ds in attn:
            heads = unet.get("num_heads", -1)
            if unet.get("num_head_channels", -1) not in (-1, None):
                heads = ch // unet["num_head_channels"]
            attention.append([ds, max(int(heads), 1)])
            work = max(work, 8 * ch / ds ** 2)  # GEGLU: 2 x 4C hidden per token
        work = max(work, 3 * ch / ds ** 2)
    first = p["first_stage_config"]["params"].get("ddconfig")
    decoder = encoder = 0.0
    if first:
        decoder = first["ch"] * first["ch_mult"][0]
        encoder = first["ch"]
    return {"unet_per_latent_px": skip + work, "unet_attention": attention, "decoder_per_px": decoder,
            "encoder_per_px": encoder, "first_stage_attention": bool(first)}


def estimate(summary: dict, backend: str, precision: str, batch: int, height: int, width: int, guided: bool,
             encode: bool = False, device: str = "cpu", fused_attention: bool = False,
             tile: int | None = None) -> dict[str, int]:
    """Bytes of activations per graph for one request (see the module docstring), and their peak.
    fused_attention: the engine's graphs fuse attention (`fused_attention(manifest)`): no tokens^2 matrices.
    tile: the first stage runs in tiles of this many latent pixels a side (None: whole)."""
    prof = summary["memory"]
    a = 2 if precision in ("fp16", "bf16") else 4
    f = summary["latent_factor"]
    h, w = height // f, width // f
    tokens = h * w
    unfused = not str(device).startswith("cuda") and not fused_attention  # scores held whole where the backend does
    unet_batch = batch * (2 if guided else 1)
    unet = OVERHEAD + unet_batch * tokens * a * prof["unet_per_latent_px"]
    if unfused and backend in MATERIALISED_UNET:
        unet += unet_batch * ATTENTION_COPIES * 4 * max(
            (heads * (tokens // ds ** 2) ** 2 for ds, heads in prof["unet_attention"]), default=0)
    materialised = unfused and backend in MATERIALISED_FIRST_STAGE and prof["first_stage_attention"]
    blended = 0
    if tile is not None:  # one tile at a time, into float32 sums of the whole image (and of the latent)
        blended = batch * (3 * height * width + 2 * summary["latent_channels"] * tokens) * 4 * 2
        h, w = min(h, tile), min(w, tile)
    first_px, first_tokens = h * w * f * f, h * w
    mid = batch * ATTENTION_COPIES * 4 * first_tokens ** 2 if materialised else 0
    out = {"unet": int(unet), "decoder": int(OVERHEAD + blended + mid + batch * first_px * a * prof["decoder_per_px"]
                                             * DECODER_LIVE_MAPS)}
    if encode:
        out["encoder"] = int(OVERHEAD + blended + mid + batch * first_px * a * prof["encoder_per_px"]
                             * ENCODER_LIVE_MAPS)
    out["peak"] = max(out.values())
    return out


def available(device: str = "cpu") -> int:
    """Bytes this process may still allocate: free CUDA memory, or MemAvailable capped by the cgroup limit."""
    if str(device).startswith("cuda"):
        import torch
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                left = int(limit) - int(Path(used_file).read_text())
                free = left if free is None else min(free, left)
            break
        except (OSError, ValueError):
            continue
    if free is None:  # no /proc: assume what the machine has in total
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(int(free), 0)


def _gb(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GB"


def fused_attention(manifest: dict) -> bool:
    """Whether an engine's graphs were exported with fused attention (export/onnx.py records it per graph)."""
    return manifest["graphs"].get("unet", {}).get("attention") == "fused"


def request_estimate(engine, batch: int, height: int, width: int, guided: bool, encode: bool = False,
                     tile: int | None = None) -> dict[str, int]:
    """`estimate` for a request to a loaded engine (its backend, precision, device and graphs)."""
    m = engine.manifest
    return estimate(engine.summary, m["backend"], m["precision"], batch, height, width, guided, encode,
                    str(getattr(engine.backend, "device", "cpu")), fused_attention(m), tile)


def first_stage_fits(engine, batch: int, height: int, width: int, encode: bool = False) -> bool:
    """Whether the decoder (and the encoder, with `encode`) fit this machine run whole."""
    need = request_estimate(engine, batch, height, width, False, encode)
    return max(need["decoder"], need.get("encoder", 0)) <= HEADROOM * available(
        str(getattr(engine.backend, "device", "cpu")))


def check_request_memory(engine, batch: int, height: int, width: int, guided: bool, encode: bool = False,
                         tile: int | None = None) -> None:
    """ResourceError when the request's estimated peak does not fit what this machine has free (tile: the first
    stage runs in tiles of that many latent pixels)."""
    m = engine.manifest
    device = str(getattr(engine.backend, "device", "cpu"))
    need = request_estimate(engine, batch, height, width, guided, encode, tile)
    have = available(device)
    if need["peak"] > HEADROOM * have:
        part = max((k for k in need if k != "peak"), key=need.get)
        hints = ["a smaller height/width or batch_size"]
        if m["backend"] in MATERIALISED_UNET and part == "unet" and not fused_attention(m):
            hints.append("an engine built with --backend torch (its UNet attention needs no tokens^2 matrices)")
        if part in ("decoder", "encoder") and tile is None:
            hints.append("tiled_decode=True (--tiled-vae)")
        raise ResourceError(f"this request ({batch} x {width}x{height}) needs about {_gb(need['peak'])} for the "
                            f"{part} (estimate), and {'the GPU' if device.startswith('cuda') else 'this machine'} has "
                            f"{_gb(have)} free: try {' or '.join(hints)}")


def check_model_memory(parameters: int, source: str) -> None:
    """ResourceError when a model of `parameters` float32 weights cannot be held in RAM."""
    need, have = parameters * 4, available()
    if need > HEADROOM * have:
        raise ResourceError(f"{source} has {parameters:,} parameters ({_gb(need)} in float32) and this machine has "
                            f"{_gb(have)} free: check the config's channel and layer counts")
