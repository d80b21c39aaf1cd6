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

from ldmrt.export.graphs import cast_graph, graph_modules


class TorchBackend:
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
        self._modules = graph_modules(model)
        self._graphed = {}
        if self.device.type == "cuda":
            from .cuda_graphs import CudaGraphRunner
            unet = self._modules["unet"]
            if hasattr(unet, "alphas_cumprod"):  # x0 models: no host-to-device copy inside the graph
                unet.alphas_cumprod = unet.alphas_cumprod.to(self.device)
            if cuda_graphs:
                self._graphed["unet"] = CudaGraphRunner(unet, self.device)

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self._modules)

    def run(self, graph: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if graph not in self._modules:
            raise KeyError(f"no graph {graph!r} in this model; it has {', '.join(self._modules)}")
        module = self._modules[graph]
        check_inputs(graph, module.input_names, inputs)
        # The graph modules cast floating inputs to their own dtype and return float32.
        with torch.inference_mode():
            if graph in self._graphed:  # copies the inputs into its static buffers itself
                outputs = self._graphed[graph](*[inputs[name] for name in module.input_names])
            else:
                outputs = module(*[inputs[name].to(self.device) for name in module.input_names])
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: out.to("cpu", torch.float32) for name, out in zip(module.output_names, outputs)}


def check_inputs(graph: str, expected, inputs: dict) -> None:
    """The same error from every backend when the inputs do not match the graph's."""
    if set(inputs) != set(expected):
        raise TypeError(f"graph {graph!r} takes inputs {', '.join(expected)}; got {', '.join(inputs) or 'none'}")
