"""The runtimes compared: ldmrt's backends and the peers, each preparing one component at one shape.

A variant's `prepare(bench, component, inputs)` returns a callable that runs the component once on the
inputs and returns its output as a float32 tensor; it raises `Unavailable` when the variant cannot run here
(a peer not installed). Components and their inputs (float32 / int64 CPU tensors, see harness.make_inputs):

    text_encoder  ids (B, L) int64                      -> context (B, L, D)
    unet          x (B, 4, h, w), t (B,), context       -> eps (B, 4, h, w)      one guided step
    unet_cond     the same at batch B / 2                                         a step outside the guidance interval
    unet_shallow  x, t, context, deep (ldmrt's UNet's)   -> eps                   a cached step (feature caching)
    unet_shallow_cond  the same at batch B / 2
    decoder       latent (1, 4, h, w), scaled as sampled -> image (1, 3, H, W)

Cached steps run where a runtime has feature caching: ldmrt's unet_shallow graph, and diffusers through the
DeepCache package's helper (diffusers-bf16-deepcache; its own cached feature, from a full call on the same x).

Peers take the diffusers/transformers modules holding the same tensors as ldmrt's model (harness.Bench).
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

GRAPHS = {"text_encoder": "cond_stage", "unet": "unet", "unet_cond": "unet", "unet_shallow": "unet_shallow",
          "unet_shallow_cond": "unet_shallow", "decoder": "decoder"}
UNET_INPUTS = ("x", "t", "context")
GRAPH_INPUTS = {"text_encoder": ("cond",), "unet": UNET_INPUTS, "unet_cond": UNET_INPUTS,
                "unet_shallow": (*UNET_INPUTS, "deep"), "unet_shallow_cond": (*UNET_INPUTS, "deep"),
                "decoder": ("latent",)}
GRAPH_OUTPUTS = {c: "eps" for c in GRAPHS} | {"text_encoder": "context", "decoder": "image"}
SHALLOW = ("unet_shallow", "unet_shallow_cond")


class Unavailable(RuntimeError):
    """This variant cannot run on this machine (what is missing, and how to get it)."""


@dataclass(frozen=True)
class Variant:
    name: str
    runtime: str  # what runs, in words
    precision: str  # fp32 / bf16: what the matrix products compute in
    ldmrt: bool  # one of ldmrt's own paths (else a peer)
    prepare: Callable
    optional: bool = False  # only when asked for by name (slow to build)


# --- ldmrt ----------------------------------------------------------------------------------------
def _ldmrt_backend_call(backend, component, inputs, context=contextlib.nullcontext):
    graph = GRAPHS[component]
    taken = backend.input_names(graph)  # a shallow branch without cross-attention takes no context
    feeds = {n: x for n, x in zip(GRAPH_INPUTS[component], inputs) if n in taken}
    out = GRAPH_OUTPUTS[component]

    def call():
        with context():
            return backend.run(graph, **feeds)[out]
    return call


def _ldmrt_torch_backend(bench, dtype: torch.dtype, channels_last: bool | None = None):
    """(TorchBackend, its LatentDiffusion), made once per run and setting (channels_last None: the backend's
    default, channels-last below fp32)."""
    key = ("ldmrt-torch", dtype, channels_last)
    if key not in bench.cache:
        from ldmrt.backends.torch import TorchBackend
        # fp32 NCHW leaves the weights as they are: it shares ldmrt's model, whose tensors are the peers'.
        shared = dtype == torch.float32 and not channels_last
        model = bench.ldm if shared else bench.load_ldmrt()
        bench.cache[key] = TorchBackend(model, dtype=dtype, channels_last=channels_last), model
    return bench.cache[key]


def ldmrt_torch(dtype: torch.dtype, channels_last: bool | None = None, native_group_norm: bool = False):
    def prepare(bench, component, inputs):
        backend, _ = _ldmrt_torch_backend(bench, dtype, channels_last)
        return _ldmrt_backend_call(backend, component, inputs,
                                   _native_group_norm if native_group_norm else contextlib.nullcontext)
    return prepare


def ldmrt_torch_compile(dtype: torch.dtype):
    """ldmrt's graph module, cast and channels-last as the torch backend has it, through torch.compile with
    inductor freezing (weights folded in and prepacked for oneDNN). Compiles on the first call, per shape."""
    def prepare(bench, component, inputs):
        import torch._inductor.config as inductor_config

        from ldmrt.export.graphs import graph_modules
        _, model = _ldmrt_torch_backend(bench, dtype)
        inductor_config.freezing = True
        module = graph_modules(model)[GRAPHS[component]]
        compiled = torch.compile(module)
        feeds = [x for n, x in zip(GRAPH_INPUTS[component], inputs) if n in module.input_names]

        def call():
            with torch.no_grad():  # freezing needs no_grad, not inference_mode
                out = compiled(*feeds)
                return out[0] if isinstance(out, tuple) else out
        return call
    return prepare


@contextlib.contextmanager
def _native_group_norm():
    """ldmrt's GroupNorm without the bf16 -> fp32 -> bf16 round trip: torch's CPU kernel already keeps its
    statistics in fp32 (same result, measured). The change proposed for ldmrt.models.ops."""
    from ldmrt.models import ops

    def native(x, norm, silu=False):
        if x.dtype != torch.bfloat16 or x.is_cuda:
            return reference(x, norm, silu)
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.silu(y) if silu else y

    reference = ops.group_norm_reference
    ops.group_norm_reference = native
    try:
        yield
    finally:
        ops.group_norm_reference = reference


def _onnx_export(bench) -> Path:
    """ldmrt's fp32 ONNX export of every graph (plain: no onnxruntime fusions), once per run."""
    if "onnx_dir" not in bench.cache:
        from ldmrt.export.onnx import export_onnx
        folder = Path(tempfile.mkdtemp(prefix="onnx-", dir=bench.work_dir))
        bench.cache["onnx_graphs"] = export_onnx(bench.ldm, folder)
        bench.cache["onnx_dir"] = folder
    return bench.cache["onnx_dir"]


