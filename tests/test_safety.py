"""Bad input, faults and hostile files, through the CLI and the API: each gets its named error (or a correct
result), no user file is changed or removed, nothing outside an engine folder is opened, and no user mistake
prints a traceback.

"Opened" is checked with a Python audit hook (every `open` Python makes: the manifest, the hashing, the
tokenizer, the config); the checks run before any runtime (ONNX Runtime, safetensors) opens a file, and a path
that escapes is refused by them, so the native loaders only ever see checked files.
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ldmrt
from ldmrt import (CheckpointError, ConfigError, Engine, EngineError, InputError, NumericalError, OutputError,
                   ResourceError)
from ldmrt.cli import main
from ldmrt.files import sha256
from ldmrt.images import write_png
from ldmrt.testing import reduced_config

LDMRT = [sys.executable, "-m", "ldmrt.cli"]
OPENED: list[str] = []


def _audit(event, args):
    if event == "open" and OPENED and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


class opened_files:
    """Records the paths Python opens inside the block."""
    def __enter__(self):
        OPENED[:] = ["<recording>"]
        return self

    def __exit__(self, *exc):
        self.paths = [Path(p).resolve() for p in OPENED[1:]]
        OPENED.clear()

    def outside(self, folder: Path, within: Path) -> list[Path]:
        """Paths opened under `within` (the test's scratch space) but not inside `folder`."""
        folder, within = folder.resolve(), within.resolve()
        return [p for p in self.paths if p.is_relative_to(within) and not p.is_relative_to(folder)]


def snapshot(root: Path) -> dict:
    """Every file under root with its content hash: compared before and after, nothing of the user's changes."""
    return {p.relative_to(root).as_posix(): sha256(p) if p.is_file() else "dir" for p in sorted(root.rglob("*"))
            if not p.is_symlink() and (p.is_file() or p.is_dir())}


def cli(*args, cwd=None, env=None, timeout=300):
    """The `ldmrt` command in a subprocess: (exit status, stderr)."""
    r = subprocess.run([*LDMRT, *args], cwd=cwd, capture_output=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    err = r.stderr.decode(errors="backslashreplace")
    assert "Traceback" not in err, err
    return r.returncode, err


@pytest.fixture(scope="module")
def torch_engine(tmp_path_factory):
    return Engine.build("shapes", tmp_path_factory.mktemp("torch") / "engine", backend="torch", progress=None).path


@pytest.fixture(scope="module")
def onnx_engine(tmp_path_factory):
    return Engine.build("shapes", tmp_path_factory.mktemp("onnx") / "engine", progress=None).path


def copy_engine(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def edit_manifest(folder: Path, change) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    change(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    return m


# --- 1. output targets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [".", "user_folder", "user_file"])
def test_build_refuses_targets_that_are_not_engines(tmp_path, target):
    (tmp_path / "user_folder").mkdir()
    (tmp_path / "user_folder" / "thesis.txt").write_text("years of work")
    (tmp_path / "user_file").write_text("also mine")
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, err = cli("build", "--backend", "torch", "-o", target, cwd=tmp_path)
    assert code == 2 and "nothing was written" in err, err
    assert snapshot(tmp_path) == before


def test_build_writes_new_empty_and_engine_targets(tmp_path, torch_engine):
    (tmp_path / "empty").mkdir()
    old = copy_engine(torch_engine, tmp_path / "old")
    for target in ("new/deeper", "empty", "old"):
        Engine.build("shapes", tmp_path / target, backend="torch", progress=None)
        assert (tmp_path / target / "manifest.json").is_file()
    assert old.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new", "old"]


def test_killed_build_leaves_nothing_that_the_next_build_keeps(tmp_path):
    out = tmp_path / "engine"
    user = tmp_path / ".engine.building.mine"  # a user's folder with ldmrt's name pattern but no marker: kept
    user.mkdir()
    (user / "data").write_text("mine")
    proc = subprocess.Popen([*LDMRT, "build", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in tmp_path.glob(".engine.building.*") if p != user and any(p.iterdir())]:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in tmp_path.glob(".engine.building.*") if p != user]
    assert leftovers and not out.exists()  # killed mid-build: a hidden temporary, no engine
    Engine.build("shapes", out, backend="torch", progress=None)
    assert [p for p in tmp_path.glob(".engine.building.*")] == [user] and (user / "data").read_text() == "mine"
    assert Engine.load(out).manifest["backend"] == "torch"


# --- 2. closed engine folders ----------------------------------------------------------------------------------
def escapes(folder: Path, secret: Path):
    """Edits of a good torch engine that point it outside itself: (name, edit)."""
    def files_entry(rel):
        def change(m):
            m["files"][rel] = {"bytes": secret.stat().st_size, "sha256": sha256(secret)}
            m["graphs"]["model"]["config"] = rel
        return change

    def symlinked(name):
        def change(m):
            target = folder / name
            target.unlink()
            target.symlink_to(secret)
        return change

    def symlinked_dir(m):
        import shutil
        shutil.rmtree(folder / "tokenizer")
        (folder / "tokenizer").symlink_to(secret.parent, target_is_directory=True)

    def fifo(m):
        (folder / "config.yaml").unlink()
        os.mkfifo(folder / "config.yaml")

    def unlisted_graph(m):
        (folder / "other.yaml").write_text((folder / "config.yaml").read_text())
        m["graphs"]["model"]["config"] = "other.yaml"

    return [("relative ../", files_entry(os.path.relpath(secret, folder))), ("absolute", files_entry(str(secret))),
            ("dotted", files_entry("./config.yaml")), ("symlinked file", symlinked("config.yaml")),
            ("symlinked folder", symlinked_dir), ("fifo", fifo), ("graph not in files", unlisted_graph),
            ("stray file", lambda m: (folder / "extra.bin").write_bytes(b"x"))]


@pytest.mark.parametrize("case", range(8))
def test_engine_paths_stay_inside(torch_engine, tmp_path, case):
    secret = tmp_path / "outside" / "config.yaml"
    secret.parent.mkdir()
    secret.write_text((torch_engine / "config.yaml").read_text())
    (secret.parent / "vocab.txt").write_text((torch_engine / "tokenizer" / "vocab.txt").read_text())
    folder = copy_engine(torch_engine, tmp_path / "engine")
    name, change = escapes(folder, secret)[case]
    edit_manifest(folder, change)
    with opened_files() as rec:
        with pytest.raises(EngineError) as e:
            Engine.load(folder)
    assert rec.outside(folder, tmp_path) == [], (name, rec.outside(folder, tmp_path))
    assert "rebuild" in str(e.value) or "remove it" in str(e.value), (name, str(e.value))


def test_onnx_external_data_cannot_escape(onnx_engine, tmp_path):
    """An .onnx whose external data points outside (manifest re-hashed to match): refused, secret unread."""
    import onnx
    folder = copy_engine(onnx_engine, tmp_path / "engine")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(1 << 16, np.float32).tobytes())
    model = onnx.load(str(folder / "decoder.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    onnx.external_data_helper.set_external_data(tensor, location="../secret.bin", offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, str(folder / "decoder.onnx"))
    edit_manifest(folder, lambda m: m["files"]["decoder.onnx"].update(
        bytes=(folder / "decoder.onnx").stat().st_size, sha256=sha256(folder / "decoder.onnx")))
    with pytest.raises(EngineError, match="decoder|escapes|external"):
        Engine.load(folder)


# --- 3. manifests: a seeded fuzz over fields and types -------------------------------------------------------
FUZZ_CASES = 120


def mutate(value, rng: random.Random):
    choices = [None, True, -1, 0, 2 ** 70, 1.5, math.nan, "", "../../etc/passwd", "/etc/passwd", [], {}, [1, "x"],
               {"file": "x"}, "x" * 1000]
    return rng.choice(choices)


def paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k != "alphas_cumprod" and k != "config":  # long lists / the whole config: their ends are sampled
                yield from paths(v, (*prefix, k))
    elif isinstance(tree, list) and tree:
        yield from paths(tree[0], (*prefix, 0))


def test_manifest_fuzz(onnx_engine, tmp_path):
    rng = random.Random(1234)
    good = json.loads((onnx_engine / "manifest.json").read_text())
    all_paths = [p for p in paths(good) if p]
    folder = copy_engine(onnx_engine, tmp_path / "engine")
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(FUZZ_CASES):
        m = json.loads(json.dumps(good))
        path = rng.choice(all_paths)
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.2 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = mutate(parent[path[-1]], rng)
        (folder / "manifest.json").write_text(json.dumps(m))
        try:
            engine = Engine.load(folder, verify=False)
        except EngineError as e:
            assert str(e), path
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        try:  # whatever loaded must generate, or say why not
            engine.generate("a red circle", steps=1, output_type="latent")
        except ldmrt.LdmrtError:
            pass
    assert outcomes["refused"] > FUZZ_CASES // 2, outcomes
    (folder / "manifest.json").write_text(json.dumps(good))
    for text in (b"", b"\xff\xfe garbage", b"[1, 2]", b'{"format": "ldmrt-engine"}', b"{" * 100000):
        (folder / "manifest.json").write_bytes(text)
        with pytest.raises(EngineError):
            Engine.load(folder)


# --- 4. checkpoints and configs -------------------------------------------------------------------------------
class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = Path("/tmp/ldmrt-test-pwned")


@pytest.mark.parametrize("kind", ["hostile pickle", "hostile legacy pickle", "text", "empty", "truncated zip",
                                  "garbled zip", "huge safetensors header", "garbage safetensors header",
                                  "folder named .ckpt"])
def test_bad_checkpoints(tmp_path, kind):
    path = tmp_path / "model.ckpt"
    good = tmp_path / "good.ckpt"
    ldmrt.save_checkpoint(ldmrt.load_model(reduced_config("celeba256"), random_weights=True), good)
    data = good.read_bytes()
    PWNED.unlink(missing_ok=True)
    if kind == "hostile pickle":
        torch.save({"state_dict": Hostile()}, path)
    elif kind == "hostile legacy pickle":
        torch.save({"state_dict": Hostile()}, path, _use_new_zipfile_serialization=False)
    elif kind == "text":
        path.write_text("model:\n  target: x\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated zip":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbled zip":
        rng = np.random.default_rng(0)
        garbled = bytearray(data)
        for i in rng.integers(64, len(data), 200):
            garbled[i] ^= 0xFF
        path.write_bytes(bytes(garbled))
    elif kind == "huge safetensors header":
        path.write_bytes((2 ** 62).to_bytes(8, "little") + b"{" + b" " * 100)
    elif kind == "garbage safetensors header":
        path.write_bytes((20).to_bytes(8, "little") + b"{not json at all}!!!" + b"\0" * 64)
    else:
        path.mkdir()
    with pytest.raises(CheckpointError):
        ldmrt.load_model(reduced_config("celeba256"), path)
    assert not PWNED.exists()
    code, err = cli("build", "--model", "celeba256", "--ckpt", str(path), "-o", str(tmp_path / "e"))
    assert code == 2 and str(path) in err and not (tmp_path / "e").exists()
    assert not PWNED.exists()


@pytest.mark.parametrize("kind", ["binary", "not yaml", "deep yaml", "list", "unknown target", "params not a map",
                                  "bad param", "negative channels", "a million channels"])
def test_bad_configs(tmp_path, kind):
    path = tmp_path / "config.yaml"
    cfg = reduced_config("celeba256")
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 10)
    elif kind == "not yaml":
        path.write_text("model: [unclosed\n  target: {")
    elif kind == "deep yaml":
        path.write_text("[" * 50000 + "]" * 50000)
    elif kind == "list":
        path.write_text("- 1\n- 2\n")
    elif kind == "unknown target":
        cfg["target"] = "os.system"
    elif kind == "params not a map":
        cfg["params"] = [1, 2]
    elif kind == "bad param":
        cfg["params"]["unet_config"]["params"]["model_channels"] = "wide"
    elif kind == "negative channels":
        cfg["params"]["unet_config"]["params"]["model_channels"] = -32
    else:
        cfg["params"]["unet_config"]["params"]["model_channels"] = 32 * 10 ** 6
    if not path.exists():
        path.write_text(yaml.safe_dump({"model": cfg}))
    t0 = time.perf_counter()
    with pytest.raises((ConfigError, ResourceError)) as e:
        ldmrt.load_model(path, random_weights=True)
    assert time.perf_counter() - t0 < 20 and str(e.value)  # refused before allocating anything large
    if kind == "a million channels":
        assert isinstance(e.value, ResourceError) and "parameters" in str(e.value)
    if kind == "binary":
        assert "not a text file" in str(e.value)


def test_unknown_model_names(tmp_path):
    (tmp_path / "w.ckpt").write_bytes(b"PK\x03\x04")
    for extra in ([], ["--ckpt", str(tmp_path / "w.ckpt")]):
        code, err = cli("build", "--model", "nosuchmodel", *extra, "-o", str(tmp_path / "e"))
        assert code == 2 and "unknown model 'nosuchmodel': presets are" in err and "config.yaml" in err, err


# --- 5. requests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(guidance_scale=math.nan), dict(guidance_scale=math.inf), dict(eta=math.nan),
                                 dict(strength=1.5, init_image=np.zeros((64, 64, 3), np.uint8)), dict(steps=0),
                                 dict(seed=-1), dict(seed=2 ** 64), dict(seed=1.5), dict(batch_size=0),
                                 dict(prompt=["a", "b", "c"], batch_size=2), dict(prompt=5), dict(prompt=[]),
                                 dict(prompt="bad \udcff bytes"), dict(height=100), dict(sampler="nope"),
                                 dict(init_image="missing.png"), dict(latents=torch.full((1, 3, 16, 16), math.nan))])
def test_bad_requests(torch_engine, bad):
    engine = Engine.load(torch_engine)
    kwargs = {"prompt": "a red circle", "steps": 2, **bad}
    with pytest.raises(InputError):
        engine.generate(kwargs.pop("prompt"), **kwargs)


def test_requests_larger_than_the_machine(torch_engine, monkeypatch):
    engine = Engine.load(torch_engine)
    t0 = time.perf_counter()
    for size, batch in ((100032, 1), (512, 10000)):
        with pytest.raises(ResourceError, match=r"needs about .* GB .* free: try"):
            engine.generate("a red circle", height=size, width=size, batch_size=batch, steps=2)
    from ldmrt import memory
    monkeypatch.setattr(memory, "available", lambda device="cpu": 50 << 20)  # a machine with 50 MB free
    with pytest.raises(ResourceError, match="512x512"):
        engine.generate("a red circle", height=512, width=512, steps=2)
    assert time.perf_counter() - t0 < 10  # refused before any work


def test_image_inputs(torch_engine, tmp_path):
    engine = Engine.load(torch_engine)
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 400 megapixels, a few KB on disk
    (tmp_path / "text.png").write_text("not an image")
    Image.new("1", (9000, 9000)).save(tmp_path / "big.png")  # under PIL's own bomb limit, over ldmrt's
    for name, match in (("bomb.png", "too large"), ("big.png", "too large for an input"),
                        ("text.png", "cannot read image")):
        with pytest.raises(InputError, match=match):
            engine.generate("a red circle", init_image=tmp_path / name, steps=2)


def test_nan_during_sampling_stops_the_run(torch_engine, tmp_path):
    engine = Engine.load(torch_engine)
    with pytest.raises(NumericalError, match=r"NaN or inf in .* guidance scale"):
        engine.generate("a red circle", guidance_scale=1e38, steps=4)
    code, err = cli("generate", "a red circle", "--engine", str(torch_engine), "--guidance-scale", "1e38",
                    "--steps", "4", "-o", str(tmp_path / "out.png"))
    assert code == 2 and "NaN or inf" in err and not (tmp_path / "out.png").exists()


def test_cli_request_mistakes(torch_engine, tmp_path):
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "folder").mkdir()
    cases = [(["--guidance-scale", "nan"], "finite"), (["--seed", "-1"], "outside 0..2^64-1"),
             (["--seed", str(2 ** 64)], "outside"), (["--seed", "abc"], "not an integer"),
             (["-o", str(tmp_path / "folder")], "is a folder"), (["-o", str(tmp_path / "a_file" / "x.png")], "is a file"),
             (["--width", "100"], "multiples of")]
    before = snapshot(tmp_path)
    for extra, message in cases:
        code, err = cli("generate", "a red circle", "--engine", str(torch_engine), "--steps", "2", "-o",
                        str(tmp_path / "out.png"), *extra)
        assert code == 2 and message in err, (extra, err)
    assert snapshot(tmp_path) == before
    r = subprocess.run([*LDMRT, "generate", b"bad \xff\xfe utf-8", "--engine", str(torch_engine), "-o",
                        str(tmp_path / "out.png")], capture_output=True)
    assert r.returncode == 2 and b"not valid text" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.parametrize("errno_name", ["EROFS", "ENOSPC", "EACCES"])
def test_unwritable_outputs(torch_engine, tmp_path, monkeypatch, capsys, errno_name):
    import errno
    out = tmp_path / "out.png"
    out.write_bytes(b"the user's old image")

    def fail(*args, **kwargs):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
    monkeypatch.setattr(os, "replace", fail)
    assert main(["generate", "a red circle", "--engine", str(torch_engine), "--steps", "2", "--quiet",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and os.strerror(getattr(errno, errno_name)) in err
    assert out.read_bytes() == b"the user's old image" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


# --- 6. concurrent writers, the cache --------------------------------------------------------------------------
WRITER = """
import sys
import numpy as np
from PIL import Image
from ldmrt.images import write_png
seed, path = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(seed)
for _ in range(15):
    write_png(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), path, {"writer": str(seed)})
"""


def test_concurrent_writers_each_write_whole_files(tmp_path):
    out = tmp_path / "out.png"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(out)], stderr=subprocess.PIPE)
               for i in range(4)]
    reads = 0
    while any(w.poll() is None for w in writers):
        if out.exists():
            with Image.open(out) as im:
                im.load()  # a truncated PNG raises here
            reads += 1
    assert all(w.wait() == 0 for w in writers), [w.stderr.read() for w in writers]
    with Image.open(out) as im:
        assert im.size == (256, 256) and im.text["writer"] in "0123"
    assert reads > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_generate_cache_recovers_from_damage(tmp_path):
    env = {"LDMRT_CACHE": str(tmp_path / "cache")}
    args = ("generate", "a red circle", "--backend", "torch", "--steps", "2", "--quiet", "-o", str(tmp_path / "a.png"))
    assert cli(*args, env=env)[0] == 0
    (cached,) = (tmp_path / "cache" / "engines").iterdir()
    weights = cached / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    code, err = cli(*args, env=env)
    assert code == 0 and "rebuilding" in err and "sha256" in err
    (cached / "manifest.json").write_bytes(b"\x00garbage")
    code, err = cli(*args, env=env)
    assert code == 0 and "rebuilding" in err
    assert Engine.load(cached).manifest["backend"] == "torch"


def test_prompt_cache_is_bounded(torch_engine):
    from ldmrt.pipeline import CONTEXT_CACHE_SIZE, text_context
    engine = Engine.load(torch_engine)
    rss = []
    for i in range(1000):
        text_context(engine, f"a red circle number {i}")
        if i in (100, 999):
            rss.append(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    assert len(engine.context_cache) == CONTEXT_CACHE_SIZE
    assert rss[1] - rss[0] < 20 << 20, rss  # flat: not growing with the prompts
    engine.generate(["a red circle", "a blue square"], steps=2, output_type="latent")


def test_write_png_refuses_bad_targets(tmp_path):
    image = Image.new("RGB", (8, 8))
    (tmp_path / "file").write_text("mine")
    for target, match in ((tmp_path, "is a folder"), (tmp_path / "file" / "x.png", "file")):
        with pytest.raises(OutputError, match=match):
            write_png(image, target)
    assert (tmp_path / "file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
