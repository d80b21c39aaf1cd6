"""The benchmark harness (benchmarks/) on the tiny architecture, one round: the JSON and markdown it writes,
ratios against the baseline of the same run, and that ldmrt and the peers really run the same weights.

Needs the peers diffusers and transformers (test extras); OpenVINO and torch.compile are not run here.
"""
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from benchmarks.harness import COMPONENTS, parse_args, run  # noqa: E402

VARIANTS = ["ldmrt-torch-fp32", "ldmrt-torch-bf16", "diffusers-fp32", "diffusers-bf16", "diffusers-bf16-deepcache"]
MODES = ["exact", "cache2", "cut30", "cache2+cut30"]
CACHED = ("unet_shallow", "unet_shallow_cond")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = parse_args(["--model", "tiny", "--sizes", "32", "48", "--repeats", "1", "--threads", "1",
                       "--steps", "10", "--variants", *VARIANTS, "--baseline", "diffusers-bf16", "--modes", *MODES,
                       "--work-dir", str(out), "--out", str(out)])
    return run(args, log=lambda *a: None), out


def test_json_structure(bench_run):
    result, out = bench_run
    saved = json.loads((out / "bench.json").read_text())
    assert saved["baseline"] == "diffusers-bf16" and saved["command"].startswith("python")
    assert {"cpu", "threads", "amx", "cpu_flags", "versions"} <= set(saved["machine"])
    rows = saved["results"]
    assert {(r["size"], r["component"], r["variant"]) for r in rows} == {
        (s, c, v) for s in (32, 48) for c in COMPONENTS for v in VARIANTS}
    for r in rows:
        if "unavailable" in r:  # only diffusers without DeepCache lacks a component: the cached steps
            assert r["variant"] in ("diffusers-fp32", "diffusers-bf16") and r["component"] in CACHED, r
            continue
        assert len(r["times_s"]) == 1 and r["median_s"] > 0 and r["gflop"] > 0
        assert r["gflop_per_s"] == pytest.approx(r["gflop"] / r["median_s"])
    assert (out / "bench.png").stat().st_size > 0


def test_ratios_against_the_baseline_of_the_same_run(bench_run):
    result, _ = bench_run
    medians = {(r["size"], r["component"], r["variant"]): r["median_s"] for r in result["results"] if "median_s" in r}
    for r in result["results"]:
        if "median_s" in r and (r["size"], r["component"], "diffusers-bf16") in medians:
            assert r["ratio_vs_baseline"] == pytest.approx(r["median_s"] / medians[(r["size"], r["component"],
                                                                                     "diffusers-bf16")])
    # 10 DDIM steps: exact = 10 guided calls; cache2 = 5 full + 5 cached; cut30 = 7 guided + 3 unguided;
    # both = full on steps 0, 2, 4, 6 and 7 (guidance switches off), cached on 1, 3, 5 and 9
    calls = {"exact": {"unet": 10}, "cache2": {"unet": 5, "unet_shallow": 5}, "cut30": {"unet": 7, "unet_cond": 3},
             "cache2+cut30": {"unet": 4, "unet_shallow": 3, "unet_cond": 2, "unet_shallow_cond": 1}}
    for e in result["e2e"]:
        s, v = e["size"], e["variant"]
        assert e["calls"] == calls[e["mode"]]
        expected = medians[(s, "text_encoder", v)] + medians[(s, "decoder", v)] + sum(
            n * medians[(s, c, v)] for c, n in e["calls"].items())
        assert e["seconds_per_image"] == pytest.approx(expected)
        base = next(b for b in result["e2e"] if b["size"] == s and b["variant"] == "diffusers-bf16"
                    and b["mode"] == "exact")
        assert e["ratio_vs_baseline"] == pytest.approx(expected / base["seconds_per_image"])
    modes = {(e["variant"], e["mode"]) for e in result["e2e"]}
    assert ("diffusers-bf16", "cache2") not in modes and ("diffusers-bf16", "cut30") in modes
    assert {("ldmrt-torch-bf16", m) for m in MODES} <= modes
    if any(r["variant"] == "diffusers-bf16-deepcache" and "median_s" in r for r in result["results"]):
        assert ("diffusers-bf16-deepcache", "cache2") in modes


def test_same_weights_and_stated_accuracy(bench_run):
    """ldmrt fp32 against diffusers fp32 on the same inputs: the same network (converter-mapped tensors);
    bf16 against fp32 within what bf16 rounding gives (~1e-2)."""
    result, _ = bench_run
    for r in result["results"]:
        if r["variant"] == "diffusers-fp32" and "median_s" in r:
            assert r["rel_l2_vs_fp32"] < 1e-5, r
        if r["precision"] == "bf16" and "median_s" in r:  # cached steps too: their deep input is the exact one
            assert 1e-4 < r["rel_l2_vs_fp32"] < 5e-2, r


def test_markdown_table(bench_run):
    _, out = bench_run
    text = (out / "bench.md").read_text()
    assert "Command: `python -m benchmarks --model tiny" in text and "AMX:" in text
    assert "### 32x32" in text and "### 48x48" in text
    table = [line for line in text.splitlines() if line.startswith("| ldmrt-torch-bf16 | bf16 | UNet step |")]
    assert len(table) == 2
    assert "End to end (10 ddim steps" in text and "| ldmrt-torch-bf16 | cache2+cut30 | 4 / 2 / 3 / 1 |" in text
