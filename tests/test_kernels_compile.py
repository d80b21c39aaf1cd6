"""The Triton kernels compiled for real GPUs (sm_80, sm_90) here, without one: ldmrt.kernels.resources
compiles every launch the launchers make at SD's shapes and reads its cubin's resource use. Each must
compile, spill no registers, and fit 99 KB of shared memory (see that module for why and how).

Triton's compiler does not work beside its interpreter, which the other kernel tests run in on CPUs, so
the report runs in a child process without TRITON_INTERPRET (~40 s on 2 cores).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or not (Path(spec.origin).parent / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton carries no NVIDIA backend with cuobjdump to compile and inspect kernels")
    out = tmp_path_factory.mktemp("resources") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to keep its warning out of the log
    done = subprocess.run([sys.executable, "-m", "ldmrt.kernels.resources", "--json", str(out)], env=env,
                          capture_output=True, text=True)
    if not out.exists():
        pytest.fail(f"the resource report did not finish:\n{done.stdout}\n{done.stderr}")
    return json.loads(out.read_text())


def test_every_launch_compiles_without_spills_within_shared_memory(rows):
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['kernel']} {r['case']} {r['dtype']} sm_{r['arch']}: {r['spill_bytes']} bytes "
                              f"spilled, {r['shared_bytes']} of shared memory, {r['meta']}" for r in bad)


def test_report_covers_every_launch_shape(rows):
    """No tile config or head split goes unchecked: for each dtype and architecture, the report compiles
    every (tiles, BLOCK_D, BLOCK_D2) that head dims 1 to MAX_HEAD_DIM launch with."""
    from ldmrt.kernels import attention
    from ldmrt.kernels.resources import ARCHS

    def shapes(dtype_class):
        kernel_dtype = torch.float32 if dtype_class == "fp32" else torch.float16
        return {tuple(attention.launch_meta(kernel_dtype, d, False)[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D",
                                                                                 "BLOCK_D2"))
                for d in range(1, attention.MAX_HEAD_DIM + 1)}

    for dtype in ("fp16", "bf16", "fp32"):
        for arch in ARCHS:
            compiled = {tuple(r["meta"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_D2")) for r in rows
                        if r["kernel"] == "attention" and r["dtype"] == dtype and r["arch"] == arch}
            assert shapes("fp32" if dtype == "fp32" else "16-bit") <= compiled, (dtype, arch)
