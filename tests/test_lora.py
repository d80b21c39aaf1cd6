"""LoRA (ldmrt/lora.py, Engine.set_loras): files in the kohya and diffusers/PEFT layouts, written here for the tiny
SD-v1 model, merged as diffusers merges them (`load_lora_weights` + `fuse_lora`), applied by the torch and ONNX
Runtime and OpenVINO backends without a rebuild, and switched back to the exact base weights.

Needs the test extras diffusers, transformers and peft (references only).
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from ldmrt import Engine  # noqa: E402
from ldmrt.backends.torch import TorchBackend  # noqa: E402
from ldmrt.checkpoint import load_model  # noqa: E402
from ldmrt.errors import CheckpointError, InputError  # noqa: E402
from ldmrt.export.graphs import graph_modules  # noqa: E402
from ldmrt.lora import lora_deltas, parse_spec, parse_specs, read_lora  # noqa: E402
from helpers import diffusers_pipeline, rel_l2, write_kohya_lora, write_peft, write_tiny_sd_folder  # noqa: E402

WORDS = ["a", "red", "circle", "blue", "square"]
TOL = 1e-5  # fp32, the tolerance of the task; measured 0 (the same float32 sums as diffusers)
SETTINGS = dict(steps=4, guidance_scale=5.0, seed=3, height=32, width=32, output_type="latent")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_tiny_sd_folder(tmp_path_factory.mktemp("lora") / "sd", WORDS)


@pytest.fixture(scope="module")
def loras(sd_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    return {"kohya": write_kohya_lora(root / "kohya.safetensors", sd_folder, seed=1),
            "kohya_b": write_kohya_lora(root / "kohya_b.safetensors", sd_folder, seed=2, rank=2, alpha=1.0),
            "peft": write_peft(sd_folder, root / "peft", seed=3)}


def merged_model(folder, specs):
    """ldmrt's eager model with base + the LoRA deltas added to its parameters."""
    model = load_model(str(folder))
    params = dict(model.named_parameters())
    deltas, _ = lora_deltas(specs, {n: tuple(p.shape) for n, p in params.items()}, model.ldmrt_config)
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta)
    return model


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10.0, 500.0]),
            torch.randint(0, len(WORDS), (2, 77), generator=gen))


@pytest.mark.parametrize("layout, strength", [("kohya", 0.7), ("peft", 0.6)])
def test_merge_matches_diffusers(sd_folder, loras, layout, strength):
    """UNet eps and text-encoder output of ldmrt's merged model == diffusers' load_lora_weights + fuse_lora."""
    pipe = diffusers_pipeline(sd_folder)
    x, t, ids = _inputs()
    with torch.no_grad():
        base_context = pipe.text_encoder(ids)[0]
        base_eps = pipe.unet(x, t, encoder_hidden_states=base_context).sample
        pipe.load_lora_weights(str(loras[layout]))
        pipe.fuse_lora(lora_scale=strength)
        context = pipe.text_encoder(ids)[0]
        eps = pipe.unet(x, t, encoder_hidden_states=context).sample
        model = merged_model(sd_folder, [(str(loras[layout]), strength)])
        ours_context = model.cond_stage_model.encode(ids)
        ours_eps = model.apply_model(x, t, context)
    assert rel_l2(context, base_context) > 0.05 and rel_l2(eps, base_eps) > 0.05  # the LoRA matters
    assert rel_l2(ours_context, context) <= TOL
    assert rel_l2(ours_eps, eps) <= TOL


