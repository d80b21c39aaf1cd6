"""C++ hosts: libldmrt built against the installed package (`python -m ldmrt.cpp build`), the example host
examples/cpp built with find_package(ldmrt), run on an AOTInductor engine and compared with Python's Engine.

The claim is bit-identity, not a tolerance: both sides run the same .pt2 packages through the same libtorch,
tokenise to the same ids, draw the same Philox noise and step the same C++ plan loop, with the same thread
count (inductor kernels and oneDNN split reductions by thread, so a different count may change the last bits).
So the latents must be equal to the bit and the 8-bit images byte for byte. Prompts too: csrc/prompts.cpp against
ldmrt/prompts.py (pieces, windows, weights; no libtorch, not slow), and on a tiny CLIP SD aoti engine long weighted
prompts with BREAK, a negative prompt, CLIP skip and textual-inversion files give Python's latents to the bit.

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


def run_host(example, engine_dir, out_png, prompt, *extra, **flags):
    """extra: more arguments as they are (repeated flags: "--embedding", FILE, "--embedding", FILE2)."""
    args = [str(example), str(engine_dir), prompt, str(out_png), "--threads", str(THREADS), *map(str, extra)]
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


# ---- prompts: csrc/prompts.cpp against ldmrt/prompts.py (no libtorch: the core's sources alone) ----

PROMPT_DRIVER = r"""
#include <cstdio>
#include <iostream>
#include <string>
#include "ldmrt/json.h"
#include "ldmrt/prompts.h"
// prompt_chunks TOKENIZER_DIR KIND LONG(0/1) PROMPTS.json [TRIGGER=VECTORS ...]: one JSON line per prompt.
std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += static_cast<char>(c);
    else if (c < 0x20) { char buf[8]; std::snprintf(buf, sizeof buf, "\\u%04x", c); out += buf; }
    else out += static_cast<char>(c);
  }
  return out + "\"";
}
std::string number(double v) { char buf[32]; std::snprintf(buf, sizeof buf, "%.17g", v); return buf; }
int main(int argc, char** argv) {
  auto tokenizer = ldmrt::Tokenizer::from_folder(argv[1], argv[2]);
  const bool long_prompts = std::string(argv[3]) == "1";
  std::vector<std::pair<std::string, int>> embeddings;
  for (int i = 5; i < argc; ++i) {
    const std::string a = argv[i];
    embeddings.emplace_back(a.substr(0, a.rfind('=')), std::stoi(a.substr(a.rfind('=') + 1)));
  }
  const ldmrt::json::Value prompts = ldmrt::json::Value::parse(ldmrt::json::read_file(argv[4]));
  for (const auto& p : prompts.items()) {
    std::string line = "{\"parsed\": [";
    try {
      for (const auto& piece : ldmrt::parse_prompt(p.as_string()))
        line += "[" + quoted(piece.text) + ", " + (piece.is_break ? "null" : number(piece.weight)) + "], ";
      line += "null], \"chunks\": [";
      for (const auto& c : ldmrt::prompt_chunks(p.as_string(), *tokenizer, long_prompts, embeddings)) {
        line += "{\"ids\": [";
        for (std::size_t i = 0; i < c.ids.size(); ++i) line += (i ? ", " : "") + std::to_string(c.ids[i]);
        line += "], \"weights\": [";
        for (std::size_t i = 0; i < c.weights.size(); ++i) line += (i ? ", " : "") + number(c.weights[i]);
        line += "], \"fixes\": [";
        for (std::size_t i = 0; i < c.fixes.size(); ++i)
          line += (i ? ", [" : "[") + std::to_string(c.fixes[i].first) + ", " + quoted(c.fixes[i].second) + "]";
        line += "]}, ";
      }
      line += "null]}";
    } catch (const ldmrt::PromptError& e) {
      line = "{\"error\": " + quoted(e.what()) + "}";
    }
    std::cout << line << "\n";
  }
}
"""

# Beyond the web UI's fixtures: escapes and stray brackets, BREAK's word boundaries, weights with signs, a bad
# weight, unclosed brackets, a trigger word between windows, an empty prompt.
EXTRA_PROMPTS = ["", "\\(red\\) \\[blue\\] \\\\ \\x", "a) b] :c :1.2) (d:+1.5) (e:-.5) [f", "BREAKa aBREAK a_BREAK",
                 "x BREAK BREAK y", "BREAK", "(a (b [c] d) e", "(a:1.2.3) b", "(a:.) b", "my-style circle " * 30,
                 "a (my-style:1.2) circle, [my-style] ((dog)) my", "tab\tBREAK\nnew line, ü BREAK ü",
                 "(red) my-style, " * 20]


def _python_chunks(prompt, tokenizer, long, embeddings):
    from ldmrt.errors import InputError
    from ldmrt.prompts import chunks, parse
    try:
        parsed = [[p.text, None if p.is_break else p.weight] for p in parse(prompt)]
        got = chunks(prompt, tokenizer, long=long, embeddings=embeddings)
    except InputError as e:
        return {"error": str(e)}
    return {"parsed": parsed, "chunks": [{"ids": c.ids, "weights": c.weights, "fixes": [list(f) for f in c.fixes]}
                                         for c in got]}


@pytest.fixture(scope="module")
def prompt_driver(tmp_path_factory):
    work = tmp_path_factory.mktemp("prompt_driver")
    (work / "main.cpp").write_text(PROMPT_DRIVER)
    exe = work / "prompt_chunks"
    sources = [ROOT / "csrc" / f for f in ("prompts.cpp", "tokenizer.cpp", "json.cpp")]
    subprocess.run([CXX, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'include'}", str(work / "main.cpp"),
                    *map(str, sources), "-o", str(exe)], check=True)
    return exe


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("kind", ["clip", "bert"])
def test_cpp_prompt_chunks_match_python(prompt_driver, tmp_path, kind):
    """parse_prompt and prompt_chunks in C++ against ldmrt/prompts.py, on the 16 web UI fixture prompts and the extra
    ones: the same pieces (weights to the bit), windows, weights and textual-inversion placements, the same errors.
    CLIP with long prompts and two embeddings; BERT with its one window (overflow and BREAK are errors)."""
    from ldmrt.testing import write_clip_tokenizer
    from ldmrt.tokenizer import BertTokenizer, ClipTokenizer
    fixture = json.loads((ROOT / "tests" / "fixtures" / "a1111_prompts.json").read_text())
    prompts = [c["prompt"] for c in fixture["cases"]] + EXTRA_PROMPTS
    folder = tmp_path / "tokenizer"
    if kind == "clip":
        write_clip_tokenizer(folder, fixture["words"])
        tokenizer = ClipTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
        embeddings = {"my-style": 3, "dog": 2}
    else:
        folder.mkdir()
        shutil.copy(Path(ldmrt.__file__).parent / "assets" / "shapes" / "vocab.txt", folder / "vocab.txt")  # shipped
        tokenizer = BertTokenizer.from_file(folder / "vocab.txt")
        embeddings = {}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    done = subprocess.run([str(prompt_driver), str(folder), kind, "1" if kind == "clip" else "0",
                           str(tmp_path / "prompts.json"), *[f"{k}={v}" for k, v in embeddings.items()]],
                          capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert len(lines) == len(prompts)
    errors = 0
    for prompt, line in zip(prompts, lines):
        got = json.loads(line)
        for key in ("parsed", "chunks"):
            if key in got:
                assert got[key].pop() is None  # the driver's list terminator
        want = _python_chunks(prompt, tokenizer, kind == "clip", embeddings)
        assert got == want, prompt
        errors += "error" in want
    assert errors >= (1 if kind == "clip" else 3)  # the bad weights; BERT also overflow and BREAK


# ---- prompts in the host: a tiny CLIP SD engine (long prompts, BREAK, emphasis, CLIP skip, textual inversion) ----

SD_WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left"]
# 80 + 2 tokens, weighted: a full window, the rest, then BREAK's: 3 windows, the most the aoti engine takes
LONG_PROMPT = "a (red:1.3) circle, " * 20 + "[blue] square BREAK on the ((left))"
NEGATIVE = "blurry BREAK (dark:0.8)"  # 2 windows: padded with the empty prompt's to the prompt's 3


@pytest.fixture(scope="module")
def sd_engine(tmp_path_factory):
    """A tiny diffusers SD-v1 folder (random weights, CLIP tokenizer) built with the AOTInductor backend."""
    pytest.importorskip("diffusers")
    from helpers import write_tiny_sd_folder
    work = tmp_path_factory.mktemp("sd_aoti")
    folder = write_tiny_sd_folder(work / "sd", SD_WORDS)
    Engine.build(str(folder), work / "engine", backend="aoti", progress=None)
    return work / "engine"


def write_embedding_files(folder, width):
    """An AUTOMATIC1111 .safetensors (2 vectors, float16), a diffusers learned_embeds.safetensors (one (width,)
    vector, float32) and an AUTOMATIC1111 .pt, which the host refuses."""
    from safetensors.torch import save_file
    folder.mkdir()
    g = torch.Generator().manual_seed(7)
    save_file({"emb_params": torch.randn(2, width, generator=g).half()}, str(folder / "my-style.safetensors"))
    save_file({"<cat-toy>": torch.randn(width, generator=g)}, str(folder / "learned_embeds.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, width, generator=g)}}, folder / "old-style.pt")
    return folder


@slow
@pytest.mark.parametrize("case", [
    dict(prompt=LONG_PROMPT, negative=NEGATIVE, seed=1),
    dict(prompt=LONG_PROMPT, negative=NEGATIVE, seed=2, **{"clip-skip": 2}),
    dict(prompt="a (my-style:1.2) circle, <cat-toy> BREAK [red] square", negative="my-style", seed=3,
         embeddings=["my-style.safetensors", "learned_embeds.safetensors"], **{"clip-skip": 2}),
])
def test_cpp_host_prompts_give_python_latents_bit_for_bit(example, sd_engine, tmp_path, case):
    """The C++ host parses, windows, weighs and encodes prompts as Python's Engine does: same latents to the bit."""
    assert torch.get_num_threads() == THREADS
    engine = Engine.load(sd_engine)
    files = write_embedding_files(tmp_path / "emb", engine.token_table().shape[1])
    embeddings = [files / name for name in case.get("embeddings", ())]
    latent = engine.generate(case["prompt"], negative_prompt=case["negative"], steps=4, seed=case["seed"],
                             sampler="ddim", clip_skip=case.get("clip-skip", 1), embeddings=embeddings,
                             output_type="latent").numpy()
    extra = [a for f in embeddings for a in ("--embedding", f)]
    flags = {k: v for k, v in case.items() if k in ("seed", "negative", "clip-skip")}
    done = run_host(example, sd_engine, tmp_path / "out.png", case["prompt"], *extra, steps=4, sampler="ddim",
                    latent=tmp_path / "latent.f32", **flags)
    assert done.returncode == 0, done.stderr
    cpp_latent = np.fromfile(tmp_path / "latent.f32", dtype=np.float32).reshape(latent.shape)
    assert np.array_equal(cpp_latent, latent), f"max |diff| {np.abs(cpp_latent - latent).max()}"


