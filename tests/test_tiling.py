"""Tiled first-stage decode and encode (ldmrt/tiling.py), its automatic choice in generate, and the hires fix.

The blend is checked exactly on first stages that are local (a tiled run must equal the whole one); on the shipped
model's trained autoencoder the tiles differ from the whole run by what per-tile GroupNorm statistics, attention
and border padding change (measured: benchmarks/tiling.py, README "Beyond the training size"), and no seam shows.
"""
import numpy as np
import pytest
import torch

import ldmrt
from benchmarks.tiling import flat_pictures, mosaic, psnr, seam_steps
from ldmrt import Engine, memory
from ldmrt.checkpoint import load_model
from ldmrt.errors import InputError, ResourceError
from ldmrt.export.graphs import DecoderGraph, EncoderGraph
from ldmrt.testing import reduced_config
from ldmrt.tiling import decode_tiled, encode_tiled, overlap_and_margin, tile_starts

PROMPT = "a large red circle at the top left on a white background"


def test_tile_starts_cover_with_full_tiles():
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(16, 16, 4) == [0]
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    for length in range(16, 80):
        starts = tile_starts(length, 16, 4)
        assert starts[0] == 0 and starts[-1] == length - 16  # every tile whole, the last flush with the edge
        assert all(b - a <= 12 for a, b in zip(starts, starts[1:]))  # neighbours share at least the overlap


@pytest.mark.parametrize("size", [(40, 40), (37, 52), (10, 40), (12, 12)])
def test_blend_is_exact_on_local_first_stages(size):
    """A pointwise decoder (nearest upsampling of tanh) and a block-local encoder (4x4 means): tiles blended by
    normalised ramps give the whole run back to float32 rounding, also where a side is shorter than a tile."""
    torch.manual_seed(0)
    z = torch.randn(2, 3, *size)

    def decoder(t):
        return torch.nn.functional.interpolate(torch.tanh(t), scale_factor=4, mode="nearest")
    assert (decode_tiled(decoder, z, 4, 16, *overlap_and_margin(16)) - decoder(z)).abs().max() < 1e-6
    assert torch.equal(decode_tiled(decoder, z, 4, 64, *overlap_and_margin(64)), decoder(z))  # one tile: the whole
    image = torch.rand(2, 3, size[0] * 4, size[1] * 4)

    def encoder(t):
        m = torch.nn.functional.avg_pool2d(t, 4)
        return m, m.abs()
    for tiled, whole in zip(encode_tiled(encoder, image, 4, 16, *overlap_and_margin(16)), encoder(image)):
        assert tiled.shape == whole.shape and (tiled - whole).abs().max() < 1e-6


@pytest.fixture(scope="module")
def shapes_first_stage():
    model = ldmrt.load_model("shapes").eval()
    return DecoderGraph(model), EncoderGraph(model)


def test_tiled_first_stage_of_the_shipped_model(shapes_first_stage):
    """128 px, 2x2 training scenes (twice the model's size; both fit), tiles of 16 latent pixels (overlap 8, margin
    2). Measured: decode max |tiled - whole| 108 levels of 255, mean 27.1; PSNR against the picture 25.8 dB tiled,
    18.2 dB whole (this decoder, trained at 64 px, reconstructs worse whole beyond its size). Encode: rel L2 of
    the tiled latent mean 0.10, its decode 26.8 dB."""
    decoder, encoder = shapes_first_stage
    picture = mosaic(2, seed=0)
    with torch.no_grad():
        mean, _ = encoder(picture)
        whole = decoder(mean)
        tiled = decode_tiled(decoder, mean, 4, 16, *overlap_and_margin(16))
        diff = (tiled.clamp(-1, 1) - whole.clamp(-1, 1)).abs() * 127.5
        assert diff.max() < 120 and diff.mean() < 30
        assert psnr(tiled, picture) > psnr(whole, picture) + 5
        tiled_mean, _ = encode_tiled(encoder, picture, 4, 16, *overlap_and_margin(16))
        assert float((tiled_mean - mean).norm() / mean.norm()) < 0.15
        assert psnr(decode_tiled(decoder, tiled_mean, 4, 16, *overlap_and_margin(16)), picture) > 24


@pytest.mark.parametrize("picture", ["white", "gray", "black", "blue", "gradient"])
def test_no_seam(shapes_first_stage, picture):
    """The tile-boundary gradient check on flat 128 px pictures (any step there is a seam): the largest step
    between pixel columns where tiles meet is no larger than elsewhere (within 25%; measured 0.12x-0.30x, 1.17x on
    the gradient, whose own steps are everywhere), in the decoded image and in the encoded latent (0.08x-1.12x).
    On black, a quarter's overlap without margin fails it (1.6x: the grid it left on dark backgrounds)."""
    decoder, encoder = shapes_first_stage
    image = flat_pictures(128)[picture]
    overlap, margin = overlap_and_margin(16)
    with torch.no_grad():
        mean, _ = encoder(image)
        at_edge, elsewhere = seam_steps(decode_tiled(decoder, mean, 4, 16, overlap, margin), 4, 16, overlap)
        assert at_edge <= 1.25 * elsewhere
        at_edge, elsewhere = seam_steps(encode_tiled(encoder, image, 4, 16, overlap, margin)[0], 1, 16, overlap,
                                        border=2)
        assert at_edge <= 1.25 * elsewhere
        if picture == "black":
            at_edge, elsewhere = seam_steps(decode_tiled(decoder, mean, 4, 16, 4, 0), 4, 16, 4)
            assert at_edge > 1.25 * elsewhere  # the check sees the seams there are


