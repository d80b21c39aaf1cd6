"""`ldmrt info`: what this machine can run, and what a model is made of."""
from __future__ import annotations

import sys

from .machine import cpu_features, cpu_reduced_precision, library_version


def backends() -> dict:
    """Each backend: whether it works here, and why not when it does not."""
    import torch
    out = {}
    try:
        from . import _C  # noqa: F401
        out["cpp_core"] = {"available": True}
    except ImportError as e:
        out["cpp_core"] = {"available": False, "why": f"ldmrt._C not built ({e}): reinstall with pip install ."}
    out["torch_cpu"] = {"available": True}
    cuda = torch.cuda.is_available()
    out["torch_cuda"] = {"available": cuda} if cuda else {
        "available": False, "why": "no CUDA device" if torch.version.cuda else "this torch is a CPU build"}
    try:
        import onnxruntime as ort
        out["onnxruntime"] = {"available": True, "providers": ort.get_available_providers()}
    except ImportError:
        out["onnxruntime"] = {"available": False, "why": "onnxruntime not installed: pip install 'ldmrt[onnx]'"}
    try:
        import openvino
        out["openvino"] = {"available": True, "devices": openvino.Core().available_devices}
    except ImportError:
        out["openvino"] = {"available": False, "why": "openvino not installed: pip install 'ldmrt[openvino]'"}
    try:
        import tensorrt  # noqa: F401
        out["tensorrt"] = {"available": cuda} if cuda else {"available": False, "why": "TensorRT needs a CUDA device"}
    except ImportError:
        out["tensorrt"] = {"available": False, "why": "tensorrt not installed (NVIDIA GPUs only)"}
    import shutil
    compiler = shutil.which("c++") or shutil.which("g++")
    out["aoti"] = {"available": True} if compiler else {
        "available": False, "why": "AOTInductor compiles C++: install a C++ compiler (g++)"}
    try:
        import triton  # noqa: F401
        out["triton"] = {"available": cuda} if cuda else {
            "available": False, "why": "no CUDA device (kernels run only under TRITON_INTERPRET=1 for tests)"}
    except ImportError:
        out["triton"] = {"available": False, "why": "triton not installed"}
    return out


def system_info() -> dict:
    import torch
    devices = [{"index": i, "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
               for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    versions = {name: library_version(name) for name in ("ldmrt", "torch", "numpy", "onnx", "onnxruntime",
                                                   "triton", "tensorrt", "safetensors", "tokenizers")}
    versions["python"] = sys.version.split()[0]
    versions["torch_cuda"] = torch.version.cuda
    cpu = cpu_features() | {"fp16_runs_as": cpu_reduced_precision()}  # what --fp16 means for CPU engines here
    return {"versions": versions, "cpu": cpu, "cuda_devices": devices, "backends": backends()}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def model_info(model) -> dict:
    """Architecture summary and parameter counts per component, built on the meta device (no memory)."""
    import torch

    from .config import instantiate_from_config, load_config
    cfg = load_config(model)
    with torch.device("meta"):
        ldm = instantiate_from_config(cfg)
    p = cfg["params"]
    unet = p["unet_config"]["params"]
    shared = ldm.cond_stage_model is ldm.first_stage_model
    counts = {"unet": _count(ldm.model), "first_stage": _count(ldm.first_stage_model),
              "cond_stage": 0 if shared else _count(ldm.cond_stage_model)}
    counts["total"] = sum(counts.values())
    cond = p["cond_stage_config"]
    return {
        "model": str(model),
        "unet": {k: unet.get(k) for k in ("in_channels", "out_channels", "model_channels", "channel_mult",
                                         "num_res_blocks", "attention_resolutions", "num_heads",
                                         "num_head_channels", "context_dim", "use_spatial_transformer")},
        "first_stage": p["first_stage_config"]["target"].rsplit(".", 1)[-1],
        "cond_stage": cond if isinstance(cond, str) else cond["target"].rsplit(".", 1)[-1],
        "conditioning_key": ldm.conditioning_key,
        "latent_factor": 2 ** (len(p["first_stage_config"]["params"].get("ddconfig", {}).get("ch_mult", [1])) - 1),
        "timesteps": ldm.num_timesteps,
        "scale_factor": float(ldm.scale_factor),
        "parameters": counts,
    }


def format_info(info: dict, indent: int = 0) -> str:
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines.append(format_info(v, indent + 2))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            lines.append(" " * indent + f"{k}:")
            lines.extend(" " * (indent + 2) + ", ".join(f"{a}={b}" for a, b in d.items()) for d in v)
        else:
            value = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v
            lines.append(" " * indent + f"{k}: {value}")
    return "\n".join(lines)
