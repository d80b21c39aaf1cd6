"""The OpenVINO backend (ldmrt.backends.openvino) on the exported ONNX graphs of a reduced SD model, against
the torch backend: fp32 (forced f32 inference precision) within fp32 tolerance, bf16 within bf16 rounding,
one compiled model per input shape. Needs openvino (optional: the measured fastest CPU runtime)."""
import pytest
import torch

pytest.importorskip("openvino")

from ldmrt.backends.torch import TorchBackend  # noqa: E402
from ldmrt.backends.openvino import OpenVinoBackend  # noqa: E402
from ldmrt.checkpoint import load_model  # noqa: E402
from ldmrt.export.onnx import export_onnx  # noqa: E402
from ldmrt.testing import reduced_config  # noqa: E402
from helpers import rel_l2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = load_model(reduced_config("sd-v1"), random_weights=True)
    out = tmp_path_factory.mktemp("sd")
    graphs = export_onnx(model, out, latent_size=8)
    return model, {name: out / g["file"] for name, g in graphs.items()}


def test_graphs_match_torch(exported):
    model, files = exported
    torch_backend = TorchBackend(model)
    fp32 = OpenVinoBackend(files, precision="fp32", threads=1)
    bf16 = OpenVinoBackend(files, precision="bf16", threads=1)
    ids = torch.randint(0, 1000, (2, 77))
    context = torch_backend.run("cond_stage", cond=ids)["context"]
    inputs = {"cond_stage": {"cond": ids},
              "unet": {"x": torch.randn(2, 4, 8, 8), "t": torch.tensor([10.0, 900.0]), "context": context},
              "decoder": {"latent": torch.randn(1, 4, 8, 8)},
              "encoder": {"image": torch.rand(1, 3, 64, 64) * 2 - 1}}
    for graph, feeds in inputs.items():
        ref = torch_backend.run(graph, **feeds)
        got32, got16 = fp32.run(graph, **feeds), bf16.run(graph, **feeds)
        assert list(got32) == list(ref)
        for name in ref:
            assert got32[name].dtype == torch.float32 and got32[name].shape == ref[name].shape
            if ref[name].norm() > 0:  # the encoder's std can be all zeros: compared below
                assert rel_l2(got32[name], ref[name]) < 1e-4, (graph, name)
                assert rel_l2(got16[name], ref[name]) < 5e-2, (graph, name)
    assert fp32.compiled_precision == "f32"


def test_one_compiled_model_per_shape(exported):
    _, files = exported
    backend = OpenVinoBackend({"decoder": files["decoder"]}, threads=1)
    for size in (8, 8, 16):
        out = backend.run("decoder", latent=torch.randn(1, 4, size, size))["image"]
        assert out.shape == (1, 3, 8 * size, 8 * size)
    assert len(backend._compiled) == 2
    with pytest.raises(TypeError, match="takes inputs latent"):
        backend.run("decoder", image=torch.zeros(1, 3, 8, 8))


def test_engine_backend_on_the_shipped_model(tmp_path):
    """`ldmrt build --backend openvino` on the shipped model: fp32 reproduces the golden latent of
    tests/test_shapes_model.py; `--fp16` (bf16 on this CPU, f32 on CPUs without bf16) still follows its prompt."""
    import numpy as np

    from ldmrt.testing import adherence
    from ldmrt.config import ASSET_DIR
    from ldmrt.engine import Engine
    golden = np.load(ASSET_DIR / "shapes" / "golden.npz")
    kw = dict(sampler=str(golden["sampler"]), steps=int(golden["steps"]), guidance_scale=float(golden["guidance"]),
              seed=int(golden["seed"]))
    fp32 = Engine.build("shapes", tmp_path / "fp32", backend="openvino", progress=None)
    assert fp32.manifest["backend"] == "openvino" and fp32.manifest["precision"] == "fp32"
    latent = fp32.generate(str(golden["prompt"]), output_type="latent", **kw)
    assert rel_l2(latent, torch.from_numpy(golden["latent"])) < 1e-3
    bf16 = Engine.build("shapes", tmp_path / "bf16", backend="openvino", fp16=True, progress=None)
    assert bf16.manifest["precision"] == "bf16"
    prompt = "a large red circle on a gray background"
    image = bf16.generate(prompt, steps=20, seed=3, output_type="np")[0]
    assert all(adherence.score(prompt, (image * 255).round().astype(np.uint8)).values())
