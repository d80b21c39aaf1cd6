"""PyTorch backend: the graph modules run as they are, on CPU or CUDA, in any dtype.

On a CPU, in fp32 it is the reference the compiled backends are tested against (computing exactly what eager
PyTorch computes), and in bf16 a fast path: oneDNN on avx512_bf16 or AMX, with the convolution weights
channels-last, so that oneDNN takes and gives NHWC activations instead of reordering them on every call
(measured: benchmarks/README.md). On CUDA it is the fast PyTorch
path: channels-last, the Triton kernels (through ldmrt.models.ops, chosen automatically for CUDA
tensors), and the UNet step replayed from a CUDA graph captured once per shape (unverified on hardware:
no GPU was available to this project's tests).
"""
from __future__ import annotations

import torch

from ..export.graphs import cast_graph, graph_modules
from ..manifest import listed_file
from .base import Backend, Exported

NAME = "torch"
EXTRA = None
REQUIRES = ()
OPTIONS = ()
GRAPHS = ("model",)  # the whole model in one file: its graph modules are cut in memory (export/graphs.py)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(model, out, *, summary, fp16, progress) -> Exported:
    """The weights as model.safetensors and the config as config.yaml: the engine is the model itself."""
    import yaml

    from ..checkpoint import save_checkpoint
    from ..files import atomic_write
    save_checkpoint(model, out / "model.safetensors")
    atomic_write(out / "config.yaml", yaml.safe_dump({"model": model.ldmrt_config}, sort_keys=False))
    return Exported(reduced_precision() if fp16 else "fp32",
                    {"model": {"file": "model.safetensors", "config": "config.yaml"}}, "cpu")


def reduced_precision() -> str:
    """What --fp16 records: "bf16" (run as fp16 on CUDA; fp16 CPU kernels are slow or missing) where a GPU or
    the CPU's bf16 instructions run it, "fp32" on CPUs that would only emulate bf16."""
    from ..machine import cpu_reduced_precision
    return "bf16" if torch.cuda.is_available() else cpu_reduced_precision()


def load(folder, manifest, *, device=None, tokenizer=None, **_) -> "TorchBackend":
    """device: "cpu" or "cuda[:i]" (default: CUDA when available). tokenizer: the engine's, given to the model."""
    from ..checkpoint import load_model
    graph = manifest["graphs"]["model"]
    ldm = load_model(listed_file(folder, manifest, graph["config"]), listed_file(folder, manifest, graph["file"]),
                     tokenizer=tokenizer or False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[manifest["precision"]]
    if dtype != torch.float32 and device.startswith("cuda"):
        dtype = torch.float16  # "--fp16" engines: bf16 is the CPU's stand-in, GPUs run fp16
    elif dtype != torch.float32:
        from ..machine import cpu_reduced_precision
        if cpu_reduced_precision() == "fp32":  # built elsewhere; here bf16 would only be emulated
            dtype = torch.float32
    return TorchBackend(ldm, device=device, dtype=dtype)


class TorchBackend(Backend):
    def __init__(self, model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 cuda_graphs: bool = True, channels_last: bool | None = None):
        """model: a LatentDiffusion; it is moved to `device` and cast to `dtype` in place (VQ codebooks stay
        float32, as in the exported graphs: export.graphs.cast_graph). cuda_graphs: replay the UNet step
        from a CUDA graph per input shape (CUDA devices only). channels_last: conv weights in channels-last
        layout, in place; None: on CUDA, and on CPUs below fp32 (in fp32 it changes the convolution algorithms,
        ~1e-6 off eager NCHW, and this backend is the fp32 reference)."""
        self.device = torch.device(device)
        self.dtype = dtype
        if channels_last is None:
            channels_last = self.device.type == "cuda" or dtype in (torch.bfloat16, torch.float16)
        cast_graph(model.to(self.device), dtype).eval()
        if channels_last:
            model.to(memory_format=torch.channels_last)  # only 4-d tensors (the conv weights) change layout
        self.model = model
        self._base_weights: dict[str, torch.Tensor] = {}  # weights changed by set_weight_deltas, as loaded
        self._modules = graph_modules(model)
        super().__init__({name: (m.input_names, m.output_names) for name, m in self._modules.items()})
        self._graphed = {}
        if self.device.type == "cuda":
            from .cuda_graphs import CudaGraphRunner
            for name in ("unet", "unet_shallow"):  # the per-step graphs
                step = self._modules[name]
                if hasattr(step, "alphas_cumprod"):  # x0 models: no host-to-device copy inside the graph
                    step.alphas_cumprod = step.alphas_cumprod.to(self.device)
                if cuda_graphs:
                    self._graphed[name] = CudaGraphRunner(step, self.device)

    @property
    def precision(self) -> str:
        """What this backend computes in, here (a bf16 engine runs fp32 on a CPU without bf16, fp16 on CUDA)."""
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def _run(self, graph: str, inputs: list[torch.Tensor]):
        # The graph modules cast floating inputs to their own dtype and return float32.
        with torch.inference_mode():
            if graph in self._graphed:  # copies the inputs into its static buffers itself
                outputs = self._graphed[graph](*inputs)
            else:
                outputs = self._modules[graph](*[x.to(self.device) for x in inputs])
        return outputs if isinstance(outputs, tuple) else (outputs,)

    # --- weights changed in place (LoRA: ldmrt/lora.py) ----------------------------------------------------
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """{parameter name: shape} of what set_weight_deltas can change: every parameter."""
        return {name: tuple(p.shape) for name, p in self.model.named_parameters()}

    def set_weight_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Each parameter = its loaded value + deltas.get(name) (summed in float32, cast to its dtype), in place:
        the modules keep their tensors, so CUDA graphs captured on them stay valid. The loaded values of changed
        parameters are kept; one without a delta is copied back from them, bit for bit, and they are dropped."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in [*self._base_weights, *(n for n in deltas if n not in self._base_weights)]:
                param = params[name]
                if name not in self._base_weights:
                    self._base_weights[name] = param.detach().clone()
                base = self._base_weights[name]
                if name in deltas:
                    param.copy_(base.float() + deltas[name].to(param.device))
                else:
                    param.copy_(base)
                    del self._base_weights[name]
