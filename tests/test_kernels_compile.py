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


def test_report_covers_every_tile_config(rows):
    """A new entry in attention.TILES cannot go unchecked: some case compiles each, on each architecture."""
    from ldmrt.kernels.attention import TILES
    from ldmrt.kernels.resources import ARCHS

    def width(meta):  # the padded head width the table is keyed by
        return max(64, 1 << (meta["BLOCK_D"] + meta["BLOCK_D2"] - 1).bit_length())

    covered = {("fp32" if r["dtype"] == "fp32" else "16-bit", width(r["meta"]), r["arch"])
               for r in rows if r["kernel"] == "attention"}
    assert covered == {(kind, width, arch) for kind, table in TILES.items() for width in table for arch in ARCHS}
