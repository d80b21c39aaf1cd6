"""AOTInductor backend: the `<graph>.pt2` packages of export/aoti.py, run with torch._inductor.aoti_load_package.

These are the very files a C++ host runs (csrc/engine.cpp), so Python and C++ compute the same numbers
given the same thread count: the packages are compiled with inductor's `cpp.dynamic_threads`, so their
kernels split work over the threads of the calling process (torch.set_num_threads / at::set_num_threads).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .torch import check_inputs


class AotiBackend:
    def __init__(self, graphs: dict[str, dict], folder: str | Path, device: str = "cpu"):
        """graphs: the manifest's {graph: {"file", "inputs", "outputs"}} (export.aoti.export_aoti)."""
        from torch._inductor import aoti_load_package

        folder = Path(folder)
        self.device = torch.device(device)
        self._specs = graphs
        self._packages = {name: aoti_load_package(str(folder / g["file"])) for name, g in graphs.items()}

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self._packages)

    def run(self, graph: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if graph not in self._packages:
            raise KeyError(f"no graph {graph!r} in this engine; it has {', '.join(self._packages)}")
        spec = self._specs[graph]
        check_inputs(graph, spec["inputs"], inputs)
        args = [inputs[name].to(self.device).contiguous() for name in spec["inputs"]]
        with torch.inference_mode():
            outputs = self._packages[graph](*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {name: out.to("cpu", torch.float32) for name, out in zip(spec["outputs"], outputs)}
