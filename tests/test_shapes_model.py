"""The shipped `shapes` model (ldmrt/assets/shapes) and its prompt-adherence evaluator (ldmrt.adherence).

- The evaluator reads prompts of any wording and measures the procedural training images exactly
  (100% of the attributes on rendered scenes: it is a fair judge of the model).
- The shipped files load through the ordinary loader (config.yaml + model.ckpt + vocab.txt), < 25 MB.
- Golden latents: eager fp32 reproduces the stored final latent of one prompt/seed within relative L2
  GOLDEN_TOL (the stored latent was made by the same code on another CPU; float32 kernels differ in
  the last bits between CPUs, and 10 guided steps amplify that to ~1e-5).
- Adherence: on held-out wordings, every sampler at 20 steps with guidance 5 obeys >= ADHERENCE_MIN
  of the attribute checks.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ldmrt
from ldmrt import adherence, sampling

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "ldmrt" / "assets" / "shapes"
GOLDEN = ASSETS / "golden.npz"
GOLDEN_TOL = 1e-3
ADHERENCE_MIN = 0.85
# Held-out wordings (phrase orders the training captions never use), one per shape kind and background.
PROMPTS = [
    "in the top left, a large red circle on a white background",
    "black background, a big blue square at the right",
    "a large yellow triangle against a gray background in the bottom right corner",
    "at the bottom, a small green circle on a black backdrop",
    "white background, a huge purple box in the upper left",
    "to the left, a big orange triangle on a black background",
]


@pytest.fixture(scope="module")
def training_dataset():
    sys.path.insert(0, str(ROOT / "training"))
    try:
        import dataset
    finally:
        sys.path.remove(str(ROOT / "training"))
    return dataset


@pytest.fixture(scope="module")
def model():
    if not (ASSETS / "model.ckpt").is_file():
        pytest.skip("the shapes model is not in ldmrt/assets/shapes (train it: training/README.md)")
    return ldmrt.load_model(ASSETS / "config.yaml", ASSETS / "model.ckpt")


# ---- the evaluator --------------------------------------------------------------------------------

def test_parse_prompt_reads_any_wording():
    spec = adherence.parse_prompt("Grey backdrop, and a tiny purple ball in the upper right corner")
    assert spec.background == "gray"
    assert spec.shapes == [adherence.ShapeSpec("purple", "circle", "small", "top right")]
    spec = adherence.parse_prompt("a red box on the left and a big blue triangle at the bottom, white background")
    assert spec.background == "white"
    assert spec.shapes == [adherence.ShapeSpec("red", "square", None, "left"),
                           adherence.ShapeSpec("blue", "triangle", "large", "bottom")]
    assert adherence.parse_prompt("a green dot centered").shapes[0].position == "center"
    assert adherence.parse_prompt("").shapes == []


def test_evaluator_measures_training_images_exactly(training_dataset):
    ds = training_dataset
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(150):
        scene = ds.random_scene(rng, two_shape_prob=0.3)
        image = ds.render(scene, rng)
        scores.append(adherence.score(ds.caption(scene, rng, ds.HELDOUT_TEMPLATES, complete=True), image))
    summary = adherence.summarize(scores)
    assert summary["all"] == 1.0, summary


def test_evaluator_rejects_wrong_images(training_dataset):
    ds = training_dataset
    rng = np.random.default_rng(1)
    shape = ds.random_shape(rng, colour="red", kind="circle", size="large", position="left")
    image = ds.render(ds.Scene("white", [shape]), rng)
    assert adherence.score("a large red circle on the left on a white background", image) == dict(
        background=True, colour=True, position=True, size=True, kind=True)
    assert adherence.score("a small blue square on the right, black background", image) == dict(
        background=False, colour=False, position=False, size=False, kind=False)


def test_heldout_prompts_are_not_training_captions(training_dataset):
    ds = training_dataset
    rng = np.random.default_rng(2)
    train = {ds.caption(ds.random_scene(rng), rng) for _ in range(5000)}
    heldout = [p for p, _ in ds.evaluation_prompts(200)] + PROMPTS
    assert not train.intersection(heldout)


# ---- the shipped model ----------------------------------------------------------------------------

def test_shipped_files_are_small_and_load(model):
    total = sum(f.stat().st_size for f in ASSETS.iterdir() if f.is_file())
    assert total < 25e6, f"{total / 1e6:.1f} MB"
    ids = model.cond_stage_model.tknz_fn(["a red circle"])
    assert ids.shape == (1, model.cond_stage_model.transformer.max_seq_len)
    assert (ids != 1).all(), "caption words must be in the vocabulary ([UNK] = 1)"


def test_golden_latents(model):
    if not GOLDEN.is_file():
        pytest.skip(f"{GOLDEN} missing (written by training/export_assets.py)")
    golden = np.load(GOLDEN)
    latents, _ = adherence.eager_generate(model, [str(golden["prompt"])], sampler=str(golden["sampler"]),
                                          steps=int(golden["steps"]), guidance_scale=float(golden["guidance"]),
                                          seed=int(golden["seed"]))
    expected = golden["latent"]
    err = np.linalg.norm(latents.numpy() - expected) / np.linalg.norm(expected)
    assert err < GOLDEN_TOL, err


def _adherence(model, sampler):
    _, images = adherence.eager_generate(model, PROMPTS, sampler=sampler, steps=20, guidance_scale=5.0)
    return adherence.summarize([adherence.score(p, im) for p, im in zip(PROMPTS, images)])


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_adherence_every_sampler(model, sampler):
    """Colour, background, size and kind: what the shipped model obeys today."""
    summary = _adherence(model, sampler)
    for attribute in ("colour", "background", "size", "kind"):
        assert summary[attribute] >= ADHERENCE_MIN, (attribute, summary)


@pytest.mark.xfail(strict=True, reason="issue 5 open: the shipped model does not place shapes where the prompt "
                   "says yet (held-out position adherence 0.17 at 6000 steps); strict, so it fails once it does")
def test_position_adherence(model):
    summary = _adherence(model, "ddim")
    assert summary["position"] >= ADHERENCE_MIN, summary
