"""The one dispatch point between the model definitions and fast kernels.

Every attention and every GroupNorm(+SiLU) in ldmrt's models calls through here, so the fused Triton
kernels (`ldmrt.kernels`) replace them without touching the module tree that checkpoints load into.
Which implementation runs is chosen per call by the environment variable LDMRT_KERNELS:

    auto   (default) Triton kernels for CUDA tensors when Triton is installed, torch elsewhere
    triton the Triton kernels for every input they support, CUDA or not (on CPU tensors only under
           Triton's interpreter, TRITON_INTERPRET=1, for tests); inputs they do not support (float64,
           head dims over 256) still take torch
    torch  the torch references below, always

`attention_reference` and `group_norm_reference` are the references: plain torch, statistics in at
least fp32.
"""
import functools
import importlib
import os

import torch
import torch.nn.functional as F
from torch import nn

KERNELS_ENV = "LDMRT_KERNELS"
KERNEL_CHOICES = ("auto", "triton", "torch")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, Nq, d) and k, v (B, H, Nk, d); `causal` masks j > i."""
    kernels = _triton_kernels("attention", q)
    if kernels is not None and kernels.supports(q, k, v):
        return kernels.attention(q, k, v, causal=causal)
    return attention_reference(q, k, v, causal)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """`norm(x)` (then SiLU if asked), statistics in fp32 for fp16/bf16 x as CompVis's GroupNorm32."""
    kernels = _triton_kernels("group_norm", x)
    if kernels is not None and kernels.supports(x, norm.num_groups):
        return kernels.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu)
    return group_norm_reference(x, norm, silu)


def attention_reference(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def group_norm_reference(x, norm, silu=False):
    """Statistics in fp32 for fp16/bf16 x (and in float64 for float64 x, so reference comparisons stay
    exact)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    w = None if norm.weight is None else norm.weight.to(dtype)
    b = None if norm.bias is None else norm.bias.to(dtype)
    y = F.group_norm(x.to(dtype), norm.num_groups, w, b, norm.eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def kernel_choice() -> str:
    """LDMRT_KERNELS, validated (read on every call, so it can be switched at run time)."""
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={choice!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    return choice


def _triton_kernels(name: str, x: torch.Tensor):
    """The module ldmrt.kernels.<name> when its Triton kernel should run on x, else None."""
    choice = kernel_choice()
    if choice == "torch" or (choice == "auto" and not x.is_cuda):
        return None
    return _import_kernels(name, required=choice == "triton")


@functools.cache
def _import_kernels(name: str, required: bool):
    # Imported on first use: Triton is optional, slow to import, and picks its CPU interpreter from
    # TRITON_INTERPRET at import time.
    try:
        return importlib.import_module(f"ldmrt.kernels.{name}")
    except ImportError:
        if required:
            raise ImportError(f"{KERNELS_ENV}=triton needs Triton installed (pip install triton)") from None
        return None
