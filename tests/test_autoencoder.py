"""First-stage autoencoders: sizes, shapes, quantizer semantics, low precision, parity with CompVis.

The parity tests need the CompVis latent-diffusion source (env LDMRT_COMPVIS_SRC) and, for the VQ
models, taming-transformers (importable, or its checkout in env LDMRT_TAMING_SRC). CompVis's
ldm/models/autoencoder.py imports pytorch_lightning and taming at top level; the test stubs
pytorch_lightning with `LightningModule = nn.Module` (only the base class is used when building and
running the models) and, when taming is absent, stubs its quantizer module so the KL model imports.
"""
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from ldmrt.models.autoencoder import (AutoencoderKL, DiagonalGaussianDistribution, IdentityFirstStage, VectorQuantizer,
                                      VQModel, VQModelInterface)
from helpers import has_real_taming, import_compvis, rel_l2

ZOO = Path("/work/shared/reference/compvis-zoo")
OURS = {cls.__name__: cls for cls in (AutoencoderKL, VQModel, VQModelInterface)}


def first_stage_params(yaml_name):
    model = yaml.safe_load((ZOO / yaml_name).read_text())["model"]
    if "first_stage_config" in model["params"]:
        model = model["params"]["first_stage_config"]
    return model["target"].rsplit(".", 1)[1], dict(model["params"])


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- full-size models, meta device only ----------------------------------------------------------

@pytest.mark.parametrize("yaml_name, cls, expected", [
    ("sd-v1-inference.yaml", AutoencoderKL, 83_653_863),
    # counted with CompVis Encoder/Decoder + taming VectorQuantizer2 on the meta device
    ("first-stage-vq-f4.yaml", VQModel, 55_322_782),
    ("first-stage-vq-f4-noattn.yaml", VQModel, 53_219_486),
    ("ldm-cin256.yaml", VQModelInterface, 67_717_295),  # the VQ-f8 first stage
])
def test_full_size_param_count(yaml_name, cls, expected):
    name, params = first_stage_params(yaml_name)
    assert name == cls.__name__
    with torch.device("meta"):
        model = cls(**params)
    assert n_params(model) == expected


# ---- tiny models ---------------------------------------------------------------------------------

