"""Cross-attention transformer used by the LDM / Stable Diffusion UNet.

Module tree and parameter names follow CompVis `ldm/modules/attention.py` so checkpoints load with
strict=True. Attention runs through `ops.attention`, GroupNorm through `ops.group_norm`.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import ops


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, query_dim) over context (B, M, context_dim); self-attention when
    context is None. Heads split the projected features as (heads, dim_head), heads outermost."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context

        def split_heads(t):  # (B, N, heads * d) -> (B, heads, N, d)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(context)), split_heads(self.to_v(context))
        out = ops.attention(q, k, v)  # scale 1/sqrt(dim_head), as CompVis
        return self.to_out(out.transpose(1, 2).flatten(2))


class BasicTransformerBlock(nn.Module):
    # `checkpoint` (gradient checkpointing) is training-only: accepted and ignored.
    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, `depth` transformer blocks over the H*W tokens, 1x1 conv out, residual."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim)
            for _ in range(depth))
        self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(self, x, context=None):
        h, w = x.shape[-2:]
        tokens = self.proj_in(ops.group_norm(x, self.norm)).flatten(2).transpose(1, 2)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        out = tokens.transpose(1, 2).unflatten(2, (h, w))  # (B, C, H, W) with channels-last strides
        if not x.is_contiguous(memory_format=torch.channels_last):
            # In an NCHW model, a channels-last conv input makes the conv, and every conv after it, convert
            # layouts (profiled on CPU: a quarter of the fp32 SD UNet step at 256x256 went to those copies).
            out = out.contiguous()
        return self.proj_out(out) + x
