"""Backends (ldmrt.backends): the torch backend against LatentDiffusion's own API, the ONNX Runtime backend
(CPU provider) against the torch backend, provider choice and fallback, and a sampler loop driving it.

The CUDA / TensorRT paths of OnnxRuntimeBackend (provider options, I/O binding) need a GPU: not run here.
"""
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from ldmrt import sampling
from ldmrt.backends.onnxruntime import OnnxRuntimeBackend
from ldmrt.backends.torch import TorchBackend
from ldmrt.backends.onnxruntime import best_providers
from ldmrt.checkpoint import load_model
from ldmrt.export.onnx import export_onnx
from ldmrt.testing import reduced_config
from helpers import rel_l2

FP32_TOL = 1e-4


def model_for(name: str):
    torch.manual_seed(0)
    return load_model(reduced_config(name), random_weights=True)


@pytest.fixture(scope="module")
def celeba_engine(tmp_path_factory):
    """A reduced unconditional VQ model, its ONNX export and both backends."""
    model = model_for("celeba256")
    out = tmp_path_factory.mktemp("celeba")
    exported = export_onnx(model, out, latent_size=8)
    onnx_backend = OnnxRuntimeBackend({g: out / d["file"] for g, d in exported.items()}, threads=1)
    return model, TorchBackend(model), onnx_backend, out, exported


def test_torch_backend_matches_latent_diffusion_api():
    """Every graph of the contract against get_learned_conditioning / apply_model / decode / encode."""
    model = model_for("sd-v1")
    backend = TorchBackend(model)
    assert backend.graphs == ("cond_stage", "cond_stage_embeds", "unet", "unet_shallow", "decoder", "encoder")
    ids = torch.randint(0, 1000, (2, 77))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        context = model.get_learned_conditioning(ids)
        eps = model.apply_model(x, t, context)
        decoded = model.decode_first_stage(x)
        posterior = model.encode_first_stage(image)
    out = backend.run("cond_stage", cond=ids)
    assert list(out) == ["context", "layer_contexts"] and out["context"].dtype == torch.float32
    assert torch.equal(out["context"], context) and torch.equal(out["layer_contexts"][:, -1], context)
    # After the token lookup (textual inversion): the same context from the looked-up rows.
    rows = model.cond_stage_model.token_embedding.weight[ids]
    assert torch.equal(backend.run("cond_stage_embeds", token_embeds=rows)["context"], context)
    full = backend.run("unet", x=x, t=t, context=context)
    assert torch.equal(full["eps"], eps)
    # The shallow branch on the deep feature of the same x and t is the full UNet, to the bit (DeepCache's premise
    # is only that the deep feature changes slowly between steps).
    taken = {"context": context} if "context" in backend.input_names("unet_shallow") else {}
    assert torch.equal(backend.run("unet_shallow", x=x, t=t, deep=full["deep"], **taken)["eps"], eps)
    assert torch.equal(backend.run("decoder", latent=x)["image"], decoded)
    enc = backend.run("encoder", image=image)
    assert torch.allclose(enc["mean"], model.scale_factor * posterior.mean)
    assert torch.allclose(enc["std"], model.scale_factor * posterior.std)


def test_torch_backend_inpainting_contract():
    """inpainting_big: concat = [encoder mean / scale_factor (CompVis's unscaled h), mask at latent size]."""
    model = model_for("inpainting_big")
    backend = TorchBackend(model)
    assert backend.graphs == ("unet", "unet_shallow", "decoder", "encoder")
    image, mask = torch.rand(1, 3, 32, 32) * 2 - 1, (torch.rand(1, 1, 32, 32) > 0.5).float()
    masked = (1 - mask) * image
    h = backend.run("encoder", image=masked)["mean"] / model.scale_factor
    concat = torch.cat([h, F.interpolate(mask, size=h.shape[-2:])], dim=1)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        c = model.get_learned_conditioning(masked)  # CompVis: cond_stage_model.encode = pre-quant h
        expected = model.apply_model(x, t, torch.cat([c, F.interpolate(mask, size=c.shape[-2:])], dim=1))
    assert torch.allclose(backend.run("unet", x=x, t=t, concat=concat)["eps"], expected, atol=1e-6)


def test_torch_backend_bfloat16():
    model = model_for("cin256")
    backend = TorchBackend(model, dtype=torch.bfloat16)
    context = backend.run("cond_stage", cond=torch.tensor([1, 7]))["context"]
    eps = backend.run("unet", x=torch.randn(2, 4, 8, 8), t=torch.tensor([1.0, 999.0]), context=context)["eps"]
    assert eps.dtype == torch.float32 and eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.first_stage_model.quantize.embedding.weight.dtype == torch.float32  # codebook kept fp32


def test_inputs_are_checked(celeba_engine):
    _, torch_backend, onnx_backend, _, _ = celeba_engine
    for backend in (torch_backend, onnx_backend):
        with pytest.raises(TypeError, match="takes inputs x, t"):
            backend.run("unet", x=torch.randn(1, 3, 8, 8))
        with pytest.raises(KeyError, match="cond_stage"):
            backend.run("cond_stage", cond=torch.zeros(1, dtype=torch.long))


