"""Triton kernels (ldmrt.kernels) against the torch references in ldmrt.models.ops, and the dispatch point.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, which must be set before
anything imports Triton: in tests/conftest.py, or by this file when it runs alone); with CUDA they are compiled and run on the GPU. Outputs are compared in float64 with the
reference computed in float64 from the same (already rounded) inputs, by relative L2 error:

    fp32 1e-5   (measured ~3e-7 in the interpreter)
    fp16 2e-3   (measured ~2.7e-4: the output's own fp16 rounding)
    bf16 1e-2   (measured ~3.6e-3: the interpreter rounds fp32->bf16 by truncation, twice torch's error;
                 its bf16 tl.dot is wrong, so the attention kernel upcasts bf16 tiles to fp32 there and
                 only there: the native bf16 dot is checked on a GPU, by this file or benchmarks/gpu/)

Slow tests (long sequences, a whole UNet in the interpreter) run with LDMRT_SLOW=reduced (smaller) or
LDMRT_SLOW=1 (full size) and skip otherwise.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

# Triton picks its interpreter when it is imported: too late here if another test module's imports loaded it
# first (diffusers does), hence TRITON_INTERPRET=1 in tests/conftest.py on machines without CUDA.
INTERPRETER_TOO_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from ldmrt.kernels import attention as attention_kernel  # noqa: E402
from ldmrt.kernels import group_norm as group_norm_kernel  # noqa: E402
from ldmrt.models import ops  # noqa: E402
from helpers import rel_l2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and (INTERPRETER_TOO_LATE or not attention_kernel.INTERPRETED):
    pytest.skip("no CUDA, and Triton was imported before TRITON_INTERPRET=1 was set: set it before pytest "
                "starts (tests/conftest.py or the environment) to run the kernels in Triton's CPU interpreter",
                allow_module_level=True)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)
SLOW = os.environ.get("LDMRT_SLOW", "")


def slow_size(full, reduced):
    if not SLOW:
        pytest.skip("slow: set LDMRT_SLOW=reduced (or LDMRT_SLOW=1 for full size)")
    return reduced if SLOW == "reduced" else full


def randn(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def sdpa64(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)


# ---- attention ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
def test_cross_attention_ragged_lengths(head_dim, dtype):
    """130 queries over 77 keys: several query and key blocks, both with masked tails; head dims in two
    parts (40 = 32 + 16 with 8 masked, 80 = 64 + 16, 160 = 128 + 32) and in one (64)."""
    q = randn(1, 2, 130, head_dim, dtype=dtype, seed=1)
    k, v = randn(1, 2, 77, head_dim, dtype=dtype, seed=2), randn(1, 2, 77, head_dim, dtype=dtype, seed=3)
    out = attention_kernel.attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_l2(out, sdpa64(q, k, v)) < TOLERANCE[dtype]


@pytest.mark.parametrize("head_dim", [40, 80, 160])
def test_padded_heads(head_dim, monkeypatch):
    """Heads not split in two power-of-two parts (SPLIT_HEADS off): one part, padded to 64, 128 or 256."""
    monkeypatch.setattr(attention_kernel, "SPLIT_HEADS", False)
    assert attention_kernel.launch_meta(torch.float16, head_dim, False)["BLOCK_D2"] == 0
    q = randn(1, 2, 130, head_dim, dtype=torch.float16, seed=1)
    k, v = (randn(1, 2, 77, head_dim, dtype=torch.float16, seed=s) for s in (2, 3))
    assert rel_l2(attention_kernel.attention(q, k, v), sdpa64(q, k, v)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [40, 160])
def test_causal_self_attention(head_dim, dtype):
    """CLIP's causal mask over 150 tokens: query blocks past the first must stop at their diagonal."""
    q, k, v = (randn(1, 2, 150, head_dim, dtype=dtype, seed=s) for s in (4, 5, 6))
    assert rel_l2(attention_kernel.attention(q, k, v, causal=True), sdpa64(q, k, v, causal=True)) < TOLERANCE[dtype]


