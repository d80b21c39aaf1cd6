"""ldmrt.tokenizer against transformers' tokenizers (and, for CLIP, a plain-Python BPE) on synthetic vocabularies."""
import json
import math
import re
import unicodedata

import pytest
import torch

from ldmrt.tokenizer import BertTokenizer, ClipTokenizer, TokenizerNotFoundError, find_tokenizer
from ldmrt.testing import clip_alphabet, write_clip_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers (test extra) is the reference tokenizer")
regex = pytest.importorskip("regex", reason="the CLIP reference BPE needs `regex` for \\p{L}")

SENTENCES = [
    "A photo of a cat.",
    "  The   DOG's running!!  in\tthe\nPARK ",
    "Café au lait, naïve résumé",
    "xyzzy unknownword qqq",
    "playing cats and dogs, 3 cats 42",
    "a photo<|endoftext|>cat",
    "rocket 🚀 to mars!!! ... ??",
    "中文 text",
    "",
    "the cat " * 60,  # far past 77 tokens: truncation
]


# ---- BERT WordPiece ----

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "play",
              "run", "park", "in", "cafe", "au", "lait", "naive", "resume", ",", ".", "!", "'", "s", "3", "4", "2",
              "##s", "##ing", "##ning", "##n", "and", "mars", "to", "rocket", "text", "##2", "中", "文", "?"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    return folder


def bert_references(folder):
    """The slow (pure-Python) BertTokenizer, and transformers' default BertTokenizer when that is a different one."""
    refs = []
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy  # transformers >= 5
        refs.append(BertTokenizerLegacy(str(folder / "vocab.txt"), do_lower_case=True))
    except ImportError:
        pass
    refs.append(transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True))
    return refs


@pytest.mark.parametrize("max_length", [77, 16])
def test_bert_matches_transformers(bert_dir, max_length):
    ours = BertTokenizer.from_file(bert_dir / "vocab.txt", max_length=max_length)
    got = ours(SENTENCES)
    assert got.dtype == torch.long and got.shape == (len(SENTENCES), max_length)
    for ref in bert_references(bert_dir):
        # As CompVis's BERTTokenizer calls it.
        want = ref(SENTENCES, truncation=True, max_length=max_length, return_length=True,
                   return_overflowing_tokens=False, padding="max_length", return_tensors="pt")["input_ids"]
        assert torch.equal(got, want), type(ref).__name__
    # The sentences do exercise unknown words, word pieces and truncation.
    ids = got.flatten().tolist()
    assert BERT_VOCAB.index("[UNK]") in ids and BERT_VOCAB.index("##ing") in ids
    assert got[-1, -1] == BERT_VOCAB.index("[SEP]") and got[0, -1] == BERT_VOCAB.index("[PAD]")


def test_bert_single_string(bert_dir):
    ours = BertTokenizer.from_file(bert_dir / "vocab.txt", max_length=8)
    v = BERT_VOCAB.index
    assert ours("A cat!").tolist() == [[v("[CLS]"), v("a"), v("cat"), v("!"), v("[SEP]"), 0, 0, 0]]


# ---- CLIP byte-level BPE ----

CLIP_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
CLIP_WORDS = ["a", "photo", "of", "the", "cat", "dog", "'s", "running", "in", "park", "playing", "and",
              "to", "mars", "rocket", "!!", "...", "ca", "é"]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """vocab.json + merges.txt built the way CLIP builds its vocabulary."""
    folder = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer(folder, CLIP_WORDS)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]]
    return folder, vocab, merges


