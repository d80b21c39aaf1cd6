"""AOTInductor backend: the `<graph>.pt2` packages of export/aoti.py, run with torch._inductor.aoti_load_package.

These are the very files a C++ host runs (csrc/engine.cpp), so Python and C++ compute the same numbers
given the same thread count: the packages are compiled with inductor's `cpp.dynamic_threads`, so their
kernels split work over the threads of the calling process (torch.set_num_threads / at::set_num_threads).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..manifest import graph_files
from .base import Backend, Exported

NAME = "aoti"
EXTRA = None
REQUIRES = ()
OPTIONS = ()


def export(model, out, *, summary, fp16, progress) -> Exported:
    from ..export.aoti import MAX_BATCH, MAX_LATENT, export_aoti
    from ..export.graphs import MAX_CONTEXT_WINDOWS
    graphs = export_aoti(model, out, fp16=fp16, progress=progress)
    # MAX_BATCH bounds the UNet's batch, which guidance doubles.
    return Exported("fp16" if fp16 else "fp32", graphs, "cpu", {
        "batch": [1, MAX_BATCH // 2], "size_multiple": summary["size_multiple"],
        "max_size": MAX_LATENT * summary["latent_factor"],
        **({"max_context_windows": MAX_CONTEXT_WINDOWS} if summary.get("long_prompts") else {})})


def load(folder, manifest, **_) -> "AotiBackend":
    return AotiBackend(manifest["graphs"], graph_files(folder, manifest))


class AotiBackend(Backend):
    def __init__(self, graphs: dict[str, dict], files: dict[str, Path], device: str = "cpu"):
        """graphs: the manifest's {graph: {"file", "inputs", "outputs"}} (export.aoti.export_aoti); files: their
        checked paths."""
        from torch._inductor import aoti_load_package

        super().__init__({name: (g["inputs"], g["outputs"]) for name, g in graphs.items()})
        self.device = torch.device(device)
        self._packages = {name: aoti_load_package(str(files[name])) for name in graphs}

    def _run(self, graph: str, inputs: list[torch.Tensor]):
        with torch.inference_mode():
            outputs = self._packages[graph](*[x.to(self.device).contiguous() for x in inputs])
        return outputs if isinstance(outputs, (tuple, list)) else (outputs,)
