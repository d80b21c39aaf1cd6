"""Checkpoint loading: formats, EMA, Lightning pickles, and the errors bad files must give."""
import collections

import pytest
import torch

import ldmrt
from ldmrt.checkpoint import CheckpointError, read_state_dict, save_checkpoint
from ldmrt.config import ConfigError
from ldmrt.testing import reduced_config


@pytest.fixture(scope="module")
def tiny():
    cfg = reduced_config("cin256")  # small and fast: class-conditional, VQ first stage
    return cfg, ldmrt.load_model(cfg, random_weights=True, seed=3)


def outputs(model):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([5, 500]), model.get_learned_conditioning(torch.tensor([1, 2])))


def test_compvis_lightning_checkpoint_with_foreign_pickles_loads(tiny, tmp_path):
    """CompVis checkpoints are Lightning files: training state pickled beside `state_dict` must not
    stop a weights_only load (and must not be imported or run)."""
    cfg, model = tiny
    Callback = type("ModelCheckpoint", (), {})  # stands for pytorch_lightning's class, absent here
    Callback.__module__ = "lightning_callbacks_absent_here"  # a top-level name: no parent packages to fake
    import sys
    import types
    fake = types.ModuleType(Callback.__module__)
    fake.ModelCheckpoint = Callback
    sys.modules[Callback.__module__] = fake
    try:
        torch.save({"epoch": 3, "global_step": 10, "callbacks": {"cb": Callback()},
                    "state_dict": collections.OrderedDict(model.state_dict())}, tmp_path / "model.ckpt")
    finally:
        del sys.modules[Callback.__module__]
    loaded = ldmrt.load_model(cfg, tmp_path / "model.ckpt")
    assert torch.equal(outputs(model), outputs(loaded))


def test_config_beside_checkpoint_is_found(tiny, tmp_path):
    import yaml
    cfg, model = tiny
    save_checkpoint(model, tmp_path / "model.ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": cfg}))
    assert torch.equal(outputs(model), outputs(ldmrt.load_model(None, tmp_path / "model.ckpt")))
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="no config"):
        ldmrt.load_model(None, tmp_path / "model.ckpt")


def test_ema_weights_are_selectable(tiny, tmp_path):
    cfg, model = tiny
    sd = dict(model.state_dict())
    ema = {k: v + 1 for k, v in sd.items() if k.startswith("model.")}
    # CompVis LitEma names its shadows without dots, under model_ema.
    sd.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in ema.items()})
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
    torch.save({"state_dict": sd}, tmp_path / "ema.ckpt")
    plain = ldmrt.load_model(cfg, tmp_path / "ema.ckpt")
    assert torch.equal(outputs(model), outputs(plain))
    with_ema = ldmrt.load_model(cfg, tmp_path / "ema.ckpt", ema=True)
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(with_ema.state_dict()[k], ema[k])
    save_checkpoint(model, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        ldmrt.load_model(cfg, tmp_path / "plain.ckpt", ema=True)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file_is_named(tiny, tmp_path, suffix):
    _, model = tiny
    path = tmp_path / f"model{suffix}"
    save_checkpoint(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


def test_wrong_and_missing_keys_are_named(tiny, tmp_path):
    cfg, model = tiny
    sd = dict(model.state_dict())
    del sd["model.diffusion_model.out.2.bias"]
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(1, 2, 3)
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as err:
        ldmrt.load_model(cfg, tmp_path / "bad.ckpt")
    msg = str(err.value)
    assert "1 missing keys (model.diffusion_model.out.2.bias)" in msg
    assert "1 unexpected keys (model.diffusion_model.extra.weight)" in msg
    assert "first_stage_model.quant_conv.weight: checkpoint (1, 2, 3) vs model" in msg


def test_checkpoint_for_another_model_names_the_fix(tiny, tmp_path):
    _, model = tiny
    save_checkpoint(model, tmp_path / "cin.safetensors")
    with pytest.raises(CheckpointError, match="Use the config the checkpoint was trained with"):
        ldmrt.load_model(reduced_config("celeba256"), tmp_path / "cin.safetensors")


def test_bad_requests_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="random_weights=True"):
        ldmrt.load_model("cin256")
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        ldmrt.load_model("nope", random_weights=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        ldmrt.load_model("cin256", tmp_path / "missing.ckpt")
    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):  # neither zip, pickle nor safetensors
        ldmrt.load_model("cin256", tmp_path / "x.ckpt")
    (tmp_path / "z.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ldmrt.load_model("cin256", tmp_path / "z.ckpt")
    torch.save({"weights": [1, 2]}, tmp_path / "y.ckpt")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_state_dict(tmp_path / "y.ckpt")


def test_save_is_atomic(tiny, tmp_path):
    _, model = tiny

    class Boom(Exception):
        pass

    path = tmp_path / "m.ckpt"
    orig = torch.save

    def failing_save(obj, f, *a, **k):
        orig(obj, f, *a, **k)
        raise Boom()
    torch.save = failing_save
    try:
        with pytest.raises(Boom):
            save_checkpoint(model, path)
    finally:
        torch.save = orig
    assert list(tmp_path.iterdir()) == []
