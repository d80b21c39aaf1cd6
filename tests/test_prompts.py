"""ldmrt/prompts.py against AUTOMATIC1111's web UI (tests/fixtures/a1111_prompts.json, made by its own functions):
emphasis parsing, chunks of long prompts, comma backtracking, BREAK; the single-window rule of LDM-BERT; emphasis.
Then in engines built from a tiny diffusers SD-v1 folder (tokenizer.json alone): long weighted prompts, CLIP skip
and textual inversion against eager PyTorch / transformers, on the torch and ONNX Runtime backends."""
import json
import os
from pathlib import Path

import pytest
import torch

from ldmrt.errors import InputError
from ldmrt.prompts import Piece, chunks, emphasized, parse
from ldmrt.testing import write_clip_tokenizer
from ldmrt.tokenizer import BertTokenizer, ClipTokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "a1111_prompts.json").read_text())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer(folder, FIXTURE["words"])
    return ClipTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["prompt"][:24] for c in FIXTURE["cases"]])
def test_parse_matches_a1111(case):
    want = [(text, None) if weight == -1 else (text, weight) for text, weight in case["parsed"]]
    got = [(p.text, None) if p.is_break else (p.text, p.weight) for p in parse(case["prompt"])]
    assert got == want  # weights exactly: the same products in the same order


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["prompt"][:24] for c in FIXTURE["cases"]])
def test_chunks_match_a1111(case, clip):
    got = chunks(case["prompt"], clip)
    assert [c.ids for c in got] == [c["ids"] for c in case["chunks"]]
    assert [c.weights for c in got] == [c["weights"] for c in case["chunks"]]


def test_fixture_covers_the_rules(clip):
    """The cases do exercise comma backtracking, hard splits, BREAK and nesting."""
    by_prompt = {c["prompt"]: c for c in FIXTURE["cases"]}
    commas = by_prompt[", ".join(["a big red circle on the left"] * 12)]["chunks"]
    comma = clip.token_id(",</w>")
    first = commas[0]["ids"]
    assert first[first.index(clip.eos_id) - 1] == comma  # the first chunk ends after a comma, padded
    hard = by_prompt[" ".join(["a small blue square"] * 25)]["chunks"]
    assert clip.eos_id not in hard[0]["ids"][1:-1]  # filled to the last token
    assert len(by_prompt["a cat BREAK a dog"]["chunks"]) == 2
    # A short unweighted prompt is exactly what the padded tokenizer gives: nothing changes for plain prompts.
    assert chunks("a red circle", clip)[0].ids == clip("a red circle")[0].tolist()


def test_break_inside_brackets_is_a_break():
    """Where ldmrt departs from the web UI on purpose: there a bracketed BREAK becomes the word with weight -1.1."""
    assert parse("(a BREAK b)") == [Piece("a", 1.1), Piece("BREAK", 1.0, True), Piece("b", 1.1)]


def test_bad_weight_is_an_input_error():
    with pytest.raises(InputError, match="not a number"):
        parse("a (cat:1.2.3)")


def test_single_window_rule(tmp_path):
    """LDM-BERT has one window: the prompt fits, or an InputError says by how much it does not; never cut."""
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "cat", ","]) + "\n")
    bert = BertTokenizer.from_file(tmp_path / "vocab.txt", max_length=8)
    (chunk,) = chunks("a (red:1.5) cat", bert, long=False)
    assert chunk.ids == bert("a red cat")[0].tolist() and chunk.weights == [1, 1, 1.5, 1, 1, 1, 1, 1]
    chunks("a " * 6, bert, long=False)  # 6 tokens + [CLS] + [SEP] = 8 fits
    with pytest.raises(InputError, match="7 tokens long.*at most 6.*by 1 tokens"):
        chunks("a " * 7, bert, long=False)
    with pytest.raises(InputError, match="BREAK"):
        chunks("a BREAK cat", bert, long=False)