def reference_clip_ids(text, vocab, merges, max_length):
    """CLIP's tokenizer in plain Python: clean, split by CLIP's regex, byte-map, greedy lowest-rank BPE merges."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    byte_map = clip_alphabet()
    rank = {pair: i for i, pair in enumerate(merges)}
    ids = []
    for word in regex.findall(CLIP_PATTERN, text):
        if word in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[word])
            continue
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: rank.get(pair, math.inf))
            if best not in rank:
                break
            merged, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i:i + 2]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids += [vocab[s] for s in symbols]
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = [bos] + ids[: max_length - 2] + [eos]
    return ids + [eos] * (max_length - len(ids))


@pytest.mark.parametrize("max_length", [77, 12])
def test_clip_matches_references(clip_files, max_length):
    folder, vocab, merges = clip_files
    ours = ClipTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", max_length=max_length)
    got = ours(SENTENCES)
    assert got.dtype == torch.long and got.shape == (len(SENTENCES), max_length)

    want = torch.tensor([reference_clip_ids(s, vocab, merges, max_length) for s in SENTENCES])
    assert torch.equal(got, want)

    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    # As Stable Diffusion v1's FrozenCLIPEmbedder calls it.
    want_hf = hf(SENTENCES, truncation=True, max_length=max_length, return_length=True,
                 return_overflowing_tokens=False, padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(got, want_hf)

    # The sentences do exercise whole-word merges, partial merges and raw bytes.
    rocket_first_byte = vocab[clip_alphabet()["🚀".encode("utf-8")[0]]]
    assert vocab["photo</w>"] in got[0] and vocab["'s</w>"] in got[1] and rocket_first_byte in got[6]
    assert vocab["ca"] in got[4]  # "cats": the word merges stop short of "cats</w>"


def test_clip_single_string(clip_files):
    folder, vocab, _ = clip_files
    ours = ClipTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", max_length=6)
    eos = vocab["<|endoftext|>"]
    assert ours("A  CAT").tolist() == [[vocab["<|startoftext|>"], vocab["a</w>"], vocab["cat</w>"], eos, eos, eos]]


# ---- finding files, errors ----

def test_find_tokenizer_layouts(tmp_path, bert_dir, clip_files):
    clip_dir = clip_files[0]
    assert isinstance(find_tokenizer(bert_dir), BertTokenizer)
    assert isinstance(find_tokenizer(clip_dir, kind="clip", max_length=20), ClipTokenizer)
    # diffusers layout: <model>/tokenizer/{vocab.json, merges.txt}
    nested = tmp_path / "model" / "tokenizer"
    nested.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (nested / name).write_bytes((clip_dir / name).read_bytes())
    tok = find_tokenizer(tmp_path / "model", max_length=20)
    assert isinstance(tok, ClipTokenizer) and tok("a cat").shape == (1, 20)
    # Both vocabularies in one folder: ambiguous unless kind is given.
    (nested / "vocab.txt").write_bytes((bert_dir / "vocab.txt").read_bytes())
    with pytest.raises(ValueError, match="kind="):
        find_tokenizer(tmp_path / "model")
    assert isinstance(find_tokenizer(tmp_path / "model", kind="bert"), BertTokenizer)


def test_missing_files_errors(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match=r"vocab\.json \+ merges\.txt.*vocab\.txt") as err:
        find_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer") in str(err.value)
    with pytest.raises(TokenizerNotFoundError, match=r"vocab\.txt"):
        find_tokenizer(tmp_path, kind="bert")
    with pytest.raises(TokenizerNotFoundError, match="merges.txt"):
        ClipTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(TokenizerNotFoundError, match="vocab.txt"):
        BertTokenizer.from_file(tmp_path / "vocab.txt")
    assert issubclass(TokenizerNotFoundError, FileNotFoundError)


# ---- tokenizer.json alone (transformers >= 5 saves nothing else) ----

def test_tokenizer_json_alone_matches_transformers(tmp_path, clip_files, bert_dir):
    """A folder saved by CLIPTokenizerFast / BertTokenizerFast.save_pretrained: read through the tokenizers library,
    ids equal transformers' own, and the standard files it yields (what engines hold) tokenize the same."""
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(clip_files[0]))
    fast.save_pretrained(tmp_path / "clip")
    bert = transformers.BertTokenizerFast(vocab_file=str(bert_dir / "vocab.txt"), do_lower_case=True)
    bert.save_pretrained(tmp_path / "bert")
    for name in ("clip", "bert"):  # the situation this covers: no vocab.json / merges.txt / vocab.txt
        assert not {"vocab.json", "merges.txt", "vocab.txt"} & {p.name for p in (tmp_path / name).iterdir()}
    for name, ref, cls, max_length in (("clip", fast, ClipTokenizer, 77), ("bert", bert, BertTokenizer, 16)):
        ours = find_tokenizer(tmp_path / name, max_length=max_length)
        assert isinstance(ours, cls)
        want = ref(SENTENCES, truncation=True, max_length=max_length, padding="max_length",
                   return_tensors="pt")["input_ids"]
        assert torch.equal(ours(SENTENCES), want), name
        standard = tmp_path / f"{name}-standard"
        standard.mkdir()
        for file, content in ours.standard_files.items():
            (standard / file).write_bytes(content)
        assert torch.equal(find_tokenizer(standard, kind=ours.kind, max_length=max_length)(SENTENCES), want), name
    # The standard files of a tokenizer read from them are those files, byte for byte.
    folder = clip_files[0]
    tok = ClipTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    assert tok.standard_files == {n: (folder / n).read_bytes() for n in ("vocab.json", "merges.txt")}


def test_tokenizer_json_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerNotFoundError, match="not a tokenizers-library file"):
        find_tokenizer(tmp_path)