@pytest.mark.parametrize("lengths", [(1, 1), (3, 3), (5, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_tiny_lengths(lengths, causal):
    seq_q, seq_k = lengths
    q, k, v = randn(2, 3, seq_q, 24, seed=7), randn(2, 3, seq_k, 24, seed=8), randn(2, 3, seq_k, 24, seed=9)
    out = attention_kernel.attention(q, k, v, causal=causal)
    assert rel_l2(out, sdpa64(q, k, v, causal=causal)) < TOLERANCE[torch.float32]


def test_attention_strided_inputs():
    """q, k, v as the models hand them over: head-split views of one packed projection, not contiguous."""
    packed = randn(2, 70, 3, 2, 80, dtype=torch.float16, seed=10)  # (B, N, qkv, heads, d)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d), strides of `packed`
    assert not q.is_contiguous()
    out = attention_kernel.attention(q, k, v)
    assert out.is_contiguous()
    assert rel_l2(out, sdpa64(q, k, v)) < TOLERANCE[torch.float16]


@pytest.mark.slow
def test_attention_long_sequence():
    """SD's 64x64 self-attention length (4096 tokens, head dim 40); 1024 tokens when reduced."""
    tokens = slow_size(4096, 1024)
    q, k, v = (randn(1, 1, tokens, 40, dtype=torch.float16, seed=s) for s in (11, 12, 13))
    assert rel_l2(attention_kernel.attention(q, k, v), sdpa64(q, k, v)) < TOLERANCE[torch.float16]


# ---- group norm ----

GROUP_NORM_CASES = {  # name: (shape, groups)
    "sd_channels_per_group_10_odd_hw": ((2, 40, 7, 9), 4),
    "stats_span_tiles": ((1, 32, 17, 31), 2),  # 527 positions over tiles of 256
    "sequence_3d": ((1, 12, 33), 3),  # AttentionBlock normalises (B, C, T)
    "one_channel_per_group": ((1, 4, 5, 5), 4),
}


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GROUP_NORM_CASES)
def test_group_norm_matches_reference(case, dtype, channels_last, silu):
    shape, groups = GROUP_NORM_CASES[case]
    if channels_last and len(shape) != 4:
        pytest.skip("channels-last is a 4D layout")
    x = (randn(*shape, seed=20) * 3 + 5).to(dtype)  # mean away from 0, as activations are
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = randn(shape[1], seed=21), randn(shape[1], seed=22)
    out = group_norm_kernel.group_norm(x, groups, weight, bias, 1e-6, silu=silu)
    ref = F.group_norm(x.double(), groups, weight.double(), bias.double(), 1e-6)
    if silu:
        ref = F.silu(ref)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous(memory_format=layout)
    assert rel_l2(out, ref) < TOLERANCE[dtype]


class GridSpy:
    """Wraps a kernel to record the grids it is launched on."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_chunked(dtype, channels_last, monkeypatch):
    """Several programs per group (as on a GPU, where chunks fill the multiprocessors): 713 positions in
    tiles of 128 make 3 chunks of 256 (the last ragged), whose partial sums the apply kernel adds."""
    spy = GridSpy(group_norm_kernel._group_stats)
    monkeypatch.setattr(group_norm_kernel, "_group_stats", spy)
    x = (randn(2, 64, 23, 31, seed=24) * 3 + 5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = randn(64, seed=25), randn(64, seed=26)
    out = group_norm_kernel.group_norm(x, 2, weight, bias, 1e-6, silu=True, chunks=5)
    ref = F.silu(F.group_norm(x.double(), 2, weight.double(), bias.double(), 1e-6))
    assert spy.grids == [(2 * 2, 3)]
    assert rel_l2(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("chunks", [1, 4])
def test_group_norm_statistics_large_mean(chunks):
    """|mean| / std = 1e5 in fp32: naive E[x^2] - E[x]^2 in fp32 would lose every digit of the variance
    (and so would chunks that each shifted by their own first element before their sums are added)."""
    x = 1000 + 0.01 * randn(2, 8, 64, 64, seed=23)
    out = group_norm_kernel.group_norm(x, 2, None, None, 1e-12, chunks=chunks)
    ref = F.group_norm(x.double(), 2, eps=1e-12)
    assert rel_l2(out, ref) < TOLERANCE[torch.float32]


# ---- dispatch (ops) and the kernels inside real modules ----

def test_kernel_choice_validates(monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="LDMRT_KERNELS"):
        ops.attention(randn(1, 1, 2, 8), randn(1, 1, 2, 8), randn(1, 1, 2, 8))


@pytest.mark.parametrize("choice", ["torch", "auto", "triton"])
def test_dispatch(choice, monkeypatch):
    """torch: always the reference; auto: Triton only on CUDA; triton: Triton on any device it supports."""
    monkeypatch.setenv(ops.KERNELS_ENV, choice)
    calls = []
    for module, name in ((attention_kernel, "attention"), (group_norm_kernel, "group_norm")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, **kw: calls.append(_k) or _k(*a, **kw))
    q = randn(1, 2, 9, 16)
    norm = torch.nn.GroupNorm(4, 8).to(DEVICE)
    ops.attention(q, q, q, causal=True)
    ops.group_norm(randn(1, 8, 3, 3), norm, silu=True)
    uses_triton = choice == "triton" or (choice == "auto" and DEVICE == "cuda")
    assert len(calls) == (2 if uses_triton else 0)


def test_unsupported_inputs_fall_back_to_reference(monkeypatch):
    """float64 (the models' comparison precision), heads over 256 wide and groups over 2048 channels wide
    take torch even when forced."""
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    q = randn(1, 1, 5, 8).double()
    assert torch.equal(ops.attention(q, q, q), ops.attention_reference(q, q, q))
    wide = randn(1, 1, 3, 512)
    assert torch.equal(ops.attention(wide, wide, wide), ops.attention_reference(wide, wide, wide))
    x, norm = randn(1, 8, 3, 3).double(), torch.nn.GroupNorm(4, 8).to(DEVICE).double()
    assert torch.equal(ops.group_norm(x, norm), ops.group_norm_reference(x, norm))
    wide_groups = group_norm_kernel.MAX_GROUP_CHANNELS * 2
    x, norm = randn(1, wide_groups, 1, 1), torch.nn.GroupNorm(1, wide_groups).to(DEVICE)
    assert torch.equal(ops.group_norm(x, norm), ops.group_norm_reference(x, norm))


def test_inputs_past_int32_offsets_are_not_supported():
    """The kernels' offsets are int32: 2^31 elements and more take torch (checked on meta tensors)."""
    big = torch.empty(1, 8, 2**28, 1, dtype=torch.float16, device="meta")
    assert not attention_kernel.supports(big, big, big)
    assert not group_norm_kernel.supports(big, 8)
    fits = torch.empty(1, 8, 2**28 - 1, 1, dtype=torch.float16, device="meta")
    assert attention_kernel.supports(fits, fits, fits) and group_norm_kernel.supports(fits, 8)


def _run_both(module, *inputs, monkeypatch):
    with torch.no_grad():
        monkeypatch.setenv(ops.KERNELS_ENV, "torch")
        ref = module(*inputs)
        monkeypatch.setenv(ops.KERNELS_ENV, "triton")
        return module(*inputs), ref


def _randomise_norms(module):
    """Zero-initialised or unit norms would hide affine bugs."""
    gen = torch.Generator().manual_seed(30)
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen))


def test_spatial_transformer_with_kernels(monkeypatch):
    """SD's SpatialTransformer (GroupNorm, self- and cross-attention at head dim 40) with the kernels."""
    from ldmrt.models.attention import SpatialTransformer

    torch.manual_seed(0)
    block = SpatialTransformer(32, n_heads=2, d_head=40, context_dim=24).to(DEVICE).eval()
    _randomise_norms(block)
    for p in block.proj_out.parameters():  # zero-initialised as in CompVis: give it weights to check through
        p.data.normal_(0, 0.1)
    out, ref = _run_both(block, randn(1, 32, 5, 7, seed=31), randn(1, 6, 24, seed=32), monkeypatch=monkeypatch)
    assert rel_l2(out, ref) < TOLERANCE[torch.float32]


def test_clip_text_encoder_causal_with_kernels(monkeypatch):
    """CLIP's text encoder calls ops.attention(..., causal=True) over 77 tokens."""
    from ldmrt.models.conditioners import FrozenCLIPEmbedder

    torch.manual_seed(0)
    clip = FrozenCLIPEmbedder(vocab_size=100, hidden_size=80, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64).to(DEVICE).eval()
    ids = torch.randint(0, 100, (1, 77), generator=torch.Generator().manual_seed(33)).to(DEVICE)
    out, ref = _run_both(clip, ids, monkeypatch=monkeypatch)
    assert rel_l2(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.slow
def test_unet_with_kernels(monkeypatch):
    """A tiny SD-architecture UNet (every GroupNorm and attention through the kernels) against torch."""
    from ldmrt.models.unet import UNetModel

    size = slow_size(16, 8)
    torch.manual_seed(0)
    unet = UNetModel(image_size=size, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                     attention_resolutions=[1, 2], channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True,
                     context_dim=24, legacy=False).to(DEVICE).eval()
    _randomise_norms(unet)
    x, t, context = randn(1, 4, size, size, seed=34), torch.tensor([500.0], device=DEVICE), randn(1, 5, 24, seed=35)
    out, ref = _run_both(lambda *a: unet(a[0], a[1], context=a[2]), x, t, context, monkeypatch=monkeypatch)
    assert rel_l2(out, ref) < TOLERANCE[torch.float32]
