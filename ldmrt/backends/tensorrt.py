"""TensorRT backend: serialized engines (`<graph>.plan`, built by ldmrt.export.tensorrt) run on CUDA tensors.

Per graph: the engine is deserialized once, and every input signature (the set of input shapes) gets its own
execution context, static device buffers for its inputs and outputs, and a CUDA graph of one
`execute_async_v3` captured after a first eager run. A sampler loop calls the UNet with the same shapes every
step, so after the first step each call is: copy the inputs into the static buffers, replay, copy out.
TensorRT binds tensor addresses and resolves shapes per context, and a captured graph bakes them in, hence one
context per signature rather than re-binding one. The contexts of all graphs share one scratch allocation
(USER_MANAGED memory, sized for the largest engine): they only ever run one at a time, on the backend's stream.

Inputs follow the graph contract (export/graphs.py): float32 or int64 CPU tensors (or numpy arrays), cast by
the copy into the engine's input buffers. Results are float32 CPU tensors, or CUDA tensors when every input
was a CUDA tensor: a caller that keeps its data on the GPU gets no host round trip.

Known cost: the C++ sampler loop (ldmrt.sampling.run) keeps the latent in CPU memory, so each step copies
x host-to-device and eps back (B x C x h x w float32: 64 KiB per image at SD's 64 x 64 latent, twice with
guidance) and synchronises the stream; small next to a UNet step, but it serialises host and GPU. The
conditioning that is constant across steps (context, concat) is moved to the GPU once by Engine.generate and
then only copied device-to-device. Where the fix goes: the plan is plain data (csrc/include/ldmrt/plan.h: per
stage a timestep and the coefficients of one linear update over latent, eps, history slots and noise), so a
device loop in ldmrt/sampling.py could apply each stage with a few torch ops (or one kernel) on CUDA tensors,
with the stochastic samplers' Philox noise uploaded per draw (or drawn by a device port of csrc/rng.cpp), and
call `run("unet", ...)` with CUDA inputs, which this backend already answers with CUDA outputs; the update
could then join the UNet in one captured graph.

Nothing in this module has run on a GPU with TensorRT yet (see the README); what needs no GPU is tested.
`import tensorrt` happens only when a backend is created or an engine built (`import_tensorrt`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import EngineError, InputError
from ldmrt.export.trt import fingerprint, import_tensorrt, refit, require_cuda, trt_logger
from ..manifest import graph_files, listed_file
from .base import Backend, Exported

NAME = "tensorrt"
EXTRA = None  # the tensorrt wheel must match the CUDA of the driver: installed by hand (INSTALL)
REQUIRES = ()  # checked with the reason by check_build (import_tensorrt, require_cuda)
OPTIONS = ("tensorrt",)


def check_build():
    """What this machine lacks to build TensorRT engines, said before any weights load."""
    from ..export.tensorrt import check_build_environment
    check_build_environment()


def export(model, out, *, summary, fp16, progress, tensorrt=None) -> Exported:
    """tensorrt: export.tensorrt.BuildOptions (shape ranges, bf16, refit, timing cache)."""
    from ..export.tensorrt import export_tensorrt
    return Exported(*export_tensorrt(model, out, summary=summary, fp16=fp16, options=tensorrt, progress=progress))


def load(folder, manifest, *, device=None, **_) -> "TensorRTBackend":
    """Checks TensorRT, CUDA and the engine's fingerprint before deserializing anything."""
    return TensorRTBackend.from_manifest(Path(folder), manifest, device=device)

def check_fingerprint(built: dict, here: dict, where) -> None:
    """Raise EngineError when an engine built on `built` (a manifest "device") cannot run on `here`.

    TensorRT plans run only under the TensorRT version that built them and on GPUs of the compute capability
    they were compiled for; ldmrt also requires the same GPU model, since tactics are timed on it.
    """
    rebuild = f"rebuild it here: ldmrt build --backend tensorrt -o {where}"
    if built.get("type") != "cuda" or "tensorrt" not in built:
        raise EngineError(f"{where} has no TensorRT fingerprint in its manifest (device {built}): {rebuild}")
    if built["tensorrt"] != here["tensorrt"]:
        raise EngineError(f"{where} was built with TensorRT {built['tensorrt']}, this is TensorRT {here['tensorrt']}; "
                          f"TensorRT engines only load in the version that built them: pip install "
                          f"tensorrt=={built['tensorrt']}, or {rebuild}")
    if built.get("capability") != here["capability"]:
        raise EngineError(f"{where} was compiled for compute capability {built.get('capability')} "
                          f"({built.get('name')}); this GPU, {here['name']}, is {here['capability']}: {rebuild}")
    if built.get("name") != here["name"]:
        raise EngineError(f"{where} was built and timed on {built.get('name')}; this GPU is {here['name']}: "
                          f"{rebuild}")