@slow
def test_cpp_host_refuses_what_python_refuses(example, sd_engine, engine_dir, tmp_path):
    """Never a silent cut: LDM-BERT's one window and the aoti engine's 3 windows give Python's message; a pickled
    embedding is refused with the conversion to use; a bad clip_skip names the range."""
    from ldmrt.errors import InputError
    long_bert = "a red circle on the left " * 20  # over LDM-BERT's 75 tokens
    with pytest.raises(InputError) as python_error:
        Engine.load(engine_dir).generate(long_bert, steps=1)
    done = run_host(example, engine_dir, tmp_path / "x.png", long_bert, steps=1)
    assert done.returncode == 1 and str(python_error.value) in done.stderr and "tokens long" in done.stderr
    four = "a red circle " * 76  # 228 tokens: 4 windows
    with pytest.raises(InputError) as python_error:
        Engine.load(sd_engine).generate(four, steps=1)
    done = run_host(example, sd_engine, tmp_path / "x.png", four, steps=1)
    assert done.returncode == 1 and str(python_error.value) in done.stderr
    files = write_embedding_files(tmp_path / "emb", Engine.load(sd_engine).token_table().shape[1])
    done = run_host(example, sd_engine, tmp_path / "x.png", "a circle", "--embedding", files / "old-style.pt", steps=1)
    assert done.returncode == 1 and "Python pickles" in done.stderr and "old-style.safetensors" in done.stderr
    done = run_host(example, sd_engine, tmp_path / "x.png", "a circle", steps=1, **{"clip-skip": 99})
    assert done.returncode == 1 and "clip_skip must be an integer in 1.." in done.stderr
    done = run_host(example, engine_dir, tmp_path / "x.png", "a circle", "--embedding", files / "my-style.safetensors")
    assert done.returncode == 1 and "takes no textual-inversion embeddings" in done.stderr