def ldmrt_openvino(precision: str):
    def prepare(bench, component, inputs):
        try:
            from ldmrt.backends.openvino import OpenVinoBackend
        except ImportError as e:
            raise Unavailable(f"openvino not installed ({e}): pip install openvino") from None
        graph = GRAPHS[component]
        path = _onnx_export(bench) / bench.cache["onnx_graphs"][graph]["file"]
        backend = OpenVinoBackend({graph: path}, precision=precision, threads=bench.threads)
        call = _ldmrt_backend_call(backend, component, inputs)
        call()  # compiles for these shapes: part of the set-up
        bench.facts[f"ldmrt-openvino-{precision} compiled precision"] = backend.compiled_precision
        return call
    return prepare


def ldmrt_onnxruntime(bench, component, inputs):
    try:
        from ldmrt.backends.onnxruntime import OnnxRuntimeBackend
    except ImportError as e:
        raise Unavailable(f"onnxruntime not installed ({e}): pip install 'ldmrt[onnx]'") from None
    graph = GRAPHS[component]
    path = _onnx_export(bench) / bench.cache["onnx_graphs"][graph]["file"]
    backend = OnnxRuntimeBackend({graph: path}, providers=["CPUExecutionProvider"], threads=bench.threads)
    return _ldmrt_backend_call(backend, component, inputs)


# --- peers: diffusers / transformers eager, torch.compile, OpenVINO -----------------------------------
class _PeerCall(torch.nn.Module):
    """A peer component as a module of plain tensors -> one tensor (what tracers and compilers take)."""

    def __init__(self, component: str, module: torch.nn.Module, scaling_factor: float):
        super().__init__()
        self.component, self.module, self.scaling_factor = component, module, scaling_factor

    def forward(self, *inputs):
        if self.component == "text_encoder":
            return self.module(inputs[0])[0]  # last_hidden_state
        if self.component in ("unet", "unet_cond"):
            x, t, context = inputs
            return self.module(x, t, encoder_hidden_states=context, return_dict=False)[0]
        return self.module.decode(inputs[0] / self.scaling_factor, return_dict=False)[0]


def _peer_module(bench, component: str, dtype: torch.dtype) -> _PeerCall:
    if component in SHALLOW:
        raise Unavailable("no feature caching in this runtime (diffusers has it through DeepCache: "
                          "diffusers-bf16-deepcache)")
    module = {"text_encoder": bench.peers.text_encoder, "unet": bench.peers.unet, "unet_cond": bench.peers.unet,
              "decoder": bench.peers.vae}[component]
    if dtype != torch.float32:
        module = copy.deepcopy(module).to(dtype)
    return _PeerCall(component, module, bench.peers.scaling_factor).eval()


def _cast(inputs, dtype):
    return [x.to(dtype) if x.is_floating_point() else x for x in inputs]


def diffusers_eager(dtype: torch.dtype):
    def prepare(bench, component, inputs):
        module = _peer_module(bench, component, dtype)
        feeds = _cast(inputs, dtype)

        def call():
            with torch.inference_mode():
                return module(*feeds).float()
        return call
    return prepare


def torch_compile(dtype: torch.dtype):
    """torch.compile (inductor) of the peer module with freezing: weights folded in and prepacked for oneDNN,
    the CPU recipe of PyTorch's own Stable Diffusion benchmarks. Compiles on the first call (the warm-up)."""
    def prepare(bench, component, inputs):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        module = _peer_module(bench, component, dtype)
        compiled = torch.compile(module)
        feeds = _cast(inputs, dtype)

        def call():
            with torch.no_grad():  # freezing needs no_grad, not inference_mode
                return compiled(*feeds).float()
        return call
    return prepare