def check_shapes(graph: str, profile: dict, shapes: dict) -> None:
    """Raise InputError when input `shapes` fall outside the engine's optimization `profile`.

    profile: {input: {"min": [...], "opt": [...], "max": [...]}} as recorded in the manifest.
    """
    for name, shape in shapes.items():
        lo, hi = profile[name]["min"], profile[name]["max"]
        if len(shape) != len(lo):
            raise InputError(f"{graph} input {name} has shape {list(shape)}; the engine takes {len(lo)} dimensions")
        if any(not a <= d <= b for d, a, b in zip(shape, lo, hi)):
            flags = "--min-batch/--max-batch" if not lo[0] <= shape[0] <= hi[0] else "--min-size/--max-size"
            raise InputError(f"{graph} input {name} has shape {list(shape)}, outside the shapes this TensorRT engine "
                             f"was built for ({lo} to {hi}); rebuild it with other {flags} (with guidance the UNet "
                             f"runs twice the batch)")


def torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
             trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool}
    return table[dtype]


@dataclass
class _Signature:
    """One input signature of a graph: its execution context, static buffers and captured CUDA graph."""
    context: object
    buffers: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    capture_tried: bool = False


@dataclass
class _GraphEngine:
    name: str
    engine: object
    profile: dict | None
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, torch.dtype]
    signatures: dict[tuple, _Signature] = field(default_factory=dict)

    @classmethod
    def load(cls, trt, runtime, name: str, path: Path, profile: dict | None) -> "_GraphEngine":
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"TensorRT could not deserialize {path} (see its log above): rebuild the engine")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        return cls(name, engine, profile, inputs, [n for n in names if n not in inputs],
                   {n: torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names})

    def memory_size(self) -> int:
        e = self.engine
        return e.device_memory_size_v2 if hasattr(e, "device_memory_size_v2") else e.device_memory_size