def test_no_seam_on_the_sd_architecture():
    """SD v1's decoder (f = 8) at reduced width, random weights, a smooth 32x32 latent in tiles of 16: as
    test_no_seam (measured 0.17x)."""
    torch.manual_seed(0)
    decoder = DecoderGraph(load_model(reduced_config("sd-v1"), random_weights=True).eval())
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 4, 4), size=(32, 32), mode="bicubic", align_corners=True)
    overlap, margin = overlap_and_margin(16)
    with torch.no_grad():
        at_edge, elsewhere = seam_steps(decode_tiled(decoder, z, 8, 16, overlap, margin), 8, 16, overlap)
    assert at_edge <= 1.25 * elsewhere


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    return {b: Engine.build("shapes", root / b, backend=b, progress=None) for b in ("torch", "onnxruntime")}


def test_generate_tiles_every_backend_alike(engines):
    """tiled_decode=True at 128 px runs the decoder per tile on every backend; ONNX Runtime's image matches torch's."""
    out = {b: e.generate(PROMPT, steps=4, height=128, width=128, output_type="np", tiled_decode=True)
           for b, e in engines.items()}
    assert out["torch"].shape == (1, 128, 128, 3)
    assert np.abs(out["torch"] - out["onnxruntime"]).max() < 1e-3
    whole = engines["torch"].generate(PROMPT, steps=4, height=128, width=128, output_type="np", tiled_decode=False)
    assert np.abs(whole - out["torch"]).max() > 1e-2  # really tiled
    image = np.zeros((128, 128, 3), np.uint8)
    image[32:96, 32:96] = (255, 0, 0)
    for b, e in engines.items():  # img2img: the init image encoded in tiles too
        assert e.generate(PROMPT, steps=4, init_image=image, strength=0.5, tiled_decode=True)[0].size == (128, 128)


def test_tiles_chosen_when_the_whole_decode_does_not_fit(engines, monkeypatch):
    """tiled_decode=None tiles exactly when the estimate of the whole decoder exceeds what is free (here a machine
    with 100 MB free, 90 MB usable: at 256 px the whole decoder needs ~128 MB by the estimate, the UNet ~75, a
    tile ~70)."""
    engine = engines["torch"]
    kwargs = dict(steps=2, height=256, width=256, output_type="np")
    whole = engine.generate(PROMPT, **kwargs)
    assert np.array_equal(engine.generate(PROMPT, tiled_decode=None, **kwargs), whole)  # fits: not tiled
    tiled = engine.generate(PROMPT, tiled_decode=True, **kwargs)
    monkeypatch.setattr(memory, "available", lambda device="cpu": 100 << 20)
    assert np.array_equal(engine.generate(PROMPT, **kwargs), tiled)
    with pytest.raises(ResourceError, match="decoder .* tiled_decode=True"):
        engine.generate(PROMPT, tiled_decode=False, **kwargs)
    with pytest.raises(InputError, match="tiled_decode"):
        engine.generate(PROMPT, tiled_decode="yes", **kwargs)


def test_hires_fix_is_generate_then_img2img(engines):
    """hires=128: the 64 px image, upscaled and refined by img2img at hires_strength, bit for bit; its PNG record
    holds what reproduces it."""
    engine = engines["torch"]
    images = engine.generate(PROMPT, steps=4, seed=3, hires=128, hires_strength=0.5)
    first = engine.generate(PROMPT, steps=4, seed=3, output_type="np")
    init = torch.from_numpy(first).permute(0, 3, 1, 2) * 2 - 1
    second = engine.generate(PROMPT, steps=4, seed=3, height=128, width=128, init_image=init, strength=0.5)
    assert images[0].size == (128, 128) and np.array_equal(np.asarray(images[0]), np.asarray(second[0]))
    import json
    record = json.loads(images[0].info["parameters"])
    assert record["hires"] == [128, 128] and record["hires_strength"] == 0.5 and record["height"] == 64
    assert "strength" not in record
    assert engine.generate(PROMPT, steps=2, hires=(128, 192), output_type="np").shape == (1, 128, 192, 3)


@pytest.mark.parametrize("bad", [dict(hires="big"), dict(hires=(100, 100)), dict(hires=True),
                                 dict(hires=128, hires_strength=0), dict(hires=128, hires_strength=1.5),
                                 dict(hires=128, init_image=np.zeros((64, 64, 3), np.uint8))])
def test_bad_hires_requests_refused_before_work(engines, bad, monkeypatch):
    engine = engines["torch"]
    monkeypatch.setattr(engine.backend, "run", lambda *a, **k: pytest.fail("a graph ran"))
    with pytest.raises(InputError):
        engine.generate(PROMPT, steps=2, **bad)


def test_cli_flags(engines, tmp_path, capsys):
    """--hires WIDTHxHEIGHT --hires-strength S --tiled-vae: the PNG's record says so; a bad size is one line, exit 2."""
    import json

    from PIL import Image

    from ldmrt.cli import main
    out = tmp_path / "big.png"
    assert main(["generate", PROMPT, "--engine", str(engines["torch"].path), "--steps", "4", "--hires", "192x128",
                 "--hires-strength", "0.4", "--tiled-vae", "--quiet", "-o", str(out)]) == 0
    record = json.loads(Image.open(out).text["parameters"])
    assert Image.open(out).size == (192, 128) and record["hires"] == [128, 192] and record["hires_strength"] == 0.4
    assert main(["generate", PROMPT, "--engine", str(engines["torch"].path), "--hires", "100",
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "multiples of 16" in capsys.readouterr().err
