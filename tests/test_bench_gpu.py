"""benchmarks/gpu/bench_gpu.py --cpu-check: what of the GPU benchmark a CPU can run (the kernel checks, the
eager UNet variants, the C++-driven sampler, the shipped model's engine; tiny shapes, Triton's
interpreter), so that the script a GPU session gets minutes for is known to work up to the parts that
need CUDA."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "bench_gpu.py"


def test_cpu_check(tmp_path):
    out = tmp_path / "bench_gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-check", "--no-build", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    checks = [r for r in results["checks"] if r["kind"] == "check"]
    assert checks and all(r["ok"] for r in checks)
    assert {r["kernel"] for r in checks} == {"attention", "group_norm+silu"}
    eager = [r for r in results["unet"] if "ms" in r]
    assert len(eager) == 2 and all(r["rel_err_vs_eager_sdpa"] < 1e-4 for r in eager)
    assert [r.get("latent_finite") for r in results["sampler"]] == [True]
    (engine,) = results["engine"]
    assert engine["rel_err_vs_cpu_fp32"] < 0.05  # bf16 engine against fp32, 20 steps: measured 1.1e-2
    assert all(engine["adherence"].values()), engine["adherence"]
