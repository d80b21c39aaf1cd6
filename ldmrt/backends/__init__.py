"""Backends run an engine's graphs (the export/graphs.py contract: "cond_stage", "unet", "decoder", "encoder").

A backend is one module here, registered by its name in BACKENDS. Each module declares
    NAME       its name in `ldmrt build --backend` and the manifest
    EXTRA      the pip extra that installs its runtime (None: nothing beyond ldmrt)
    REQUIRES   the modules it imports, checked before a build loads any weights
    OPTIONS    the keyword options of `Engine.build` it takes (e.g. "tensorrt", "onnx_fusions")
    export(model, out, *, summary, fp16, progress, **options) -> Exported   writes its graph files
    load(folder, manifest, *, device, providers, threads) -> Backend        opens them
and may define check_build() (what the machine lacks, said before any weights load) and GRAPHS (the graph
names it writes, when they are not the contract's: graphs_needed). Modules import their
runtime lazily, so that the registry can be read where a runtime is missing. The runtime objects share one
interface, `base.Backend`: `.graphs`, `.device`, `.run(graph, **inputs)`, and, for LoRA (ldmrt/lora.py), `.weight_shapes()`
and `.set_weight_deltas(deltas)` (weights = loaded values + deltas, in the loaded engine: no rebuild).
"""
from __future__ import annotations

import importlib

from ..errors import EngineError

BACKENDS = ("onnxruntime", "openvino", "torch", "aoti", "tensorrt")


def backend_module(name: str):
    """The module of backend `name`, or EngineError listing the backends there are."""
    if name not in BACKENDS:
        raise EngineError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    module = importlib.import_module(f"{__name__}.{name}")
    assert module.NAME == name, (module.NAME, name)
    return module


def check_available(name: str, purpose: str | None = None):
    """The module of backend `name` after checking that its runtime is installed (EngineError with the pip
    command otherwise)."""
    module = backend_module(name)
    for required in module.REQUIRES:
        try:
            importlib.import_module(required)
        except ImportError as e:
            fix = f"pip install 'ldmrt[{module.EXTRA}]'" if module.EXTRA else "pip install " + required
            raise EngineError(f"{purpose or 'the ' + name + ' backend'} needs {', '.join(module.REQUIRES)} ({e}): "
                              f"{fix}, or use --backend torch") from None
    return module


def graphs_needed(module, summary: dict) -> set[str]:
    """The graphs an engine of this backend must hold for its model (checked by Engine.load)."""
    if getattr(module, "GRAPHS", None):
        return set(module.GRAPHS)
    cond_stage = summary["conditioning"] in ("text", "class", "segmentation", "tokens", "text_inpainting")
    return {"unet", "decoder"} | ({"cond_stage"} if cond_stage else set())