def test_read_both_layouts(loras):
    kohya, peft_file = read_lora(loras["kohya"]), read_lora(loras["peft"])
    assert not kohya.ignored and not peft_file.ignored
    # 3x3 LoCon down convolutions with 1x1 up convolutions, and the PEFT alphas from the file's metadata
    conv = kohya.modules[("unet", "down_blocks_0_resnets_0_conv1")]
    assert conv.down.shape[2:] == (3, 3) and conv.up.shape[2:] == (1, 1) and conv.alpha == 2.0
    assert peft_file.modules[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")].alpha == 8
    assert peft_file.modules[("text_encoder", "encoder.layers.0.self_attn.q_proj")].alpha == 2


def test_older_diffusers_forms(sd_folder, tmp_path):
    """diffusers' older keys (attention processors' `to_q_lora`, `.lora.up.weight`; with and without the `unet.`
    prefix) give the deltas of the same factors in the kohya layout."""
    pipe = diffusers_pipeline(sd_folder)
    gen = torch.Generator().manual_seed(5)
    old, kohya = {}, {}
    for name, module in pipe.unet.named_modules():
        if not name.endswith(("attn1.to_q", "attn2.to_out.0", "ff.net.2")):
            continue
        up, down = torch.randn(module.out_features, 2, generator=gen), torch.randn(2, module.in_features, generator=gen)
        attention, _, leaf = name.rpartition(".to_") if ".to_" in name else (None, None, None)
        key = {"q": f"{attention}.processor.to_q_lora", "out.0": f"unet.{attention}.processor.to_out_lora"}.get(
            leaf, f"unet.{name}.lora")
        old[f"{key}.up.weight"], old[f"{key}.down.weight"] = up, down
        kohya_name = "lora_unet_" + name.replace(".", "_")
        kohya[f"{kohya_name}.lora_up.weight"], kohya[f"{kohya_name}.lora_down.weight"] = up, down
    save_file(old, str(tmp_path / "old.safetensors"))
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    model = load_model(str(sd_folder))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ours, _ = lora_deltas([(str(tmp_path / "old.safetensors"), 1.0)], shapes, model.ldmrt_config)
    reference, _ = lora_deltas([(str(tmp_path / "kohya.safetensors"), 1.0)], shapes, model.ldmrt_config)
    assert len(ours) == len(reference) == 3 * 11  # three modules in each of the tiny UNet's 11 transformers
    assert all(torch.equal(ours[name], reference[name]) for name in reference)


@pytest.fixture(scope="module")
def engines(sd_folder, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("engines")
    pytest.importorskip("openvino")
    return {backend: Engine.build(str(sd_folder), root / backend, backend=backend, progress=None)
            for backend in ("torch", "onnxruntime", "openvino")}


def eager_engine(engine, model):
    """An engine running ldmrt's eager model `model` with the manifest and tokenizer of `engine`."""
    return Engine(engine.path, engine.manifest, TorchBackend(model), engine.tokenizer)


def test_onnx_weight_names(engines):
    """Every 2-d/4-d initializer of the exported graphs is found under its torch name, with the torch values
    (transposed where the exporter stored W^T), including the DeepCache graph and CLIP-skip cond stage, whose
    node scopes lack modules called by method."""
    import onnx
    from onnx import numpy_helper

    from ldmrt.export.weight_names import weight_initializers
    params = dict(engines["torch"].backend.model.named_parameters())
    for graph, path in engines["onnxruntime"].backend.files.items():
        proto = onnx.load(str(path))
        arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) in (2, 4)}
        weights = weight_initializers(proto.graph)
        assert {w.initializer for w in weights.values()} == set(arrays), graph
        for name, w in weights.items():
            value = arrays[w.initializer].T if w.transposed else arrays[w.initializer]
            assert np.array_equal(value, params[name].detach().numpy()), (graph, name)


