"""TensorRT engines (export/tensorrt.py, ldmrt/backends/tensorrt.py).

Everywhere: shape profiles against what each graph accepts, options, precision rules, fingerprint and shape
checks, the backend choice and its errors, and the build/refit code driven through a stand-in for TensorRT's
documented Python API (it records calls; it proves the calls are the intended ones, not that TensorRT takes
them). With TensorRT and a CUDA device: engines built and run against eager PyTorch, CUDA graph replays,
refit; these skip with the reason otherwise.
"""
import enum
import hashlib
import json
import sys
import types

import pytest
import torch

import ldmrt
from ldmrt.backends.tensorrt import EngineError, check_fingerprint, check_shapes
from ldmrt.cli import tensorrt_options
from ldmrt.engine import Engine
from ldmrt.export import tensorrt as trt_export
from ldmrt.export import trt as trt_common
from ldmrt.export.trt import import_tensorrt
from ldmrt.manifest import model_summary, new_manifest
from ldmrt.export.graphs import graphs_for
from ldmrt.export.tensorrt import (BuildOptions, build_engine, graph_profiles, network_typing, refit_engine,
                                   resolve_ranges)
from ldmrt.testing import reduced_config
from helpers import rel_l2

WORDS = "a red green blue circle square on the left right of background".split()
SD_SUMMARY = {"conditioning": "text", "latent_factor": 8, "size_multiple": 64, "default_size": 512,
              "unconditional_input": True}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return d


# --- ranges and profiles ------------------------------------------------------------------------------

def test_default_ranges_follow_the_model():
    r = resolve_ranges(BuildOptions(), SD_SUMMARY)
    assert (r.batch, r.size, r.latent_factor, r.guidance, r.text) == ((1, 1, 4), (256, 512, 1024), 8, True, True)
    # A given range moves the default optimum into it; given values are kept as they are.
    assert resolve_ranges(BuildOptions(min_size=768), SD_SUMMARY).size == (768, 768, 1024)
    assert resolve_ranges(BuildOptions(max_size=384), SD_SUMMARY).size == (256, 384, 384)
    assert resolve_ranges(BuildOptions(min_batch=8), SD_SUMMARY).batch == (8, 8, 8)
    assert resolve_ranges(BuildOptions(max_batch=2), SD_SUMMARY).batch == (1, 1, 2)
    # Guidance exists for text models and class models with a null class only.
    assert not resolve_ranges(BuildOptions(), {**SD_SUMMARY, "conditioning": "class", "uncond_class": None,
                                                          "unconditional_input": False}).guidance
    assert resolve_ranges(BuildOptions(), {**SD_SUMMARY, "conditioning": "class", "uncond_class": 1000}).guidance


@pytest.mark.parametrize("options, message", [
    (BuildOptions(min_batch=0), "1 <= --min-batch"),
    (BuildOptions(min_batch=4, max_batch=2), "--min-batch <= --opt-batch <= --max-batch"),
    (BuildOptions(opt_batch=8, max_batch=4), "--min-batch <= --opt-batch <= --max-batch"),
    (BuildOptions(min_size=1024, max_size=512), "--min-size <= --opt-size <= --max-size"),
    (BuildOptions(opt_size=500), "multiples of 64"),
    (BuildOptions(max_size=0), "0 < --min-size"),
])
def test_bad_ranges_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        resolve_ranges(options, SD_SUMMARY)


