"""C++ hosts: libldmrt built against the installed package (`python -m ldmrt.cpp build`), the example host
examples/cpp built with find_package(ldmrt), run on an AOTInductor engine and compared with Python's Engine.

The claim is bit-identity, not a tolerance: both sides run the same .pt2 packages through the same libtorch,
tokenise to the same ids, draw the same Philox noise and step the same C++ plan loop, with the same thread
count (inductor kernels and oneDNN split reductions by thread, so a different count may change the last bits).
So the latents must be equal to the bit and the 8-bit images byte for byte.

Slow (a libldmrt build, the shipped model's engine compile and the example build take minutes on 2 cores):
set LDMRT_SLOW (CI sets it to `reduced`).
"""
import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldmrt
import ldmrt.cpp
from ldmrt.config import shipped_checkpoint
from helpers import code_blocks, run_sh, substitute
from ldmrt.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
SLOW = os.environ.get("LDMRT_SLOW", "")
CXX = shutil.which("g++") or shutil.which("c++")


def slow(test):
    for mark in (pytest.mark.slow,
                 pytest.mark.skipif(not SLOW, reason="slow: set LDMRT_SLOW=reduced"),
                 pytest.mark.skipif(shutil.which("cmake") is None or CXX is None, reason="needs cmake and a C++ compiler"),
                 pytest.mark.filterwarnings("ignore")):  # torch.export / inductor warnings
        test = mark(test)
    return test


THREADS = 1  # tests/conftest.py runs torch with one thread; the host is told the same
@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """examples/cpp/README.md's build block, run as a reader runs it: libldmrt built against the installed package
    into a fresh prefix, the shipped model's aoti engine, the example built with find_package, one image."""
    work = tmp_path_factory.mktemp("cpp_host")
    _, block = [b for b in code_blocks("examples/cpp/README.md") if b[0] == "sh"][0]
    run_sh(substitute(block, {"-S examples/cpp": f"-S {ROOT / 'examples' / 'cpp'}"}), work,
           env={"LDMRT_CPP_PREFIX": str(work / "prefix")})
    assert ldmrt.cpp.config_file(work / "prefix").is_file() and (work / "out.png").is_file()
    return work


@pytest.fixture(scope="module")
def example(host):
    return host / "build" / "example" / "ldmrt_generate"


@pytest.fixture(scope="module")
def engine_dir(host):
    """The shipped model's engine, as `ldmrt build --backend aoti` makes it."""
    return host / "engines" / "shapes"


def run_host(example, engine_dir, out_png, prompt, **flags):
    args = [str(example), str(engine_dir), prompt, str(out_png), "--threads", str(THREADS)]
    for name, value in flags.items():
        args += [f"--{name}", str(value)]
    return subprocess.run(args, capture_output=True, text=True)


@slow
@pytest.mark.parametrize("case", [
    dict(prompt="a red circle on the left", seed=3, steps=4),  # guided (default scale 5), DDIM
    dict(prompt="blue square right", seed=11, steps=5, guidance=1.0, sampler="euler_ancestral", batch=2),
    # feature caching and a guidance interval: the plan's stage flags, followed by both hosts
    dict(prompt="a red circle", seed=5, steps=7, sampler="dpmpp_2m", cache=3, **{"guidance-until": 0.5}),
    dict(prompt="green square", seed=2, steps=12, cache=3, **{"cache-schedule": "quadratic"}),
    # samplers of two evaluations per step (trial points in history slots), with noise, and diffusers' UniPC
    dict(prompt="a blue circle", seed=4, steps=4, sampler="heun"),
    dict(prompt="a red square", seed=6, steps=4, sampler="dpmpp_sde"),
    dict(prompt="a gray circle", seed=8, steps=5, sampler="unipc"),
])
def test_cpp_host_gives_python_images_bit_for_bit(example, engine_dir, tmp_path, case):
    assert torch.get_num_threads() == THREADS
    engine = Engine.load(engine_dir)
    kwargs = dict(steps=case["steps"], seed=case["seed"], guidance_scale=case.get("guidance"),
                  sampler=case.get("sampler", "ddim"), batch_size=case.get("batch", 1),
                  cache_interval=case.get("cache", 1), guidance_interval=(0, case.get("guidance-until", 1)),
                  cache_schedule=case.get("cache-schedule", "uniform"))
    latent = engine.generate(case["prompt"], output_type="latent", **kwargs).numpy()
    images = [np.asarray(im) for im in engine.generate(case["prompt"], **kwargs)]

    flags = {k: v for k, v in case.items() if k not in ("prompt",)}
    done = run_host(example, engine_dir, tmp_path / "out.png", case["prompt"], latent=tmp_path / "latent.f32", **flags)
    assert done.returncode == 0, done.stderr
    cpp_latent = np.fromfile(tmp_path / "latent.f32", dtype=np.float32).reshape(latent.shape)
    assert np.array_equal(cpp_latent, latent), f"max |diff| {np.abs(cpp_latent - latent).max()}"
    names = ["out.png"] if len(images) == 1 else [f"out-{b}.png" for b in range(len(images))]
    for name, want in zip(names, images):
        got = np.asarray(Image.open(tmp_path / name))
        assert got.shape == want.shape and np.array_equal(got, want)