# ---- LoRA on aoti engines: Python's backend and the C++ host change the packages' weights in place ----

LORA_SETTINGS = dict(steps=4, seed=5, sampler="ddim")


@pytest.fixture(scope="module")
def sd_loras(sd_engine):
    """A kohya file (LoCon convolutions, text encoder) and a diffusers/PEFT one (lora_alpha in its metadata) for the
    tiny SD folder the aoti engine was built from."""
    pytest.importorskip("peft")
    from helpers import write_kohya_lora, write_peft
    folder = sd_engine.parent / "sd"
    return {"kohya": write_kohya_lora(sd_engine.parent / "kohya.safetensors", folder, seed=1),
            "peft": write_peft(folder, sd_engine.parent / "peft", seed=3)}


@slow
def test_aoti_engine_loras_match_eager_and_switch_back(sd_engine, sd_loras):
    """Two files at strengths 0.8 and -0.5 == ldmrt's eager model with the merged weights (fp32 tolerance; measured
    1.8e-6, the aoti engine's own distance from eager); switching back gives the base bits, and a set again its bits."""
    from helpers import rel_l2
    from ldmrt.backends.torch import TorchBackend
    from ldmrt.checkpoint import load_model
    from ldmrt.lora import lora_deltas, read_lora
    engine = Engine.load(sd_engine)
    base = engine.generate("a red circle", output_type="latent", **LORA_SETTINGS)
    specs = [(str(sd_loras["kohya"]), 0.8), (str(sd_loras["peft"]), -0.5)]
    report = engine.set_loras(specs)
    assert [r.matched for r in report] == [len(read_lora(path).modules) for path, _ in specs]
    model = load_model(str(sd_engine.parent / "sd"))
    params = dict(model.named_parameters())
    deltas, _ = lora_deltas(specs, {n: tuple(p.shape) for n, p in params.items()}, model.ldmrt_config)
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta)
    eager = Engine(engine.path, engine.manifest, TorchBackend(model), engine.tokenizer)
    merged = engine.generate("a red circle", output_type="latent", **LORA_SETTINGS)
    assert rel_l2(merged, eager.generate("a red circle", output_type="latent", **LORA_SETTINGS)) <= 1e-5
    assert rel_l2(merged, base) > 1e-2
    for loras in (specs[:1], [], specs[::-1][:1], specs):
        engine.set_loras(loras)
    assert torch.equal(engine.generate("a red circle", output_type="latent", **LORA_SETTINGS), merged)
    engine.set_loras([])
    assert torch.equal(engine.generate("a red circle", output_type="latent", **LORA_SETTINGS), base)


