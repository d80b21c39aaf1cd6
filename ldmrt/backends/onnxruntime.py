"""ONNX Runtime backend: one InferenceSession per exported graph (export/onnx.py).

Provider choice: TensorRT EP > CUDA EP > CPU, among those this onnxruntime build has, unless given. A
provider that is built in but cannot start (no driver, no TensorRT libraries) is dropped and the session
retried with the next ones; `.providers[graph]` tells what each session really runs on.

Only the CPU path is tested here. The CUDA / TensorRT path (provider options, I/O binding) is written
against onnxruntime's documented Python API and is unverified.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import EngineError
from ..manifest import graph_files
from .base import Backend, Exported

NAME = "onnxruntime"
EXTRA = "onnx"
REQUIRES = ("onnx", "onnxruntime")
OPTIONS = ("onnx_fusions",)
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                       "all": "ORT_ENABLE_ALL"}  # onnxruntime's GraphOptimizationLevel members
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def export(model, out, *, summary, fp16, progress, onnx_fusions=None) -> Exported:
    """onnx_fusions: None, or "cuda" to fuse onto ONNX Runtime's CUDA contrib operators (such an engine needs the
    CUDA execution provider; on CPUs no fusion measured faster, see export/optimize.py)."""
    from ..export.onnx import export_onnx
    return Exported("fp16" if fp16 else "fp32", export_onnx(model, out, fp16=fp16, fusions=onnx_fusions), "cpu")


def load(folder, manifest, *, providers=None, threads=None, **_) -> "OnnxRuntimeBackend":
    """providers: ONNX Runtime execution providers (default: the best available). threads: intra-op threads."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise EngineError(f"{folder} is an onnxruntime engine and onnxruntime is not installed ({e}): "
                          f"pip install 'ldmrt[{EXTRA}]'") from None
    return OnnxRuntimeBackend(graph_files(folder, manifest), providers=providers, threads=threads)


def best_providers() -> list[str]:
    """The preferred providers this onnxruntime build has, best first."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in PREFERRED_PROVIDERS if p in available]


class OnnxRuntimeBackend(Backend):
    def __init__(self, graph_files: dict, providers: list | None = None, threads: int | None = None, *,
                 optimization_level: str = "all", cpu_arena: bool = True, device_id: int = 0):
        """graph_files: {graph name: path of its .onnx}. providers: onnxruntime provider names (or
        (name, options) pairs), best first; default best_providers(). threads: intra-op threads of the CPU
        provider (None: onnxruntime's default, one per physical core). optimization_level: disable, basic,
        extended or all (onnxruntime's graph optimisations at session creation). cpu_arena: onnxruntime's
        CPU memory arena (faster repeated runs, holds the peak memory)."""
        import onnxruntime as ort
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization_level {optimization_level!r} not in {list(OPTIMIZATION_LEVELS)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization_level])
        options.enable_cpu_mem_arena = cpu_arena
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.device_id = device_id
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.providers: dict[str, list[str]] = {}
        for name, path in graph_files.items():
            wanted = _with_options(providers or best_providers(), Path(path).parent, device_id)
            self.sessions[name] = _create_session(Path(path), options, wanted)
            self.providers[name] = self.sessions[name].get_providers()
        # Per session once, not per step: input names with their numpy types, output names.
        self._types = {name: [NUMPY_TYPES[i.type] for i in sess.get_inputs()] for name, sess in self.sessions.items()}
        super().__init__({name: ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
                          for name, sess in self.sessions.items()})

    def _run(self, graph: str, inputs: list[torch.Tensor]):
        session = self.sessions[graph]
        names, outputs = self._io[graph]
        # Graph inputs are float32/int64 (export/graphs.py); the cast only matters for other exports.
        feeds = {name: x.detach().cpu().numpy().astype(dtype, copy=False)
                 for name, x, dtype in zip(names, inputs, self._types[graph])}
        if self.providers[graph][0] in GPU_PROVIDERS:
            results = self._run_bound(session, feeds, outputs)
        else:
            results = session.run(outputs, feeds)
        return [torch.from_numpy(np.asarray(out)) for out in results]

    def _run_bound(self, session, feeds: dict, names: list[str]) -> list:
        """GPU run with I/O binding: inputs copied once to the device, outputs allocated there by onnxruntime
        and copied back once. (Unverified here: no GPU.)"""
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in names:
            binding.bind_output(name, "cuda", self.device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def _with_options(providers: list, graph_dir: Path, device_id: int) -> list:
    """Provider names -> (name, options) with the device and, for TensorRT, an engine cache beside the graph."""
    result = []
    for provider in providers:
        if isinstance(provider, tuple):
            result.append(provider)
        elif provider == "TensorrtExecutionProvider":
            result.append((provider, {"device_id": device_id, "trt_engine_cache_enable": True,
                                      "trt_engine_cache_path": str(graph_dir / "trt_cache")}))
        elif provider == "CUDAExecutionProvider":
            result.append((provider, {"device_id": device_id}))
        else:
            result.append((provider, {}))
    return result


def _create_session(path: Path, options, providers: list):
    import onnxruntime as ort
    available = set(ort.get_available_providers())
    providers = [p for p in providers if p[0] in available]
    if not providers:
        raise ValueError(f"none of the providers asked for is in this onnxruntime build ({sorted(available)})")
    errors = []
    for first in range(len(providers)):
        try:
            return ort.InferenceSession(str(path), options, providers=[p[0] for p in providers[first:]],
                                        provider_options=[p[1] for p in providers[first:]])
        except Exception as err:  # onnxruntime raises its own exception types; the next provider may work
            errors.append(f"{providers[first][0]}: {err}")
    raise RuntimeError(f"cannot create an onnxruntime session for {path}:\n" + "\n".join(errors))
