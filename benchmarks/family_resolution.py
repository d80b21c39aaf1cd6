"""A published LDM family at one size beyond its training size: build its engine (torch backend, random weights),
run one 1-step generate with the family's input (bsr_sr: a low-res image of a quarter the size; semantic synthesis:
a random class map), print seconds and the process's peak RSS (VmHWM, the build included). One configuration per
process, so peaks do not mix:

    .venv/bin/python benchmarks/family_resolution.py bsr_sr 1024 tiled       # or: whole
    .venv/bin/python benchmarks/family_resolution.py semantic_synthesis512 1024 whole
"""
import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main():
    preset, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(2)
    from ldmrt import Engine
    with TemporaryDirectory() as tmp:
        engine = Engine.build(preset, Path(tmp) / "engine", backend="torch", random_weights=True, progress=None)
        rng = np.random.default_rng(0)
        if engine.summary["conditioning"] == "low_res_image":
            inputs = dict(low_res_image=rng.random((size // 4, size // 4, 3)).astype(np.float32))
        else:
            inputs = dict(segmentation=rng.integers(0, engine.summary["segmentation_classes"], (size, size)))
        held = status("VmRSS")
        start = time.perf_counter()
        engine.generate(steps=1, height=size, width=size, tiled_decode=mode == "tiled", output_type="np", **inputs)
        print(json.dumps({"preset": preset, "size": size, "decode": mode,
                          "seconds": round(time.perf_counter() - start, 1),
                          "peak_gb": round(status("VmHWM") / 2 ** 30, 2), "held_before_gb": round(held / 2 ** 30, 2)}))


if __name__ == "__main__":
    main()
