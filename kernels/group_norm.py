"""Fused GroupNorm (+ SiLU) forward in Triton, for NCHW and channels-last (any strides over (C, spatial)).

One program normalises one (sample, group): it reads the group twice (statistics, then normalise +
affine + optional SiLU + store), where torch's GroupNorm followed by SiLU reads it three times and writes
it twice. Statistics are fp32 whatever the input dtype (as CompVis's GroupNorm32). The group is walked as
a 2D tile (spatial x channels-of-the-group), so the same kernel serves both memory layouts: the stride-1
axis is the contiguous one in either. The torch reference is `ldmrt.models.ops.group_norm`.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _group_norm_fwd(
    X, Y, W, B,
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    num_groups, group_channels, spatial, eps,
    SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    sample = tl.program_id(0) // num_groups
    group = tl.program_id(0) % num_groups
    chans = tl.arange(0, BLOCK_C)
    chan_ok = chans < group_channels
    first_chan = group * group_channels
    X += sample * stride_xn + first_chan * stride_xc
    Y += sample * stride_yn + first_chan * stride_yc
    positions = tl.arange(0, BLOCK_S)

    # Sums of x - shift per lane, shift = the group's first element: the shifted second moment does not
    # cancel catastrophically when |mean| >> std, and per-lane partial sums keep each accumulator short.
    shift = tl.load(X).to(tl.float32)
    lane_sum = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    lane_sq = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for start in range(0, spatial, BLOCK_S):
        pos = start + positions
        mask = (pos[:, None] < spatial) & chan_ok[None, :]
        x = tl.load(X + pos[:, None] * stride_xs + chans[None, :] * stride_xc, mask=mask, other=0.0)
        d = tl.where(mask, x.to(tl.float32) - shift, 0.0)
        lane_sum += d
        lane_sq += d * d
    count = spatial * group_channels
    mean_shifted = tl.sum(tl.sum(lane_sum, 1), 0) / count
    var = tl.maximum(tl.sum(tl.sum(lane_sq, 1), 0) / count - mean_shifted * mean_shifted, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)

    # x - mean is taken as (x - shift) - mean_shifted: exact where folding the mean into an fp32 offset
    # (x * scale + offset) would cancel away the digits that matter when |mean| >> std.
    w = tl.load(W + first_chan + chans, mask=chan_ok, other=0.0).to(tl.float32)
    b = tl.load(B + first_chan + chans, mask=chan_ok, other=0.0).to(tl.float32)
    scale = w * rstd
    for start in range(0, spatial, BLOCK_S):
        pos = start + positions
        mask = (pos[:, None] < spatial) & chan_ok[None, :]
        x = tl.load(X + pos[:, None] * stride_xs + chans[None, :] * stride_xc, mask=mask, other=0.0)
        y = (x.to(tl.float32) - shift - mean_shifted) * scale[None, :] + b[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + pos[:, None] * stride_ys + chans[None, :] * stride_yc, y.to(Y.dtype.element_ty), mask=mask)


# Wider groups do not fit one tile in registers: 4096 channels per group spill on sm_80
# (`python -m ldmrt.kernels.resources`). SD's widest is 60 (1920 channels, 32 groups).
MAX_GROUP_CHANNELS = 2048


def supports(x: torch.Tensor, num_groups: int) -> bool:
    """Whether `group_norm` handles this input (otherwise use the torch reference)."""
    return (x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.dim() >= 2
            and x.shape[1] % num_groups == 0 and x.shape[1] // num_groups <= MAX_GROUP_CHANNELS
            and x.numel() > 0)


def launch_meta(group_channels: int, spatial: int, silu: bool) -> dict:
    """The kernel's compile-time parameters and launch options for one group width and spatial extent."""
    block_c = triton.next_power_of_2(group_channels)
    # Tiles of up to 4K elements (16 per thread at 8 warps), no longer than the spatial extent.
    block_s = min(max(1, 4096 // block_c), triton.next_power_of_2(spatial))
    return dict(SILU=silu, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=8)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps) (then SiLU if asked) for x (N, C, *spatial) in
    fp16/bf16/fp32, statistics in fp32. The output has x's dtype and memory format."""
    assert supports(x, num_groups), "unsupported group_norm input: check with supports() first"
    n, c = x.shape[:2]
    if weight is None:
        weight = x.new_ones(c)
    if bias is None:
        bias = x.new_zeros(c)
    # Spatial dims flattened: a view for NCHW and channels-last alike (H and W stay mergeable in both);
    # empty_like keeps that layout for the output.
    x3 = x.reshape(n, c, -1)
    y3 = torch.empty_like(x3)
    group_channels = c // num_groups
    _group_norm_fwd[(n * num_groups,)](
        x3, y3, weight, bias, *x3.stride(), *y3.stride(), num_groups, group_channels, x3.shape[2], eps,
        **launch_meta(group_channels, x3.shape[2], silu),
    )
    return y3.view(x.shape)
