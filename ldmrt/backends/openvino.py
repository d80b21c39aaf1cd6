"""OpenVINO backend (CPU): the exported ONNX graphs (export/onnx.py) compiled by OpenVINO's CPU plugin.

Measured the fastest CPU runtime for these graphs (benchmarks/README.md): OpenVINO fuses the convolutions,
normalisations and attention of the graphs into few oneDNN primitives and runs bf16 on CPUs that have it.
It compiles for static shapes: each graph is compiled once per input-shape set on first use and kept
(a UNet compiles in seconds; a sampling loop reuses one shape).

precision: "bf16" (OpenVINO's bf16 inference precision: on AMX or avx512_bf16 CPUs) or "fp32" (forced: the
plugin would otherwise pick bf16 by itself on such CPUs).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import EngineError
from ..manifest import graph_files
from .base import Backend, Exported

NAME = "openvino"
EXTRA = "openvino"
REQUIRES = ("onnx", "openvino")
OPTIONS = ()
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def export(model, out, *, summary, fp16, progress) -> Exported:
    """fp32 graphs: OpenVINO's CPU plugin lowers them to bf16 itself when asked (the fastest CPU path measured,
    benchmarks/README.md), keeping its own fp32 islands."""
    from ..export.onnx import export_onnx
    from ..machine import cpu_reduced_precision
    # Where the CPU lacks bf16 instructions the plugin runs f32 whatever it is asked: record what runs.
    return Exported(cpu_reduced_precision() if fp16 else "fp32", export_onnx(model, out), "cpu")


def load(folder, manifest, *, threads=None, **_) -> "OpenVinoBackend":
    """threads: OpenVINO's inference threads (default: one per physical core)."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        raise EngineError(f"{folder} is an openvino engine and openvino is not installed ({e}): "
                          f"pip install 'ldmrt[{EXTRA}]'") from None
    return OpenVinoBackend(graph_files(folder, manifest), precision=manifest["precision"], threads=threads)


class OpenVinoBackend(Backend):
    def __init__(self, graph_files: dict, precision: str = "fp32", threads: int | None = None):
        """graph_files: {graph name: path of its .onnx}. threads: inference threads (None: OpenVINO's default,
        one per physical core)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: OpenVINO's CPU backend runs {', '.join(PRECISIONS)}")
        import openvino as ov
        self.precision = precision
        self.core = ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = threads
        # Only the compiled models are kept: a read model holds the fp32 weights (3.4 GB for SD's UNet), so
        # it is read again from its file when a new shape is compiled.
        self.files = {name: str(Path(path)) for name, path in graph_files.items()}
        io = {}
        for name, path in self.files.items():
            model = self.core.read_model(path)
            io[name] = ([i.get_any_name() for i in model.inputs], [o.get_any_name() for o in model.outputs])
        super().__init__(io)
        self._compiled = {}  # (graph, input shapes) -> openvino InferRequest
        self.compiled_precision: str | None = None
        self._weights = None  # {graph: {weight name: export.weight_names.WeightInitializer}}, read on first use
        self._merged: dict[str, dict] = {}  # {graph: {initializer: merged array}} replacing the file's constants

    @property
    def running_precision(self) -> str:
        """What the plugin runs, read back from the last compiled model (before any: what was asked)."""
        return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(self.compiled_precision, self.precision)

    def _run(self, graph: str, inputs: list[torch.Tensor]):
        feeds = [x.detach().cpu().numpy() for x in inputs]
        request = self._request(graph, tuple(tuple(f.shape) for f in feeds))
        request.infer(feeds)
        return [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(len(self._io[graph][1]))]

    def _request(self, graph: str, shapes: tuple):
        """The graph compiled for these input shapes (compiled on first use, then kept; a
        sampling loop reuses one shape)."""
        import openvino as ov
        key = (graph, shapes)
        if key not in self._compiled:
            model = self.core.read_model(self.files[graph])
            self._replace_constants(model, self._merged.get(graph, {}))
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in zip(self._io[graph][0], shapes)})
            compiled = self.core.compile_model(model, "CPU", self.config)
            # what the plugin really runs: a CPU without bf16 instructions falls back to f32
            self.compiled_precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            self._compiled[key] = compiled.create_infer_request()
        return self._compiled[key]

    # --- weights swapped without a rebuild (LoRA: ldmrt/lora.py) -------------------------------------------
    # OpenVINO compiles the read model per shape anyway (_request): a LoRA replaces the initializers' Constant nodes
    # (named as the initializers) of the read model before that compile; the compiled models of the graphs it
    # touches are dropped and compiled again on next use (README "LoRA": seconds, against an export for a rebuild).
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """{model weight name: shape (torch's layout)} of the weights the graphs hold on their own."""
        return {name: w.shape for weights in self._weight_map().values() for name, w in weights.items()}

    def set_weight_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Each weight = its value in the graph file + deltas.get(name); graphs whose weights change are compiled
        again on next use (without any delta: from the file alone, so the base is exact)."""
        import onnx
        from onnx import numpy_helper
        for graph, weights in self._weight_map().items():
            touched = {w.initializer: (w, deltas[name]) for name, w in weights.items() if name in deltas}
            if not touched and graph not in self._merged:
                continue
            merged = {}
            if touched:
                path = Path(self.files[graph])
                for tensor in onnx.load(str(path), load_external_data=False).graph.initializer:
                    if tensor.name in touched:
                        w, delta = touched[tensor.name]
                        base = numpy_helper.to_array(tensor, base_dir=str(path.parent))
                        delta = delta.detach().float().cpu().numpy()
                        merged[tensor.name] = (base.astype("float32") + (delta.T if w.transposed else delta)).astype(
                            base.dtype)
                self._merged[graph] = merged
            else:
                del self._merged[graph]
            self._compiled = {key: request for key, request in self._compiled.items() if key[0] != graph}

    @staticmethod
    def _replace_constants(model, arrays: dict) -> None:
        import openvino as ov
        if not arrays:
            return
        for op in model.get_ops():
            if op.get_type_name() == "Constant" and op.get_friendly_name() in arrays:
                op.output(0).replace(ov.op.Constant(arrays[op.get_friendly_name()]).output(0))

    def _weight_map(self) -> dict:
        if self._weights is None:
            import onnx

            from ..export.weight_names import weight_initializers
            self._weights = {graph: weight_initializers(onnx.load(path, load_external_data=False).graph)
                             for graph, path in self.files.items()}
        return self._weights
