"""The paper's conditioning tasks through Engine and the CLI: layouts as taming's builder tokenizes them, segmentation
maps, the inputs each family takes (and the refusal of any other), and every preset generating end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldmrt
from ldmrt.config import preset_names
from ldmrt.engine import Engine
from ldmrt.errors import CheckpointError, InputError
from ldmrt.layout import layout_tokens, num_classes
from ldmrt.sampling import randn, sample
from ldmrt.testing import reduced_config, write_clip_tokenizer
from helpers import rel_l2, write_tiny_sd_folder

FIXTURES = Path(__file__).with_name("fixtures")
WORDS = "a red green blue circle square on the left right of background".split()
DOG = {"class": "Dog", "box": [0.1, 0.2, 0.6, 0.9]}


def small(name, size=8):
    cfg = reduced_config(name)
    cfg["params"]["image_size"] = size
    return cfg


def eager_latent(cfg, cond, shape, *, seed=0, steps=4):
    """The same random weights in eager PyTorch, the same noise and C++ loop (unguided)."""
    model = ldmrt.load_model(cfg, random_weights=True)
    c = cond(model)
    with torch.no_grad():
        return sample(lambda x, t: model.apply_model(x, torch.full((x.shape[0],), t), c),
                      torch.from_numpy(randn(seed, shape)), sampler="ddim", steps=steps,
                      alphas_cumprod=model.schedule_alphas_cumprod, seed=seed)


# --- layout-to-image ------------------------------------------------------------------------------------------
def test_layout_tokens_match_taming_builder():
    """Id for id the sequences of taming's ObjectsBoundingBoxConditionalBuilder (tests/fixtures/README.md)."""
    cases = json.loads((FIXTURES / "layout_tokens.json").read_text())["cases"]
    assert len(cases) == 12 and num_classes() == 340
    for case in cases:
        assert layout_tokens(case["layout"], 8192, 92).tolist() == case["tokens"], case["layout"]
    # numpy numbers and arrays are numbers and lists
    as_numpy = [{"class": np.int64(o["class"]), "box": np.array(o["box"])} for o in cases[2]["layout"]]
    assert layout_tokens(as_numpy, 8192, 92).tolist() == cases[2]["tokens"]


@pytest.mark.parametrize("layout, match", [
    ([{"class": "Unicorn", "box": [0, 0, 1, 1]}], "not an OpenImages class"),
    ([{"class": 340, "box": [0, 0, 1, 1]}], r"number in 0\.\.339"),
    ([{"class": "Dog", "box": [0.5, 0, 0.5, 1]}], "0 <= x0 < x1 <= 1"),
    ([{"class": "Dog", "box": [0, 0, 1.2, 1]}], "0 <= x0 < x1 <= 1"),
    ([{"class": "Dog", "box": [0, 0, 1]}], "four numbers"),
    ([{"class": "Dog", "box": [0, 0, 1, 1], "colour": "red"}], "unknown keys"),
    ([{"class": "Dog", "box": [0, 0, 1, 1], "occluded": 1}], "true or false"),
    ([DOG] * 31, "at most 30"),
    ({"class": "Dog"}, "must be a list"),
])
def test_bad_layouts_are_named(layout, match):
    with pytest.raises(InputError, match=match):
        layout_tokens(layout, 8192, 92)


@pytest.fixture(scope="module")
def layout_engine(tmp_path_factory):
    return Engine.build(small("layout2img-openimages256"), tmp_path_factory.mktemp("layout") / "e", backend="torch",
                        random_weights=True, progress=None)


def test_layout_model_matches_eager(layout_engine):
    layout = [DOG, {"class": "Person", "box": [0.5, 0.1, 0.9, 0.8], "group_of": True}]
    got = layout_engine.generate(layout=layout, steps=4, output_type="latent")
    ids = layout_tokens(layout, 8192, 92)[None]
    ref = eager_latent(small("layout2img-openimages256"), lambda m: m.get_learned_conditioning(ids), (1, 3, 8, 8))
    assert rel_l2(got, ref) < 1e-6
    images = layout_engine.generate(layout=[layout, []], steps=1)  # one layout per image; the empty one too
    assert len(images) == 2 and json.loads(images[0].info["parameters"])["layout"] == layout


# --- semantic synthesis ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_engine(tmp_path_factory):
    return Engine.build(small("semantic_synthesis256"), tmp_path_factory.mktemp("seg") / "e", backend="torch",
                        random_weights=True, progress=None)


def one_hot(seg, size):
    m = torch.nn.functional.interpolate(torch.as_tensor(seg)[None, None].float(), size=size, mode="nearest")
    return torch.nn.functional.one_hot(m[0, 0].long(), 182).permute(2, 0, 1)[None].float()