def test_emphasis_keeps_the_mean():
    """The web UI's "Original" emphasis: z * w per token, rescaled to the unweighted mean (float64 reference)."""
    z = torch.randn(1, 5, 3, dtype=torch.float64) + 0.5
    w = [1.0, 1.5, 1.0, 0.5, 1.0]
    got = emphasized(z, w)
    scaled = z * torch.tensor(w, dtype=torch.float64)[None, :, None]
    assert torch.allclose(got, scaled * z.mean() / scaled.mean(), rtol=1e-15, atol=0)
    assert torch.allclose(got.mean(), z.mean(), rtol=1e-14)
    assert emphasized(z, [1.0] * 5) is z


# ---- in engines: long prompts through the UNet's dynamic context length ----

WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny diffusers SD-v1 folder whose tokenizer is what transformers >= 5 saves: tokenizer.json alone."""
    pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from helpers import write_tiny_sd_folder
    root = write_tiny_sd_folder(tmp_path_factory.mktemp("sd") / "sd", WORDS)
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(root / "tokenizer"))
    for f in (root / "tokenizer").iterdir():
        f.unlink()
    fast.save_pretrained(root / "tokenizer")
    assert sorted(f.name for f in (root / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return root


LONG_PROMPT = "a (red:1.3) circle, " * 12 + "[blue] square on the left, " * 10  # 118 tokens: 2 windows


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=pytest.mark.filterwarnings("ignore"))])
def test_long_prompt_engine_matches_eager(backend, sd_folder, tmp_path):
    """A 2-window weighted prompt, guided against the "" prompt padded to 2 windows, through an engine built from a
    folder with only tokenizer.json, against eager PyTorch doing the same by hand: fp32 rel L2 <= 1e-5."""
    import ldmrt
    from helpers import rel_l2
    from ldmrt.engine import Engine
    from ldmrt.sampling import randn, sample
    engine = Engine.build(str(sd_folder), tmp_path / "e", backend=backend, progress=None)
    assert sorted(engine.manifest["tokenizer"]["files"]) == ["tokenizer/merges.txt", "tokenizer/vocab.json"]
    assert engine.summary["long_prompts"] and engine.summary["context_window"] == 77
    got = engine.generate(LONG_PROMPT, steps=4, sampler="ddim", timestep_spacing="uniform", guidance_scale=5.0, seed=2,
                          output_type="latent")

    model = ldmrt.load_model(str(sd_folder))
    tok = model.cond_stage_model.tokenizer

    def encode(prompt):  # each 77-token window on its own, weighted, rescaled to its unweighted mean, concatenated
        parts = []
        for w in chunks(prompt, tok):
            z = model.get_learned_conditioning(torch.tensor([w.ids]))
            weighted = z * torch.tensor(w.weights)[None, :, None]
            parts.append(weighted * (z.mean() / weighted.mean()))
        return torch.cat(parts, dim=1)
    cond = encode(LONG_PROMPT)
    assert cond.shape[1] == 154
    uncond = encode("").repeat(1, 2, 1)
    context = torch.cat([uncond, cond])

    def eps_fn(x, t):
        return model.apply_model(x, torch.full((x.shape[0],), t), context)
    with torch.no_grad():
        ref = sample(eps_fn, torch.from_numpy(randn(2, tuple(got.shape))), sampler="ddim", steps=4,
                     alphas_cumprod=model.schedule_alphas_cumprod, guidance_scale=5.0, seed=2)
    err = rel_l2(got, ref)
    print(f"{backend}: rel L2 {err:.2e}")
    assert err <= 1e-5


def test_text_engine_needs_a_tokenizer(tmp_path):
    from ldmrt.engine import Engine
    from ldmrt.errors import TokenizerNotFoundError
    from ldmrt.testing import reduced_config
    with pytest.raises(TokenizerNotFoundError, match=r"no tokenizer.*vocab\.json \+ merges\.txt.*tokenizer\.json"):
        Engine.build(reduced_config("sd-v1"), tmp_path / "e", backend="torch", random_weights=True, progress=None)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=pytest.mark.filterwarnings("ignore"))])
def test_clip_skip_in_engines(backend, sd_folder, tmp_path):
    """clip_skip without a rebuild: the cond stage's layer_contexts against transformers' CLIPTextModel
    (hidden_states[-n] + final_layer_norm, as AUTOMATIC1111) on the folder's own text encoder: fp32 rel L2 <= 1e-6."""
    transformers = pytest.importorskip("transformers")
    from helpers import rel_l2
    from ldmrt.engine import Engine
    from ldmrt.pipeline import text_context
    engine = Engine.build(str(sd_folder), tmp_path / "e", backend=backend, progress=None)
    hf = transformers.CLIPTextModel.from_pretrained(str(sd_folder / "text_encoder")).eval()
    ids = torch.tensor([chunks("a red circle on the left", engine.tokenizer)[0].ids])
    with torch.no_grad():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
        for n in (1, 2):
            want = getattr(hf, "text_model", hf).final_layer_norm(hidden[-n])
            err = rel_l2(text_context(engine, "a red circle on the left", n), want)
            print(f"{backend} clip_skip={n}: rel L2 {err:.2e}")
            assert err <= 1e-6
    with pytest.raises(InputError, match="clip_skip must be an integer in 1..2"):
        engine.generate("a red circle", clip_skip=3, steps=1)


