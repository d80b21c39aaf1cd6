"""Text tokenizers for the text conditioners, built on the `tokenizers` library (no `transformers`).

- `BertTokenizer`: WordPiece as HF BertTokenizerFast('bert-base-uncased') behaves when CompVis's
  BERTEmbedder calls it (lowercase + accent stripping, [CLS] ... [SEP], truncate and pad to max_length
  with [PAD]). Needs the model's `vocab.txt`.
- `ClipTokenizer`: CLIP's byte-level BPE as HF CLIPTokenizer behaves when Stable Diffusion v1 calls it
  (truncate and pad to 77 with <|endoftext|>, <|startoftext|> ... <|endoftext|>). Needs `vocab.json`
  and `merges.txt`. Like HF without `ftfy` installed, text is only NFC-normalized, whitespace-collapsed
  and lowercased; CLIP's own cleaner (ftfy.fix_text, HTML unescaping) is not applied.

Both turn a string or a list of strings into a LongTensor (batch, max_length). Either is read from its standard
files, or from the `tokenizer.json` that transformers >= 5 saves alone (`Tokenizer.from_file`; its vocabulary
and merges, with the pipeline above around them). Engines hold the standard files whatever the source
(`standard_files`), the one format the C++ host reads.
"""
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from .errors import TokenizerNotFoundError