@pytest.mark.parametrize("backend, tol", [("torch", 0), ("onnxruntime", 1e-4), ("openvino", 1e-4)])
def test_engine_with_loras_matches_eager_merged(engines, sd_folder, loras, backend, tol):
    """Two files at once, on each graph and through generate: the engine == the eager model with merged weights
    (torch bit for bit; ONNX Runtime and OpenVINO within the fp32 tolerance of the engine tests)."""
    engine = engines[backend]
    specs = [(str(loras["kohya"]), 0.8), (str(loras["peft"]), -0.5)]
    report = engine.set_loras(specs)
    assert [r.matched for r in report] == [len(read_lora(loras["kohya"]).modules),
                                           len(read_lora(loras["peft"]).modules)]
    eager = merged_model(sd_folder, specs)
    graphs = graph_modules(eager)
    x, t, ids = _inputs(1)
    with torch.no_grad():
        context = eager.cond_stage_model.encode(ids)
        eps = graphs["unet"](x, t, context)[0]
    assert rel_l2(engine.backend.run("cond_stage", cond=ids)["context"], context) <= max(tol, 1e-6)
    assert rel_l2(engine.backend.run("unet", x=x, t=t, context=context)["eps"], eps) <= max(tol, 1e-6)
    ours = engine.generate("a red circle", **SETTINGS)
    reference = eager_engine(engine, eager).generate("a red circle", **SETTINGS)
    assert rel_l2(ours, reference) <= tol
    engine.set_loras([])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_switching_back_is_bitwise_base(engines, loras, backend):
    """Base -> A -> B -> A+B -> A ... -> base: every set gives the same bits each time, and [] the base bits."""
    engine = engines[backend]
    engine.set_loras([])
    base = engine.generate("a blue square", **SETTINGS)
    first = {}
    sets = {"A": [(str(loras["kohya"]), 1.0)], "B": [(str(loras["peft"]), 0.7)],
            "AB": [(str(loras["kohya"]), 0.5), (str(loras["kohya_b"]), 1.0), (str(loras["peft"]), 0.3)]}
    for name in ["A", "B", "AB", "A", "base", "AB", "B", "base", "A"]:
        latents = engine.generate("a blue square", loras=sets.get(name, []), **SETTINGS)
        if name == "base":
            assert torch.equal(latents, base)
        else:
            assert not torch.equal(latents, base)
            assert torch.equal(latents, first.setdefault(name, latents))
    engine.set_loras([])
    assert torch.equal(engine.generate("a blue square", **SETTINGS), base)
    if backend == "torch":  # the parameters themselves are the loaded ones again
        loaded = load_model(str(engine.path / "config.yaml"), str(engine.path / "model.safetensors"), tokenizer=False)
        ours = dict(engine.backend.model.named_parameters())
        assert all(torch.equal(ours[n], p) for n, p in loaded.named_parameters())


def test_onnxruntime_external_data(engines, loras, tmp_path):
    """Graphs with their weights in .onnx.data (SD's UNet is over protobuf's 2 GB) take the merged weights as
    external initializers: the same result as the torch backend, and the base bits back."""
    from ldmrt.backends.onnxruntime import OnnxRuntimeBackend
    from ldmrt.export.onnx import export_onnx
    torch_backend = engines["torch"].backend
    exported = export_onnx(torch_backend.model, tmp_path, external_data=True)
    assert all(d["external_data"] for d in exported.values())
    backend = OnnxRuntimeBackend({"unet": tmp_path / exported["unet"]["file"]}, threads=1)
    x, t, _ = _inputs(2)
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    base = backend.run("unet", x=x, t=t, context=context)["eps"]
    with pytest.warns(UserWarning, match="not in this engine"):  # its text-encoder modules: a UNet graph alone
        deltas, _ = lora_deltas([(str(loras["kohya"]), 0.9)], backend.weight_shapes(),
                                engines["torch"].manifest["model"]["config"])
    backend.set_weight_deltas(deltas)
    torch_backend.set_weight_deltas(deltas)
    try:
        expected = torch_backend.run("unet", x=x, t=t, context=context)["eps"]
        assert rel_l2(backend.run("unet", x=x, t=t, context=context)["eps"], expected) <= 1e-5
    finally:
        torch_backend.set_weight_deltas({})
    backend.set_weight_deltas({})
    assert torch.equal(backend.run("unet", x=x, t=t, context=context)["eps"], base)


