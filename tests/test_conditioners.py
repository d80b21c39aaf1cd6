"""Conditioners against their references: CompVis's encoders (x_transformer) and transformers' CLIPTextModel."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldmrt.models.conditioners import (BERTEmbedder, ClassEmbedder, FrozenCLIPEmbedder, SpatialRescaler,
                                       TransformerEmbedder)
from ldmrt.tokenizer import BertTokenizer, TokenizerNotFoundError
from helpers import import_compvis, needs_compvis, rel_l2


# BERTEmbedder params of the zoo configs: text2img256, txt2img-1p4B, layout2img-openimages256.
ZOO_BERT_PARAMS = [dict(n_embed=640, n_layer=32), dict(n_embed=1280, n_layer=32),
                   dict(n_embed=512, n_layer=16, vocab_size=8192, max_seq_len=92, use_tokenizer=False)]


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (LayerNorms near identity) so that every parameter shows in the output."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if isinstance(module, nn.LayerNorm) and name == "weight" else 0.1 * noise)
    return model


@pytest.fixture(scope="module")
def compvis():
    """CompVis's ldm.modules.encoders.modules, with its unused top-level imports (clip, kornia) stubbed."""
    with pytest.MonkeyPatch.context() as mp:
        return import_compvis(mp, "ldm.modules.encoders.modules")


# ---- BERTEmbedder / TransformerEmbedder ----

@needs_compvis
@pytest.mark.parametrize("params", ZOO_BERT_PARAMS)
def test_bert_zoo_configs_same_state_dict_as_compvis(compvis, params):
    with torch.device("meta"):
        ours = BERTEmbedder(**params).state_dict()
        theirs = compvis.BERTEmbedder(**{**params, "use_tokenizer": False}).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@needs_compvis
def test_bert_embedder_matches_compvis_float64(compvis):
    params = dict(n_embed=64, n_layer=2, vocab_size=100, max_seq_len=12, use_tokenizer=False)
    theirs = randomize(compvis.BERTEmbedder(**params)).double().eval()
    ours = BERTEmbedder(**params).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = theirs.encode(ids), ours.encode(ids)
    assert got.shape == (3, 12, 64)
    assert rel_l2(got, want) <= 1e-12


@needs_compvis
def test_transformer_embedder_matches_compvis_float64(compvis):
    theirs = randomize(compvis.TransformerEmbedder(48, 2, 50, max_seq_len=10, device="cpu")).double().eval()
    ours = TransformerEmbedder(48, 2, 50, max_seq_len=10).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))  # shorter than max_seq_len
    with torch.no_grad():
        assert rel_l2(ours.encode(ids), theirs.encode(ids)) <= 1e-12


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "."]


@pytest.fixture
def bert_tokenizer(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    return BertTokenizer.from_file(tmp_path / "vocab.txt", max_length=8)


def test_bert_embedder_text_and_ids(bert_tokenizer):
    emb = randomize(BERTEmbedder(n_embed=32, n_layer=1, vocab_size=len(BERT_VOCAB), max_seq_len=8)).eval()
    assert not list(emb.tknz_fn.parameters()) and not list(emb.tknz_fn.buffers())
    with pytest.raises(TokenizerNotFoundError, match=r"vocab\.txt.*beside the checkpoint.*tokenizer="):
        emb.encode(["a cat"])
    emb.tokenizer = bert_tokenizer  # as the loader sets it
    assert emb.tknz_fn.tokenizer is bert_tokenizer
    with torch.no_grad():
        from_text = emb.encode(["a photo of a cat.", "cat"])
        from_ids = emb.encode(bert_tokenizer(["a photo of a cat.", "cat"]))
    assert from_text.shape == (2, 8, 32) and torch.equal(from_text, from_ids)

    with pytest.raises(ValueError, match="max_length=16"):
        BERTEmbedder(32, 1, len(BERT_VOCAB), max_seq_len=16, tokenizer=bert_tokenizer).encode("a cat")


def test_bert_embedder_ids_only():
    emb = BERTEmbedder(n_embed=32, n_layer=1, vocab_size=20, max_seq_len=6, use_tokenizer=False)
    assert not hasattr(emb, "tknz_fn") and emb.tokenizer is None
    assert emb.encode(torch.zeros(2, 6, dtype=torch.long)).shape == (2, 6, 32)
    with pytest.raises(TypeError, match="use_tokenizer=False"):
        emb.encode(["a cat"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_runs(dtype):
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(3))
    for emb, out_dim in ((BERTEmbedder(32, 1, 30, max_seq_len=8), 32),
                         (FrozenCLIPEmbedder(vocab_size=30, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64), 32)):
        randomize(emb).eval()
        with torch.no_grad():
            want = emb.encode(ids)
            got = emb.to(dtype).encode(ids)
        assert got.dtype == dtype and got.shape == (2, 8, out_dim)
        assert rel_l2(got.float(), want) <= 2e-2


# ---- FrozenCLIPEmbedder ----

def test_clip_full_size_parameter_count():
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
    keys = model.state_dict().keys()
    assert "transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "transformer.text_model.encoder.layers.11.self_attn.out_proj.bias" in keys
    assert "transformer.text_model.final_layer_norm.weight" in keys


TINY_CLIP = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                 max_position_embeddings=77)


@pytest.fixture(scope="module")
def hf_tiny_clip():
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is the CLIP reference")
    # sdpa, not eager: HF's eager attention takes its softmax in float32 even for a float64 model.
    config = transformers.CLIPTextConfig(**TINY_CLIP, hidden_act="quick_gelu", bos_token_id=97, eos_token_id=98,
                                         pad_token_id=98, attn_implementation="sdpa")
    model = randomize(transformers.CLIPTextModel(config)).double().eval()
    # SD v1 checkpoints (transformers 4.x) nest the text tower under `text_model.`; transformers 5 does not.
    state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in model.state_dict().items()}
    return model, state


