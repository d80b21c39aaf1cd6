"""Text tokenizers for the text conditioners, built on the `tokenizers` library (no `transformers`).

- `BertTokenizer`: WordPiece as HF BertTokenizerFast('bert-base-uncased') behaves when CompVis's
  BERTEmbedder calls it (lowercase + accent stripping, [CLS] ... [SEP], truncate and pad to max_length
  with [PAD]). Needs the model's `vocab.txt`.
- `ClipTokenizer`: CLIP's byte-level BPE as HF CLIPTokenizer behaves when Stable Diffusion v1 calls it
  (truncate and pad to 77 with <|endoftext|>, <|startoftext|> ... <|endoftext|>). Needs `vocab.json`
  and `merges.txt`. Like HF without `ftfy` installed, text is only NFC-normalized, whitespace-collapsed
  and lowercased; CLIP's own cleaner (ftfy.fix_text, HTML unescaping) is not applied.

Both turn a string or a list of strings into a LongTensor (batch, max_length).
"""
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from .errors import TokenizerNotFoundError

BERT_FILES = ("vocab.txt",)
CLIP_FILES = ("vocab.json", "merges.txt")


class _PaddedTokenizer:
    """A configured `tokenizers.Tokenizer` that always truncates and pads to `max_length`."""

    kind: str  # "bert" or "clip"

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token: str, files: tuple[Path, ...]):
        pad_id = tokenizer.token_to_id(pad_token)
        self.files = files  # the standard files it was read from: engines copy them for C++ hosts
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.tokenizer.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)


def _require_files(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TokenizerNotFoundError(f"tokenizer file(s) not found: {', '.join(missing)}")


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
        tokenizer = Tokenizer(WordPiece.from_file(str(vocab_txt), unk_token="[UNK]", max_input_chars_per_word=100))
        # strip_accents=None follows lowercase, as in the uncased BERT models.
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        ids = {t: _special_token_id(tokenizer, t, vocab_txt) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")}
        # Special tokens written in the text stay whole, as in HF ([MASK] too when the vocabulary has it).
        tokenizer.add_special_tokens([t for t in (*ids, "[MASK]") if tokenizer.token_to_id(t) is not None])
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
        return cls(tokenizer, max_length, pad_token="[PAD]", files=(vocab_txt,))


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
        # Words end in '</w>' and there is no continuation prefix; every byte is in CLIP's vocabulary,
        # so <|endoftext|> as unknown token is never actually produced.
        bpe = BPE.from_file(str(vocab_json), str(merges_txt), unk_token=cls.EOS,
                            continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
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
        return cls(tokenizer, max_length, pad_token=cls.EOS, files=(vocab_json, merges_txt))


def find_tokenizer(directory: str | Path, kind: str | None = None,
                   max_length: int = 77) -> BertTokenizer | ClipTokenizer:
    """The tokenizer whose standard files lie in `directory` or its `tokenizer/` subfolder (diffusers layout).

    kind: "bert" (vocab.txt) or "clip" (vocab.json + merges.txt); None takes whichever is there.
    """
    if kind not in (None, "bert", "clip"):
        raise ValueError(f"kind must be 'bert', 'clip' or None, not {kind!r}")
    directory = Path(directory)
    folders = [directory, directory / "tokenizer"]
    for folder in folders:
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
        f"no tokenizer files found: looked for {' or '.join(wanted)} in {' and '.join(map(str, folders))}")
