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

import openvino as ov
import torch

from .torch import check_inputs

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoBackend:
    def __init__(self, graph_files: dict, precision: str = "fp32", threads: int | None = None):
        """graph_files: {graph name: path of its .onnx}. threads: inference threads (None: OpenVINO's default,
        one per physical core)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: OpenVINO's CPU backend runs {', '.join(PRECISIONS)}")
        self.precision = precision
        self.core = ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = threads
        # Only the compiled models are kept: a read model holds the fp32 weights (3.4 GB for SD's UNet), so
        # it is read again from its file when a new shape is compiled.
        self.files = {name: str(Path(path)) for name, path in graph_files.items()}
        self.input_names, self.output_names = {}, {}
        for name, path in self.files.items():
            model = self.core.read_model(path)
            self.input_names[name] = [i.get_any_name() for i in model.inputs]
            self.output_names[name] = [o.get_any_name() for o in model.outputs]
        self._compiled: dict[tuple, ov.InferRequest] = {}
        self.compiled_precision: str | None = None

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.files)

    def run(self, graph: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if graph not in self.files:
            raise KeyError(f"no graph {graph!r} in this engine; it has {', '.join(self.files)}")
        names = self.input_names[graph]
        check_inputs(graph, names, inputs)
        feeds = [inputs[n].detach().cpu().numpy() for n in names]
        request = self._request(graph, tuple(tuple(f.shape) for f in feeds))
        request.infer(feeds)
        return {name: torch.from_numpy(request.get_output_tensor(i).data.copy()).float()
                for i, name in enumerate(self.output_names[graph])}

    def _request(self, graph: str, shapes: tuple) -> ov.InferRequest:
        """The graph compiled for these input shapes (compiled on first use, then kept; a
        sampling loop reuses one shape)."""
        key = (graph, shapes)
        if key not in self._compiled:
            model = self.core.read_model(self.files[graph])
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in zip(self.input_names[graph], shapes)})
            compiled = self.core.compile_model(model, "CPU", self.config)
            # what the plugin really runs: a CPU without bf16 instructions falls back to f32
            self.compiled_precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            self._compiled[key] = compiled.create_infer_request()
        return self._compiled[key]