def test_failed_switch_leaves_the_base(engines, loras, monkeypatch):
    """A runtime failure half-way through a switch (the second graph's session) puts every graph back to base."""
    engine = engines["onnxruntime"]
    engine.set_loras([])
    base = engine.generate("a red circle", **SETTINGS)
    opened, original = [], engine.backend._open_merged

    def fails_second(graph, touched):
        opened.append(graph)
        if len(opened) == 2:
            raise RuntimeError("out of memory")
        return original(graph, touched)
    monkeypatch.setattr(engine.backend, "_open_merged", fails_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.set_loras([(str(loras["kohya"]), 1.0)])
    assert engine.loras == [] and torch.equal(engine.generate("a red circle", **SETTINGS), base)


def test_strength_zero_and_unchanged_set(engines, loras):
    engine = engines["torch"]
    engine.set_loras([])
    base = engine.generate("a red circle", **SETTINGS)
    assert torch.equal(engine.generate("a red circle", loras=[(str(loras["kohya"]), 0.0)], **SETTINGS), base)
    report = engine.set_loras([(str(loras["kohya"]), 0.0)])
    assert engine.set_loras([(str(loras["kohya"]), 0.0)]) is report  # the same set: nothing read or changed
    engine.set_loras([])


def test_png_records_loras(engines, loras):
    engine = engines["torch"]
    image = engine.generate("a red circle", loras=[f"{loras['kohya']}:0.8"], **{**SETTINGS, "output_type": "pil"})[0]
    assert json.loads(image.info["parameters"])["loras"] == [[str(loras["kohya"]), 0.8]]
    engine.set_loras([])
    image = engine.generate("a red circle", **{**SETTINGS, "output_type": "pil"})[0]
    assert "loras" not in json.loads(image.info["parameters"])


def test_tensorrt_refits_through_a_stand_in(engines, loras, tmp_path, monkeypatch):
    """TensorRT (no GPU here): the base weights a refittable build saves are the exported ones, and a LoRA and the
    switch back refit exactly base + delta and then the base, by the initializer names TensorRT's parser gives."""
    import types

    from ldmrt.backends.tensorrt import TensorRTBackend
    from ldmrt.export.tensorrt import save_lora_weights
    files = engines["onnxruntime"].backend.files
    entries = {g: save_lora_weights(files[g], tmp_path / f"{g}.lora.safetensors") for g in ("unet", "cond_stage")}
    params = dict(engines["torch"].backend.model.named_parameters())
    assert set(entries["unet"]["weight_names"]) == {n for n in params if n.startswith("model.diffusion_model.")
                                                   and params[n].dim() in (2, 4)}
    refits = []

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.named = engine, {}

        def set_named_weights(self, name, weights):
            self.named[name] = weights.array.copy()
            return True

        def refit_cuda_engine(self):
            refits.append((self.engine, self.named))
            return True

    trt = types.SimpleNamespace(Refitter=Refitter, Weights=lambda a: types.SimpleNamespace(array=a))
    backend = object.__new__(TensorRTBackend)  # the parts of it that refits use, without CUDA
    # device -1: torch.cuda.device(-1) changes nothing, so the backend's CUDA context switch runs on a CPU build
    backend.trt, backend.device, backend.stream = trt, -1, types.SimpleNamespace(synchronize=lambda: None)
    backend.engines = {g: types.SimpleNamespace(engine=g, signatures={"captured": 1}) for g in entries}
    backend.lora_weights = {g: (tmp_path / e["lora_weights"], e["weight_names"]) for g, e in entries.items()}
    backend._refitted = {}
    monkeypatch.setattr("ldmrt.backends.tensorrt.trt_logger", lambda trt: None)
    engine = Engine(engines["torch"].path, {**engines["torch"].manifest, "backend": "tensorrt"}, backend)
    engine.set_loras([(str(loras["kohya"]), 0.5)])
    deltas, _ = lora_deltas([(str(loras["kohya"]), 0.5)], backend.weight_shapes(), engine.manifest["model"]["config"])
    for graph, named in refits:
        for name, (initializer, transposed) in entries[graph]["weight_names"].items():
            if name in deltas:
                expected = params[name].detach() + deltas[name]
                assert np.array_equal(named[initializer], (expected.T if transposed else expected).numpy()), name
    assert {g for g, _ in refits} == {"unet", "cond_stage"} and not backend.engines["unet"].signatures
    refits.clear()
    engine.set_loras([])
    for graph, named in refits:
        for name, (initializer, transposed) in entries[graph]["weight_names"].items():
            if initializer in named:
                base = params[name].detach()
                assert np.array_equal(named[initializer], (base.T if transposed else base).numpy())
    assert sum(len(named) for _, named in refits) == len(deltas)


def test_cli(engines, loras, tmp_path, capsys):
    """--lora FILE[:STRENGTH], repeatable: the PNG records them; a bad file is one line and status 2."""
    from PIL import Image

    from ldmrt.cli import main
    engine = str(engines["onnxruntime"].path)
    argv = ["generate", "a red circle", "--engine", engine, "--steps", "4", "--height", "32", "--width", "32",
            "--quiet", "--lora", f"{loras['kohya']}:0.8", "--lora", str(loras["peft"]), "-o", str(tmp_path / "o.png")]
    assert main(argv) == 0
    with Image.open(tmp_path / "o.png") as image:
        recorded = json.loads(image.text["parameters"])["loras"]
    assert recorded == [[str(loras["kohya"]), 0.8], [str(loras["peft"]), 1.0]]
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    capsys.readouterr()
    assert main([*argv[:-4], "--lora", str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.safetensors" in err[0] and not (tmp_path / "p.png").exists()


# --- bad files and arguments ----------------------------------------------------------------------------------
def test_not_safetensors(engines, tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("not a LoRA")
    with pytest.raises(CheckpointError, match="notes.safetensors"):
        engines["torch"].set_loras([(str(bad), 1.0)])
    with pytest.raises(CheckpointError, match="does not exist"):
        engines["torch"].set_loras([(str(tmp_path / "missing.safetensors"), 1.0)])


def test_no_lora_keys(engines, sd_folder, tmp_path):
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(CheckpointError, match="holds no LoRA weights"):
        engines["torch"].set_loras([(str(tmp_path / "ckpt.safetensors"), 1.0)])


def test_no_matching_module(engines, tmp_path):
    """A LoRA of another model (SDXL's names) matches nothing: refused, and the engine keeps its weights."""
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640)},
              str(tmp_path / "sdxl.safetensors"))
    engine = engines["onnxruntime"]
    engine.set_loras([])
    with pytest.raises(CheckpointError, match="none of its 1 LoRA modules.*input_blocks_4_1"):
        engine.set_loras([(str(tmp_path / "sdxl.safetensors"), 1.0)])
    assert engine.loras == []


def test_wrong_shapes(engines, loras, tmp_path):
    """A LoRA for a wider model: the module, its shapes and the weight's are named."""
    from safetensors.torch import load_file
    state = load_file(str(loras["kohya"]))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    state[key] = torch.zeros(64, state[key].shape[1])
    save_file(state, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match=r"attn1_to_q.*\(64, 4\).*\(32, 32\)"):
        engines["torch"].set_loras([(str(tmp_path / "wide.safetensors"), 1.0)])
    del state[key]  # up without down: damaged
    save_file(state, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="not both up and down"):
        read_lora(tmp_path / "half.safetensors")


def test_partial_match_is_applied_and_reported(engines, loras, tmp_path):
    from safetensors.torch import load_file
    state = load_file(str(loras["kohya_b"]))
    state["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 2)
    state["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 8)
    state["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"] = torch.ones(32, 1, 1, 1)
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.warns(UserWarning) as caught:
        report = engines["torch"].set_loras([(str(tmp_path / "partial.safetensors"), 1.0)])
    messages = [str(w.message) for w in caught]
    assert any("1 of its" in m and "LoRA modules are not in this engine" in m for m in messages)
    assert any("1 keys are not LoRA up/down/alpha weights" in m and "dora_scale" in m for m in messages)
    assert report[0].unmatched == ["unet:no_such_block_to_q"] and report[0].matched > 0
    assert report[0].ignored == ["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"]
    engines["torch"].set_loras([])


def test_specs():
    assert parse_spec("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_spec("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    assert parse_specs(["a.safetensors:-0.5", ("b.safetensors", 2)]) == [("a.safetensors", -0.5), ("b.safetensors", 2.0)]
    with pytest.raises(InputError, match="takes a list"):
        parse_specs("a.safetensors")
    with pytest.raises(InputError, match="finite"):
        parse_specs([("a.safetensors", float("nan"))])