# ---- textual inversion ----

def write_embeddings(folder, width, generator):
    """One file of each format SD v1 users bring; returns {path: {trigger: vectors}}."""
    from safetensors.torch import save_file
    folder.mkdir(exist_ok=True)
    vec = lambda n: torch.randn(n, width, generator=generator)  # noqa: E731
    files = {folder / "my-style.pt": {"my-style": vec(2)}, folder / "red-thing.safetensors": {"red-thing": vec(3)},
             folder / "learned_embeds.bin": {"<cat-toy>": vec(1)},
             folder / "learned_embeds.safetensors": {"<sky-toy>": vec(1)}}
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": files[folder / "my-style.pt"]["my-style"]},
                "name": "my-style", "step": 3000}, folder / "my-style.pt")  # AUTOMATIC1111's .pt layout
    save_file({"emb_params": files[folder / "red-thing.safetensors"]["red-thing"]},
              str(folder / "red-thing.safetensors"))
    torch.save({"<cat-toy>": files[folder / "learned_embeds.bin"]["<cat-toy>"][0]}, folder / "learned_embeds.bin")
    save_file(files[folder / "learned_embeds.safetensors"], str(folder / "learned_embeds.safetensors"))
    return files


def test_embedding_files(tmp_path):
    from ldmrt.embeddings import read_embedding_file
    from ldmrt.errors import CheckpointError
    files = write_embeddings(tmp_path, 8, torch.Generator().manual_seed(0))
    for path, want in files.items():
        got = read_embedding_file(path, 8)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), path.name
    with pytest.raises(CheckpointError, match=r"shape \(2, 8\).*takes \(n, 16\)"):
        read_embedding_file(tmp_path / "my-style.pt", 16)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_embedding_file(tmp_path / "none.pt", 8)
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_embedding_file(tmp_path / "bad.pt", 8)


