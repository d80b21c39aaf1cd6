"""Export a LatentDiffusion model's graphs (export/graphs.py contract) to AOTInductor packages.

Each graph becomes `<graph>.pt2`: `torch.export.export` traces it with dynamic batch and spatial sizes, and
`torch._inductor.aoti_compile_and_package` compiles it to a shared library with the weights inside. The
same file runs from Python (`torch._inductor.aoti_load_package`, ldmrt/backends/aoti.py) and from C++
(`torch::inductor::AOTIModelPackageLoader`, csrc/engine.cpp) with the libtorch of the torch that built it:
a package is tied to that torch version and to the CPU (or CUDA device) it was compiled for.

Dynamic axes: batch 1..MAX_BATCH everywhere; latent height and width are multiples of the UNet's
downsampling (a derived dimension `multiple * k`, so the compiled code needs no size guards beyond it),
images are `latent_factor` times that. Token sequences keep their fixed padded length; the UNet's context of a
long-prompt model (CLIP) is 1..MAX_CONTEXT_WINDOWS windows of it.

Inputs and outputs are float32 or int64 whatever the precision inside (casts in the graph modules), in the
order of the graph's `input_names`: a C++ host passes a vector of tensors in that order.

Compiling takes a while on CPUs (measured on 2 cores, torch 2.13, reduced txt2img test model: see the
tests); the UNet dominates.
"""
from __future__ import annotations

import copy
import inspect
import time
from pathlib import Path

import torch
from torch.export import Dim

from ldmrt.models.conditioners import long_prompt_window

from . import graphs as graph_defs

MAX_BATCH = 64
MAX_LATENT = 512  # latent height/width bound for the symbolic sizes (4096 px at factor 8)
# Kernels split work over the threads of the process that runs them (at::get_num_threads), not over a count
# fixed when compiling: a build in a single-threaded process must not make a single-threaded engine.
INDUCTOR_CONFIGS = {"cpp.dynamic_threads": True}


def _dynamic_shapes(graph, multiple: int, factor: int, window: int | None = None) -> tuple:
    """dynamic_shapes for torch.export from the graph's ONNX-style dynamic axes. window: the text encoder's
    tokens per window where the UNet's context is k of them (long prompts), k <= MAX_CONTEXT_WINDOWS."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    # latent sizes are multiple * k; images factor * multiple * k. Separate height and width.
    kh = Dim("kh", min=1, max=MAX_LATENT // multiple)
    kw = Dim("kw", min=1, max=MAX_LATENT // multiple)
    sizes = {"batch": batch, "height": multiple * kh, "width": multiple * kw,
             "image_height": factor * multiple * kh, "image_width": factor * multiple * kw}
    if window:
        sizes["context_length"] = window * Dim("context_windows", min=1, max=graph_defs.MAX_CONTEXT_WINDOWS)
    specs = []
    for name in graph.input_names:
        axes = graph.dynamic_axes.get(name, {})
        if name == "cond" and 2 in axes:  # maps at image resolution (semantic synthesis)
            axes = {0: "batch", 2: "image_height", 3: "image_width"}
        specs.append({axis: sizes[dim] for axis, dim in axes.items() if dim in sizes} or None)
    # torch.export matches dynamic_shapes to forward's signature: a *varargs parameter takes one nested tuple.
    params = list(inspect.signature(graph.module.forward).parameters.values())
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return (*specs[:i], tuple(specs[i:]))
    return tuple(specs)


def export_aoti(model, out_dir, *, fp16: bool = False, latent_size: int | None = None,
                progress=None) -> dict[str, dict]:
    """Compile every graph `model` needs to `out_dir`/<graph>.pt2; returns {graph: description}.

    description: {"file", "inputs": [names in call order], "outputs": [names], "precision", "compile_s"}.
    fp16: the graphs except the cond stage compute in fp16 (as export/onnx.py); meant for CUDA builds.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    multiple = graph_defs.unet_downsampling(model)
    _, factor = graph_defs.latent_shape(model)
    window = long_prompt_window(model.cond_stage_model) if model.cond_stage_model is not None else None
    results = {}
    with torch.no_grad():
        for name, graph in graph_defs.graphs_for(model, latent_size=latent_size).items():
            module, half = graph.module, fp16 and name not in graph_defs.COND_STAGE_GRAPHS
            if half:
                module = graph_defs.cast_graph(copy.deepcopy(module), torch.float16)
            t0 = time.perf_counter()
            exported = torch.export.export(module, graph.example_inputs,
                                           dynamic_shapes=_dynamic_shapes(graph, multiple, factor, window))
            path = out_dir / f"{name}.pt2"
            path.unlink(missing_ok=True)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=INDUCTOR_CONFIGS)
            seconds = time.perf_counter() - t0
            if progress:
                progress(f"ldmrt build: compiled {name} with AOTInductor in {seconds:.1f} s")
            results[name] = {"file": path.name, "inputs": list(graph.input_names),
                             "outputs": list(graph.output_names), "precision": "fp16" if half else "fp32",
                             "compile_s": round(seconds, 1)}
    return results