def test_profiles_per_graph():
    inputs = {"cond_stage": [{"name": "cond", "shape": ["batch", 77]}],
              "unet": [{"name": "x", "shape": ["batch", 4, "height", "width"]}, {"name": "t", "shape": ["batch"]},
                       {"name": "context", "shape": ["batch", 77, 768]}],
              "decoder": [{"name": "latent", "shape": ["batch", 4, "height", "width"]}],
              "encoder": [{"name": "image", "shape": ["batch", 3, "image_height", "image_width"]}]}
    p = graph_profiles(inputs, resolve_ranges(BuildOptions(max_batch=2), SD_SUMMARY))
    assert p["unet"]["x"] == {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [4, 4, 128, 128]}
    assert p["unet"]["context"] == {"min": [1, 77, 768], "opt": [2, 77, 768], "max": [4, 77, 768]}
    assert p["cond_stage"]["cond"] == {"min": [1, 77], "opt": [1, 77], "max": [4, 77]}  # one prompt at a time
    assert p["decoder"]["latent"] == {"min": [1, 4, 32, 32], "opt": [1, 4, 64, 64], "max": [2, 4, 128, 128]}
    assert p["encoder"]["image"] == {"min": [1, 3, 256, 256], "opt": [1, 3, 512, 512], "max": [2, 3, 1024, 1024]}
    with pytest.raises(ValueError, match="axis 'frames' with no size range"):
        graph_profiles({"unet": [{"name": "x", "shape": ["frames", 4]}]}, resolve_ranges(BuildOptions(), SD_SUMMARY))


def test_long_prompt_context_profile():
    """CLIP models: the UNet's context takes 1..MAX_CONTEXT_WINDOWS windows, tuned for one."""
    clip = {**SD_SUMMARY, "long_prompts": True, "context_window": 77}
    inputs = {"unet": [{"name": "context", "shape": ["batch", "context_length", 768]}]}
    p = graph_profiles(inputs, resolve_ranges(BuildOptions(max_batch=2), clip))
    assert p["unet"]["context"] == {"min": [1, 77, 768], "opt": [2, 77, 768], "max": [4, 3 * 77, 768]}
    with pytest.raises(ValueError, match="axis 'context_length' with no size range"):  # not a long-prompt model
        graph_profiles(inputs, resolve_ranges(BuildOptions(), SD_SUMMARY))


def _descriptions(graphs):
    """export_onnx's input descriptions, from the traced graphs' example inputs and dynamic axes."""
    return {name: [{"name": n, "shape": [g.dynamic_axes.get(n, {}).get(i, d) for i, d in enumerate(x.shape)]}
                   for n, x in zip(g.input_names, g.example_inputs)] for name, g in graphs.items()}


def _example(name, dtype, shape):
    if dtype == torch.long:  # token ids, class labels
        return torch.zeros(shape, dtype=torch.long)
    return torch.full(shape, 500.0) if name == "t" else torch.randn(shape)


@pytest.mark.parametrize("name", ["txt2img", "sd-v1", "cin256", "bsr_sr", "semantic_synthesis256", "inpainting_big",
                                  "celeba256"])