def test_chunks_place_embeddings(clip):
    """A trigger's tokens become as many placeholders as it has vectors, recorded as a fix; a chunk never splits one."""
    plain = clip.encode_plain(["a", "circle"])
    (chunk,) = chunks("a (my-style:1.2) circle", clip, embeddings={"my-style": 3})
    assert chunk.ids[:7] == [clip.bos_id, *plain[0], clip.eos_id, clip.eos_id, clip.eos_id, *plain[1], clip.eos_id]
    assert chunk.fixes == ((2, "my-style"),) and chunk.weights[2:5] == [1.2] * 3
    full = chunks("sun " * 74 + "my-style", clip, embeddings={"my-style": 3})
    assert [c.fixes for c in full] == [(), ((1, "my-style"),)]  # 74 + 3 > 75: the embedding opens the next chunk
    with pytest.raises(InputError, match="76 vectors"):
        chunks("a", clip, embeddings={"x": 76})


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=pytest.mark.filterwarnings("ignore"))])
def test_textual_inversion_in_engines(backend, sd_folder, tmp_path):
    """Each file format through Engine.load_embedding, against the eager CLIP with the file's rows put in place of
    the trigger's tokens by hand: fp32 rel L2 <= 1e-6; generate(embeddings=) runs."""
    import ldmrt
    from helpers import rel_l2
    from ldmrt.engine import Engine
    from ldmrt.pipeline import text_context
    engine = Engine.build(str(sd_folder), tmp_path / "e", backend=backend, progress=None)
    assert engine.manifest["tokenizer"]["token_embedding"] in engine.manifest["files"]
    model = ldmrt.load_model(str(sd_folder))
    text = model.cond_stage_model.transformer.text_model
    files = write_embeddings(tmp_path / "emb", text.embeddings.token_embedding.weight.shape[1],
                             torch.Generator().manual_seed(1))
    tok = engine.tokenizer
    a, circle = tok.encode_plain(["a", "circle"])
    for path, want in files.items():
        (trigger,) = engine.load_embedding(path)
        vectors = want[trigger]
        ids = [tok.bos_id, *a, *[tok.eos_id] * len(vectors), *circle]
        ids += [tok.eos_id] * (77 - len(ids))
        with torch.no_grad():
            rows = text.embeddings.token_embedding.weight[torch.tensor(ids)].clone()
            rows[1 + len(a):1 + len(a) + len(vectors)] = vectors
            ref = text.final_layer_norm(text.encoder(text.embeddings.with_positions(rows[None])))
        err = rel_l2(text_context(engine, f"a {trigger} circle"), ref)
        print(f"{backend} {path.name}: rel L2 {err:.2e}")
        assert err <= 1e-6
    # The prompt without a trigger word runs the ids graph, as before.
    assert torch.equal(text_context(engine, "a red circle"),
                       engine.backend.run("cond_stage", cond=tok("a red circle"))["context"])
    fresh = Engine.load(tmp_path / "e")
    latent = fresh.generate("a my-style circle", embeddings=[tmp_path / "emb" / "my-style.pt"], steps=1,
                            output_type="latent")
    assert torch.isfinite(latent).all() and "my-style" in fresh.embeddings


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LDMRT_SLOW"), reason="slow (~20 s): set LDMRT_SLOW=reduced")
def test_aoti_dynamic_shapes_take_long_contexts():
    """torch.export with AOTInductor's dynamic shapes (export/aoti.py): the UNet takes 1..3 windows of context, the
    textual-inversion graph any batch; the exported UNet at 3 windows equals eager (the compile itself is not run)."""
    from ldmrt.checkpoint import load_model
    from ldmrt.export import graphs as G
    from ldmrt.export.aoti import _dynamic_shapes
    from ldmrt.testing import reduced_config
    torch.manual_seed(0)
    model = load_model(reduced_config("sd-v1"), random_weights=True).eval()
    multiple, (_, factor) = G.unet_downsampling(model), G.latent_shape(model)
    graphs = G.graphs_for(model)
    for name in ("unet", "cond_stage_embeds"):
        g = graphs[name]
        exported = torch.export.export(g.module, g.example_inputs,
                                       dynamic_shapes=_dynamic_shapes(g, multiple, factor, 77))
        if name == "unet":
            x, t, ctx = torch.randn(3, 4, 16, 16), torch.tensor([1.0, 500.0, 900.0]), torch.randn(3, 3 * 77, 32)
            with torch.no_grad():
                assert torch.equal(exported.module()(x, t, ctx)[0], g.module(x, t, ctx)[0])


def test_cli_clip_skip_and_embedding(sd_folder, tmp_path, capsys):
    """`ldmrt generate --clip-skip N --embedding FILE`: the PNG records the skip; mistakes are exit status 2."""
    from PIL import Image
    from ldmrt.cli import main
    from ldmrt.engine import Engine
    Engine.build(str(sd_folder), tmp_path / "e", backend="torch", progress=None)
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}}, tmp_path / "my-style.pt")
    args = ["generate", "a (red:1.2) my-style circle", "--engine", str(tmp_path / "e"), "--steps", "2", "--quiet"]
    assert main([*args, "--clip-skip", "2", "--embedding", str(tmp_path / "my-style.pt"),
                 "-o", str(tmp_path / "out.png")]) == 0
    assert json.loads(Image.open(tmp_path / "out.png").text["parameters"])["clip_skip"] == 2
    assert main([*args, "--clip-skip", "3", "-o", str(tmp_path / "bad.png")]) == 2
    assert main([*args, "--embedding", str(tmp_path / "none.pt"), "-o", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert "clip_skip must be an integer in 1..2" in err and "none.pt does not exist" in err