def test_semantic_synthesis_matches_eager(seg_engine, tmp_path):
    assert seg_engine.summary["segmentation_classes"] == 182
    seg = np.random.default_rng(0).integers(0, 182, (32, 32))
    got = seg_engine.generate(segmentation=seg, steps=4, output_type="latent")
    cfg = small("semantic_synthesis256")
    ref = eager_latent(cfg, lambda m: m.get_learned_conditioning(one_hot(seg, (32, 32))), (1, 3, 8, 8))
    assert rel_l2(got, ref) < 1e-6
    # another size than the map's: the map resized nearest to it; a PNG of indices gives the same as the array
    small_map = seg[::2, ::2].astype(np.uint8)
    Image.fromarray(small_map, mode="L").save(tmp_path / "map.png")
    got = seg_engine.generate(segmentation=tmp_path / "map.png", steps=4, height=32, width=64, output_type="latent")
    ref = eager_latent(cfg, lambda m: m.get_learned_conditioning(one_hot(small_map, (32, 64))), (1, 3, 8, 16))
    assert rel_l2(got, ref) < 1e-6


def test_bad_segmentation_maps_are_named(seg_engine, tmp_path):
    seg = np.zeros((32, 32), np.int64)
    for bad, match in [(seg + 182, r"class index 182; this model knows 182 classes \(0\.\.181\)"),
                       (seg - 1, "class index -1"), (seg.astype(np.float32), "integer class indices"),
                       (seg[None, None], r"\(H, W\) or \(B, H, W\)")]:
        with pytest.raises(InputError, match=match):
            seg_engine.generate(segmentation=bad, steps=1)
    Image.new("RGB", (32, 32)).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="not mode RGB"):
        seg_engine.generate(segmentation=tmp_path / "rgb.png", steps=1)
    with pytest.raises(InputError, match="multiples of 16"):
        seg_engine.generate(segmentation=np.zeros((40, 32), np.int64), steps=1)


# --- what each family takes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    tokenizer = tokenizer_for(small("txt2img"), folder / "vocab")
    return Engine.build(small("txt2img"), folder / "e", backend="torch", random_weights=True, tokenizer=tokenizer,
                        progress=None)


@pytest.mark.parametrize("given, match", [
    ({"class_label": 3}, "this text-to-image model takes no class_label"),
    ({"layout": [DOG]}, "this text-to-image model takes no layout"),
    ({"segmentation": np.zeros((64, 64), np.int64)}, "this text-to-image model takes no segmentation"),
    ({"low_res_image": np.zeros((16, 16, 3), np.uint8)}, "this text-to-image model takes no low_res_image"),
])
def test_text_model_refuses_other_families_inputs(given, match, text_engine):
    with pytest.raises(InputError, match=match):
        text_engine.generate("a red circle", steps=1, **given)


def test_text_model_takes_the_empty_prompt(text_engine):
    assert text_engine.generate("", steps=2, output_type="latent").shape == (1, 4, 8, 8)  # unconditional
    with pytest.raises(InputError, match="give a prompt"):
        text_engine.generate(steps=1)
    with pytest.raises(InputError, match="negative_prompt needs classifier-free guidance"):
        text_engine.generate("a red circle", negative_prompt="blue", guidance_scale=1.0, steps=1)


def test_other_families_refuse_what_they_do_not_take(layout_engine, seg_engine):
    with pytest.raises(InputError, match=r"layout-to-image model takes no prompt .*it takes layout"):
        layout_engine.generate("a dog", steps=1)
    with pytest.raises(InputError, match="give layout"):
        layout_engine.generate(steps=1)
    with pytest.raises(InputError, match="semantic-synthesis model takes no negative_prompt"):
        seg_engine.generate(negative_prompt="blurry", segmentation=np.zeros((32, 32), np.int64), steps=1)
    with pytest.raises(InputError, match="semantic-synthesis model takes no layout"):
        seg_engine.generate(layout=[DOG], segmentation=np.zeros((32, 32), np.int64), steps=1)


# --- SD inpainting (RunwayML's LatentInpaintDiffusion) -----------------------------------------------------------
@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory):
    return write_tiny_sd_folder(tmp_path_factory.mktemp("inpainting") / "sd", WORDS, inpainting=True)


def inpainting_inputs(size=32):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    m = np.zeros((size, size), np.uint8)
    m[8:24, 4:20] = 255
    return image, Image.fromarray(m, mode="L")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the tiny folder's PNDM steps_offset (replaced by DDIM here)