def test_profile_shapes_run_through_every_graph(name, vocab):
    """The min and max shapes of every profile are shapes the graphs accept, and agree across graphs: the cond
    stage's output fits the UNet's context/concat profile, latents and images scale by the latent factor."""
    model = ldmrt.load_model(reduced_config(name), random_weights=True, tokenizer=vocab if name == "txt2img" else None)
    summary = model_summary(model, model.ldmrt_config)
    m = summary["size_multiple"]
    options = BuildOptions(min_batch=1, max_batch=2, min_size=m, opt_size=2 * m, max_size=3 * m)
    graphs = graphs_for(model)
    profiles = graph_profiles(_descriptions(graphs), resolve_ranges(options, summary))
    assert profiles.keys() == graphs.keys()
    f = summary["latent_factor"]
    for end in ("min", "max"):
        for gname in ("cond_stage", "unet", "decoder", "encoder"):
            if gname not in graphs:
                continue
            g, prof = graphs[gname], profiles[gname]
            assert list(prof) == g.input_names
            inputs = [_example(n, x.dtype, prof[n][end]) for n, x in zip(g.input_names, g.example_inputs)]
            with torch.no_grad():
                out = g.module(*inputs)
            out = out if isinstance(out, tuple) else (out,)
            shapes = {n: list(o.shape) for n, o in zip(g.output_names, out)}
            if gname == "cond_stage":  # its output is the UNet's context (cross-attention) or concat (maps)
                target = profiles["unet"]["context" if "context" in profiles["unet"] else "concat"]
                lo, hi, got = target["min"], target["max"], shapes["context"]
                assert len(got) == len(lo) and all(a <= d <= b for d, a, b in zip(got, lo, hi)), (end, got, lo, hi)
            x = inputs[0]
            if gname == "unet":
                assert shapes["eps"] == list(x.shape)
            if gname == "decoder":
                assert shapes["image"] == [x.shape[0], 3, x.shape[2] * f, x.shape[3] * f]
            if gname == "encoder":
                assert shapes["mean"] == [x.shape[0], summary["latent_channels"], x.shape[2] // f, x.shape[3] // f]
                assert shapes["mean"][1:] == profiles["decoder"]["latent"][end][1:]  # latents of the same range
    unet_batch = profiles["unet"]["x"]["max"][0]
    assert unet_batch == (4 if summary["conditioning"] == "text" else 2)  # guidance doubles the UNet's batch


def test_profiles_from_exported_onnx(tmp_path):
    """export_onnx's descriptions name the axes the profiles know (no 'unk__' axes, fixed ints elsewhere)."""
    from ldmrt.export.onnx import export_onnx
    model = ldmrt.load_model(reduced_config("celeba256"), random_weights=True)
    summary = model_summary(model, model.ldmrt_config)
    onnx_graphs = export_onnx(model, tmp_path)
    profiles = graph_profiles({g: d["inputs"] for g, d in onnx_graphs.items()},
                              resolve_ranges(BuildOptions(max_batch=3), summary))
    assert profiles["unet"]["x"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [3, 3, 128, 128]}
    assert profiles["unet"]["t"] == {"min": [1], "opt": [1], "max": [3]}
    assert profiles["encoder"]["image"]["max"] == [3, 3, 512, 512]


# --- precision, timing cache --------------------------------------------------------------------------

TRT10_FLAGS = {"TF32", "REFIT", "FP16", "BF16"}
TRT11_FLAGS = {"TF32", "REFIT"}


def test_network_typing():
    assert network_typing("fp32", "fp32", TRT11_FLAGS) == (True, (), ("TF32",))  # fp32 means fp32: no TF32
    assert network_typing("fp16", "fp16", TRT11_FLAGS) == (True, (), ())
    assert network_typing("fp32", "fp16", TRT11_FLAGS) == (True, (), ())  # the cond stage stays fp32
    assert network_typing("fp32", "bf16", TRT10_FLAGS) == (False, ("BF16",), ())
    with pytest.raises(ValueError, match="bf16 engines need TensorRT 10.x"):
        network_typing("fp32", "bf16", TRT11_FLAGS)
    with pytest.raises(ValueError, match="cannot build a fp32 engine from a fp16 ONNX graph"):
        network_typing("fp16", "fp32", TRT10_FLAGS)
    with pytest.raises(ValueError, match="one of --fp16 and --bf16"):
        BuildOptions(bf16=True).precision(fp16=True)
    assert BuildOptions(bf16=True).precision(fp16=False) == "bf16"


def test_default_timing_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LDMRT_CACHE", str(tmp_path))
    fp = {"type": "cuda", "name": "NVIDIA H200 (141 GB)", "capability": "9.0", "tensorrt": "10.8.0.43"}
    assert trt_export.default_timing_cache(fp) == tmp_path / "tensorrt" / "timing-10.8.0.43-nvidia-h200-141-gb-sm90.cache"


# --- fingerprints, request shapes ---------------------------------------------------------------------

BUILT = {"type": "cuda", "name": "NVIDIA H200", "capability": "9.0", "tensorrt": "10.8.0"}


@pytest.mark.parametrize("here, message", [
    ({**BUILT, "tensorrt": "10.9.0"}, r"built with TensorRT 10.8.0, this is TensorRT 10.9.0.*tensorrt==10.8.0"),
    ({**BUILT, "name": "NVIDIA A100", "capability": "8.0"}, r"compute capability 9.0 \(NVIDIA H200\).*A100, is 8.0"),
    ({**BUILT, "name": "NVIDIA H100"}, "built and timed on NVIDIA H200; this GPU is NVIDIA H100"),
])
def test_fingerprint_mismatch(here, message):
    check_fingerprint(BUILT, BUILT, "engines/x")
    with pytest.raises(EngineError, match=message) as e:
        check_fingerprint(BUILT, here, "engines/x")
    assert "ldmrt build --backend tensorrt -o engines/x" in str(e.value)


def test_fingerprint_missing():
    with pytest.raises(EngineError, match="no TensorRT fingerprint"):
        check_fingerprint({"type": "cpu"}, BUILT, "engines/x")


def test_request_shapes_against_the_profile():
    profile = {"x": {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [4, 4, 128, 128]}, "t": {
        "min": [1], "opt": [2], "max": [4]}}
    check_shapes("unet", profile, {"x": (4, 4, 32, 128), "t": (4,)})
    with pytest.raises(ValueError, match=r"unet input x has shape \[8, 4, 64, 64\].*--min-batch/--max-batch"):
        check_shapes("unet", profile, {"x": (8, 4, 64, 64), "t": (4,)})
    with pytest.raises(ValueError, match=r"input x has shape \[1, 4, 64, 136\].*--min-size/--max-size"):
        check_shapes("unet", profile, {"x": (1, 4, 64, 136)})
    with pytest.raises(ValueError, match=r"input x has shape \[1, 4, 64\]; the engine takes 4 dimensions"):
        check_shapes("unet", profile, {"x": (1, 4, 64)})


# --- backend choice and its errors --------------------------------------------------------------------

def fake_tensorrt(version="10.8.0", flags=TRT10_FLAGS):
    """A stand-in for the parts of TensorRT's Python API that build_engine and refit_engine call; it records
    the calls. Ports of the documented signatures only: no behaviour of TensorRT is simulated."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.BuilderFlag = enum.Enum("BuilderFlag", sorted(flags))
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
    trt.parse_ok, trt.build_ok, trt.refittable = True, True, True

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []
            trt.calls.append(("create_network", flags))

        num_inputs = property(lambda self: len(self.inputs))

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.inputs = json.loads(open(path).read())  # the stand-in "ONNX" file: its input names
            self.num_errors = 0 if trt.parse_ok else 1
            return trt.parse_ok

        def get_error(self, i):
            return "In node 3 (Conv): unsupported"

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Config:
        cache = None

        def set_flag(self, flag):
            trt.calls.append(("set_flag", flag.name))

        def clear_flag(self, flag):
            trt.calls.append(("clear_flag", flag.name))

        def add_optimization_profile(self, profile):
            trt.calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data == b"other-gpu":
                return False
            self.cache = cache
            trt.calls.append(("timing_cache", cache.data))
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class Builder:
        def __init__(self, logger):
            pass

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            return memoryview(b"PLAN:" + ",".join(network.inputs).encode()) if trt.build_ok else None

    class Engine:
        def __init__(self, data):
            self.data, self.refittable = data, trt.refittable

        def serialize(self):
            return b"REFITTED" + self.data

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, data: Engine(data)})

    class Refitter:
        def __init__(self, engine, logger):
            self.engine = engine

        def refit_cuda_engine(self):
            trt.calls.append(("refit_cuda_engine",))
            return True

    class OnnxParserRefitter:
        num_errors = 0

        def __init__(self, refitter, logger):
            pass

        def refit_from_file(self, path):
            trt.calls.append(("refit_from_file", path))
            return True

    trt.Refitter, trt.OnnxParserRefitter = Refitter, OnnxParserRefitter
    return trt


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


@pytest.fixture
def stand_in(monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_common, "_LOGGER", None)
    return trt


def test_missing_or_old_tensorrt(no_tensorrt, monkeypatch):
    with pytest.raises(EngineError, match="need the tensorrt package.*pip install tensorrt.*--backend onnxruntime"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version="8.6.1"))
    with pytest.raises(EngineError, match="need TensorRT >= 10.0; this is 8.6.1"):
        import_tensorrt()


def _engine_folder(path, device):
    """A well-formed TensorRT engine folder around a stand-in plan file."""
    path.mkdir()
    for graph in ("unet", "decoder"):
        (path / f"{graph}.plan").write_bytes(b"PLAN")
    cfg = reduced_config("celeba256")
    summary = model_summary(ldmrt.load_model(cfg, random_weights=True), cfg)
    manifest = new_manifest(path, backend="tensorrt", precision="fp16", model_name="celeba256", cfg=cfg,
                            summary=summary, tokenizer=None, shapes=None, device=device,
                            graphs={g: {"file": f"{g}.plan", "profile": None} for g in ("unet", "decoder")})
    assert manifest["files"]["unet.plan"] == {"bytes": 4, "sha256": hashlib.sha256(b"PLAN").hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_engine_load_picks_tensorrt_and_says_what_is_missing(tmp_path, monkeypatch):
    # Built on a GPU, loaded here: the manifest's device check names the GPU this machine lacks.
    with pytest.raises(EngineError, match="built for NVIDIA H200.*no CUDA device"):
        Engine.load(_engine_folder(tmp_path / "gpu", BUILT))
    # Past that check (a manifest without the GPU), the TensorRT backend is the one chosen, and says why not.
    folder = _engine_folder(tmp_path / "e", {"type": "cpu"})
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match="holds TensorRT engines; they need the tensorrt package"):
        Engine.load(folder)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    with pytest.raises(EngineError, match="holds TensorRT engines; they run on NVIDIA GPUs"):
        Engine.load(folder)


def test_cli_tensorrt_options(capsys, no_tensorrt, tmp_path):
    from ldmrt.cli import build_parser, main
    args = build_parser().parse_args(["build", "--backend", "tensorrt", "--max-batch", "2", "--min-size", "256",
                                      "--bf16", "--refit", "--no-timing-cache", "-o", "x"])
    assert tensorrt_options(args) == BuildOptions(max_batch=2, min_size=256, bf16=True, refit=True,
                                                              timing_cache=False)
    args = build_parser().parse_args(["build", "--max-batch", "2", "-o", "x"])
    with pytest.raises(ValueError, match="--max-batch: TensorRT options, for --backend tensorrt only"):
        tensorrt_options(args)
    assert tensorrt_options(build_parser().parse_args(["build", "-o", "x"])) is None
    # Without TensorRT, the build stops with the reason before exporting anything.
    out = tmp_path / "engine"
    assert main(["build", "--model", "no-such-model", "--random-weights", "--backend", "tensorrt", "-o", str(out)]) == 2
    assert "TensorRT builds need the tensorrt package" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


# --- build and refit through the stand-in -------------------------------------------------------------

PROFILE = {"x": {"min": [1, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [4, 4, 32, 32]},
           "t": {"min": [1], "opt": [2], "max": [4]}}


def _onnx(tmp_path, inputs=("x", "t")):
    f = tmp_path / "unet.onnx"
    f.write_text(json.dumps(list(inputs)))
    return f


@pytest.mark.parametrize("precision, onnx_precision, refit, expected", [
    ("fp16", "fp16", False, [("create_network", 1 << 5)]),
    ("fp32", "fp32", True, [("create_network", 1 << 5), ("set_flag", "REFIT"), ("clear_flag", "TF32")]),
    ("bf16", "fp32", False, [("create_network", 0), ("set_flag", "BF16")]),
])
def test_build_engine_calls(stand_in, tmp_path, precision, onnx_precision, refit, expected):
    cache = tmp_path / "cache" / "timing.cache"
    plan = build_engine(_onnx(tmp_path), tmp_path / "unet.plan", PROFILE, precision=precision,
                        onnx_precision=onnx_precision, refit=refit, timing_cache=cache, progress=None)
    assert plan.read_bytes() == b"PLAN:x,t"
    profile = {n: tuple(p[k] for k in ("min", "opt", "max")) for n, p in PROFILE.items()}
    calls = [c for c in stand_in.calls if c[0] != "timing_cache"]
    assert calls == [expected[0], ("profile", profile), *expected[1:]]
    assert ("timing_cache", b"") in stand_in.calls and cache.read_bytes() == b"+timings"
    build_engine(_onnx(tmp_path), tmp_path / "unet.plan", PROFILE, precision=precision, onnx_precision=onnx_precision,
                 timing_cache=cache, progress=None)
    assert ("timing_cache", b"+timings") in stand_in.calls  # the second build starts from the first's timings
    assert cache.read_bytes() == b"+timings+timings"


def test_build_engine_failures(stand_in, tmp_path):
    messages = []
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"other-gpu")
    build_engine(_onnx(tmp_path), tmp_path / "a.plan", PROFILE, precision="fp16", onnx_precision="fp16",
                 timing_cache=cache, progress=messages.append)
    assert "starting a new TensorRT timing cache" in messages[0] and cache.read_bytes() == b"+timings"
    with pytest.raises(EngineError, match="has inputs .*'context'.*; the profile covers"):
        build_engine(_onnx(tmp_path, ("x", "t", "context")), tmp_path / "b.plan", PROFILE, precision="fp16",
                     onnx_precision="fp16")
    stand_in.parse_ok = False
    with pytest.raises(EngineError, match=r"could not parse unet.onnx:\nIn node 3 \(Conv\): unsupported"):
        build_engine(_onnx(tmp_path), tmp_path / "c.plan", PROFILE, precision="fp16", onnx_precision="fp16")
    stand_in.parse_ok, stand_in.build_ok = True, False
    with pytest.raises(EngineError, match="failed to build unet.onnx"):
        build_engine(_onnx(tmp_path), tmp_path / "d.plan", PROFILE, precision="fp16", onnx_precision="fp16")
    stand_in.BuilderFlag = enum.Enum("BuilderFlag", sorted(TRT11_FLAGS))
    with pytest.raises(EngineError, match="bf16 engines need TensorRT 10.x"):
        build_engine(_onnx(tmp_path), tmp_path / "e.plan", PROFILE, precision="bf16", onnx_precision="fp32")
    assert sorted(p.name for p in tmp_path.glob("*.plan")) == ["a.plan"]  # nothing half-written


def test_refit_engine_arguments(tmp_path, no_tensorrt, monkeypatch):
    plan, onnx = tmp_path / "unet.plan", _onnx(tmp_path)
    with pytest.raises(FileNotFoundError, match="no TensorRT plan at"):
        refit_engine(plan, onnx)
    plan.write_bytes(b"PLAN")
    with pytest.raises(FileNotFoundError, match="no TensorRT plan at"):
        refit_engine(onnx, onnx)
    with pytest.raises(FileNotFoundError, match="no ONNX graph at"):
        refit_engine(plan, tmp_path / "other.onnx")
    with pytest.raises(FileNotFoundError, match="no ONNX graph at"):
        refit_engine(plan, plan)
    with pytest.raises(EngineError, match="TensorRT refits need the tensorrt package"):
        refit_engine(plan, onnx)
    assert plan.read_bytes() == b"PLAN"


def test_refit_engine_updates_the_plan_and_the_manifest(stand_in, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_export, "require_cuda", lambda purpose: None)  # the stand-in needs no GPU
    folder = _engine_folder(tmp_path / "e", BUILT)
    onnx = _onnx(tmp_path)
    refit_engine(folder / "unet.plan", onnx)
    assert stand_in.calls == [("refit_from_file", str(onnx)), ("refit_cuda_engine",)]
    assert (folder / "unet.plan").read_bytes() == b"REFITTEDPLAN"
    entry = json.loads((folder / "manifest.json").read_text())["files"]["unet.plan"]
    assert entry == {"bytes": 12, "sha256": hashlib.sha256(b"REFITTEDPLAN").hexdigest()}
    stand_in.refittable = False
    with pytest.raises(EngineError, match="built without refit support: rebuild it with --refit"):
        refit_engine(folder / "unet.plan", onnx)


# --- with TensorRT and a GPU --------------------------------------------------------------------------

def _tensorrt_here():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed"
    return None if torch.cuda.is_available() else "TensorRT needs a CUDA device"


needs_tensorrt = pytest.mark.skipif(_tensorrt_here() is not None, reason=str(_tensorrt_here()))
TOL = {"fp32": 1e-3, "fp16": 3e-2}  # final latents vs eager fp32, rel L2 (fp32 without TF32)


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_eager(precision, vocab, tmp_path):
    from ldmrt.sampling import randn, sample
    cfg = reduced_config("txt2img")
    cfg["params"]["image_size"] = 8
    options = BuildOptions(max_batch=2, min_size=64, max_size=128, timing_cache=str(tmp_path / "tc"))
    engine = Engine.build(cfg, tmp_path / "e", backend="tensorrt", fp16=precision == "fp16", random_weights=True,
                          tokenizer=vocab, tensorrt=options, progress=None)
    assert engine.manifest["device"]["tensorrt"] and engine.manifest["graphs"]["unet"]["profile"]
    got = engine.generate("a red circle", steps=4, guidance_scale=4.0, seed=3, height=64, width=64,
                          output_type="latent")
    model = ldmrt.load_model(cfg, random_weights=True, tokenizer=vocab)
    cond = model.get_learned_conditioning(["", "a red circle"])

    def eps_fn(x, t):
        return model.apply_model(x, torch.full((x.shape[0],), t), cond)
    with torch.no_grad():
        ref = sample(eps_fn, torch.from_numpy(randn(3, (1, 4, 8, 8))), sampler="ddim", steps=4,
                     alphas_cumprod=model.schedule_alphas_cumprod, guidance_scale=4.0, seed=3)
    assert rel_l2(got, ref) < TOL[precision]
    with pytest.raises(ValueError, match="--min-batch/--max-batch"):
        engine.generate("a red circle", steps=4, batch_size=3, height=64, width=64, output_type="latent")


@needs_tensorrt
def test_cuda_graph_replays_match_eager_runs(tmp_path):
    from ldmrt.backends.tensorrt import TensorRTBackend
    engine = Engine.build(reduced_config("celeba256"), tmp_path / "e", backend="tensorrt", random_weights=True,
                          tensorrt=BuildOptions(max_batch=2, min_size=64, max_size=128), progress=None)
    graphs = engine.backend
    eager = TensorRTBackend.from_manifest(engine.path, engine.manifest, cuda_graphs=False)
    for batch, seed in ((2, 0), (2, 1), (1, 2), (2, 3)):
        g = torch.Generator().manual_seed(seed)
        x, t = torch.randn(batch, 3, 16, 16, generator=g), torch.full((batch,), 500.0)
        out, ref = graphs.run("unet", x=x, t=t)["eps"], eager.run("unet", x=x, t=t)["eps"]
        assert out.device.type == "cpu" and out.dtype == torch.float32
        assert rel_l2(out, ref) < 1e-6, (batch, seed)
        on_gpu = graphs.run("unet", x=x.cuda(), t=t.cuda())["eps"]  # CUDA in, CUDA out
        assert on_gpu.is_cuda and rel_l2(on_gpu.cpu(), ref) < 1e-6
    sigs = graphs.engines["unet"].signatures
    assert len(sigs) == 2 and all(s.graph is not None for s in sigs.values())


@needs_tensorrt
def test_refit_swaps_weights(tmp_path):
    from ldmrt.export.onnx import export_onnx
    cfg = reduced_config("celeba256")
    options = BuildOptions(max_batch=1, min_size=64, max_size=64, refit=True)
    engine = Engine.build(cfg, tmp_path / "e", backend="tensorrt", random_weights=True, tensorrt=options,
                          progress=None)
    other = ldmrt.load_model(cfg, random_weights=True, seed=123)
    export_onnx(other, tmp_path / "other")
    x, t = torch.randn(1, 3, 16, 16), torch.full((1,), 500.0)
    before = engine.backend.run("unet", x=x, t=t)["eps"]
    refit_engine(engine.path / "unet.plan", tmp_path / "other" / "unet.onnx")
    after = Engine.load(engine.path).backend.run("unet", x=x, t=t)["eps"]  # the manifest still verifies
    with torch.no_grad():
        ref = other.apply_model(x, t, None)
    assert rel_l2(after, ref) < 1e-3 and rel_l2(before, ref) > 0.1
