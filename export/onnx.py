"""Export a LatentDiffusion model's graphs (export/graphs.py contract) to ONNX.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. Measured with torch 2.13 on the
reduced SD UNet: it exports in ~4 s against ~40 s for `dynamo=True`, names the dynamic axes as asked
(torch.export names them s0, s13, ... and writes output sizes as expressions), traces any example size
(torch.export specialises axes that reach 1 inside the UNet), and onnxruntime's transformer optimizer
matches its GroupNorm/Gelu patterns (export/optimize.py). Both gave the same accuracy (rel L2 ~2e-6 fp32).
It is deprecated in torch >= 2.9 and prints a DeprecationWarning (silenced here); switching means passing
`dynamo=True` with `dynamic_shapes` (and installing onnxscript).

fp16: the graph modules are cast to fp16 and traced, so the precision decisions live in the model code
and match eager fp16 (graphs.cast_graph): GroupNorm statistics, the timestep embedding, the VQ codebook and
its distances and the x0->eps conversion stay fp32 (float64 for the latter); graph inputs and outputs stay
float32 (casts inside).
The cond stage stays fp32 altogether: it runs once per image, and the TorchScript exporter's causal
attention (CLIP) mixes fp32 into fp16 graphs (invalid ONNX: "Scale has inconsistent type").
Tracing runs the model once: torch's fp16 convolutions on CPU are a naive kernel (a reduced decoder at
64x64 took 8 s), so export fp16 with the model on a GPU, or expect minutes on CPU for full-size models.
ONNX Runtime's CPU provider has few fp16 kernels and inserts casts around the rest: fp16 graphs are for
GPUs; on CPUs export fp32 (bf16 for CPUs is a later decision).
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from ldmrt.models import ops

from . import graphs as graph_defs

DEFAULT_OPSET = 17  # LayerNormalization is native from 17; TensorRT 8.6+ and ORT >= 1.14 read it
PROTOBUF_LIMIT = 2 ** 31  # a single .onnx protobuf cannot exceed 2 GB: weights go to external data


def export_onnx(model, out_dir, *, fp16: bool = False, opset: int = DEFAULT_OPSET, fusions: str | None = None,
                external_data: bool | None = None, latent_size: int | None = None,
                attention: str = "materialised") -> dict[str, dict]:
    """Export every graph `model` needs to `out_dir`/<graph>.onnx; returns {graph: description}.

    description: {"file": "<graph>.onnx", "inputs"/"outputs": [{"name", "dtype", "shape"}] (symbolic axes
    by name), "precision": "fp32"|"fp16", "external_data": "<graph>.onnx.data" or None, "opset",
    "fusions": the onnxruntime fused operators applied, "fused_for": the provider they were chosen for}.
    external_data: None writes it only for graphs over 2 GB; True/False force it.
    latent_size: the example size traced, default the smallest the UNet takes; the axes are dynamic anyway.
    fusions: "cpu" or "cuda": rewrite onto the onnxruntime fused operators kept for that provider
    (export/optimize.py; none pay on CPU). A fused graph needs onnxruntime and that provider.
    attention: "materialised" (MatMul + Softmax + MatMul, standard ONNX: TensorRT and OpenVINO fuse it themselves)
    or "fused" (com.microsoft MultiHeadAttention: ONNX Runtime's flash attention, no tokens^2 matrix; OpenVINO
    reads it too), in the UNet and first-stage graphs; the cond stage's stays materialised.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    results = {}
    with torch.no_grad():
        latent_size = latent_size or graph_defs.unet_downsampling(model)  # the cheapest trace
        for name, graph in graph_defs.graphs_for(model, latent_size=latent_size).items():
            module, half = graph.module, fp16 and name not in graph_defs.COND_STAGE_GRAPHS
            if half:
                module = graph_defs.cast_graph(copy.deepcopy(module), torch.float16)
            # The cond stage attends over at most a few hundred tokens: it keeps the plain form.
            spelled = "materialised" if name in graph_defs.COND_STAGE_GRAPHS else attention
            with ops.onnx_attention(spelled):
                results[name] = _export_graph(name, module, graph, out_dir, opset=opset, fusions=fusions,
                                              fp16=half, external_data=external_data)
            results[name]["precision"] = "fp16" if half else "fp32"
            results[name]["attention"] = spelled
    return results


def _export_graph(name: str, module, graph, out_dir: Path, *, opset: int, fusions: str | None, fp16: bool,
                  external_data: bool | None) -> dict:
    path = out_dir / f"{name}.onnx"
    data_name = f"{name}.onnx.data"
    for stale in (path, out_dir / data_name):
        stale.unlink(missing_ok=True)
    # The exporter writes one file per tensor beside the model when it is over 2 GB: export into a scratch
    # folder and re-save as one model file plus at most one data file.
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        traced = Path(scratch) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(module, graph.example_inputs, str(traced), input_names=graph.input_names,
                              output_names=graph.output_names, dynamic_axes=graph.dynamic_axes,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        # By path, so that models over 2 GB are checked too (the in-memory check stops there); before any
        # fusion, whose com.microsoft operators the checker does not know.
        onnx.checker.check_model(str(traced), full_check=True)
        proto = onnx.load(str(traced))
    applied = []
    if fusions:
        from .optimize import fuse

        proto, applied = fuse(proto, name, fusions, fp16)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    external = size > PROTOBUF_LIMIT - 2 ** 24 if external_data is None else external_data
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return {"file": path.name, "inputs": _describe(proto.graph.input), "outputs": _describe(proto.graph.output),
            "external_data": data_name if external else None, "opset": opset, "fusions": applied,
            "fused_for": fusions if applied else None}


def _describe(values) -> list[dict]:
    return [{"name": v.name,
             "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]
