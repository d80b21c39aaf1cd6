"""TensorRT access shared by the build (export/tensorrt.py) and the backend (ldmrt/backends/tensorrt.py).

`import tensorrt` happens only here, when an engine is built, refitted or loaded (import_tensorrt).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ldmrt.errors import EngineError

MIN_TENSORRT = (10, 0)  # execute_async_v3, int64 I/O tensors, USER_MANAGED context memory, OnnxParserRefitter
INSTALL = "pip install tensorrt (NVIDIA GPUs on Linux or Windows; the version must match the CUDA of the driver)"


def import_tensorrt(purpose: str = "TensorRT engines"):
    """The tensorrt module, or an EngineError saying why it cannot be used and how to fix that."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(f"{purpose} need the tensorrt package, which is not installed here ({e}): {INSTALL}; "
                          f"or use --backend onnxruntime") from None
    if _version_tuple(trt.__version__) < MIN_TENSORRT:
        raise EngineError(f"{purpose} need TensorRT >= {'.'.join(map(str, MIN_TENSORRT))}; this is "
                          f"{trt.__version__}: pip install --upgrade tensorrt")
    return trt


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


_LOGGER = None


def trt_logger(trt):
    """One logger for every builder, runtime and refitter (TensorRT warns when they differ)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def require_cuda(purpose: str) -> None:
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise EngineError(f"{purpose} run on NVIDIA GPUs and {why}: install a CUDA build of torch on a machine with "
                          f"an NVIDIA GPU, or use --backend onnxruntime")


def fingerprint(trt, device=None) -> dict:
    """What a TensorRT engine is tied to: the GPU model, its compute capability and the TensorRT version."""
    index = torch.device("cuda" if device is None else device).index
    index = torch.cuda.current_device() if index is None else index
    return {"type": "cuda", "name": torch.cuda.get_device_name(index),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(index))), "tensorrt": trt.__version__}


def refit(trt, engine, onnx_path: Path) -> None:
    """Replace the weights of a deserialized refittable `engine` by those of `onnx_path` (same graph)."""
    if not engine.refittable:
        raise EngineError("this TensorRT engine was built without refit support: rebuild it with --refit")
    logger = trt_logger(trt)
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not take the weights of {onnx_path}: {errors} (the ONNX graph must be the "
                          f"one the engine was built from, in the same precision, with other weights)")
    if not refitter.refit_cuda_engine():
        raise EngineError(f"TensorRT refit from {onnx_path} failed; weights still missing: "
                          f"{list(refitter.get_missing_weights())}")
