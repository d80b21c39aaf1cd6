"""Registers, shared memory and spills of each kernel launch (SD's shapes, every attention head split),
compiled for a GPU architecture ahead of time: no GPU needed.

    python -m ldmrt.kernels.resources [--arch 80 90] [--json out.json]

The launchers are called on meta tensors with their kernels swapped for a recorder (nothing runs), so each
launch is exactly what they would make. Triton then compiles it for sm_<arch> (its wheel carries ptxas)
with the argument specialisation it applies at a real launch (ints equal to 1 become constants; pointers
and ints divisible by 16 carry that hint), and the cubin's resource use is read with the cuobjdump
Triton also carries. What this catches that the CPU interpreter cannot: launch configs that do not
compile, register spills (a stack frame: these kernels make no calls, so a frame is spilled registers),
and shared memory over a GPU's per-block limit (`SHARED_LIMIT`, which also names the architectures
`--arch` takes). On a GPU, benchmarks/gpu/bench_gpu.py reads the same from that machine's Triton.

Triton's compiler is not usable in a process running its interpreter (TRITON_INTERPRET=1): run this in
one without (tests/test_kernels_compile.py starts it so).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ldmrt.files import atomic_write

from . import attention, group_norm

ARCHS = (80, 90)  # A100; H100/H200
# Shared memory per block. sm_86/sm_89 (RTX 30xx/40xx, L4, A10...) allow the least from Ampere on, 99 KB,
# and compile like sm_80, so sm_80's launches are held to their limit; sm_90 allows 227 KB.
SHARED_LIMIT = {80: 99 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
OPTIONS = ("num_warps", "num_stages")
H100_MULTIPROCESSORS = 132


def _meta_tensor(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _contiguous(q_shape, seq_k):
    def make(dtype):
        q = _meta_tensor(q_shape, dtype)
        return q, *(_meta_tensor(q_shape[:2] + (seq_k, q_shape[3]), dtype) for _ in range(2))
    return make


def _transformer_views(batch, heads, seq_q, seq_k, head_dim):
    """As SpatialTransformer's attention hands them over: (B, N, heads * d) projections split into heads."""
    def make(dtype):
        def split(tokens):
            return _meta_tensor((batch, tokens, heads * head_dim), dtype).unflatten(-1, (heads, -1)).transpose(1, 2)
        return split(seq_q), split(seq_k), split(seq_k)
    return make


def _legacy_qkv(batch, heads, tokens, head_dim):
    """As the legacy AttentionBlock (LDM zoo UNets) hands them over: one (B, 3C, T) tensor, tokens stride 1."""
    def make(dtype):
        qkv = _meta_tensor((batch, 3 * heads * head_dim, tokens), dtype).unflatten(1, (heads, 3, -1))
        return qkv.transpose(1, 2).transpose(-1, -2).unbind(1)
    return make