def test_sd_inpainting_matches_diffusers(inpainting_folder, tmp_path, monkeypatch):
    """The same x_T, DDIM with guidance, fp32: ldmrt's image against StableDiffusionInpaintPipeline's. The
    masked image's posterior sample is the one random draw inside diffusers: given ldmrt's Philox noise."""
    import diffusers
    import transformers
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    engine = Engine.build(inpainting_folder, tmp_path / "e", backend="torch", progress=None)
    assert engine.summary["conditioning"] == "text_inpainting"
    image, mask = inpainting_inputs()
    seed, steps, shape = 3, 10, (1, 4, 16, 16)
    x_T = torch.from_numpy(randn(seed, shape))
    ours = engine.generate("a red circle", init_image=image, mask=mask, latents=x_T, steps=steps, guidance_scale=5.0,
                           seed=seed, sampler="ddim", timestep_spacing="uniform", output_type="np")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(inpainting_folder / "tokenizer", model_max_length=77)
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpainting_folder, tokenizer=tokenizer,
                                                                    safety_checker=None, requires_safety_checker=False)
    # CompVis DDIM = diffusers' with SD's scheduler settings (leading, offset 1, final alpha a_0, no clipping)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False, steps_offset=1,
                                                         timestep_spacing="leading", clip_sample=False)
    noise = torch.from_numpy(randn(seed, shape, stream=1 << 32))  # ldmrt's encode(): mean + std * this
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean + self.std * noise)
    ref = pipe("a red circle", image=image, mask_image=mask, latents=x_T.clone(), num_inference_steps=steps,
               guidance_scale=5.0, height=32, width=32, output_type="np").images
    assert rel_l2(torch.from_numpy(ours), torch.from_numpy(ref)) <= 1e-4  # measured 9.1e-7


def test_sd_inpainting_preset_is_sd_v1_with_a_9_channel_input():
    """Full size on the meta device: SD v1 plus conv_in's 5 more input channels (RunwayML's published
    v1-inpainting-inference.yaml gives the same counts: 859,535,364 in the UNet)."""
    from ldmrt.info import model_info
    inpainting, sd = model_info("sd-v1-inpainting")["parameters"], model_info("sd-v1")["parameters"]
    assert inpainting["unet"] == sd["unet"] + 5 * 320 * 3 * 3 == 859_535_364
    assert (inpainting["first_stage"], inpainting["cond_stage"]) == (sd["first_stage"], sd["cond_stage"])


def test_sd_inpainting_checkpoints_are_recognised(inpainting_folder, tmp_path):
    """A .ckpt / .safetensors of the 9-channel UNet, given with the text-to-image SD config (`--model sd-v1`), loads
    as the inpainting model: the same images as the diffusers folder's."""
    from ldmrt.checkpoint import save_checkpoint
    from ldmrt.diffusers_convert import convert_diffusers_folder
    cfg = convert_diffusers_folder(inpainting_folder)[1]
    assert cfg["target"].endswith("LatentInpaintDiffusion") and cfg["params"]["conditioning_key"] == "hybrid"
    text_to_image = json.loads(json.dumps(cfg))  # what the sd-v1 preset is, at this size
    text_to_image["target"] = "ldm.models.diffusion.ddpm.LatentDiffusion"
    text_to_image["params"].update(conditioning_key="crossattn")
    text_to_image["params"]["unet_config"]["params"]["in_channels"] = 4
    image, mask = inpainting_inputs()
    kw = dict(init_image=image, mask=mask, steps=2, seed=1, output_type="latent")
    folder_engine = Engine.build(inpainting_folder, tmp_path / "f", backend="torch", progress=None)
    want = folder_engine.generate("a red circle", **kw)
    model = ldmrt.load_model(inpainting_folder)
    for suffix in (".ckpt", ".safetensors"):
        save_checkpoint(model, tmp_path / f"model{suffix}")
        engine = Engine.build(text_to_image, tmp_path / suffix[1:], ckpt=tmp_path / f"model{suffix}",
                              tokenizer=inpainting_folder / "tokenizer", backend="torch", progress=None)
        assert engine.summary["conditioning"] == "text_inpainting"
        assert torch.equal(engine.generate("a red circle", **kw), want)
    with pytest.raises(InputError, match="give init_image and mask"):
        engine.generate("a red circle", steps=1)
    save_checkpoint(ldmrt.load_model(text_to_image, random_weights=True), tmp_path / "text.ckpt")
    with pytest.raises(CheckpointError, match="use --model sd-v1"):  # the other way round: said as such
        ldmrt.load_model(cfg, tmp_path / "text.ckpt")
    from ldmrt.cli import main
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    assert main(["generate", "a red circle", "--engine", str(engine.path), "--init-image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--quiet", "-o", str(tmp_path / "out.png")]) == 0
    assert Image.open(tmp_path / "out.png").size == (32, 32)