@slow
def test_cpp_host_loras_give_python_latents_bit_for_bit(example, sd_engine, sd_loras, tmp_path):
    """--lora FILE:STRENGTH, twice: the same deltas, summed in the same order, in the same packages: Python's latents."""
    assert torch.get_num_threads() == THREADS
    kohya, peft = sd_loras["kohya"], sd_loras["peft"]
    latent = Engine.load(sd_engine).generate("a red circle", loras=[(str(kohya), 0.8), (str(peft), -0.5)],
                                             output_type="latent", **LORA_SETTINGS).numpy()
    done = run_host(example, sd_engine, tmp_path / "out.png", "a red circle", "--lora", f"{kohya}:0.8",
                    "--lora", f"{peft}:-0.5", latent=tmp_path / "latent.f32", **LORA_SETTINGS)
    assert done.returncode == 0, done.stderr
    assert f"lora {kohya} at 0.8: " in done.stdout and f"lora {peft} at -0.5: " in done.stdout
    cpp_latent = np.fromfile(tmp_path / "latent.f32", dtype=np.float32).reshape(latent.shape)
    assert np.array_equal(cpp_latent, latent), f"max |diff| {np.abs(cpp_latent - latent).max()}"


@slow
def test_cpp_host_refuses_lora_files_as_python_does(example, sd_engine, sd_loras, tmp_path):
    """A file without LoRA keys, one whose module this model lacks, factors that do not fit: Python's message; a
    pickle: the conversion command; a partial match: applied, with the left-out modules said."""
    from safetensors.torch import load_file, save_file

    from ldmrt.errors import CheckpointError
    kohya = load_file(str(sd_loras["kohya"]))
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    files = {"no_keys": {"foo.weight": torch.zeros(2, 2)},
             "no_match": {"lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2),
                          "lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4)},
             "wrong_shape": {f"{name}.lora_up.weight": torch.zeros(3, 2), f"{name}.lora_down.weight": torch.zeros(2, 5)},
             "partial": {**{k: v for k, v in kohya.items() if k.startswith(name)},
                         "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2),
                         "lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4)}}
    engine = Engine.load(sd_engine)
    for case, tensors in files.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(tensors, str(path))
        done = run_host(example, sd_engine, tmp_path / "x.png", "a circle", "--lora", path, steps=1)
        if case == "partial":
            assert done.returncode == 0, done.stderr
            assert "1 LoRA modules are not in this engine" in done.stderr and "unet:nowhere" in done.stderr
            continue
        with pytest.raises(CheckpointError) as python_error:
            engine.set_loras([(str(path), 1.0)])
        assert done.returncode == 1 and str(python_error.value) in done.stderr, (case, done.stderr)
    torch.save(kohya, tmp_path / "old.pt")
    done = run_host(example, sd_engine, tmp_path / "x.png", "a circle", "--lora", tmp_path / "old.pt", steps=1)
    assert done.returncode == 1 and "Python pickles" in done.stderr and "old.safetensors" in done.stderr
