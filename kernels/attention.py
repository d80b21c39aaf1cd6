"""Flash-style attention forward in Triton: softmax(q k^T / sqrt(d)) v without materialising the scores.

Each program owns BLOCK_M query rows of one (batch, head) and streams the keys/values in blocks of
BLOCK_N, keeping a running row maximum and row sum (online softmax), so memory traffic is one read of
q, k, v and one write of the output. Triton's tiles are powers of two: head dims that are not (SD's 40,
80, 160) are covered by two parts (32 + 16, 64 + 16, 128 + 32; `SPLIT_HEADS`) or one padded part, with
masked loads; sequence lengths are arbitrary (masked tails). The torch reference is
`ldmrt.models.ops.attention`.
"""
import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256  # one padded head must fit a program's registers/shared memory
MAX_ELEMENTS = 2**31  # offsets are int32 arithmetic in the kernel


@triton.jit
def _attention_fwd(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, seq_q, seq_k, head_dim, qk_scale_log2,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh

    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    # The head's dims [0, BLOCK_D) and, when BLOCK_D2 > 0, [BLOCK_D, BLOCK_D + BLOCK_D2): two power-of-two
    # parts cover 80 as 64 + 16 and 160 as 128 + 32, where one part would be padded to 128 and 256.
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(Q + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=(rows[:, None] < seq_q) & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if BLOCK_D2 > 0:
        dims2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        dim2_ok = dims2 < head_dim
        q2 = tl.load(Q + rows[:, None] * stride_qm + dims2[None, :] * stride_qd,
                     mask=(rows[:, None] < seq_q) & dim2_ok[None, :], other=0.0)
        if UPCAST:
            q2 = q2.to(tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)

    # Scores live in the log2 domain (scale folded with log2(e)) so the exponentials are exp2.
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Causal (top-left aligned, as torch's is_causal): keys past the block's last row never contribute.
    end_n = seq_k
    if CAUSAL:
        end_n = tl.minimum(seq_k, start_m + BLOCK_M)
    for start_n in range(0, end_n, BLOCK_N):
        keys = start_n + cols
        kv_mask = (keys[:, None] < seq_k) & dim_ok[None, :]
        k = tl.load(K + keys[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + keys[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            kv2_mask = (keys[:, None] < seq_k) & dim2_ok[None, :]
            k2 = tl.load(K + keys[:, None] * stride_kn + dims2[None, :] * stride_kd, mask=kv2_mask, other=0.0)
            v2 = tl.load(V + keys[:, None] * stride_vn + dims2[None, :] * stride_vd, mask=kv2_mask, other=0.0)
            if UPCAST:
                k2 = k2.to(tl.float32)
                v2 = v2.to(tl.float32)
            s += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)
        s *= qk_scale_log2
        valid = keys[None, :] < seq_k
        if CAUSAL:
            valid = valid & (keys[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
        # Every real row sees key 0 in the first block, so new_max is finite there (padding rows are
        # never stored).
        new_max = tl.maximum(row_max, tl.max(s, 1))
        p = tl.exp2(s - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            acc2 = acc2 * correction[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision=DOT_PRECISION)
        row_max = new_max

    Out += batch * stride_ob + head * stride_oh
    tl.store(Out + rows[:, None] * stride_om + dims[None, :] * stride_od,
             (acc / row_sum[:, None]).to(Out.dtype.element_ty), mask=(rows[:, None] < seq_q) & dim_ok[None, :])
    if BLOCK_D2 > 0:
        tl.store(Out + rows[:, None] * stride_om + dims2[None, :] * stride_od,
                 (acc2 / row_sum[:, None]).to(Out.dtype.element_ty), mask=(rows[:, None] < seq_q) & dim2_ok[None, :])


# Triton picks the CPU interpreter (TRITON_INTERPRET=1) when the kernel is decorated, so ask the kernel.
INTERPRETED = not isinstance(_attention_fwd, triton.JITFunction)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention` handles these inputs (otherwise use the torch reference)."""
    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.dtype == k.dtype == v.dtype
            and q.dim() == k.dim() == v.dim() == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1] <= MAX_HEAD_DIM
            and k.shape[:3] == v.shape[:3] and q.shape[:2] == k.shape[:2]
            and 0 < q.numel() < MAX_ELEMENTS and 0 < k.numel() < MAX_ELEMENTS)


# Tiles per padded head width: of the sizes tried, the largest that Triton 3.6 and 3.9 compile, for every
# head dim of that width (heads split as by default), for sm_80 and sm_90 without register spills and within
# 99 KB of shared memory on sm_80 (the per-block limit of sm_86/sm_89, which compile like it: the smallest
# from Ampere on). `python -m ldmrt.kernels.resources` reports that, tests/test_kernels_compile.py checks it. fp32 takes
# twice the registers per element, hence smaller tiles; bf16 shares fp16's (same sizes, same instructions).
# Their speed is not measured yet (no GPU so far): benchmarks/gpu/bench_gpu.py times the kernel against
# SDPA and other tiles.
TILES = {  # padded head width, split or not (16 and 32 take 64's): (BLOCK_M, BLOCK_N, num_warps, num_stages)
    "16-bit": {64: (128, 32, 8, 2), 128: (128, 64, 8, 2), 256: (64, 32, 4, 2)},
    "fp32": {64: (32, 32, 4, 2), 128: (32, 32, 8, 2), 256: (16, 16, 4, 2)},
}


# Heads whose width is not a power of two in two power-of-two parts (see the kernel) rather than one padded
# part: SD's 40, 80 and 160 become 32 + 16, 64 + 16 and 128 + 32, a quarter to three eighths less work in
# the dots than 64, 128 and 256. Which is faster is not measured yet (no GPU so far): bench_gpu.py's tile
# sweep times both.
SPLIT_HEADS = True


def head_blocks(head_dim: int, split: bool) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the power-of-two parts covering head_dim, two if `split` saves work (BLOCK_D2 = 0:
    one part). tl.dot takes no dimension under 16."""
    padded = max(16, triton.next_power_of_2(head_dim))
    if not split or padded == head_dim:
        return padded, 0
    first = max(16, padded // 2)
    second = max(16, triton.next_power_of_2(head_dim - first))
    return (first, second) if first + second < padded else (padded, 0)


def launch_meta(dtype: torch.dtype, head_dim: int, causal: bool) -> dict:
    """The kernel's compile-time parameters and launch options for one input dtype and head size."""
    block_d, block_d2 = head_blocks(head_dim, SPLIT_HEADS)
    # The CPU interpreter computes tl.dot on bf16 operands wrongly: there (only) bf16 tiles are upcast to
    # fp32 before the dots. On a GPU bf16 runs on the tensor cores like fp16.
    upcast = dtype == torch.bfloat16 and INTERPRETED
    width = max(64, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = TILES["fp32" if dtype == torch.float32 else "16-bit"][width]
    # fp32 dots in true fp32 (torch's default; TF32 would cost ~3 decimal digits); fp16/bf16: the default.
    precision = "ieee" if dtype == torch.float32 or upcast else None
    return dict(CAUSAL=causal, UPCAST=upcast, DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=block_d, BLOCK_D2=block_d2, num_warps=num_warps, num_stages=num_stages)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, Nq, d), k and v (B, H, Nk, d), any strides; causal masks key
    j > query i. fp16/bf16/fp32; the output is contiguous, in q's dtype."""
    assert supports(q, k, v), "unsupported attention inputs: check with supports() first"
    batch, heads, seq_q, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    meta = launch_meta(q.dtype, head_dim, causal)
    grid = (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)
    _attention_fwd[grid](
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, seq_q, k.shape[2], head_dim, head_dim ** -0.5 * 1.4426950408889634, **meta,
    )
    return out
