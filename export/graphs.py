"""The graphs a LatentDiffusion model is cut into for compiled backends (ONNX, TensorRT) and eager runs.

Contract (the same for every backend; the sampler loop calls "unet" once per step):

    cond_stage  cond -> context[, layer_contexts]
                cond: int64 token ids (B, L) (BERT / CLIP / layout tokens), int64 class labels (B,),
                or float maps (B, C, H, W) (semantic synthesis); context is what the UNet takes. For CLIP the
                UNet's context is k windows of it concatenated (long prompts): its axis 1 is `context_length`.
                layer_contexts (CLIP only): (B, layers, L, D), each layer's output through the final layer norm
                (CLIP skip n takes [:, -n]; [:, -1] is context).
    cond_stage_embeds  token_embeds (B, L, D) -> context, layer_contexts (CLIP only): the same after the token
                lookup, done by the host (textual inversion: some rows come from embedding files).
    unet        x (B, C, h, w), t (B,) float32 timesteps, [context (B, L, D)], [concat (B, Cc, h, w)] -> eps, deep
                x0-parameterised models are turned into eps inside the graph; deep (B, Cd, h, w) is the feature
                unet_shallow takes (DeepCache).
    unet_shallow  the same inputs and deep -> eps: the UNet's outermost skip branches only, on the deep feature
                of an earlier step (feature caching; the sampler plan says which steps).
    decoder     latent (B, C, h, w), scaled as sampled -> image (B, 3, H, W) in about [-1, 1]
                (1/scale_factor and the VQ quantisation inside, as LatentDiffusion.decode_first_stage).
    encoder     image (B, 3, H, W) in [-1, 1] -> mean, std of the latent, both times scale_factor
                (std is 0 for VQ first stages: their latent is the pre-quantisation h).

Inputs and outputs of every graph are float32 (or int64) whatever the precision the graph computes in:
each module casts at its boundary, so hosts bind the same buffers for fp32 and fp16 engines.

Which graphs a family needs (`graphs_for`):
- unconditional (`cond_stage_config: __is_unconditional__`): no cond_stage, unet takes x, t.
- cross-attention (text, layout, class labels): cond_stage, unet takes `context`.
- concat: unet takes `concat`, the conditioning at latent resolution (Cc = unet in_channels - C):
  - bsr_sr: the cond stage is torch.nn.Identity: `concat` is the low-resolution image itself, no graph.
  - semantic synthesis: cond_stage (SpatialRescaler) maps the one-hot segmentation to `concat`.
  - inpainting_big (`__is_first_stage__`): no cond_stage graph; the encoder covers it. CompVis
    conditions on the *unscaled* pre-quantisation h of the masked image plus the mask resized to the
    latent (nearest), so the host builds
        concat = cat([encoder(masked_image).mean / scale_factor, interpolate(mask, size=(h, w))], dim=1)
    (scale_factor is 1.0 for the published model, but the division keeps the contract exact).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ldmrt.models import unet as unet_module
from ldmrt.models.autoencoder import DiagonalGaussianDistribution, VectorQuantizer, VQModelInterface
from ldmrt.models.conditioners import long_prompt_window
from ldmrt.models.ldm import eps_from_x0


# DeepCache's branch: the shallow graph runs the first DEEP_CACHE_KEEP input blocks and the last DEEP_CACHE_KEEP
# output blocks (chosen by measurement: README "Feature caching"). At most num_res_blocks + 1, so that the deep
# feature is at the latent's resolution.
DEEP_CACHE_KEEP = 1
# Text-encoder windows a long prompt may span in backends that compile a shape range (AOTInductor, TensorRT):
# 3 x 75 tokens. ONNX Runtime, OpenVINO and torch engines take any number.
MAX_CONTEXT_WINDOWS = 3
# The text-encoder graphs: exported in fp32 whatever the engine's precision (export/onnx.py says why).
COND_STAGE_GRAPHS = ("cond_stage", "cond_stage_embeds")


class Graph(NamedTuple):
    module: nn.Module
    example_inputs: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]  # torch.onnx (TorchScript) form: {name: {axis: dim name}}


def cast_graph(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """module.to(dtype) in place, except VQ codebooks, which stay float32: rounded to fp16 they move
    near-tie codes (measured: two flipped codes put a reduced semantic-synthesis decoder at rel L2 0.16)."""
    if isinstance(module, VectorQuantizer):
        return module
    for param in module.parameters(recurse=False):
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    for name, buffer in module.named_buffers(recurse=False):
        if buffer.is_floating_point():
            setattr(module, name, buffer.to(dtype))
    for child in module.children():
        cast_graph(child, dtype)
    return module


def _compute_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class CondStageGraph(nn.Module):
    """cond -> context, as LatentDiffusion.get_learned_conditioning on tensors."""

    input_names = ("cond",)

    def __init__(self, model):
        super().__init__()
        self.cond_stage_model = model.cond_stage_model
        self.cond_stage_forward = model.cond_stage_forward
        # CLIP also gives every layer's final-layer-normed output, so that CLIP skip is a choice per request, not per
        # engine: one graph, no control flow in it, ~2.8 MB more output per SD prompt window (12 x 77 x 768 fp32).
        self.layers = hasattr(self.cond_stage_model, "encode_layers")
        self.output_names = ("context", "layer_contexts") if self.layers else ("context",)

    def forward(self, cond: torch.Tensor):
        if self.layers:
            context, layer_contexts = self.cond_stage_model.encode_layers(cond)
            return context.float(), layer_contexts.float()
        if cond.is_floating_point():
            cond = cond.to(_compute_dtype(self.cond_stage_model))
        if self.cond_stage_forward is not None:
            c = getattr(self.cond_stage_model, self.cond_stage_forward)(cond)
        else:
            encode = getattr(self.cond_stage_model, "encode", None)
            c = encode(cond) if callable(encode) else self.cond_stage_model(cond)
        return c.float()


class CondStageEmbedsGraph(nn.Module):
    """token_embeds (B, L, D) -> context, layer_contexts: the CLIP cond stage after its token lookup, which the host
    does for prompts with textual-inversion embeddings (their rows come from the embedding file, the others from
    the engine's token table). Prompts without any run "cond_stage" on their ids."""

    input_names, output_names = ("token_embeds",), ("context", "layer_contexts")

    def __init__(self, model):
        super().__init__()
        self.cond_stage_model = model.cond_stage_model

    def forward(self, token_embeds: torch.Tensor):
        token_embeds = token_embeds.to(_compute_dtype(self.cond_stage_model))
        context, layer_contexts = self.cond_stage_model.encode_layers(token_embeds=token_embeds)
        return context.float(), layer_contexts.float()


class UNetGraph(nn.Module):
    """(x, t, [context], [concat]) -> eps, deep: LatentDiffusion.apply_model then predict_eps, and the deep
    feature that "unet_shallow" takes on the steps between (DeepCache; DEEP_CACHE_KEEP)."""

    output_names = ("eps", "deep")

    def __init__(self, model):
        super().__init__()
        self.model = model.model  # DiffusionWrapper: keeps the conditioning routing of LatentDiffusion
        self.conditioning_key = model.conditioning_key
        if self.conditioning_key == "adm":
            raise NotImplementedError("conditioning_key 'adm' (class label into the UNet) is not in the graph "
                                      "contract: no zoo model uses it")
        self.conditioning_inputs = {None: (), "crossattn": ("context",), "concat": ("concat",),
                                     "hybrid": ("context", "concat")}[self.conditioning_key]
        self.input_names = ("x", "t", *self.conditioning_inputs)
        self.parameterization = model.parameterization
        if self.parameterization == "x0":
            # float64 as LatentDiffusion.predict_eps (sqrt(1 - a) is small near t = 0). A plain attribute, not
            # a buffer, so that casting the graph to fp16 leaves it alone; exporters see it as a constant.
            self.alphas_cumprod = torch.tensor(model.schedule_alphas_cumprod)

    def forward(self, x, t, *conditioning):
        """conditioning: (context,) for cross-attention, (concat,) for concat, (context, concat) for hybrid."""
        out, deep = self._apply(x, t, dict(zip(self.conditioning_inputs, conditioning)), keep=DEEP_CACHE_KEEP)
        return out, deep.float()

    def _apply(self, x, t, named: dict, **cache):
        dtype = _compute_dtype(self.model)
        c_concat = [named["concat"].to(dtype)] if "concat" in named else None
        c_crossattn = [named["context"].to(dtype)] if "context" in named else None
        if "deep" in cache:
            cache["deep"] = cache["deep"].to(dtype)
        result = self.model(x.to(dtype), t, c_concat=c_concat, c_crossattn=c_crossattn, **cache)
        out, deep = result if isinstance(result, tuple) else (result, None)
        if self.parameterization == "x0":
            out = eps_from_x0(self.alphas_cumprod, x.float(), t, out)
        return out.float(), deep


class UNetShallowGraph(UNetGraph):
    """(x, t, [context], [concat], deep) -> eps: the UNet's outermost DEEP_CACHE_KEEP skip branches on the deep
    feature of the last "unet" call (DeepCache, Ma et al. CVPR 2024: between full steps the deep features change
    little). Shares the weights of "unet"."""

    output_names = ("eps",)

    def __init__(self, model):
        super().__init__(model)
        unet = self.model.diffusion_model
        blocks = [*unet.input_blocks[:DEEP_CACHE_KEEP], *unet.output_blocks[len(unet.output_blocks) - DEEP_CACHE_KEEP:]]
        # Exporters drop inputs a graph does not use: a branch without cross-attention does not take the context.
        self.uses_context = any(isinstance(m, unet_module.SpatialTransformer) for b in blocks for m in b.modules())
        self.input_names = (*(n for n in self.input_names if n != "context" or self.uses_context), "deep")

    def forward(self, x, t, *conditioning_and_deep):
        *conditioning, deep = conditioning_and_deep
        named = dict(zip(self.input_names[2:-1], conditioning))
        return self._apply(x, t, named, deep=deep, keep=DEEP_CACHE_KEEP)[0]


class DecoderGraph(nn.Module):
    """Scaled latent -> image, as LatentDiffusion.decode_first_stage."""

    input_names, output_names = ("latent",), ("image",)

    def __init__(self, model):
        super().__init__()
        self.first_stage_model = model.first_stage_model
        self.scale_factor = float(model.scale_factor)

    def forward(self, latent):
        first_stage = self.first_stage_model
        z = latent / self.scale_factor
        if isinstance(first_stage, VQModelInterface):
            # Nearest-code search on the float32 latent: rounding it to fp16 first flips near ties.
            z = first_stage.quantize(z.float())[0]
            return first_stage.decode(z.to(_compute_dtype(first_stage)), force_not_quantize=True).float()
        return first_stage.decode(z.to(_compute_dtype(first_stage))).float()


class EncoderGraph(nn.Module):
    """Image -> (mean, std) of the scaled latent: LatentDiffusion.encode_first_stage times scale_factor."""

    input_names, output_names = ("image",), ("mean", "std")

    def __init__(self, model):
        super().__init__()
        self.first_stage_model = model.first_stage_model
        self.scale_factor = float(model.scale_factor)

    def forward(self, image):
        enc = self.first_stage_model.encode(image.to(_compute_dtype(self.first_stage_model)))
        if isinstance(enc, DiagonalGaussianDistribution):
            mean, std = enc.mean, enc.std
        else:  # VQModelInterface: the pre-quantisation h is the latent itself
            mean, std = enc, torch.zeros_like(enc)
        return (mean * self.scale_factor).float(), (std * self.scale_factor).float()


def latent_shape(model) -> tuple[int, int]:
    """(channels, downsampling factor) of the model's latent space."""
    first = model.first_stage_model
    if hasattr(first, "decoder"):
        return first.post_quant_conv.in_channels, 2 ** (first.decoder.num_resolutions - 1)
    return model.model.diffusion_model.out[2].out_channels, 1  # IdentityFirstStage: pixel space


def graph_modules(model) -> dict[str, nn.Module]:
    """The graph modules `model` (a LatentDiffusion) needs, in eval mode, sharing its weights."""
    cond_stage = model.cond_stage_model
    modules = {}
    # bsr_sr's Identity passes the image through; inpainting's first stage is covered by "encoder".
    if cond_stage is not None and cond_stage is not model.first_stage_model and not isinstance(cond_stage, nn.Identity):
        modules["cond_stage"] = CondStageGraph(model)
        if hasattr(cond_stage, "encode_layers"):  # CLIP: textual inversion feeds token embeddings
            modules["cond_stage_embeds"] = CondStageEmbedsGraph(model)
    modules.update(unet=UNetGraph(model), unet_shallow=UNetShallowGraph(model), decoder=DecoderGraph(model),
                   encoder=EncoderGraph(model))
    return {name: m.eval() for name, m in modules.items()}


def unet_downsampling(model) -> int:
    """The UNet's total downsampling factor: latent heights and widths must be multiples of it."""
    blocks = model.model.diffusion_model.input_blocks
    return 2 ** sum(any(isinstance(m, unet_module.Downsample) for m in block.modules()) for block in blocks)


def graphs_for(model, *, batch: int = 2, latent_size: int | None = None) -> dict[str, Graph]:
    """graph_modules(model) with example inputs of `batch` x `latent_size`^2 latents, names and dynamic axes.

    The default latent_size, twice the UNet's downsampling, keeps every axis above 1 down to the UNet's
    lowest resolution, so that exporters tracing symbolically (torch.export) cannot mistake a dynamic axis
    for a constant one. (The TorchScript exporter export_onnx uses traces values, and takes any multiple.)
    """
    if batch < 2:
        raise ValueError("the example batch must be >= 2 (size-1 axes get specialised by exporters)")
    latent_size = latent_size or 2 * unet_downsampling(model)
    if latent_size % unet_downsampling(model):
        raise ValueError(f"latent_size {latent_size} is not a multiple of the UNet's downsampling "
                         f"{unet_downsampling(model)}")
    modules = graph_modules(model)
    channels, factor = latent_shape(model)
    param = next(model.parameters())
    batch_axis = {0: "batch"}
    spatial = {0: "batch", 2: "height", 3: "width"}
    image_spatial = {0: "batch", 2: "image_height", 3: "image_width"}
    x = torch.randn(batch, channels, latent_size, latent_size, device=param.device)
    image = torch.rand(batch, 3, latent_size * factor, latent_size * factor, device=param.device) * 2 - 1
    graphs = {}
    examples = {"x": x, "t": torch.linspace(1, 999, batch, device=param.device)}
    if "cond_stage" in modules:
        cond, cond_axes = _example_cond(model.cond_stage_model, batch, latent_size * factor)
        cond = cond.to(param.device)
        with torch.no_grad():
            out = modules["cond_stage"](cond)
        context = out[0] if isinstance(out, tuple) else out
        context_axes = spatial if context.dim() == 4 else batch_axis
        outputs = list(modules["cond_stage"].output_names)
        axes = {"cond": cond_axes, "context": context_axes, "layer_contexts": batch_axis}
        graphs["cond_stage"] = Graph(modules["cond_stage"], (cond,), ["cond"], outputs,
                                     {n: axes[n] for n in ("cond", *outputs)})
        examples["context"] = context  # cross-attention models
        if "cond_stage_embeds" in modules:
            embeds = model.cond_stage_model.token_embedding.weight[cond].detach()
            graphs["cond_stage_embeds"] = Graph(modules["cond_stage_embeds"], (embeds,), ["token_embeds"],
                                                ["context", "layer_contexts"],
                                                {"token_embeds": batch_axis, "context": batch_axis,
                                                 "layer_contexts": batch_axis})
    unet = modules["unet"]
    unet_axes = {"x": spatial, "t": batch_axis, "eps": spatial, "context": batch_axis, "concat": spatial}
    if "cond_stage" in modules and long_prompt_window(model.cond_stage_model):
        # Long prompts: the context is k windows of the text encoder (ldmrt/prompts.py). Traced with two, so that
        # exporters tracing symbolically do not specialise the axis to one window.
        unet_axes["context"] = {0: "batch", 1: "context_length"}
        examples["context"] = torch.cat([examples["context"]] * 2, dim=1)
    if "concat" in unet.input_names:  # at latent resolution, whatever produces it
        concat_channels = model.model.diffusion_model.input_blocks[0][0].in_channels - channels
        examples["concat"] = torch.randn(batch, concat_channels, latent_size, latent_size, device=param.device)
    if "context" in unet.input_names and "context" not in examples:
        raise NotImplementedError("cross-attention without a cond stage graph is not in the graph contract")
    unet_axes["deep"] = spatial  # at full latent resolution: DEEP_CACHE_KEEP <= num_res_blocks + 1
    graphs["unet"] = Graph(unet, tuple(examples[n] for n in unet.input_names), list(unet.input_names),
                           ["eps", "deep"], {n: unet_axes[n] for n in (*unet.input_names, "eps", "deep")})
    with torch.no_grad():
        examples["deep"] = unet(*(examples[n] for n in unet.input_names))[1]
    shallow = modules["unet_shallow"]
    graphs["unet_shallow"] = Graph(shallow, tuple(examples[n] for n in shallow.input_names),
                                   list(shallow.input_names), ["eps"],
                                   {n: unet_axes[n] for n in (*shallow.input_names, "eps")})
    graphs["decoder"] = Graph(modules["decoder"], (x,), ["latent"], ["image"],
                              {"latent": spatial, "image": image_spatial})
    graphs["encoder"] = Graph(modules["encoder"], (image,), ["image"], ["mean", "std"],
                              {"image": image_spatial, "mean": spatial, "std": spatial})
    return graphs


def _example_cond(cond_stage: nn.Module, batch: int, image_size: int) -> tuple[torch.Tensor, dict]:
    """An example input of the cond stage and its dynamic axes."""
    embeddings = [m for m in cond_stage.modules() if isinstance(m, nn.Embedding)]
    if hasattr(cond_stage, "n_stages"):  # SpatialRescaler: maps at image resolution -> `concat`
        channels = cond_stage.channel_mapper.in_channels if cond_stage.remap_output else 3
        return torch.rand(batch, channels, image_size, image_size), {0: "batch", 2: "map_height", 3: "map_width"}
    if hasattr(cond_stage, "key"):  # ClassEmbedder: labels (B,) -> (B, 1, D)
        return torch.arange(batch) % embeddings[0].num_embeddings, {0: "batch"}
    # token ids (B, L): L is the fixed length the tokenizers pad to
    length = next(getattr(m, "max_length", None) or m.max_seq_len for m in cond_stage.modules()
                  if hasattr(m, "max_length") or hasattr(m, "max_seq_len"))
    return torch.randint(0, embeddings[0].num_embeddings, (batch, length)), {0: "batch"}