def test_onnxruntime_backend_matches_torch(celeba_engine):
    _, torch_backend, onnx_backend, _, _ = celeba_engine
    assert onnx_backend.graphs == torch_backend.graphs == ("unet", "unet_shallow", "decoder", "encoder")
    assert all(p == ["CPUExecutionProvider"] for p in onnx_backend.providers.values())
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1.0, 250.0, 999.0])  # other batch and size than exported
    image = torch.rand(3, 3, 64, 64) * 2 - 1
    for graph, inputs in (("unet", {"x": x, "t": t}), ("decoder", {"latent": x}), ("encoder", {"image": image})):
        got, expected = onnx_backend.run(graph, **inputs), torch_backend.run(graph, **inputs)
        assert list(got) == list(expected)
        for name in got:
            assert got[name].dtype == torch.float32
            if expected[name].any():
                assert rel_l2(got[name], expected[name]) <= FP32_TOL
            else:  # the std of a VQ first stage
                assert not got[name].any()


def test_provider_choice_and_fallback(celeba_engine):
    *_, out, exported = celeba_engine
    files = {"unet": out / exported["unet"]["file"]}
    assert best_providers() == [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                            "CPUExecutionProvider") if p in ort.get_available_providers()]
    # Providers this build lacks are passed over; with none left the error names what exists.
    backend = OnnxRuntimeBackend(files, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"], threads=1,
                                 optimization_level="basic", cpu_arena=False)
    assert backend.providers["unet"] == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="none of the providers"):
        OnnxRuntimeBackend(files, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="optimization_level"):
        OnnxRuntimeBackend(files, optimization_level="max")


def test_sampler_loop_drives_onnxruntime(celeba_engine):
    """The C++ sampler calls eps_fn with a torch view of its buffer; both backends give the same latent."""
    model, torch_backend, onnx_backend, _, _ = celeba_engine
    x_T = torch.from_numpy(sampling.randn(0, (2, 3, 8, 8)))
    results = []
    for backend in (torch_backend, onnx_backend):
        def eps_fn(x, t, backend=backend):
            return backend.run("unet", x=x, t=torch.full((x.shape[0],), float(t)))["eps"]
        results.append(sampling.sample(eps_fn, x_T.clone(), sampler="ddim", steps=4,
                                       alphas_cumprod=model.schedule_alphas_cumprod))
    assert rel_l2(results[1], results[0]) <= FP32_TOL


def test_a_new_backend_is_one_module(monkeypatch, tmp_path):
    """A backend is one module (NAME, EXTRA, REQUIRES, OPTIONS, export, load; a base.Backend at run time) plus its
    name in ldmrt.backends.BACKENDS: nothing else changes for Engine.build, load and generate to use it."""
    import sys
    import types

    from ldmrt import backends
    from ldmrt.backends import base
    from ldmrt.backends import torch as torch_backend
    from ldmrt.engine import Engine

    runs = []

    class Toy(base.Backend):
        def __init__(self, inner):
            super().__init__({g: inner._io[g] for g in inner.graphs})
            self.inner = inner

        def _run(self, graph, inputs):
            runs.append(graph)
            return self.inner._run(graph, inputs)

    toy = types.ModuleType("ldmrt.backends.toy")
    toy.NAME, toy.EXTRA, toy.REQUIRES, toy.OPTIONS, toy.GRAPHS = "toy", None, (), (), torch_backend.GRAPHS
    toy.export = torch_backend.export
    toy.load = lambda folder, manifest, **kw: Toy(torch_backend.load(folder, manifest, **kw))
    monkeypatch.setitem(sys.modules, "ldmrt.backends.toy", toy)
    monkeypatch.setattr(backends, "BACKENDS", (*backends.BACKENDS, "toy"))

    engine = Engine.build("shapes", tmp_path / "toy", backend="toy", progress=None)
    assert engine.manifest["backend"] == "toy" and Engine.load(engine.path).manifest["backend"] == "toy"
    got = engine.generate("a red circle", steps=2, output_type="latent")
    want = Engine.build("shapes", tmp_path / "torch", backend="torch", progress=None).generate(
        "a red circle", steps=2, output_type="latent")
    assert torch.equal(got, want) and runs.count("unet") == 2 and "cond_stage" in runs


@pytest.mark.parametrize("flags,expected", [({"avx2"}, "fp32"), ({"avx2", "avx512_bf16"}, "bf16"),
                                            ({"amx_tile", "amx_bf16"}, "bf16")])
def test_fp16_on_a_cpu_means_bf16_only_where_the_cpu_has_it(monkeypatch, tmp_path, flags, expected):
    """`--fp16` for CPU engines: bf16 where the CPU has bf16 instructions, fp32 where bf16 would be emulated
    (slower than fp32); the manifest and Engine.precision say what runs."""
    from ldmrt import machine
    from ldmrt.engine import Engine
    real = machine.cpu_features()
    monkeypatch.setattr(machine, "cpu_features", lambda: {**real, "flags": {f: f in flags for f in machine.CPU_FLAGS}})
    assert machine.cpu_reduced_precision() == expected
    engine = Engine.build("shapes", tmp_path / "e", backend="torch", fp16=True, progress=None)
    assert engine.manifest["precision"] == expected and engine.precision == expected
    assert engine.backend.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)
    if expected == "fp32":  # OpenVINO on an AVX2-only CPU: the manifest and the compiled model say f32
        pytest.importorskip("openvino")
        engine = Engine.build("shapes", tmp_path / "ov", backend="openvino", fp16=True, progress=None)
        assert engine.manifest["precision"] == "fp32"
        engine.generate("a red circle", steps=1, output_type="latent")
        assert engine.backend.compiled_precision == "f32" and engine.precision == "fp32"
