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
import contextlib
import functools
import importlib
import os

import torch
import torch.nn.functional as F
from torch import nn

KERNELS_ENV = "LDMRT_KERNELS"
KERNEL_CHOICES = ("auto", "triton", "torch")
# How attention is written into ONNX graphs while export/onnx.py traces (`onnx_attention`): "materialised" (MatMul,
# Softmax, MatMul: what every ONNX consumer reads, holding tokens^2 scores) or "fused" (ONNX Runtime's
# com.microsoft MultiHeadAttention, whose CPU kernel is a flash attention: measured in README "Beyond the training
# size").
ONNX_ATTENTION_CHOICES = ("materialised", "fused")
_onnx_attention = "materialised"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, Nq, d) and k, v (B, H, Nk, d); `causal` masks j > i."""
    if not causal and _onnx_attention == "fused" and torch.onnx.is_in_onnx_export():
        return _fused_onnx_attention(q, k, v)
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


@contextlib.contextmanager
def onnx_attention(kind: str):
    """While exporting, write non-causal attention as `kind` (ONNX_ATTENTION_CHOICES). A module-level switch
    because the model code is shared by every backend: only the ONNX exporter decides how attention is spelled."""
    global _onnx_attention
    if kind not in ONNX_ATTENTION_CHOICES:
        raise ValueError(f"onnx attention {kind!r}: expected one of {', '.join(ONNX_ATTENTION_CHOICES)}")
    previous, _onnx_attention = _onnx_attention, kind
    try:
        yield
    finally:
        _onnx_attention = previous


class _MultiHeadAttention(torch.autograd.Function):
    """q, k, v (B, N, heads * d) -> (B, Nq, heads * d); exported as one com.microsoft MultiHeadAttention node
    (scale 1/sqrt(d), its default). Traced only: eager calls never reach it."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int, width: int):
        def split(t):
            return t.unflatten(-1, (heads, -1)).transpose(1, 2)
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)

    @staticmethod
    def symbolic(g, q, k, v, heads: int, width: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        # The query's type (v and q have the same width here) with batch and tokens unknown: a static size would
        # be folded into the reshapes after it, fixing the graph to the traced size.
        out.setType(q.type().with_sizes([None, None, width]))
        return out


def _fused_onnx_attention(q, k, v):
    heads, width = int(q.shape[1]), int(q.shape[1] * q.shape[3])

    def join(t):  # (B, H, N, d) -> (B, N, H * d), the layout MultiHeadAttention takes
        return t.transpose(1, 2).flatten(2)
    out = _MultiHeadAttention.apply(join(q), join(k), join(v), heads, width)
    return out.unflatten(-1, (heads, -1)).transpose(1, 2)


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