def tiny_ddconfig(factor, attn_type="vanilla", double_z=True):
    ch_mult = {4: (1, 1, 2), 8: (1, 1, 2, 2)}[factor]
    return dict(double_z=double_z, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=ch_mult,
                num_res_blocks=1, attn_resolutions=[32 // factor, 16], dropout=0.0, attn_type=attn_type)


def tiny_model(kind, factor, attn_type="vanilla", seed=0):
    torch.manual_seed(seed)
    if kind == "kl":
        model = AutoencoderKL(tiny_ddconfig(factor, attn_type), {"target": "torch.nn.Identity"}, embed_dim=4)
    else:
        cls = VQModel if kind == "vq" else VQModelInterface
        model = cls(ddconfig=tiny_ddconfig(factor, attn_type, double_z=False), n_embed=16, embed_dim=3)
        nn.init.normal_(model.quantize.embedding.weight, std=0.2)
    return model.eval()


@pytest.mark.parametrize("attn_type", ["vanilla", "none"])
@pytest.mark.parametrize("factor", [4, 8])
@pytest.mark.parametrize("kind", ["kl", "vq", "vqi"])
def test_shapes(kind, factor, attn_type):
    model = tiny_model(kind, factor, attn_type)
    has_attn = any(type(m).__name__ == "AttnBlock" for m in model.modules())
    assert has_attn == (attn_type == "vanilla")
    x = torch.randn(2, 3, 16, 24)
    latent_shape = (2, 4 if kind == "kl" else 3, 16 // factor, 24 // factor)
    with torch.no_grad():
        if kind == "kl":
            posterior = model.encode(x)
            assert posterior.mean.shape == posterior.std.shape == latent_shape
            z = posterior.sample()
        elif kind == "vq":
            z, loss, (_, _, indices) = model.encode(x)
            assert loss.ndim == 0 and indices.shape == (latent_shape[0] * latent_shape[2] * latent_shape[3],)
        else:
            z = model.encode(x)
        assert z.shape == latent_shape
        assert model.decode(z).shape == x.shape


def test_linear_attention_is_rejected():
    with pytest.raises(NotImplementedError):
        AutoencoderKL(tiny_ddconfig(4, "linear"), embed_dim=4)


def test_vq_interface_decode_quantizes():
    model = tiny_model("vqi", 4)
    with torch.no_grad():
        h = model.encode(torch.randn(1, 3, 16, 16))
        quant = model.quantize(h)[0]
        assert not torch.equal(quant, h)
        assert torch.equal(model.decode(h), model.decode(quant, force_not_quantize=True))
        assert torch.equal(model.decode(h, force_not_quantize=True), model.decoder(model.post_quant_conv(h)))


def test_quantizer_picks_nearest_code_first_on_ties():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 3, sane_index_shape=True)
    nn.init.normal_(vq.embedding.weight)
    z = torch.randn(2, 3, 5, 4)
    quant, loss, (_, _, indices) = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(indices.reshape(-1), torch.cdist(flat, vq.embedding.weight).argmin(1))
    assert torch.equal(quant, vq.get_codebook_entry(indices, (2, 5, 4, 3)))
    torch.testing.assert_close(loss, 1.25 * torch.mean((quant - z) ** 2))
    # a duplicated code: argmin resolves to the first copy, as taming's
    with torch.no_grad():
        vq.embedding.weight[20] = vq.embedding.weight[indices[0, 0, 0]]
    assert vq(z)[2][2][0, 0, 0] < 20
    # fp16 model: distances in fp32, so the fp16 codebook picks the same codes as in fp32
    half = VectorQuantizer(32, 3).half()
    half.embedding.weight.data.copy_(vq.embedding.weight.half())
    ref = VectorQuantizer(32, 3)
    ref.embedding.weight.data.copy_(half.embedding.weight.float())
    z16 = z.half()
    quant16, _, (_, _, idx16) = half(z16)
    assert quant16.dtype == torch.float16
    assert torch.equal(idx16, ref(z16.float())[2][2])


def test_vq_decode_code_matches_decode_of_quant():
    model = tiny_model("vq", 4)
    model.quantize.sane_index_shape = True
    with torch.no_grad():
        quant, _, (_, _, indices) = model.encode(torch.randn(1, 3, 16, 16))
        assert torch.equal(model.decode_code(indices), model.decode(quant))


def test_posterior():
    params = torch.randn(2, 8, 4, 4)
    params[:, 4:, 0, 0] = 50.0  # clamped to 20
    posterior = DiagonalGaussianDistribution(params)
    assert torch.equal(posterior.mode(), params[:, :4])
    torch.testing.assert_close(posterior.std[:, :, 0, 0], torch.full((2, 4), 10.0).exp())
    noise = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(posterior.sample(noise), posterior.mean + posterior.std * noise)
    draws = [posterior.sample(generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*draws)
    torch.manual_seed(5)  # global-generator draw reproduces CompVis's `torch.randn(mean.shape)`
    expected = posterior.mean + posterior.std * torch.randn(2, 4, 4, 4)
    torch.manual_seed(5)
    assert torch.equal(posterior.sample(), expected)
    assert torch.equal(DiagonalGaussianDistribution(params, deterministic=True).sample(), posterior.mean)


def test_identity_first_stage():
    x = torch.randn(1, 3, 4, 4)
    assert IdentityFirstStage().encode(x) is x and IdentityFirstStage().decode(x) is x
    assert IdentityFirstStage(vq_interface=True).quantize(x)[0] is x


# Tolerances for the tiny f4 net with random weights; observed up to 1.4e-3 (encode) / 4.3e-3 (decode)
# in fp16 and 1.2e-2 / 3.5e-2 in bf16 over a few seeds.
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 8e-2)])
@pytest.mark.parametrize("kind", ["kl", "vqi"])
def test_low_precision_matches_fp32(kind, dtype, tol):
    model = tiny_model(kind, 4)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        if kind == "kl":
            ref_z, ref_x = model.encode(x).mode(), model.decode(model.encode(x).mode())
            model.to(dtype)
            z = model.encode(x.to(dtype)).mode()
            out = model.decode(ref_z.to(dtype))
        else:  # skip the quantizer: a code flip near a tie would dwarf rounding error
            ref_z, ref_x = model.encode(x), model.decode(model.encode(x), force_not_quantize=True)
            model.to(dtype)
            z = model.encode(x.to(dtype))
            out = model.decode(ref_z.to(dtype), force_not_quantize=True)
    assert z.dtype == out.dtype == dtype
    assert rel_l2(z, ref_z) < tol and rel_l2(out, ref_x) < tol


