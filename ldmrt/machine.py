"""Facts about this machine and its libraries, read by `ldmrt info`, engine manifests and the benchmarks."""
from __future__ import annotations

import importlib
import platform
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def library_version(module: str) -> str | None:
    """`module.__version__`, or None when it is not installed (or its install is broken)."""
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # a broken optional install must not break `info`
        return None


def cpu_features() -> dict:
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    import torch
    return {"machine": platform.machine(), "processor": platform.processor() or None,
            "flags": {f: f in flags for f in CPU_FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def cpu_reduced_precision() -> str:
    """What `--fp16` means on this CPU: "bf16" where it has bf16 instructions (avx512_bf16, AMX; arm64's bf16),
    "fp32" elsewhere, where bf16 is emulated and runs slower than fp32 (measured on an AVX2-only EPYC: a UNet
    call 20.4 s in bf16 against 5.3 s in fp32)."""
    flags = {f for f, on in cpu_features()["flags"].items() if on} | _arm_features()
    return "bf16" if flags & {"avx512_bf16", "amx_bf16", "bf16"} else "fp32"


def _arm_features() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("aarch64", "arm64") or not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("Features"):
            return set(line.split(":", 1)[1].split())
    return set()


def library_versions() -> dict:
    """What an engine records it was built with."""
    return {name: library_version(name) for name in ("torch", "onnx", "onnxruntime", "numpy")} | {
        "python": platform.python_version()}


def device_record(device: str) -> dict:
    """The device an engine was built for: a CUDA GPU's name and capability, or the CPU's architecture and flags."""
    import torch
    if device.startswith("cuda"):
        i = torch.device(device).index or 0
        return {"type": "cuda", "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
    cpu = cpu_features()
    return {"type": "cpu", "machine": cpu["machine"], "flags": [f for f, on in cpu["flags"].items() if on]}
