"""GroupNorm (+ SiLU) forward in Triton, for NCHW and channels-last (any strides over (C, spatial)).

Two kernels, each over a grid of (sample x group, chunk of the spatial extent): `_group_stats` writes each
chunk's partial sums, `_group_norm_apply` adds up its group's partials and normalises + affine + SiLU +
stores its chunk. The input is read twice and the output written once, where torch's GroupNorm then SiLU
read it three times and write it twice. Chunks exist for parallelism: at SD's shapes there are only
batch x 32 groups (32 to 64; an H100 has 132 multiprocessors), and one program per group would leave most
of the GPU idle on the VAE's large maps; the partials are a few bytes per chunk, and fixed-order sums
keep the result deterministic (no atomics).

Statistics are fp32 whatever the input dtype (as CompVis's GroupNorm32). A group is walked as a 2D tile
(spatial x channels-of-the-group), so the same kernels serve both memory layouts: the stride-1 axis is the
contiguous one in either. The torch reference is `ldmrt.models.ops.group_norm`.
"""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _group_stats(
    X, Partials,
    stride_xn, stride_xc, stride_xs,
    num_groups, group_channels, spatial, chunk_len,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    group_id = tl.program_id(0)  # sample * num_groups + group
    chunk = tl.program_id(1)
    sample = group_id // num_groups
    X += sample * stride_xn + (group_id % num_groups) * group_channels * stride_xc
    chans = tl.arange(0, BLOCK_C)
    chan_ok = chans < group_channels
    positions = tl.arange(0, BLOCK_S)

    # Sums of x - shift per lane, shift = the group's first element (the same for every chunk, so the
    # chunks' sums add up): the shifted second moment does not cancel catastrophically when |mean| >> std,
    # and per-lane partial sums keep each accumulator short.
    shift = tl.load(X).to(tl.float32)
    lane_sum = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    lane_sq = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    first = chunk * chunk_len
    for start in range(first, tl.minimum(first + chunk_len, spatial), BLOCK_S):
        pos = start + positions
        mask = (pos[:, None] < spatial) & chan_ok[None, :]
        x = tl.load(X + pos[:, None] * stride_xs + chans[None, :] * stride_xc, mask=mask, other=0.0)
        d = tl.where(mask, x.to(tl.float32) - shift, 0.0)
        lane_sum += d
        lane_sq += d * d
    Partials += (group_id * tl.num_programs(1) + chunk) * 2
    tl.store(Partials, tl.sum(tl.sum(lane_sum, 1), 0))
    tl.store(Partials + 1, tl.sum(tl.sum(lane_sq, 1), 0))


@triton.jit
def _group_norm_apply(
    X, Y, W, B, Partials,
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    num_groups, group_channels, spatial, chunk_len, eps,
    SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CHUNKS: tl.constexpr,
):
    group_id = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    sample = group_id // num_groups
    first_chan = (group_id % num_groups) * group_channels
    X += sample * stride_xn + first_chan * stride_xc
    Y += sample * stride_yn + first_chan * stride_yc

    chunks = tl.arange(0, BLOCK_CHUNKS)
    partials = Partials + (group_id * num_chunks + chunks) * 2
    count = spatial * group_channels
    mean_shifted = tl.sum(tl.load(partials, mask=chunks < num_chunks, other=0.0), 0) / count
    var = tl.maximum(tl.sum(tl.load(partials + 1, mask=chunks < num_chunks, other=0.0), 0) / count
                     - mean_shifted * mean_shifted, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)

    # x - mean is taken as (x - shift) - mean_shifted: exact where folding the mean into an fp32 offset
    # (x * scale + offset) would cancel away the digits that matter when |mean| >> std.
    shift = tl.load(X).to(tl.float32)
    chans = tl.arange(0, BLOCK_C)
    chan_ok = chans < group_channels
    w = tl.load(W + first_chan + chans, mask=chan_ok, other=0.0).to(tl.float32)
    b = tl.load(B + first_chan + chans, mask=chan_ok, other=0.0).to(tl.float32)
    scale = w * rstd
    positions = tl.arange(0, BLOCK_S)
    first = chunk * chunk_len
    for start in range(first, tl.minimum(first + chunk_len, spatial), BLOCK_S):
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
MAX_CHUNKS = 64  # the apply kernel reads all of its group's partials at once
MAX_ELEMENTS = 2**31  # offsets are int32 arithmetic in the kernels


def supports(x: torch.Tensor, num_groups: int) -> bool:
    """Whether `group_norm` handles this input (otherwise use the torch reference)."""
    return (x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.dim() >= 2
            and x.shape[1] % num_groups == 0 and x.shape[1] // num_groups <= MAX_GROUP_CHANNELS
            and 0 < x.numel() < MAX_ELEMENTS)


def launch_meta(group_channels: int, spatial: int) -> dict:
    """Both kernels' tile sizes and warps for one group width and spatial extent."""
    block_c = triton.next_power_of_2(group_channels)
    # Tiles of up to 4K elements (16 per thread at 8 warps), no longer than the spatial extent.
    block_s = min(max(1, 4096 // block_c), triton.next_power_of_2(spatial))
    return dict(BLOCK_S=block_s, BLOCK_C=block_c, num_warps=8)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_chunks(groups_total: int, device: torch.device) -> int:
    """Chunks per group: enough programs for two per multiprocessor on CUDA; one elsewhere (the CPU
    interpreter runs programs one after another)."""
    if device.type != "cuda":
        return 1
    return triton.cdiv(2 * _multiprocessors(device), groups_total)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False, chunks: int | None = None) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps) (then SiLU if asked) for x (N, C, *spatial) in
    fp16/bf16/fp32, statistics in fp32. The output has x's dtype and memory format. chunks: how many
    programs share a group (default: `default_chunks`), at most one per tile and MAX_CHUNKS."""
    assert supports(x, num_groups), "unsupported group_norm input: check with supports() first"
    if chunks is not None and chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    n, c = x.shape[:2]
    if weight is None:
        weight = x.new_ones(c)
    if bias is None:
        bias = x.new_zeros(c)
    # Spatial dims flattened: a view for NCHW and channels-last alike (H and W stay mergeable in both);
    # empty_like keeps that layout for the output.
    x3 = x.reshape(n, c, -1)
    y3 = torch.empty_like(x3)
    group_channels, spatial = c // num_groups, x3.shape[2]
    meta = launch_meta(group_channels, spatial)
    tiles = triton.cdiv(spatial, meta["BLOCK_S"])
    chunks = min(chunks or default_chunks(n * num_groups, x.device), tiles, MAX_CHUNKS)
    chunk_len = triton.cdiv(tiles, chunks) * meta["BLOCK_S"]  # whole tiles: no tile straddles two chunks
    grid = (n * num_groups, triton.cdiv(spatial, chunk_len))
    partials = torch.empty(grid + (2,), dtype=torch.float32, device=x.device)
    _group_stats[grid](x3, partials, *x3.stride(), num_groups, group_channels, spatial, chunk_len, **meta)
    _group_norm_apply[grid](
        x3, y3, weight, bias, partials, *x3.stride(), *y3.stride(), num_groups, group_channels, spatial, chunk_len,
        eps, SILU=silu, BLOCK_CHUNKS=triton.next_power_of_2(grid[1]), **meta,
    )
    return y3.view(x.shape)