@pytest.mark.filterwarnings("ignore")  # the ONNX exporter's tracer warnings
@pytest.mark.parametrize("family", ["layout", "segmentation", "sd-inpainting"])
def test_onnxruntime_engines_match_torch(family, layout_engine, seg_engine, inpainting_folder, tmp_path):
    image, mask = inpainting_inputs()
    model, torch_engine, kw = {
        "layout": (small("layout2img-openimages256"), layout_engine, {"layout": [DOG]}),
        "segmentation": (small("semantic_synthesis256"), seg_engine,
                         {"segmentation": np.random.default_rng(0).integers(0, 182, (32, 32))}),
        "sd-inpainting": (inpainting_folder, None, {"prompt": "a red circle", "init_image": image, "mask": mask}),
    }[family]
    random = not isinstance(model, Path)
    torch_engine = torch_engine or Engine.build(model, tmp_path / "t", backend="torch", progress=None)
    engine = Engine.build(model, tmp_path / "o", backend="onnxruntime", random_weights=random, progress=None)
    got, want = (e.generate(steps=4, output_type="latent", **kw) for e in (engine, torch_engine))
    assert rel_l2(got, want) < 1e-4  # fp32 (measured 3e-7 to 2e-6)


# --- every preset, end to end ---------------------------------------------------------------------------------
def inputs_for(engine, size: int) -> dict:
    """Generate's arguments for the family of `engine`, at `size` x `size` pixels."""
    s = engine.summary
    rng = np.random.default_rng(0)
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.float32)
    mask[:, size // 2:] = 1
    inputs = {"text": {"prompt": "a red circle"}, "class": {"class_label": 1}, "none": {},
              "low_res_image": {"low_res_image": image[::s["latent_factor"], ::s["latent_factor"]]},
              "inpainting": {"init_image": image, "mask": mask},
              "segmentation": {"segmentation": rng.integers(0, s.get("segmentation_classes", 1), (size, size))},
              "tokens": {"layout": [DOG]},
              "text_inpainting": {"prompt": "a red circle", "init_image": image, "mask": mask}}
    return inputs[s["conditioning"]] | {"height": size, "width": size}


def tokenizer_for(cfg, folder: Path):
    cond = cfg["params"]["cond_stage_config"]
    target = cond["target"].rsplit(".", 1)[-1] if isinstance(cond, dict) else cond
    if target == "FrozenCLIPEmbedder":
        write_clip_tokenizer(folder, WORDS)
        return folder
    if target == "BERTEmbedder" and cond.get("params", {}).get("use_tokenizer", True):
        folder.mkdir()
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
        return folder
    return None


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_generates(name, tmp_path):
    cfg = small(name)
    engine = Engine.build(cfg, tmp_path / "e", backend="torch", random_weights=True,
                          tokenizer=tokenizer_for(cfg, tmp_path / "tok"), progress=None)
    size = max(engine.summary["default_size"], engine.summary["size_multiple"])  # the smallest size it runs at
    images = engine.generate(steps=2, output_type="np", **inputs_for(engine, size))
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()


def test_cli_generates_layouts_and_segmentations(layout_engine, seg_engine, tmp_path, capsys):
    from ldmrt.cli import main
    (tmp_path / "boxes.json").write_text(json.dumps([DOG, {"class": 7, "box": [0, 0.5, 1, 1]}]))
    out = tmp_path / "layout.png"
    assert main(["generate", "--engine", str(layout_engine.path), "--layout", str(tmp_path / "boxes.json"),
                 "--steps", "1", "--quiet", "-o", str(out)]) == 0
    assert json.loads(Image.open(out).text["parameters"])["layout"][1]["class"] == 7
    Image.fromarray(np.full((32, 32), 5, np.uint8), mode="L").save(tmp_path / "map.png")
    assert main(["generate", "--engine", str(seg_engine.path), "--segmentation", str(tmp_path / "map.png"),
                 "--steps", "1", "--quiet", "-o", str(tmp_path / "seg.png")]) == 0
    assert Image.open(tmp_path / "seg.png").size == (32, 32)
    assert main(["generate", "--engine", str(seg_engine.path), "--segmentation", str(tmp_path / "map.png"),
                 "--class-label", "3", "--steps", "1", "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    assert "takes no class_label" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    (tmp_path / "bad.json").write_text("[{")
    assert main(["generate", "--engine", str(layout_engine.path), "--layout", str(tmp_path / "bad.json"),
                 "--quiet", "-o", str(tmp_path / "x.png")]) == 2
    assert "is not JSON" in capsys.readouterr().err
