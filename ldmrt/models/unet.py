"""The CompVis LDM / Stable Diffusion v1 denoising UNet (`openaimodel.UNetModel`), inference only.

Module tree and parameter names match CompVis so a checkpoint's `model.diffusion_model.*` sub-dict
loads with strict=True. GroupNorms are plain nn.GroupNorm(32, C) (eps 1e-5, as CompVis GroupNorm32)
applied through `ops.group_norm`, which keeps GroupNorm32's fp32 statistics; attention goes through
`ops.attention`. Precision is chosen by casting the whole module (`.half()`, `.bfloat16()`, ...).
Output convolutions are not zero-initialised as in CompVis: that only matters for training.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .attention import SpatialTransformer


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps (N,) -> (N, dim), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv if use_conv."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=padding) if use_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling: strided 3x3 conv if use_conv, else 2x2 average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.op = (nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding) if use_conv
                   else nn.AvgPool2d(kernel_size=2, stride=2))

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, by addition or, with use_scale_shift_norm,
    as a FiLM scale/shift of the second GroupNorm; `up`/`down` resample inside the block."""

    # `use_checkpoint` (gradient checkpointing) is training-only: accepted and ignored.
    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3 if use_conv else 1, padding=1 if use_conv else 0)

    def forward(self, x, emb):
        h = ops.group_norm(x, self.in_layers[0], silu=True)
        h = self.in_layers[2](self.h_upd(h))  # resample between the activation and the conv, as CompVis
        x = self.x_upd(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        norm, dropout, conv = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = F.silu(ops.group_norm(h, norm) * (1 + scale) + shift)
        else:
            h = ops.group_norm(h + emb_out, norm, silu=True)
        return self.skip_connection(x) + conv(dropout(h))


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions with a fused qkv 1x1 Conv1d.

    The qkv channels are laid out (heads, 3, ch) by default (openaimodel's QKVAttentionLegacy) and
    (3, heads, ch) with use_new_attention_order (QKVAttention).
    """

    # `use_checkpoint` (gradient checkpointing) is training-only: accepted and ignored.
    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.qkv_order = "3hc" if use_new_attention_order else "h3c"
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(ops.group_norm(x, self.norm))  # (B, 3C, T)
        if self.qkv_order == "h3c":
            qkv = qkv.unflatten(1, (self.num_heads, 3, -1)).transpose(1, 2)
        else:
            qkv = qkv.unflatten(1, (3, self.num_heads, -1))
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, T, ch)
        h = ops.attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """openaimodel.UNetModel with the CompVis constructor. Training-only options (use_checkpoint,
    use_fp16: cast the module instead) are accepted and ignored; dropout is a no-op in eval mode."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=-1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, use_spatial_transformer=False, transformer_depth=1,
                 context_dim=None, legacy=True):
        super().__init__()
        if dims != 2:
            raise NotImplementedError("only dims=2 UNets are supported")
        if use_spatial_transformer != (context_dim is not None):
            raise ValueError("use_spatial_transformer and context_dim go together")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.model_channels = model_channels
        self.num_classes = num_classes
        time_embed_dim = model_channels * 4

        def attention(ch, upsampling=False):
            # Head count / width exactly as CompVis, including its `legacy` quirk for dim_head.
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim)
            return AttentionBlock(ch, num_heads=num_heads_upsample if upsampling else heads,
                                  num_head_channels=dim_head, use_new_attention_order=use_new_attention_order)

        def resblock(ch, out_ch=None, **updown):
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch,
                            use_scale_shift_norm=use_scale_shift_norm, **updown)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch), attention(ch), resblock(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, upsampling=True))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None, y=None, *, keep: int = 0):
        """x (N, in_channels, H, W), timesteps (N,), context (N, M, context_dim) for cross-attention,
        y (N,) class labels iff num_classes was given -> (N, out_channels, H, W).

        keep > 0 (DeepCache, Ma et al. 2024): also return the deep feature, the input of output_blocks[-keep],
        which `shallow` takes in place of everything between input_blocks[keep - 1] and output_blocks[-keep]."""
        emb = self._embedding(timesteps, y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        deep = None
        for i, block in enumerate(self.output_blocks):
            if i == len(self.output_blocks) - keep:
                deep = h
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        out = self.out[2](ops.group_norm(h, self.out[0], silu=True))
        return (out, deep) if keep else out

    def shallow(self, x, timesteps, deep, context=None, y=None, *, keep: int):
        """The UNet's outermost `keep` skip branches on a deep feature from forward(..., keep=keep): the first
        `keep` input blocks, whose outputs are exactly the skips the last `keep` output blocks take."""
        emb = self._embedding(timesteps, y)
        skips = []
        h = x
        for block in self.input_blocks[:keep]:
            h = block(h, emb, context)
            skips.append(h)
        h = deep
        for block in self.output_blocks[len(self.output_blocks) - keep:]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out[2](ops.group_norm(h, self.out[0], silu=True))

    def _embedding(self, timesteps, y):
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional")
        t_emb = timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)
        return emb + self.label_emb(y) if y is not None else emb
