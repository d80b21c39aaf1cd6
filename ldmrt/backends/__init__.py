"""Backends run the graphs of the export/graphs.py contract ("cond_stage", "unet", "decoder", "encoder").

Every backend has `.graphs` (the names it holds) and `.run(graph, **inputs) -> {output name: float32 CPU
tensor}`; inputs are CPU torch tensors (float32 or int64), which the backend casts to its precision.
"""
from .torch import TorchBackend


def __getattr__(name):
    # onnxruntime is an optional dependency: imported only when its backend is asked for.
    if name == "OnnxRuntimeBackend":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TorchBackend", "OnnxRuntimeBackend"]
