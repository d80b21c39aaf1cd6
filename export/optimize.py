"""Rewrite exported graphs onto onnxruntime's fused (com.microsoft) operators.

onnxruntime.transformers' optimizer matches the TorchScript exporter's patterns (attention ->
MultiHeadAttention, GroupNorm(+SiLU) -> GroupNorm, GEGLU's split + Gelu -> BiasSplitGelu, LayerNorm +
residual -> SkipLayerNormalization, ...). Fusion groups are measured one at a time on CPU by
benchmarks/onnx_fusions.py; `PROVIDER_FUSIONS` keeps, per provider, those measured faster on CPU and
those onnxruntime documents as CUDA kernels for Stable Diffusion (its SD optimisation guide runs all of
them on the CUDA provider: GroupNorm, BiasSplitGelu, BiasAdd, NhwcConv exist only as CUDA kernels).
A fused graph only runs on the provider it was fused for.

Not matched: onnxruntime's attention fusion (-> MultiHeadAttention) expects diffusers' attention graph;
the TorchScript exporter writes scaled_dot_product_attention as q*sqrt(s) @ (k*sqrt(s))^T, Softmax, @ v,
which it does not recognise. Getting MultiHeadAttention needs a pattern of our own (follow-up).
"""
from __future__ import annotations

import logging

import onnx

# group -> the FusionOptions switches it turns on (all others off)
FUSION_GROUPS = {
    "attention": ("enable_attention",),
    "packed_qkv": ("enable_attention", "enable_packed_qkv", "enable_packed_kv"),
    "group_norm": ("enable_group_norm",),
    "skip_group_norm": ("enable_group_norm", "enable_skip_group_norm"),
    "bias_split_gelu": ("enable_bias_splitgelu",),
    "layer_norm": ("enable_layer_norm", "enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
    "gelu": ("enable_gelu", "enable_bias_gelu"),
    "bias_add": ("enable_bias_add",),
    "nhwc_conv": ("enable_nhwc_conv",),
}
# Which graphs have the patterns: the text encoders are left alone (run once per image).
FUSED_GRAPHS = {"unet": "unet", "decoder": "vae", "encoder": "vae"}
PROVIDER_FUSIONS = {
    # Measured (benchmarks/onnx_fusions.py, reduced SD UNet width 64, latent 32, batch 2, 1 thread): Gelu
    # 1.00-1.04x the unfused latency (onnxruntime's session optimiser already fuses it on CPU); GroupNorm,
    # NhwcConv, BiasSplitGelu, BiasAdd have no CPU kernel; the attention and SkipLayerNorm patterns do not
    # match this exporter's graphs. Nothing pays on CPU.
    "cpu": (),
    # Unverified here (no GPU): the groups onnxruntime's Stable Diffusion optimisation runs on CUDA.
    "cuda": tuple(FUSION_GROUPS),
}


def fused_model(proto: onnx.ModelProto, groups, model_type: str = "unet") -> tuple[onnx.ModelProto, list[str]]:
    """`proto` rewritten with the fusion `groups`; also returns the fused operator types it now holds."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    for name, value in vars(options).items():
        if name.startswith("enable_") and name != "enable_shape_inference":
            setattr(options, name, False)
    for group in groups:
        for switch in FUSION_GROUPS[group]:
            setattr(options, switch, True)
    before = {n.op_type for n in proto.graph.node if n.domain == "com.microsoft"}
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    # opt_level=0: only the python fusions; onnxruntime's own graph optimisations run at session creation.
    optimized = optimize_model(proto, model_type=model_type, opt_level=0, optimization_options=options,
                               use_gpu=True)
    fused = sorted({n.op_type for n in optimized.model.graph.node if n.domain == "com.microsoft"} - before)
    return optimized.model, fused


def fuse(proto: onnx.ModelProto, graph: str, provider: str, fp16: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """The fusions kept for `provider` ("cpu" or "cuda") applied to graph `graph` (an fp16 one if `fp16`)."""
    if provider not in PROVIDER_FUSIONS:
        raise ValueError(f"fusions for {provider!r}: choose one of {', '.join(PROVIDER_FUSIONS)}")
    # onnxruntime's Stable Diffusion optimiser packs Q/K/V only in float16 graphs.
    groups = tuple(g for g in PROVIDER_FUSIONS[provider] if fp16 or g != "packed_qkv")
    if graph not in FUSED_GRAPHS or not groups:
        return proto, []
    return fused_model(proto, groups, FUSED_GRAPHS[graph])