ATTENTION_CASES = {  # name: (q, k, v for a dtype, causal); every head split attention.head_blocks makes
    "sd 64x64 self d40": (_transformer_views(2, 8, 4096, 4096, 40), False),
    "sd cross d80": (_transformer_views(2, 8, 1024, 77, 80), False),
    "sd 16x16 self d160": (_transformer_views(2, 8, 256, 256, 160), False),
    "legacy 32x32 d64": (_legacy_qkv(2, 8, 1024, 64), False),
    "clip causal d64": (_contiguous((2, 12, 77, 64), 77), True),
    "small heads d8": (_contiguous((1, 2, 130, 8), 77), False),
    "small heads d24": (_contiguous((1, 2, 130, 24), 77), False),
    "d96": (_contiguous((1, 2, 1024, 96), 1024), False),
    "d128": (_contiguous((1, 2, 1024, 128), 1024), False),
    "d144": (_contiguous((1, 2, 1024, 144), 1024), False),
    "d192": (_contiguous((1, 2, 1024, 192), 1024), False),
    "widest d256": (_contiguous((1, 2, 130, 256), 77), False),
}
GROUP_NORM_CASES = {  # name: (shape, groups, channels-last)
    "unet 320@64x64": ((2, 320, 64, 64), 32, False),
    "unet 1280@8x8 channels-last": ((2, 1280, 8, 8), 32, True),
    "vae 128@512x512": ((1, 128, 512, 512), 32, False),
    "vae 512@64x64 channels-last": ((1, 512, 64, 64), 32, True),
    "widest group": ((1, group_norm.MAX_GROUP_CHANNELS, 4, 4), 1, False),
}


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` records (kernel, args, meta)."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.kernel, args, meta))


def record_launches(module, kernel_names: tuple[str, ...], call) -> list[tuple]:
    """(kernel, args, meta) of each launch that call() makes of module's kernels, recorded instead of run."""
    kernels, launches = {name: getattr(module, name) for name in kernel_names}, []
    for name, kernel in kernels.items():
        setattr(module, name, _LaunchRecorder(kernel, launches))
    try:
        call()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return launches


def compile_launch(kernel: triton.JITFunction, args: tuple, meta: dict, arch: int):
    """Compiles kernel as Triton would for this launch on an sm_<arch> GPU."""
    names = [n for n in kernel.arg_names if n not in meta]
    signature, constants, attrs = {}, {}, {}
    for name, value in zip(names, args):
        index = kernel.arg_names.index(name)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations are aligned far past 16 bytes
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, int) and not isinstance(value, bool):
            if value == 1:
                signature[name], constants[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{name}: no rule to specialise launch argument {value!r}")
    for name, value in meta.items():
        if name not in OPTIONS:
            signature[name], constants[name] = "constexpr", value
    options = {k: v for k, v in meta.items() if k in OPTIONS}
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def _cuobjdump() -> str:
    """The cuobjdump Triton's wheel carries, else a CUDA toolkit's."""
    import triton.backends.nvidia as nvidia
    carried = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    found = str(carried) if carried.exists() else shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("no cuobjdump: neither Triton's NVIDIA backend nor the PATH has one")
    return found


def resource_usage(compiled) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        report = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True,
                                text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's report:\n{report}")
    regs, stack, static_shared, local = map(int, found.groups())
    return dict(regs=regs, spill_bytes=stack + local, shared_bytes=static_shared + compiled.metadata.shared)


def launches():
    """(kernel name, case, dtype name, kernel, args, meta) for every case, dtype and kernel launched."""
    for case, (make_qkv, causal) in ATTENTION_CASES.items():
        for dtype, dtype_name in DTYPES.items():
            q, k, v = make_qkv(dtype)
            for launch in record_launches(attention, ("_attention_fwd",),
                                          lambda: attention.attention(q, k, v, causal=causal)):
                yield ("attention", case, dtype_name, *launch)
    for case, (shape, groups, channels_last) in GROUP_NORM_CASES.items():
        for dtype, dtype_name in DTYPES.items():
            x = _meta_tensor(shape, dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            weight, bias = _meta_tensor(shape[1:2], dtype), _meta_tensor(shape[1:2], dtype)  # cast with the model
            chunks = triton.cdiv(2 * H100_MULTIPROCESSORS, shape[0] * groups)  # group_norm.default_chunks there
            for launch in record_launches(group_norm, ("_group_stats", "_group_norm_apply"),
                                          lambda: group_norm.group_norm(x, groups, weight, bias, 1e-6, silu=True,
                                                                        chunks=chunks)):
                yield (launch[0].__name__.strip("_"), case, dtype_name, *launch)


def report(archs=ARCHS) -> list[dict]:
    if not isinstance(attention._attention_fwd, triton.JITFunction):
        raise RuntimeError("Triton's interpreter is on (TRITON_INTERPRET=1): compile in a process without it")
    rows = []
    for kernel_name, case, dtype, kernel, args, meta in launches():
        for arch in archs:
            usage = resource_usage(compile_launch(kernel, args, meta, arch))
            rows.append(dict(kernel=kernel_name, case=case, dtype=dtype, arch=arch, **usage,
                             ok=usage["spill_bytes"] == 0 and usage["shared_bytes"] <= SHARED_LIMIT[arch],
                             meta={k: v for k, v in meta.items() if k.isupper() or k in OPTIONS}))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT),
                   help="compute capabilities (default: 80 90)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: Triton's compiler does not work beside its interpreter")
    try:
        rows = report(args.arch)
    except (RuntimeError, ImportError) as e:  # no NVIDIA backend or cuobjdump in this Triton
        sys.exit(f"ldmrt.kernels.resources: {e}")
    print(f"{'kernel':17s} {'case':28s} {'dtype':5s} {'arch':>5s} {'regs':>5s} {'spill B':>8s} {'shared B':>9s}  tiles")
    for r in rows:
        tiles = " ".join(f"{k}={v}" for k, v in r["meta"].items() if k.startswith("BLOCK") or k in OPTIONS)
        print(f"{r['kernel']:17s} {r['case']:28s} {r['dtype']:5s} {'sm_' + str(r['arch']):>5s} {r['regs']:5d} "
              f"{r['spill_bytes']:8d} {r['shared_bytes']:9d}  {tiles}{'' if r['ok'] else '  <-- NOT OK'}")
    if args.json:  # written whole or not at all
        atomic_write(args.json, json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} launches compile without spills, within shared memory "
          f"({', '.join(f'sm_{a}: {SHARED_LIMIT[a] // 1024} KB' for a in args.arch)})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
