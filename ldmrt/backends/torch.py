"""Eager PyTorch backend: the graph modules run as they are, on CPU or CUDA, in any dtype.

It is the reference the compiled backends are tested against, and the PyTorch path when no engine is
built.
"""
from __future__ import annotations

import torch

from ldmrt.export.graphs import cast_graph, graph_modules


class TorchBackend:
    def __init__(self, model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """model: a LatentDiffusion; it is moved to `device` and cast to `dtype` in place (VQ codebooks stay
        float32, as in the exported graphs: export.graphs.cast_graph)."""
        self.device = torch.device(device)
        self.dtype = dtype
        cast_graph(model.to(self.device), dtype).eval()
        self._modules = graph_modules(model)

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self._modules)

    def run(self, graph: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if graph not in self._modules:
            raise KeyError(f"no graph {graph!r} in this model; it has {', '.join(self._modules)}")
        module = self._modules[graph]
        check_inputs(graph, module.input_names, inputs)
        # The graph modules cast floating inputs to their own dtype and return float32.
        args = [inputs[name].to(self.device) for name in module.input_names]
        with torch.inference_mode():
            outputs = module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: out.to("cpu", torch.float32) for name, out in zip(module.output_names, outputs)}


def check_inputs(graph: str, expected, inputs: dict) -> None:
    """The same error from every backend when the inputs do not match the graph's."""
    if set(inputs) != set(expected):
        raise TypeError(f"graph {graph!r} takes inputs {', '.join(expected)}; got {', '.join(inputs) or 'none'}")