def openvino(bench, component, inputs):
    """OpenVINO: the peer module converted by OpenVINO's PyTorch frontend with static input shapes, compiled
    for its CPU plugin with default settings (its default inference precision is bf16 where the CPU has
    avx512_bf16 or AMX; recorded as the run's `openvino_precision`)."""
    try:
        import openvino as ov
    except ImportError:
        raise Unavailable("openvino not installed: pip install openvino (a benchmark peer only)") from None
    module = _peer_module(bench, component, torch.float32)
    with torch.no_grad():
        model = ov.convert_model(module, example_input=tuple(inputs),
                                 input=[(tuple(x.shape), _ov_type(ov, x)) for x in inputs])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": bench.threads,
                                                      "PERFORMANCE_HINT": "LATENCY"})
    bench.facts["openvino_precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    request = compiled.create_infer_request()
    feeds = [x.numpy() for x in inputs]

    def call():
        return torch.from_numpy(request.infer(feeds)[0].copy()).float()
    return call


def diffusers_deepcache(dtype: torch.dtype):
    """diffusers eager with the DeepCache package's helper (DeepCacheSDHelper, branch 0 = ldmrt's
    DEEP_CACHE_KEEP 1: the UNet's input conv and last output block). Full steps are diffusers' own; a cached
    step follows one full call on the same inputs, as the helper runs it in a pipeline."""
    def prepare(bench, component, inputs):
        if component not in SHALLOW:
            return diffusers_eager(dtype)(bench, component, inputs)
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError as e:
            raise Unavailable(f"DeepCache not installed ({e}): pip install DeepCache") from None
        from types import SimpleNamespace
        module = _peer_module(bench, "unet", dtype)
        (x, context), t = _cast([inputs[0], inputs[2]], dtype), inputs[1]
        # The helper tells steps apart by their timestep (float32 here: bf16 would merge nearby ones); the full
        # call one timestep before the cached one, as in a sampling loop, so that the outputs stay comparable.
        full_t, cached_t = t + 1, t
        pipe = SimpleNamespace(unet=module.module, scheduler=SimpleNamespace(timesteps=[float(full_t[0]), float(t[0])]))
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=1000, cache_branch_id=0)  # every call after the first is a cached one
        helper.enable()
        with torch.inference_mode():
            pipe.unet(x, full_t[0], encoder_hidden_states=context)  # the full step that fills the cache

        def call():
            with torch.inference_mode():
                return pipe.unet(x, cached_t[0], encoder_hidden_states=context, return_dict=False)[0].float()
        return call
    return prepare


def _ov_type(ov, x: torch.Tensor):
    return ov.Type.i64 if x.dtype == torch.int64 else ov.Type.f32


VARIANTS = {v.name: v for v in (
    Variant("ldmrt-torch-fp32", "ldmrt torch backend (eager; fp32: NCHW, the reference)", "fp32", True,
            ldmrt_torch(torch.float32)),
    Variant("ldmrt-torch-fp32-cl", "ldmrt torch backend, fp32 with channels-last weights", "fp32", True,
            ldmrt_torch(torch.float32, channels_last=True), optional=True),
    Variant("ldmrt-torch-bf16", "ldmrt torch backend (eager; bf16: channels-last)", "bf16", True,
            ldmrt_torch(torch.bfloat16)),
    Variant("ldmrt-torch-bf16-gn", "ldmrt torch backend + native bf16 GroupNorm (proposed ops change)", "bf16",
            True, ldmrt_torch(torch.bfloat16, native_group_norm=True)),
    Variant("ldmrt-torch-bf16-nchw", "ldmrt torch backend, NCHW weights (ablation)", "bf16", True,
            ldmrt_torch(torch.bfloat16, channels_last=False), optional=True),
    Variant("ldmrt-torch-bf16-compile", "ldmrt graph modules through torch.compile (inductor + freezing)",
            "bf16", True, ldmrt_torch_compile(torch.bfloat16), optional=True),
    Variant("ldmrt-onnxruntime-fp32", "ldmrt ONNX Runtime backend (CPU EP, no fusions)", "fp32", True,
            ldmrt_onnxruntime),
    Variant("ldmrt-openvino-bf16", "ldmrt OpenVINO backend (its ONNX export, static shapes)", "bf16", True,
            ldmrt_openvino("bf16")),
    Variant("ldmrt-openvino-fp32", "ldmrt OpenVINO backend (its ONNX export, static shapes)", "fp32", True,
            ldmrt_openvino("fp32"), optional=True),
    Variant("diffusers-fp32", "diffusers/transformers eager", "fp32", False, diffusers_eager(torch.float32)),
    Variant("diffusers-bf16", "diffusers/transformers eager", "bf16", False, diffusers_eager(torch.bfloat16)),
    Variant("torch-compile-bf16", "torch.compile(diffusers) inductor + freezing", "bf16", False,
            torch_compile(torch.bfloat16), optional=True),
    Variant("openvino", "OpenVINO CPU plugin, static shapes, default precision", "bf16", False, openvino),
    Variant("diffusers-bf16-deepcache", "diffusers/transformers eager + DeepCache's helper", "bf16", False,
            diffusers_deepcache(torch.bfloat16)),

)}
