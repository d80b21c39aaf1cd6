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
    # Fused attention (com.microsoft MultiHeadAttention): ONNX Runtime's flash kernel, no tokens^2 scores (README
    # "Beyond the training size").
    return Exported("fp16" if fp16 else "fp32", export_onnx(model, out, fp16=fp16, fusions=onnx_fusions,
                                                            attention="fused"), "cpu")


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
        self._settings = (optimization_level, cpu_arena, threads)  # sessions are made again with other weights
        self.device_id = device_id
        self.files = {name: Path(path) for name, path in graph_files.items()}
        self._wanted_providers = providers
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.providers: dict[str, list[str]] = {}
        for name in self.files:
            self._open(name)
        self._weights = None  # {graph: {weight name: export.weight_names.WeightInitializer}}, read on first use
        self._overrides: dict[str, dict] = {}  # {graph: {initializer: OrtValue}} of sessions not made from the file
        # Per session once, not per step: input names with their numpy types, output names.
        self._types = {name: [NUMPY_TYPES[i.type] for i in sess.get_inputs()] for name, sess in self.sessions.items()}
        super().__init__({name: ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
                          for name, sess in self.sessions.items()})

    def _open(self, graph: str, model: bytes | None = None, external: dict | None = None) -> None:
        """(Re)create the session of `graph`: from its file, or from `model` (the graph's proto, serialized, whose
        external data stays beside the file) with `external` ({initializer: OrtValue}) replacing external data."""
        import onnxruntime as ort
        level, cpu_arena, threads = self._settings
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[level])
        options.enable_cpu_mem_arena = cpu_arena
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if model is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(self.files[graph].parent))
        if external:
            options.add_external_initializers(list(external), list(external.values()))
        # TensorRT EP's engine cache is keyed by the graph file: with other weights it would serve stale engines.
        wanted = _with_options(self._wanted_providers or best_providers(), self.files[graph].parent, self.device_id,
                               engine_cache=model is None)
        self.sessions[graph] = _create_session(self.files[graph] if model is None else model, options, wanted)
        self.providers[graph] = self.sessions[graph].get_providers()

    # --- weights swapped without a rebuild (LoRA: ldmrt/lora.py) -------------------------------------------
    # The sessions of the graphs a LoRA touches are created again with the merged weights, so that ONNX Runtime
    # optimises and pre-packs them as it does the file's: a step runs as without a LoRA, on every provider.
    # Measured against the alternative, the targeted weights as graph inputs (benchmarks/lora_switch.py, README
    # "LoRA"; SD v1, 2 loaded CPU cores): a switch costs 33-43 s here (session creation) against 0.16-0.19 of a
    # rebuild, and the graph-input UNet step was as fast on the CPU provider (4.27 s against 4.63 s, within noise),
    # where that design would switch by merging alone. It is not taken because on the CUDA and TensorRT providers
    # the inputs would cross to the device on every step (_run_bound binds host inputs) and TensorRT EP would build
    # engines without the weights as constants; a CPU-only graph-input path is the open lever for switch time.
    # The merged weights go in place of the file's in the graph's proto (data inside the .onnx) or as
    # SessionOptions.add_external_initializers (data in .onnx.data, which keeps the proto under protobuf's 2 GB);
    # SessionOptions.add_initializer is not used: with ORT_ENABLE_ALL, ONNX Runtime 1.32 ignores it for Conv
    # weights (their NCHWc layout is made from the file's; tests/test_lora.py would catch it).
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """{model weight name: shape (torch's layout)} of the weights the graphs hold on their own."""
        return {name: w.shape for weights in self._weight_map().values() for name, w in weights.items()}

    def set_weight_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Each weight = its value in the graph file + deltas.get(name), in the initializer's dtype; sessions whose
        weights change are created again (without any delta: from the file itself, so the base is exact)."""
        for graph, weights in self._weight_map().items():
            touched = {w.initializer: (w, deltas[name]) for name, w in weights.items() if name in deltas}
            if not touched and graph not in self._overrides:
                continue
            if not touched:
                self._open(graph)
                del self._overrides[graph]
                continue
            self._overrides[graph] = self._open_merged(graph, touched)

    def _open_merged(self, graph: str, touched: dict) -> dict:
        """Open `graph` with base + delta for each {initializer: (WeightInitializer, delta)}; returns the
        OrtValues the session reads (kept as long as it lives)."""
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper
        path = self.files[graph]
        proto = onnx.load(str(path), load_external_data=False)
        external = {}
        for tensor in proto.graph.initializer:
            if tensor.name not in touched:
                continue
            w, delta = touched[tensor.name]
            base = numpy_helper.to_array(tensor, base_dir=str(path.parent))
            delta = delta.detach().float().cpu().numpy()
            merged = np.ascontiguousarray(base.astype(np.float32) + (delta.T if w.transposed else delta), base.dtype)
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                external[tensor.name] = ort.OrtValue.ortvalue_from_numpy(merged)
            else:
                tensor.CopyFrom(numpy_helper.from_array(merged, tensor.name))
        self._open(graph, proto.SerializeToString(), external)
        return external

    def _weight_map(self) -> dict:
        if self._weights is None:
            import onnx

            from ..export.weight_names import weight_initializers
            self._weights = {graph: weight_initializers(onnx.load(str(path), load_external_data=False).graph)
                             for graph, path in self.files.items()}
        return self._weights

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


def _with_options(providers: list, graph_dir: Path, device_id: int, engine_cache: bool = True) -> list:
    """Provider names -> (name, options) with the device and, for TensorRT, an engine cache beside the graph
    (unless engine_cache is False)."""
    result = []
    for provider in providers:
        if isinstance(provider, tuple):
            result.append(provider)
        elif provider == "TensorrtExecutionProvider":
            result.append((provider, {"device_id": device_id, "trt_engine_cache_enable": engine_cache,
                                      "trt_engine_cache_path": str(graph_dir / "trt_cache")}))
        elif provider == "CUDAExecutionProvider":
            result.append((provider, {"device_id": device_id}))
        else:
            result.append((provider, {}))
    return result


def _create_session(path: Path | bytes, options, providers: list):
    import onnxruntime as ort
    available = set(ort.get_available_providers())
    providers = [p for p in providers if p[0] in available]
    if not providers:
        raise ValueError(f"none of the providers asked for is in this onnxruntime build ({sorted(available)})")
    errors = []
    for first in range(len(providers)):
        try:
            return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=[p[0] for p in providers[first:]],
                                        provider_options=[p[1] for p in providers[first:]])
        except Exception as err:  # onnxruntime raises its own exception types; the next provider may work
            errors.append(f"{providers[first][0]}: {err}")
    what = "a graph with other weights" if isinstance(path, bytes) else path
    raise RuntimeError(f"cannot create an onnxruntime session for {what}:\n" + "\n".join(errors))
