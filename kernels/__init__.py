"""Triton kernels (installed as `ldmrt.kernels`), each beside its torch reference in `ldmrt.models.ops`.

    attention   flash-style attention forward (online softmax), self/cross/causal, head dims up to 256
    group_norm  GroupNorm (+ SiLU) forward, NCHW or channels-last, fp32 statistics
    resources   their launches compiled for a GPU architecture without a GPU: registers, spills, shared memory

The models never call these directly: `ldmrt.models.ops` dispatches to them (LDMRT_KERNELS=auto|triton|torch).
Importing a kernel module imports Triton, which picks its CPU interpreter (TRITON_INTERPRET=1) at that moment.
"""