class TensorRTBackend(Backend):
    """Runs an engine folder's TensorRT plans: `.run(graph, **inputs)` as every ldmrt backend."""

    def __init__(self, files: dict[str, Path], profiles: dict[str, dict | None] | None = None, *, device=None,
                 cuda_graphs: bool = True):
        self.trt = import_tensorrt()
        require_cuda("TensorRT engines")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.cuda_graphs = cuda_graphs
        profiles = profiles or {}
        runtime = self.trt.Runtime(trt_logger(self.trt))
        with torch.cuda.device(self.device):
            self.engines = {name: _GraphEngine.load(self.trt, runtime, name, Path(f), profiles.get(name))
                            for name, f in files.items()}
            self.stream = torch.cuda.Stream(self.device)
            # 256-byte alignment is required; the caching allocator hands out 512-byte aligned blocks.
            self._scratch = torch.empty(max([e.memory_size() for e in self.engines.values()] + [1]),
                                        dtype=torch.uint8, device=self.device)
        super().__init__({name: (e.inputs, e.outputs) for name, e in self.engines.items()})
        # LoRA (set by from_manifest): {graph: (base weights file, {torch name: (initializer, transposed)})}
        self.lora_weights: dict[str, tuple[Path, dict]] = {}
        self._refitted: dict[str, set[str]] = {}  # {graph: initializers the last set_weight_deltas changed}

    @classmethod
    def from_manifest(cls, path: Path, manifest: dict, **kwargs) -> "TensorRTBackend":
        """The backend of an engine folder, after checking TensorRT, CUDA and the engine's fingerprint."""
        trt = import_tensorrt(f"{path} holds TensorRT engines; they")
        require_cuda(f"{path} holds TensorRT engines; they")
        check_fingerprint(manifest.get("device", {}), fingerprint(trt, kwargs.get("device")), path)
        backend = cls(graph_files(path, manifest), {g: d.get("profile") for g, d in manifest["graphs"].items()},
                      **kwargs)
        backend.lora_weights = {g: (listed_file(path, manifest, d["lora_weights"]), d["weight_names"])
                                for g, d in manifest["graphs"].items() if d.get("lora_weights")}
        return backend

    # --- running --------------------------------------------------------------------------------
    def _run(self, graph: str, inputs: list[torch.Tensor]):
        eng = self.engines[graph]
        tensors = dict(zip(eng.inputs, inputs))
        on_device = all(x.is_cuda for x in inputs)
        shapes = {n: tuple(x.shape) for n, x in tensors.items()}
        if eng.profile:
            check_shapes(graph, eng.profile, shapes)
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # inputs the caller is still writing on its stream
            with torch.cuda.stream(self.stream):  # buffers allocated here are freed in this stream's order too
                sig = self._signature(eng, shapes)
                for n in eng.inputs:
                    sig.buffers[n].copy_(tensors[n], non_blocking=True)
                self._execute(eng, sig)
                if not on_device:  # a blocking copy: the results are complete when it returns
                    return [sig.buffers[n].to("cpu", torch.float32) for n in eng.outputs]
            caller.wait_stream(self.stream)
            # The static buffers: Backend.run copies them on the caller's stream (the next call overwrites them).
            return [sig.buffers[n] for n in eng.outputs]

    def _signature(self, eng: _GraphEngine, shapes: dict) -> _Signature:
        key = tuple(shapes[n] for n in eng.inputs)
        if key not in eng.signatures:
            trt = self.trt
            context = eng.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise RuntimeError(f"TensorRT could not create an execution context for {eng.name}")
            if hasattr(context, "set_device_memory"):
                context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
            else:  # TensorRT 10.0
                context.device_memory = self._scratch.data_ptr()
            buffers = {}
            for n in eng.inputs:
                if not context.set_input_shape(n, shapes[n]):
                    raise ValueError(f"TensorRT rejected shape {list(shapes[n])} for {eng.name} input {n}")
                buffers[n] = torch.empty(shapes[n], dtype=eng.dtypes[n], device=self.device)
            for n in eng.outputs:
                shape = tuple(context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"TensorRT left the shape of {eng.name} output {n} unresolved: {shape}")
                buffers[n] = torch.empty(shape, dtype=eng.dtypes[n], device=self.device)
            for n, b in buffers.items():
                context.set_tensor_address(n, b.data_ptr())
            eng.signatures[key] = _Signature(context, buffers)
        return eng.signatures[key]

    def _execute(self, eng: _GraphEngine, sig: _Signature) -> None:
        """On self.stream: replay the captured graph, or run eagerly and capture (once) for the next call."""
        if sig.graph is not None:
            sig.graph.replay()
            return
        if not sig.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {eng.name} (see its log above)")
        if self.cuda_graphs and not sig.capture_tried:
            # TensorRT needs one run after the shapes are set before a capture (it finishes lazy setup then).
            sig.capture_tried = True
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    if not sig.context.execute_async_v3(self.stream.cuda_stream):
                        raise RuntimeError("execute_async_v3 failed under capture")
                sig.graph = graph
            except RuntimeError as e:  # some engines are not capturable; they still run eagerly
                warnings.warn(f"TensorRT {eng.name}: no CUDA graph for shapes {list(sig.buffers.values())[0].shape} "
                              f"({e}); running without one", RuntimeWarning, stacklevel=3)

    # --- weights and memory ---------------------------------------------------------------------
    def refit(self, graph: str, onnx_path) -> None:
        """Swap in the weights of `onnx_path` (the graph re-exported with other weights) without a rebuild."""
        eng = self.engines[graph]
        with torch.cuda.device(self.device):
            self.stream.synchronize()
            refit(self.trt, eng.engine, Path(onnx_path))
        eng.signatures.clear()  # captured graphs may point at the old weights

    # --- LoRA: refits from the base weights the engine folder holds (export.tensorrt.save_lora_weights) ----------
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """{torch weight name: shape} of what set_weight_deltas can change (refittable engines only)."""
        if not self.lora_weights:
            raise EngineError("this TensorRT engine was built without refit support, so it runs no LoRA: rebuild it "
                              "with --refit")
        from safetensors import safe_open
        shapes = {}
        for file, names in self.lora_weights.values():
            with safe_open(str(file), "np") as f:
                for name, (initializer, transposed) in names.items():
                    shape = tuple(f.get_slice(initializer).get_shape())
                    shapes[name] = shape[::-1] if transposed else shape
        return shapes

    def set_weight_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Refit each graph whose weights change: base (from the engine folder) + delta for the weights in
        `deltas`, the base for those a previous call changed. (Unverified: no GPU with TensorRT here.)"""
        import numpy as np
        from safetensors import safe_open
        for graph, (file, names) in self.lora_weights.items():
            touched = {initializer: (transposed, deltas[name]) for name, (initializer, transposed) in names.items()
                       if name in deltas}
            restore = self._refitted.get(graph, set()) - set(touched)
            if not touched and not restore:
                continue
            arrays = {}
            with safe_open(str(file), "np") as f:
                for initializer in [*touched, *restore]:
                    base = f.get_tensor(initializer)
                    if initializer in touched:
                        transposed, delta = touched[initializer]
                        delta = delta.detach().float().cpu().numpy()
                        base = (base.astype(np.float32) + (delta.T if transposed else delta)).astype(base.dtype)
                    arrays[initializer] = np.ascontiguousarray(base)
            self._refit_named(graph, arrays)
            self._refitted[graph] = set(touched)

    def _refit_named(self, graph: str, arrays: dict) -> None:
        eng = self.engines[graph]
        trt = self.trt
        with torch.cuda.device(self.device):
            self.stream.synchronize()
            refitter = trt.Refitter(eng.engine, trt_logger(trt))
            for name, array in arrays.items():  # the arrays outlive the refit: TensorRT reads them there
                if not refitter.set_named_weights(name, trt.Weights(array)):
                    raise EngineError(f"TensorRT refused the weights {name} of {graph} (shape {array.shape}): "
                                      "rebuild the engine with --refit")
            if not refitter.refit_cuda_engine():
                raise EngineError(f"TensorRT could not refit {graph}: rebuild the engine with --refit")
        eng.signatures.clear()  # captured graphs may point at the old weights

    def clear(self) -> None:
        """Drop every execution context, static buffer and captured graph (the engines stay loaded)."""
        self.stream.synchronize()
        for eng in self.engines.values():
            eng.signatures.clear()
