"""Memory: what a model and a request need, checked against what the machine has before anything allocates.

A model's weights are counted on the meta device (no allocation) before they are created or read. A request's
activations are estimated from the model's memory profile (computed once at build time into the manifest's
summary, `profile`) and its batch and size:

    UNet     batch (x2 when guided) * latent pixels * bytes * the live maps at the graph's widest point (the
             up path's first block at a level: its working set, its level's skip maps and the shallower levels'),
             times what the backend's allocator holds beyond the live tensors (ALLOCATOR), + the attention
             matrices heads * tokens^2 where the backend materialises them (ONNX graphs: MatMul + Softmax)
    conditioning  inputs at the image's scale: a semantic-synthesis model's one-hot class maps (classes floats
             per pixel) and the SpatialRescaler's first half-size stage
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
# Bytes an allocator has touched at a graph's peak per byte of live tensors. ONNX Runtime's BFC arena grows in
# power-of-two regions, keeps them and best-fits tensors into them, so it holds up to 2x the live tensors: SD v1's
# UNet step at 512²-2048² holds 200, 800 and 3200 MB of live tensors (its optimised graph replayed in node order) and
# peaked at 1.25x, 1.42x and 1.84x that (benchmarks/results/resolution*.json, README "Memory estimate"). torch eager
# on CPU (malloc) peaked at 1.3-1.4x (diffusers' UNet, same architecture and run); the other backends are assumed so.
ALLOCATOR = {"onnxruntime": 1.8}
ALLOCATOR_DEFAULT = 1.4


def profile(cfg: dict) -> dict:
    """The per-model constants of the estimate, from a LatentDiffusion config (stored in the summary)."""
    p = cfg["params"]
    unet = p["unet_config"]["params"]
    mc, mult = unet["model_channels"], unet.get("channel_mult", [1])
    nrb = unet.get("num_res_blocks", 1)
    attn = set(unet.get("attention_resolutions", []))
    # The widest point of the graph is the up path's first block at a level (the first level for SD v1): alive
    # there are the skip maps of the shallower levels ((nrb + 1) each: every resnet/attention output and the
    # downsampler), nrb of its own level's, and the block's working set. A transformer block's is its GEGLU
    # feed-forward: the 8C projection with its two 4C halves sliced out (16C), and the residual stream and block
    # input (2C); a resnet block's, on the concatenated 2C input: that input, its norm, SiLU and the conv's
    # NCHWc-reordered copy (8C). SD v1: 20 x 320 per latent pixel at the first level, as its ONNX graph replayed in
    # node order holds (6400 floats, 200 MB at 512²).
    kept = widest = 0.0
    attention = []
    for level, m in enumerate(mult):
        ds, ch = 2 ** level, mc * m
        per_px = ch / ds ** 2
        work = 8 * per_px
        if ds in attn:
            heads = unet.get("num_heads", -1)
            if unet.get("num_head_channels", -1) not in (-1, None):
                heads = ch // unet["num_head_channels"]
            attention.append([ds, max(int(heads), 1)])
            work = (16 + 2) * per_px
        widest = max(widest, kept + nrb * per_px + work)
        kept += (nrb + 1) * per_px
    io = unet.get("in_channels", 4) + unet.get("out_channels", 4)  # x with any concatenated input (low-res image,
    # inpainting mask and latent), and eps
    first = p["first_stage_config"]["params"].get("ddconfig")
    decoder = encoder = 0.0
    if first:
        decoder = first["ch"] * first["ch_mult"][0]
        encoder = first["ch"]
    return {"unet_per_latent_px": widest + io, "unet_attention": attention, "decoder_per_px": decoder,
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
    held = ALLOCATOR.get(backend, ALLOCATOR_DEFAULT)
    unet = OVERHEAD + unet_batch * tokens * a * prof["unet_per_latent_px"] * held
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
    if summary["conditioning"] == "segmentation":
        out["cond_stage"] = int(OVERHEAD + segmentation_maps(summary, batch, height, width, held))
    if encode:
        out["encoder"] = int(OVERHEAD + blended + mid + batch * first_px * a * prof["encoder_per_px"]
                             * ENCODER_LIVE_MAPS)
    out["peak"] = max(out.values())
    return out


def segmentation_maps(summary: dict, batch: int, height: int, width: int, held: float) -> float:
    """Bytes of a semantic-synthesis request's conditioning (ldmrt/pipeline.py conditioning): the one-hot map of
    segmentation_classes float32 per pixel at segmentation_factor pixels per latent pixel, one per image (and the one
    they are expanded from), and the cond_stage graph's SpatialRescaler on them: its first bilinear stage halves
    each side (a quarter of the maps), through the backend's allocator."""
    f = summary["segmentation_factor"]
    px = (height // summary["latent_factor"] * f) * (width // summary["latent_factor"] * f)
    one_hot = px * summary["segmentation_classes"] * 4
    return one_hot * (batch + (batch > 1)) + batch * one_hot / 4 * held


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
