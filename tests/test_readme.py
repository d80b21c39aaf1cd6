"""Every shell and Python block of README.md and examples/*/README.md runs, so the READMEs cannot drift from the
code.

The blocks run in a scratch workspace laid out with what they name that a reader brings: a CompVis cin256
config + checkpoint at models/ldm/cin256/ (reduced width, random weights), an in.png, and a diffusers SD-v1
folder at path/to/diffusers-sd-v1-folder (tiny, random, saved by diffusers itself). What cannot exist here is
replaced by the table below, each entry with its reason; nothing is skipped silently, and an entry that no
longer matches its block fails.
"""
import json
import runpy

import numpy as np
import pytest
import torch
from PIL import Image

import ldmrt
from helpers import ROOT, code_blocks, run_sh, substitute, write_kohya_lora, write_tiny_sd_folder
from ldmrt.testing import reduced_config

# (file, block index) -> substitutions. Blocks are numbered among the file's sh/python blocks.
SD_WEIGHTS = "no SD-v1 weights can be had here: the shipped model stands in"
SUBSTITUTIONS = {
    ("README.md", 0): {
        # `make test` is this very run (CI's command); `make demo` = the install step + `ldmrt demo`.
        "make demo": f"make -s -n -C {ROOT} demo >/dev/null && ldmrt demo -o out.png",
        "make test": f"make -s -n -C {ROOT} test >/dev/null",
    },
    ("README.md", 1): {"--model sd-v1 --ckpt sd-v1-4.ckpt": "--model shapes"},  # SD_WEIGHTS
    ("README.md", 2): {'Engine.build("sd-v1", "engines/sd", ckpt="sd-v1-4.ckpt")': 'Engine.build("shapes", "engines/sd")'},
    ("README.md", 3): {'ldmrt.load_model("sd-v1", "sd-v1-4.ckpt")': 'ldmrt.load_model("shapes")'},  # SD_WEIGHTS
    # A server runs until stopped: tests/test_serve.py runs `ldmrt serve` on a free port and drives it with
    # clients (test_webuiapi_client_unmodified, test_sigterm_drains_in_flight_requests); here its options parse.
    ("README.md", 7): {"ldmrt serve --engine engines/shapes --port 7860": "ldmrt serve --help >/dev/null"},
}
# Blocks that run in another test, which already pays for what they need.
ELSEWHERE = {
    ("examples/cpp/README.md", 0): "tests/test_cpp_host.py: its `host` fixture runs this block (LDMRT_SLOW)",
}
READMES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*/README.md"))]
RUNNABLE = ("sh", "python")


def runnable_blocks():
    return [((readme, i), lang, text) for readme in READMES
            for i, (lang, text) in enumerate(b for b in code_blocks(readme) if b[0] in RUNNABLE)]


def test_every_block_is_run_or_placed():
    keys = [key for key, _, _ in runnable_blocks()]
    assert set(SUBSTITUTIONS) | set(ELSEWHERE) <= set(keys), "a table entry names a block that is gone"
    assert not set(ELSEWHERE) & set(SUBSTITUTIONS)
    assert [lang for _, lang, _ in runnable_blocks()].count("python") >= 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    cin = root / "models" / "ldm" / "cin256"
    cin.mkdir(parents=True)
    cfg = reduced_config("cin256")
    import yaml
    (cin / "config.yaml").write_text(yaml.safe_dump({"model": cfg}))
    ldmrt.save_checkpoint(ldmrt.load_model(cfg, random_weights=True), cin / "model.ckpt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "in.png")
    pytest.importorskip("diffusers")
    write_tiny_sd_folder(root / "path" / "to" / "diffusers-sd-v1-folder", ["a", "red", "circle"])
    for seed, name in enumerate(("style", "detail")):  # kohya-layout LoRAs for that folder (README "LoRA")
        write_kohya_lora(root / f"{name}.safetensors", root / "path" / "to" / "diffusers-sd-v1-folder", seed=seed)
    # An AUTOMATIC1111 textual-inversion file for that folder's 32-wide text encoder (README "Prompts").
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                "name": "my-style"}, root / "my-style.pt")
    return root


@pytest.mark.parametrize("key,lang,text", [pytest.param(*b, id=f"{b[0][0]}-{b[0][1]}") for b in runnable_blocks()
                                            if b[0] not in ELSEWHERE])
def test_block_runs(key, lang, text, workspace, monkeypatch, tmp_path):
    text = substitute(text, SUBSTITUTIONS.get(key, {}))
    cache = tmp_path / "cache"
    if lang == "sh":
        run_sh(text, workspace, env={"LDMRT_CACHE": str(cache)})
    else:
        monkeypatch.chdir(workspace)
        monkeypatch.setenv("LDMRT_CACHE", str(cache))
        script = tmp_path / "block.py"
        script.write_text(text)
        runpy.run_path(str(script), run_name="__main__")


def test_readme_outputs_are_what_they_say(workspace):
    """The blocks above ran in order: their images exist, and PNGs carry their parameters."""
    for name in ("out.png", "dog.png", "img2img.png"):
        assert (workspace / name).is_file(), name
    params = json.loads(Image.open(workspace / "out.png").text["parameters"])
    assert params["prompt"] == "a red circle on a blue background" and params["model"] == "shapes"
