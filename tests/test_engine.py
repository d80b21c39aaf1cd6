"""Engines: build/load round trips for each model family, parity with eager PyTorch, bad folders, the CLI."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import ldmrt
from ldmrt.engine import Engine, EngineError
from ldmrt.sampling import randn, sample
from ldmrt.testing import reduced_config
from helpers import rel_l2

WORDS = "a red green blue circle square on the left right of background".split()
BACKENDS = ["torch", pytest.param("onnxruntime", marks=pytest.mark.filterwarnings("ignore"))]
TOL = {"torch": 1e-6, "onnxruntime": 1e-4}  # fp32 rel L2 of final latents vs eager


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return d


def small(name, size=None):
    cfg = reduced_config(name)
    if size:
        cfg["params"]["image_size"] = size
    return cfg


def eager_latent(cfg, cond_fn, shape, *, seed=0, steps=4, sampler="ddim", guidance=None, tokenizer=None, **kw):
    """The reference: the same weights in eager PyTorch, the same noise, the same C++ loop."""
    model = ldmrt.load_model(cfg, random_weights=True, tokenizer=tokenizer)
    cond = cond_fn(model)

    def eps_fn(x, t):
        return model.apply_model(x, torch.full((x.shape[0],), t), cond)
    with torch.no_grad():
        return sample(eps_fn, torch.from_numpy(randn(seed, shape)), sampler=sampler, steps=steps,
                      alphas_cumprod=model.schedule_alphas_cumprod, guidance_scale=guidance, seed=seed, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_to_image_matches_eager(backend, vocab, tmp_path):
    cfg = small("txt2img", size=8)
    engine = Engine.build(cfg, tmp_path / "e", backend=backend, random_weights=True, tokenizer=vocab, progress=None)
    got = engine.generate("a red circle on the left", steps=4, guidance_scale=4.0, seed=5, output_type="latent")

    def cond(model):
        c = model.get_learned_conditioning(["", "a red circle on the left"])
        return c
    ref = eager_latent(cfg, cond, (1, 4, 8, 8), seed=5, guidance=4.0, tokenizer=vocab)
    assert rel_l2(got, ref) < TOL[backend]
    images = engine.generate("a red circle on the left", steps=2, seed=5, batch_size=2)
    assert len(images) == 2 and images[0].size == (64, 64)
    again = Engine.load(tmp_path / "e").generate("a red circle on the left", steps=2, seed=5, batch_size=2)
    assert np.array_equal(np.asarray(images[1]), np.asarray(again[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_conditional_and_unconditional(backend, tmp_path):
    cfg = small("cin256", size=8)
    engine = Engine.build(cfg, tmp_path / "c", backend=backend, random_weights=True, progress=None)
    got = engine.generate(class_label=7, steps=4, output_type="latent")
    ref = eager_latent(cfg, lambda m: m.get_learned_conditioning(torch.tensor([7])), (1, 4, 8, 8))
    assert rel_l2(got, ref) < TOL[backend]
    with pytest.raises(ValueError, match="no unconditional input"):
        engine.generate(class_label=7, guidance_scale=3.0)
    with pytest.raises(ValueError, match="give class_label"):
        engine.generate()

    cfg = small("celeba256", size=8)
    engine = Engine.build(cfg, tmp_path / "u", backend=backend, random_weights=True, progress=None)
    got = engine.generate(steps=4, sampler="plms", output_type="latent")
    assert rel_l2(got, eager_latent(cfg, lambda m: None, (1, 3, 8, 8), sampler="plms")) < TOL[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_concat_models(backend, tmp_path):
    """bsr_sr (low-res image concatenated) and inpainting_big (masked image encoding + mask)."""
    g = torch.Generator().manual_seed(0)
    cfg = small("bsr_sr", size=8)
    engine = Engine.build(cfg, tmp_path / "sr", backend=backend, random_weights=True, progress=None)
    low = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    got = engine.generate(low_res_image=low, steps=4, output_type="latent")
    assert rel_l2(got, eager_latent(cfg, lambda m: low, (1, 3, 8, 8))) < TOL[backend]
    assert engine.generate(low_res_image=low, steps=2, output_type="np").shape == (1, 32, 32, 3)

    cfg = small("inpainting_big", size=8)
    engine = Engine.build(cfg, tmp_path / "ip", backend=backend, random_weights=True, progress=None)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1
    got = engine.generate(init_image=image, mask=mask, steps=4, output_type="np")

    def cond(m):
        mm = mask[None, None]
        c = m.get_learned_conditioning((1 - mm) * image)
        return torch.cat([c, torch.nn.functional.interpolate(mm, size=c.shape[-2:])], dim=1)
    ref_latent = eager_latent(cfg, cond, (1, 3, 8, 8))
    ref_model = ldmrt.load_model(cfg, random_weights=True)
    with torch.no_grad():
        ref = ref_model.decode_first_stage(ref_latent)
    ref = (1 - mask) * image + mask * ref
    assert rel_l2(torch.from_numpy(got).permute(0, 3, 1, 2), ((ref.clamp(-1, 1) + 1) / 2)) < 10 * TOL[backend]
    outside = torch.from_numpy(got)[0, :8].permute(2, 0, 1)
    assert torch.allclose(outside, ((image[0, :, :8] + 1) / 2), atol=1e-6)  # known pixels are kept


def test_img2img_and_masked_img2img(vocab, tmp_path):
    cfg = small("txt2img", size=8)
    engine = Engine.build(cfg, tmp_path / "e", backend="torch", random_weights=True, tokenizer=vocab, progress=None)
    init = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    a = engine.generate("a blue square", init_image=init, strength=0.5, steps=4, output_type="latent")
    b = engine.generate("a blue square", init_image=init, strength=0.5, steps=4, output_type="latent")
    assert torch.equal(a, b)
    mask = np.zeros((64, 64), np.float32)
    mask[:, 32:] = 1  # repaint the right half
    c = engine.generate("a blue square", init_image=init, mask=mask, steps=4, output_type="latent")
    assert c.shape == a.shape and torch.isfinite(c).all()
    with pytest.raises(ValueError, match="mask needs init_image"):
        engine.generate("x", mask=mask)


def test_bad_sizes_and_inputs(vocab, tmp_path):
    engine = Engine.build(small("txt2img", size=8), tmp_path / "e", backend="torch", random_weights=True,
                          tokenizer=vocab, progress=None)
    with pytest.raises(ValueError, match="multiples of 64"):
        engine.generate("a", height=100, width=64)
    with pytest.raises(ValueError, match="give a prompt"):
        engine.generate()
    with pytest.raises(ValueError, match="latents have shape"):
        engine.generate("a", latents=torch.zeros(1, 4, 9, 9))
    with pytest.raises(ValueError, match="output_type"):
        engine.generate("a", output_type="jpeg")


@pytest.fixture()
def built(tmp_path):
    engine = Engine.build(small("celeba256", size=8), tmp_path / "e", backend="onnxruntime", random_weights=True,
                          progress=None)
    return engine.path


def test_corrupt_engines_get_clear_errors(built):
    manifest = json.loads((built / "manifest.json").read_text())
    graph = built / manifest["graphs"]["unet"]["file"]
    data = graph.read_bytes()
    graph.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(EngineError, match="does not match its sha256"):
        Engine.load(built)
    graph.write_bytes(data[:100])
    with pytest.raises(EngineError, match="truncated or replaced"):
        Engine.load(built)
    graph.unlink()
    with pytest.raises(EngineError, match="is missing unet"):
        Engine.load(built)
    (built / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="manifest.json is corrupt"):
        Engine.load(built)
    (built / "manifest.json").unlink()
    with pytest.raises(EngineError, match="has no manifest.json"):
        Engine.load(built)
    with pytest.raises(EngineError, match="no engine at"):
        Engine.load(built / "nope")


def test_version_mismatch_says_rebuild(built):
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["ldmrt_version"] = "0.0.1"
    (built / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"built by ldmrt 0.0.1.*rebuild it: ldmrt build"):
        Engine.load(built)
    manifest["ldmrt_version"], manifest["device"] = ldmrt.__version__, {"type": "cuda", "name": "NVIDIA H200",
                                                                          "capability": "9.0"}
    (built / "manifest.json").write_text(json.dumps(manifest))
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="built for NVIDIA H200"):
            Engine.load(built)


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import ldmrt.export.onnx as exporter

    def boom(*a, **k):
        raise RuntimeError("export failed")
    monkeypatch.setattr(exporter, "export_onnx", boom)
    with pytest.raises(RuntimeError, match="export failed"):
        Engine.build(small("celeba256", size=8), tmp_path / "e", random_weights=True, progress=None)
    assert list(tmp_path.iterdir()) == []


def test_rebuild_replaces_an_engine_atomically(built):
    old = json.loads((built / "manifest.json").read_text())["created"]
    Engine.build(small("celeba256", size=8), built, backend="torch", random_weights=True, progress=None)
    assert json.loads((built / "manifest.json").read_text())["backend"] == "torch"
    assert [p.name for p in built.parent.iterdir()] == [built.name]
    assert old


def test_cli_build_and_generate(vocab, tmp_path, capsys):
    import yaml

    from ldmrt.checkpoint import save_checkpoint
    from ldmrt.cli import main
    cfg = small("txt2img", size=8)
    model = ldmrt.load_model(cfg, random_weights=True)
    (tmp_path / "m").mkdir()
    save_checkpoint(model, tmp_path / "m" / "model.ckpt")
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump({"model": cfg}))
    shutil.copy(vocab / "vocab.txt", tmp_path / "m" / "vocab.txt")
    assert main(["build", "--model", str(tmp_path / "m" / "config.yaml"), "--ckpt", str(tmp_path / "m" / "model.ckpt"),
                 "-o", str(tmp_path / "eng")]) == 0
    out = tmp_path / "img.png"
    argv = ["generate", "a red circle", "--engine", str(tmp_path / "eng"), "--steps", "4", "--seed", "2",
            "--quiet", "-o", str(out)]
    assert main(argv) == 0
    png = Image.open(out)
    params = json.loads(png.text["parameters"])
    assert params["prompt"] == "a red circle" and params["seed"] == 2 and params["steps"] == 4
    assert png.text["ldmrt-command"].startswith("ldmrt generate 'a red circle'")
    assert main(["generate", "x", "--engine", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no engine at" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main(["generate", "x", "--engine", str(tmp_path / "eng"), "--height", "65", "-o",
                 str(tmp_path / "y.png")]) == 2
    assert "multiples of 64" in capsys.readouterr().err


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_caching_and_guidance_interval_match_float64_reference(backend, vocab, tmp_path):
    """cache_interval and guidance_interval on an engine against a float64 eager reference that applies DeepCache
    and the interval by hand (full UNet where step % N == 0 or guidance switches, its shallow branch elsewhere)."""
    from ldmrt.export.graphs import DEEP_CACHE_KEEP
    from ldmrt.testing import sampling_reference

    cfg, prompt, steps, interval, n = small("txt2img", size=8), "a red circle on the left", 6, (0, 0.5), 2
    engine = Engine.build(cfg, tmp_path / "e", backend=backend, random_weights=True, tokenizer=vocab, progress=None)
    kw = dict(sampler="dpmpp_2m", steps=steps, guidance_scale=4.0, seed=5, timestep_spacing="karras")
    got = engine.generate(prompt, output_type="latent", cache_interval=n, guidance_interval=interval, **kw)

    model = ldmrt.load_model(cfg, random_weights=True, tokenizer=vocab).double()
    with torch.no_grad():
        context = model.get_learned_conditioning(["", prompt])
    state = {"calls": 0, "deep": None, "guided": None}

    def eps_fn(x, t):
        k, state["calls"] = state["calls"], state["calls"] + 1
        guided = interval[0] <= k / steps < interval[1]
        full = k % n == 0 or guided != state["guided"]
        x = torch.as_tensor(x)
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        c = [context if guided else context[1:]]
        with torch.no_grad():
            if full:
                out, state["deep"] = model.model(x, tt, c_crossattn=c, keep=DEEP_CACHE_KEEP)
                state["guided"] = guided
            else:
                deep = state["deep"] if state["deep"].shape[0] == x.shape[0] else state["deep"][-x.shape[0]:]
                out = model.model(x, tt, c_crossattn=c, deep=deep, keep=DEEP_CACHE_KEEP)
        return out.numpy()

    x_T = randn(5, (1, 4, 8, 8)).astype(np.float64)
    want = sampling_reference.sample_reference(eps_fn, x_T, sampler="dpmpp_2m", steps=steps, timestep_spacing="karras",
                                               alphas_cumprod=model.schedule_alphas_cumprod, guidance_scale=4.0,
                                               guidance_interval=interval)
    assert state["calls"] == steps
    print(f"{backend}: cached + interval vs float64 reference, rel L2 {rel_l2(got, want):.1e}")
    assert rel_l2(got, want) < 1e-4
    exact = engine.generate(prompt, output_type="latent", **kw)
    assert rel_l2(got, exact) > 1e-3  # the approximation was applied
    record = json.loads(engine.generate(prompt, cache_interval=n, guidance_interval=interval, **kw)[0].info["parameters"])
    assert record["cache_interval"] == 2 and record["guidance_interval"] == [0.0, 0.5]