# ---- parity with CompVis (float64) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def compvis():
    """CompVis's ldm.models.autoencoder module, and whether the real taming quantizer backs it."""
    with pytest.MonkeyPatch.context() as mp:
        module = import_compvis(mp, "ldm.models.autoencoder")
        yield module, has_real_taming()


def randomize_(model):
    """Perturb every parameter so that norms' affine terms and biases are exercised too."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("yaml_name", ["sd-v1-inference.yaml", "first-stage-vq-f4.yaml",
                                       "first-stage-vq-f4-noattn.yaml", "ldm-cin256.yaml"])
def test_compvis_state_dict_layout(compvis, yaml_name):
    module, has_taming = compvis
    name, params = first_stage_params(yaml_name)
    if name != "AutoencoderKL" and not has_taming:
        pytest.skip("taming-transformers not importable (set LDMRT_TAMING_SRC)")
    params["lossconfig"] = {"target": "torch.nn.Identity"}
    with torch.device("meta"):
        ours, theirs = OURS[name](**params), getattr(module, name)(**params)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("attn_type", ["vanilla", "none"])
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_parity_with_compvis(compvis, kind, attn_type):
    module, has_taming = compvis
    if kind == "vq" and not has_taming:
        pytest.skip("taming-transformers not importable (set LDMRT_TAMING_SRC)")
    torch.manual_seed(0)
    ddconfig = tiny_ddconfig(8 if kind == "kl" else 4, attn_type, double_z=kind == "kl")
    lossconfig = {"target": "torch.nn.Identity"}
    if kind == "kl":
        theirs = module.AutoencoderKL(ddconfig, lossconfig, embed_dim=4)
        ours = AutoencoderKL(ddconfig, lossconfig, embed_dim=4)
    else:
        theirs = module.VQModelInterface(ddconfig=ddconfig, lossconfig=lossconfig, n_embed=64, embed_dim=3)
        ours = VQModelInterface(ddconfig=ddconfig, lossconfig=lossconfig, n_embed=64, embed_dim=3)
    randomize_(theirs)
    theirs = theirs.double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours = ours.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        if kind == "kl":
            z_ref, z = theirs.encode(x), ours.encode(x)
            errors = [rel_l2(z.mean, z_ref.mean), rel_l2(z.std, z_ref.std)]
            errors.append(rel_l2(ours.decode(z_ref.mean), theirs.decode(z_ref.mean)))
        else:
            h_ref, h = theirs.encode(x), ours.encode(x)
            # a codebook at the latents' scale, so that many different codes are picked
            theirs.quantize.embedding.weight.copy_(h_ref.permute(0, 2, 3, 1).reshape(-1, 3)[torch.randperm(128)[:64]]
                                                   + 0.1 * torch.randn(64, 3, dtype=torch.float64))
            ours.load_state_dict(theirs.state_dict(), strict=True)
            q_ref, loss_ref, (_, _, idx_ref) = module.VQModel.encode(theirs, x)
            q, loss, (_, _, idx) = VQModel.encode(ours, x)
            assert torch.equal(idx, idx_ref) and idx.unique().numel() > 10
            errors = [rel_l2(h, h_ref), rel_l2(q, q_ref), abs(loss.item() / loss_ref.item() - 1)]
            errors += [rel_l2(ours.decode(h_ref), theirs.decode(h_ref)),
                       rel_l2(ours.decode(h_ref, force_not_quantize=True),
                              theirs.decode(h_ref, force_not_quantize=True))]
    print(f"{kind}/{attn_type} float64 rel L2 errors vs CompVis: " + ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < 1e-12
