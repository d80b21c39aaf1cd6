"""The one dispatch point between the model definitions and fast kernels.

Every attention and every GroupNorm(+SiLU) in ldmrt's models calls through here, so a backend can
swap in fused kernels (Triton on CUDA) without touching the module tree that checkpoints load into.
The functions below are the references: plain torch, statistics in at least fp32.
"""
import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, Nq, d) and k, v (B, H, Nk, d); `causal` masks j > i."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """`norm(x)` (then SiLU if asked), statistics in fp32 for fp16/bf16 x as CompVis's GroupNorm32
    (and in float64 for float64 x, so reference comparisons stay exact)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    w = None if norm.weight is None else norm.weight.to(dtype)
    b = None if norm.bias is None else norm.bias.to(dtype)
    y = F.group_norm(x.to(dtype), norm.num_groups, w, b, norm.eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)
