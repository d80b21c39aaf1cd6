"""UNetModel: zoo parameter counts, tiny-config behaviour across dtypes, and parity with CompVis.

Parity tests need the CompVis latent-diffusion source: set LDMRT_COMPVIS_SRC to its root.
"""
import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from ldmrt.models.unet import UNetModel
from helpers import import_compvis, rel_l2

PRESETS = Path(__file__).resolve().parents[1] / "ldmrt" / "presets"
CONTEXT_LEN = 5

# One tiny config per option family the zoo uses (8x8 inputs, 32 base channels).
TINY = {
    "sd_spatial_num_heads": dict(  # sd-v1 / txt2img: spatial transformer, num_heads, legacy False
        in_channels=4, out_channels=4, attention_resolutions=[1, 2], channel_mult=[1, 2], num_heads=4,
        use_spatial_transformer=True, context_dim=24, legacy=False),
    "cin_spatial_head_channels_depth2": dict(  # cin256 / text2img / layout2img: num_head_channels, legacy
        in_channels=4, out_channels=4, attention_resolutions=[2, 4], channel_mult=[1, 2, 2],
        num_head_channels=16, use_spatial_transformer=True, transformer_depth=2, context_dim=16),
    # channels 96 with num_head_channels 64: legacy gives 1 head of 96, non-legacy 1 head of 64
    "spatial_legacy_true_uneven": dict(
        in_channels=4, out_channels=4, attention_resolutions=[2], channel_mult=[1, 3], num_head_channels=64,
        use_spatial_transformer=True, context_dim=8, legacy=True),
    "spatial_legacy_false_uneven": dict(
        in_channels=4, out_channels=4, attention_resolutions=[2], channel_mult=[1, 3], num_head_channels=64,
        use_spatial_transformer=True, context_dim=8, legacy=False),
    "churches_scale_shift_updown": dict(  # lsun_churches256
        in_channels=4, out_channels=4, attention_resolutions=[1, 2, 4], channel_mult=[1, 2, 2], num_heads=2,
        use_scale_shift_norm=True, resblock_updown=True),
    "inpainting_concat_7_to_3": dict(  # inpainting_big: concat conditioning, resblock_updown
        in_channels=7, out_channels=3, attention_resolutions=[2], channel_mult=[1, 2], num_heads=2,
        resblock_updown=True),
    "celeba_attention_head_channels": dict(  # celeba / ffhq / lsun_beds / bsr_sr / semantic_synthesis
        in_channels=3, out_channels=3, attention_resolutions=[1, 2], channel_mult=[1, 3], num_head_channels=16,
        dropout=0.1),
    "class_cond_new_order_no_conv_resample": dict(
        in_channels=3, out_channels=3, attention_resolutions=[2], channel_mult=[1, 2], num_heads=2, legacy=False,
        num_classes=10, use_new_attention_order=True, conv_resample=False),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The tiny models run fastest on one thread; extra threads only contend on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet_params(name):
    return dict(image_size=8, model_channels=32, num_res_blocks=1, **TINY[name])


def randomize_(model, seed):
    """Non-trivial weights everywhere (CompVis zero-initialises output convs, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)

    def randn_like(p, std, mean=0.0):
        return (torch.randn(p.shape, generator=gen, dtype=torch.float64) * std + mean).to(p.dtype)

    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                    p.copy_(randn_like(p, 0.1, 1.0 if name == "weight" else 0.0))
                elif p.dim() > 1:
                    p.copy_(randn_like(p, p[0].numel() ** -0.5))
                else:
                    p.copy_(randn_like(p, 0.1))
    return model


def make_inputs(params, dtype, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = params["image_size"]
    inputs = dict(x=torch.randn(batch, params["in_channels"], size, size, generator=gen, dtype=torch.float64).to(dtype),
                  timesteps=torch.tensor([3, 917, 500, 41][:batch]))
    if params.get("context_dim"):
        inputs["context"] = torch.randn(batch, CONTEXT_LEN, params["context_dim"], generator=gen,
                                        dtype=torch.float64).to(dtype)
    if params.get("num_classes"):
        inputs["y"] = torch.tensor([1, 7, 0, 9][:batch])
    return inputs


def preset_unet_params(name):
    return yaml.safe_load((PRESETS / name).read_text())["model"]["params"]["unet_config"]["params"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset, expected", [
    ("sd-v1.yaml", 859_520_964),
    ("txt2img.yaml", 872_300_484),  # txt2img-1p4B-eval; same count from CompVis's UNetModel (parity test)
])
def test_full_size_parameter_count(preset, expected):
    with torch.device("meta"):
        model = UNetModel(**preset_unet_params(preset))
    assert n_params(model) == expected


def test_legacy_sets_spatial_transformer_head_width():
    """CompVis's `legacy` rule: dim_head = channels // heads (legacy) or num_head_channels (not legacy)."""
    for legacy, width in [(True, 96), (False, 64)]:
        model = UNetModel(**tiny_unet_params(f"spatial_legacy_{str(legacy).lower()}_uneven"))
        attn = model.middle_block[1].transformer_blocks[0].attn1
        assert (attn.heads, attn.to_q.out_features) == (1, width)


@pytest.mark.parametrize("name", TINY)
def test_forward_shape_and_float64_determinism(name):
    params = tiny_unet_params(name)
    model = randomize_(UNetModel(**params), seed=1).double().eval()
    inputs = make_inputs(params, torch.float64)
    with torch.no_grad():
        out = model(**inputs)
        again = model(**inputs)
        # the second sample alone must give what it gave inside the batch
        alone = model(**{k: v[1:] for k, v in inputs.items()})
    assert out.shape == (2, params["out_channels"], 8, 8)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert torch.equal(out, again)
    assert rel_l2(alone, out[1:]) <= 1e-12


# Stated tolerances: rel L2 of the whole UNet output against fp32 (measured: bf16 <= 2.6e-2, fp16 <= 3.1e-3).
LOW_PRECISION_TOLERANCE = {torch.bfloat16: 4e-2, torch.float16: 6e-3}


@pytest.mark.parametrize("name", TINY)
def test_low_precision_cast_close_to_fp32(name):
    params = tiny_unet_params(name)
    model = randomize_(UNetModel(**params), seed=2).eval()
    inputs = make_inputs(params, torch.float32)
    with torch.no_grad():
        reference = model(**inputs)
        for dtype, tolerance in LOW_PRECISION_TOLERANCE.items():
            cast_inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            out = copy.deepcopy(model).to(dtype)(**cast_inputs)
            assert out.dtype == dtype
            error = rel_l2(out, reference)
            print(f"{name} {dtype}: rel L2 vs fp32 = {error:.2e}")
            assert error <= tolerance, dtype


# ---------------------------------------------------------------- parity with CompVis openaimodel

@pytest.fixture(scope="module")
def compvis():
    with pytest.MonkeyPatch.context() as mp:
        yield import_compvis(mp, "ldm.modules.diffusionmodules.openaimodel")


def test_compvis_zoo_state_dict_layout(compvis):
    """Every zoo UNet: same keys and shapes as CompVis's (built on the meta device)."""
    for preset in sorted(PRESETS.glob("*.yaml")):
        params = preset_unet_params(preset.name)
        with torch.device("meta"):
            ours, theirs = UNetModel(**params), compvis.UNetModel(**params)
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
               {k: v.shape for k, v in theirs.state_dict().items()}, preset.name


@pytest.mark.parametrize("name", TINY)
def test_parity_with_compvis_float64(compvis, name, monkeypatch):
    params = tiny_unet_params(name)
    theirs = randomize_(compvis.UNetModel(**params), seed=3).double().eval()
    ours = UNetModel(**params).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    inputs = make_inputs(params, torch.float64)
    with torch.no_grad():
        out = ours(**inputs)
        # Run CompVis in float64 throughout: its fp32 staging (`.float()` in GroupNorm32 and the attention
        # softmax, `h = x.type(self.dtype)`) exists for half precision and would round float64 to float32;
        # its float32 timestep embedding is cast to the weights' dtype, as ours does.
        theirs.dtype = torch.float64
        embed = compvis.timestep_embedding
        monkeypatch.setattr(compvis, "timestep_embedding", lambda *a, **kw: embed(*a, **kw).double())
        upcast = torch.Tensor.float
        monkeypatch.setattr(torch.Tensor, "float",
                            lambda t, *a, **kw: t if t.dtype == torch.float64 else upcast(t, *a, **kw))
        expected = theirs(**inputs)
    error = rel_l2(out, expected)
    print(f"{name}: rel L2 vs CompVis (float64) = {error:.2e}")
    assert error <= 1e-10