def test_clip_matches_transformers_float64(hf_tiny_clip):
    hf, state = hf_tiny_clip
    ours = FrozenCLIPEmbedder(**TINY_CLIP).double().eval()
    ours.transformer.load_state_dict(state, strict=True)
    ids = torch.randint(0, 99, (3, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(input_ids=ids).last_hidden_state
        got = ours.encode(ids)
    assert got.shape == (3, 77, 64)
    assert rel_l2(got, want) <= 1e-10


def test_clip_accepts_stored_position_ids(hf_tiny_clip):
    _, state = hf_tiny_clip
    ours = FrozenCLIPEmbedder(**TINY_CLIP).double()
    # As SD v1 checkpoints carry it; no such key in our own state dict.
    with_ids = {**state, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    ours.transformer.load_state_dict(with_ids, strict=True)
    assert "transformer.text_model.embeddings.position_ids" not in ours.state_dict()


def test_clip_text_needs_tokenizer():
    emb = FrozenCLIPEmbedder(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=16)
    with pytest.raises(TokenizerNotFoundError, match=r"vocab\.json \+ merges\.txt.*beside the checkpoint.*tokenizer="):
        emb.encode(["a photo of a cat"])


# ---- ClassEmbedder / SpatialRescaler ----

def test_class_embedder():
    emb = ClassEmbedder(embed_dim=16, n_classes=10, key="class_label")
    labels = torch.tensor([3, 0, 9])
    out = emb.encode({"class_label": labels})
    assert out.shape == (3, 1, 16)
    assert torch.equal(out[:, 0], emb.embedding.weight[labels])
    assert torch.equal(emb(labels), out)
    assert list(emb.state_dict()) == ["embedding.weight"]


def test_spatial_rescaler_semantic_synthesis():
    # ldm-semantic_synthesis256: 182 one-hot classes, two halvings, 1x1 conv to 3 channels.
    rescaler = SpatialRescaler(n_stages=2, in_channels=182, out_channels=3)
    assert list(rescaler.state_dict()) == ["channel_mapper.weight"]
    x = torch.randn(2, 182, 32, 24)
    want = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear")
    want = F.conv2d(want, rescaler.channel_mapper.weight)
    got = rescaler.encode(x)
    assert got.shape == (2, 3, 8, 6)
    assert rel_l2(got, want) <= 1e-6
    assert SpatialRescaler(n_stages=1, method="nearest")(x).shape == (2, 182, 16, 12)


@needs_compvis
def test_spatial_rescaler_matches_compvis(compvis):
    theirs = compvis.SpatialRescaler(n_stages=2, in_channels=182, out_channels=3).double()
    ours = SpatialRescaler(n_stages=2, in_channels=182, out_channels=3).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 182, 16, 16, dtype=torch.float64)
    assert rel_l2(ours(x), theirs(x)) <= 1e-12


def test_clip_layer_contexts_match_transformers(hf_tiny_clip):
    """encode_layers: each layer's output through the final layer norm, as AUTOMATIC1111's CLIP skip n takes
    hidden_states[-n] + final_layer_norm (diffusers' clip_skip = n - 1); fp32 rel L2 <= 1e-6."""
    hf, state = hf_tiny_clip
    hf = copy.deepcopy(hf).float()
    ours = FrozenCLIPEmbedder(**TINY_CLIP).eval()
    ours.transformer.load_state_dict(state, strict=True)
    ids = torch.randint(0, 99, (2, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
        context, layers = ours.encode_layers(ids)
        assert torch.equal(context, ours.encode(ids))
        assert layers.shape == (2, TINY_CLIP["num_hidden_layers"], 77, 64)
        for n in range(1, TINY_CLIP["num_hidden_layers"] + 1):
            want = getattr(hf, "text_model", hf).final_layer_norm(out.hidden_states[-n])  # transformers 4 | 5
            assert rel_l2(layers[:, -n], want) <= 1e-6, n
        assert rel_l2(layers[:, -1], out.last_hidden_state) <= 1e-6