BERT_FILES = ("vocab.txt",)
CLIP_FILES = ("vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"


class _PaddedTokenizer:
    """A configured `tokenizers.Tokenizer` that always truncates and pads to `max_length`."""

    kind: str  # "bert" or "clip"

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token: str, standard_files: dict[str, bytes],
                 bos_token: str, eos_token: str):
        self.pad_id = tokenizer.token_to_id(pad_token)
        self.bos_id, self.eos_id = tokenizer.token_to_id(bos_token), tokenizer.token_to_id(eos_token)
        # {file name: content} of the standard files (whatever it was read from): engines write them for C++ hosts.
        self.standard_files = standard_files
        # Unpadded, untruncated and without BOS/EOS: what prompt chunking (ldmrt/prompts.py) splits itself.
        self.plain = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.tokenizer.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)

    def encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids with no BOS/EOS, truncation or padding."""
        return [e.ids for e in self.plain.encode_batch(list(texts), add_special_tokens=False)]

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def _require_files(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TokenizerNotFoundError(f"tokenizer file(s) not found: {', '.join(missing)}")


def _read_tokenizer_json(path: Path, model_type: str | None) -> dict:
    """The `model` section (vocab, merges) of a tokenizers-library file, as the library itself serialises it."""
    _require_files(path)
    try:
        model = json.loads(Tokenizer.from_file(str(path)).to_str())["model"]
    except Exception as e:  # the library's own parse error: say which file and what to do
        raise TokenizerNotFoundError(f"{path} is not a tokenizers-library file ({type(e).__name__}: {e}): save the "
                                     f"tokenizer again with save_pretrained, or give its standard files") from None
    if model_type is not None and model.get("type") != model_type:
        raise TokenizerNotFoundError(f"{path} holds a {model.get('type')} tokenizer, this model needs {model_type}: "
                                     f"give the tokenizer the text encoder was trained with")
    return model


def _special_token_id(tokenizer: Tokenizer, token: str, vocab_file: Path) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{vocab_file} has no {token} token")
    return token_id


class BertTokenizer(_PaddedTokenizer):
    kind = "bert"

    @classmethod
    def from_file(cls, vocab_txt: str | Path, max_length: int = 77) -> "BertTokenizer":
        vocab_txt = Path(vocab_txt)
        _require_files(vocab_txt)
        model = WordPiece.from_file(str(vocab_txt), unk_token="[UNK]", max_input_chars_per_word=100)
        return cls._build(model, max_length, vocab_txt, {"vocab.txt": vocab_txt.read_bytes()})

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, max_length: int = 77) -> "BertTokenizer":
        path = Path(path)
        vocab = _read_tokenizer_json(path, "WordPiece")["vocab"]
        by_id = sorted(vocab, key=vocab.get)
        if [vocab[t] for t in by_id] != list(range(len(by_id))):
            raise TokenizerNotFoundError(f"{path}: its WordPiece ids are not 0..{len(by_id) - 1}: save the "
                                         f"tokenizer again with save_pretrained, or give its vocab.txt")
        model = WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)
        return cls._build(model, max_length, path, {"vocab.txt": ("\n".join(by_id) + "\n").encode("utf-8")})

    @classmethod
    def _build(cls, model: WordPiece, max_length: int, vocab_txt: Path, files: dict[str, bytes]) -> "BertTokenizer":
        tokenizer = Tokenizer(model)
        # strip_accents=None follows lowercase, as in the uncased BERT models.
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        ids = {t: _special_token_id(tokenizer, t, vocab_txt) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")}
        # Special tokens written in the text stay whole, as in HF ([MASK] too when the vocabulary has it).
        tokenizer.add_special_tokens([t for t in (*ids, "[MASK]") if tokenizer.token_to_id(t) is not None])
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
        return cls(tokenizer, max_length, "[PAD]", files, bos_token="[CLS]", eos_token="[SEP]")


# CLIP's pre-tokenization: its special tokens, English contractions, letter runs, single digits, and
# runs of everything else that is not whitespace (whitespace is dropped).
_CLIP_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


class ClipTokenizer(_PaddedTokenizer):
    BOS, EOS = "<|startoftext|>", "<|endoftext|>"
    kind = "clip"

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, max_length: int = 77) -> "ClipTokenizer":
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        _require_files(vocab_json, merges_txt)
        vocab, merges = BPE.read_file(str(vocab_json), str(merges_txt))
        files = {"vocab.json": vocab_json.read_bytes(), "merges.txt": merges_txt.read_bytes()}
        return cls._build(vocab, merges, max_length, vocab_json, files)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, max_length: int = 77) -> "ClipTokenizer":
        """From the tokenizer.json of CLIPTokenizerFast.save_pretrained (transformers >= 5 writes nothing else)."""
        path = Path(path)
        model = _read_tokenizer_json(path, "BPE")
        # Merges are "a b" strings in older files, [a, b] pairs in newer ones; CLIP's symbols hold no space.
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        files = {"vocab.json": json.dumps(model["vocab"], ensure_ascii=False).encode("utf-8"),
                 "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8")}
        return cls._build(model["vocab"], merges, max_length, path, files)

    @classmethod
    def _build(cls, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int, vocab_json: Path,
               files: dict[str, bytes]) -> "ClipTokenizer":
        # Words end in '</w>' and there is no continuation prefix; every byte is in CLIP's vocabulary,
        # so <|endoftext|> as unknown token is never actually produced.
        bpe = BPE(vocab, merges, unk_token=cls.EOS, continuing_subword_prefix="", end_of_word_suffix="</w>",
                  fuse_unk=False)
        tokenizer = Tokenizer(bpe)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            # Maps each word's UTF-8 bytes to CLIP's printable byte alphabet; the words are already split.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        bos = _special_token_id(tokenizer, cls.BOS, vocab_json)
        eos = _special_token_id(tokenizer, cls.EOS, vocab_json)
        tokenizer.add_special_tokens([cls.BOS, cls.EOS])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls.BOS} $A {cls.EOS}", special_tokens=[(cls.BOS, bos), (cls.EOS, eos)])
        # SD v1 pads with <|endoftext|> (openai/clip-vit-large-patch14's pad token).
        return cls(tokenizer, max_length, cls.EOS, files, bos_token=cls.BOS, eos_token=cls.EOS)


def find_tokenizer(directory: str | Path, kind: str | None = None,
                   max_length: int = 77) -> BertTokenizer | ClipTokenizer:
    """The tokenizer whose standard files lie in `directory` or its `tokenizer/` subfolder (diffusers layout).

    kind: "bert" (vocab.txt) or "clip" (vocab.json + merges.txt); None takes whichever is there. A folder with
    only a tokenizer.json (transformers >= 5) is read through the `tokenizers` library (WordPiece: BERT, BPE: CLIP).
    """
    if kind not in (None, "bert", "clip"):
        raise ValueError(f"kind must be 'bert', 'clip' or None, not {kind!r}")
    directory = Path(directory)
    folders = [directory, directory / "tokenizer"]
    for folder in folders:
        standard = any((folder / f).is_file() for f in (*CLIP_FILES, *BERT_FILES))
        if (folder / TOKENIZER_JSON).is_file() and not standard:
            return _from_tokenizer_json(folder / TOKENIZER_JSON, kind, max_length)
        has_clip = all((folder / f).is_file() for f in CLIP_FILES) and kind in (None, "clip")
        has_bert = all((folder / f).is_file() for f in BERT_FILES) and kind in (None, "bert")
        if has_clip and has_bert:
            raise ValueError(f"{folder} holds both a BERT and a CLIP vocabulary: pass kind='bert' or kind='clip'")
        if has_clip:
            return ClipTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", max_length)
        if has_bert:
            return BertTokenizer.from_file(folder / "vocab.txt", max_length)
    wanted = {"bert": [" + ".join(BERT_FILES)], "clip": [" + ".join(CLIP_FILES)],
              None: [" + ".join(CLIP_FILES) + " (CLIP BPE)", " + ".join(BERT_FILES) + " (BERT WordPiece)"]}[kind]
    raise TokenizerNotFoundError(
        f"no tokenizer files found: looked for {' or '.join(wanted)}, or {TOKENIZER_JSON}, in "
        f"{' and '.join(map(str, folders))}")


def _from_tokenizer_json(path: Path, kind: str | None, max_length: int) -> BertTokenizer | ClipTokenizer:
    found = _read_tokenizer_json(path, None)["type"] if kind is None else None
    if kind == "clip" or found == "BPE":
        return ClipTokenizer.from_tokenizer_json(path, max_length)
    if kind == "bert" or found == "WordPiece":
        return BertTokenizer.from_tokenizer_json(path, max_length)
    raise TokenizerNotFoundError(f"{path} holds a {found} tokenizer: ldmrt reads CLIP's BPE and BERT's WordPiece")