@slow
def test_aoti_engine_matches_eager(engine_dir):
    """The compiled packages against the same weights in eager PyTorch (fp32): rel L2 of the final latents."""
    from ldmrt.backends.torch import TorchBackend

    engine = Engine.load(engine_dir)
    model = ldmrt.load_model("shapes", shipped_checkpoint("shapes"))
    eager = Engine(engine.path, engine.manifest, TorchBackend(model), engine.tokenizer)
    kwargs = dict(steps=5, seed=2, output_type="latent")
    got, want = engine.generate("green square", **kwargs).double(), eager.generate("green square", **kwargs).double()
    assert ((got - want).norm() / want.norm()).item() < 1e-4  # measured 1.9e-6 and 6.1e-6 (shapes model, 5 guided DDIM steps)


@slow
def test_cpp_host_refuses_other_engines(example, engine_dir, tmp_path):
    other = tmp_path / "engine"
    shutil.copytree(engine_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest | {"backend": "onnxruntime"}))
    done = run_host(example, other, tmp_path / "x.png", "a red circle")
    assert done.returncode == 1 and "C++ hosts run AOTInductor engines" in done.stderr
    (other / "manifest.json").write_text(json.dumps(manifest))
    (other / "unet.pt2").write_bytes(b"truncated")
    done = run_host(example, other, tmp_path / "x.png", "a red circle")
    assert done.returncode == 1 and "truncated or replaced" in done.stderr
    done = run_host(example, tmp_path / "missing", tmp_path / "x.png", "a red circle")
    assert done.returncode == 1 and "no engine at" in done.stderr


@slow
def test_cpp_host_checks_requests(example, engine_dir, tmp_path):
    multiple = Engine.load(engine_dir).summary["size_multiple"]
    done = run_host(example, engine_dir, tmp_path / "x.png", "a red circle", size=multiple + 1)
    assert done.returncode == 1 and "multiples of" in done.stderr
    done = run_host(example, engine_dir, tmp_path / "x.png", "a red circle", sampler="nope")
    assert done.returncode == 1 and "nope" in done.stderr


PNG_DRIVER = r"""
#include <cstdint>
#include <vector>
#include "png.h"
int main(int, char** argv) {
  const int width = 300, height = 257;  // 231,557 bytes of scanlines: four stored deflate blocks
  std::vector<std::uint8_t> rgb(width * height * 3);
  for (int i = 0; i < width * height * 3; ++i) rgb[i] = static_cast<std::uint8_t>((i * 7) ^ (i >> 9));
  write_png(argv[1], width, height, rgb);
}
"""


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_example_png_writer(tmp_path):
    (tmp_path / "main.cpp").write_text(PNG_DRIVER)
    exe = tmp_path / "png"
    subprocess.run([CXX, "-std=c++17", "-O1", f"-I{ROOT / 'examples' / 'cpp'}", str(tmp_path / "main.cpp"),
                    str(ROOT / "examples" / "cpp" / "png.cpp"), "-o", str(exe)], check=True)
    subprocess.run([str(exe), str(tmp_path / "x.png")], check=True)
    data = (tmp_path / "x.png").read_bytes()
    chunks, pos = {}, 8
    while pos < len(data):  # every chunk's CRC; zlib.decompress checks the stream's Adler-32
        size = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + size]
        assert int.from_bytes(data[pos + 8 + size:pos + 12 + size], "big") == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + size
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"] and len(zlib.decompress(chunks[b"IDAT"])) == 257 * (1 + 900)
    i = np.arange(300 * 257 * 3)
    image = Image.open(tmp_path / "x.png")
    assert image.mode == "RGB" and np.array_equal(np.asarray(image).ravel(), ((i * 7) ^ (i >> 9)).astype(np.uint8))
