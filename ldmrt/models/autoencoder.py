"""CompVis first-stage autoencoders (KL and VQ) for inference.

Module tree and state-dict keys match ldm/modules/diffusionmodules/model.py (Encoder, Decoder) and
ldm/models/autoencoder.py, with the quantizer matching taming-transformers' VectorQuantizer2, so a
checkpoint's `first_stage_model.*` sub-dict loads with `strict=True`.

Constructors accept every CompVis argument (the sizes after `lossconfig` by keyword only, as the
configs pass them, so that `lossconfig` can be omitted). Training-only ones (lossconfig, ckpt_path,
ignore_keys, image_key, monitor, batch_resize_range, scheduler_config, lr_g_factor, use_ema,
dropout, ...) are accepted and ignored: loading weights and dropping `loss.*` / EMA keys is
ldmrt.checkpoint's job. `colorize_nlabels` only registers the `colorize` buffer, so its key loads.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldmrt.models import ops


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        if not hasattr(self, "conv"):
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        # CompVis pads only right and bottom before the stride-2 conv.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResnetBlock(nn.Module):
    """CompVis ResnetBlock without timestep embedding (temb_channels=0 in the autoencoders)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(ops.group_norm(x, self.norm1, silu=True))
        h = self.conv2(ops.group_norm(h, self.norm2, silu=True))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, q/k/v/proj_out as 1x1 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, hgt, wid = x.shape
        h = ops.group_norm(x, self.norm)
        # (B, C, H, W) -> (B, 1 head, H*W, C), contiguous: torch's CPU SDPA takes its flash kernel (no tokens^2
        # scores) only for a unit-stride last axis; the transposed view took the math path (measured at 128x128
        # tokens: 2.4 GB more peak, 3.3 s against 2.6 s).
        q, k, v = (conv(h).reshape(b, 1, c, hgt * wid).transpose(2, 3).contiguous()
                   for conv in (self.q, self.k, self.v))
        h = ops.attention(q, k, v).transpose(2, 3).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


def make_attn(channels: int, attn_type: str) -> nn.Module:
    if attn_type == "vanilla":
        return AttnBlock(channels)
    if attn_type == "none":
        return nn.Identity()
    if attn_type == "linear":
        raise NotImplementedError("attn_type='linear' (LinAttnBlock) is not used by any released first stage")
    raise ValueError(f"unknown attn_type {attn_type!r}")


def _level(blocks: list, attns: list) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, attn_type: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = make_attn(channels, attn_type)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_level(level: nn.Module, h):
    # `attn` is either empty or holds one module per res block.
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, double_z=True,
                 use_linear_attn=False, attn_type="vanilla", **ignore_kwargs):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        res = resolution
        levels = []
        for i in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type))
            levels.append(_level(blocks, attns))
            if i != self.num_resolutions - 1:
                levels[-1].downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
        self.down = nn.ModuleList(levels)
        self.mid = _mid(block_in, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(ops.group_norm(h, self.norm_out, silu=True))


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, give_pre_end=False, tanh_out=False,
                 use_linear_attn=False, attn_type="vanilla", **ignorekwargs):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.num_resolutions = len(ch_mult)
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, attn_type)
        levels = []  # built lowest resolution first, stored as up[0] = highest resolution (CompVis order)
        for i in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type))
            levels.append(_level(blocks, attns))
            if i != 0:
                levels[-1].upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(ops.group_norm(h, self.norm_out, silu=True))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussianDistribution:
    """Posterior of AutoencoderKL: `parameters` holds mean and log-variance stacked on dim 1."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.zeros_like(self.mean) if deterministic else torch.exp(0.5 * self.logvar)
        self.var = self.std ** 2 if deterministic else torch.exp(self.logvar)

    def sample(self, noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; without `noise`, draws it from `generator` (a CPU generator) or the global one."""
        if noise is None:
            # CompVis draws fp32 noise on the CPU and moves it; doing the same keeps its seeds reproducible.
            noise = torch.randn(self.mean.shape, generator=generator)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig, lossconfig=None, *, embed_dim, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None):
        super().__init__()
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True (encoder emits mean and log-variance)")
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:  # a buffer CompVis checkpoints carry; only used for logging
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))

    def encode(self, x) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input, sample_posterior=True):
        posterior = self.encode(input)
        return self.decode(posterior.sample() if sample_posterior else posterior.mode()), posterior


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantizer with taming's VectorQuantizer2 outputs and key `embedding.weight`.

    Distances are ||z||^2 + ||e||^2 - 2 z.e (taming's expression, so near-ties resolve alike) in at
    least fp32; argmin takes the first index on ties. The quantized output is the codebook entry
    itself (taming's straight-through `z + (z_q - z)` only matters for gradients).
    """

    def __init__(self, n_e, e_dim, beta=0.25, remap=None, unknown_index="random", sane_index_shape=False,
                 legacy=True):
        super().__init__()
        if remap is not None:
            raise NotImplementedError("VectorQuantizer remap (index remapping to a used-codes subset) is not supported")
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)

    def forward(self, z):
        b, c, h, w = z.shape
        work = torch.promote_types(z.dtype, torch.float32)
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, self.e_dim).to(work)
        codebook = self.embedding.weight.to(work)
        d = (z_flat ** 2).sum(dim=1, keepdim=True) + (codebook ** 2).sum(dim=1) - 2 * (z_flat @ codebook.t())
        indices = torch.argmin(d, dim=1)
        z_q = codebook[indices]
        # legacy or not, the loss value is (1 + beta) * mse; the two variants differ only in gradients.
        loss = (1 + self.beta) * torch.mean((z_q - z_flat) ** 2)
        z_q = z_q.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        if self.sane_index_shape:
            indices = indices.reshape(b, h, w)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices, shape):
        """Codebook vectors for `indices`; `shape` is (batch, height, width, channel) or None (flat output)."""
        z_q = self.embedding(indices.reshape(-1))
        if shape is None:
            return z_q
        return z_q.view(shape).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, ddconfig, lossconfig=None, *, n_embed, embed_dim, ckpt_path=None, ignore_keys=(),
                 image_key="image", colorize_nlabels=None, monitor=None, batch_resize_range=None,
                 scheduler_config=None, lr_g_factor=1.0, remap=None, sane_index_shape=False, use_ema=False):
        super().__init__()
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:  # a buffer CompVis checkpoints carry; only used for logging
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))

    def encode_to_prequant(self, x):
        return self.quant_conv(self.encoder(x))

    def encode(self, x):
        """(quantized latent, codebook loss, (None, None, indices)) as CompVis."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b):
        """Decode codebook indices of shape (B, H, W)."""
        b, h, w = code_b.shape
        return self.decode(self.quantize.get_codebook_entry(code_b, (b, h, w, self.embed_dim)))

    def forward(self, input, return_pred_indices=False):
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)


class VQModelInterface(VQModel):
    """The VQ first stage as LatentDiffusion uses it: latents are pre-quantization, decode quantizes."""

    def __init__(self, embed_dim, *args, **kwargs):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)

    def encode(self, x):
        return self.encode_to_prequant(x)

    def decode(self, h, force_not_quantize=False):
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


class IdentityFirstStage(nn.Module):
    """Pixel-space stand-in for a first stage."""

    def __init__(self, *args, vq_interface=False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def quantize(self, x, *args, **kwargs):
        return (x, None, [None, None, None]) if self.vq_interface else x

    def forward(self, x, *args, **kwargs):
        return x
