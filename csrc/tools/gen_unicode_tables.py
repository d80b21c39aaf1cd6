"""Writes csrc/unicode_tables.inc, the per-character data of the C++ tokenizers (csrc/tokenizer.cpp).

    python csrc/tools/gen_unicode_tables.py > csrc/unicode_tables.inc

The tables are read off the very normalisers and pre-tokenizers ldmrt/tokenizer.py configures in HF
`tokenizers`, one code point at a time, so the C++ tokenizers classify and fold characters exactly as the
Python ones do (what is not per-character, NFC composition, is documented in tokenizer.h):
- kCategoryRuns: Letter / Number (CLIP's \\p{L} / \\p{N}), Space (whitespace: collapsed by CLIP, a word
  separator for BERT), Punct (a word of its own for BERT; "other" for CLIP); all else is Other.
- kBertRuns: BertNormalizer (clean text, NFD, nonspacing marks dropped, lowercase) of one code point.
  Hangul syllables are left out: csrc/tokenizer.cpp decomposes them by formula; and it puts the spaces
  around CJK ideographs (CJK_RANGES) itself, the table holding only the ideograph (both checked here).
- kClipRuns: NFC then lowercase of one code point.
A run maps start..end (every `step`-th code point) either to code point + delta (kind 0), to nothing
(kind 1), to an explicit sequence in the pool (kind 2: value = offset | length << 24), or all to the
one code point `value` (kind 3).
"""
import unicodedata

from tokenizers import Regex, normalizers, pre_tokenizers

from ldmrt.tokenizer import _CLIP_PATTERN

CODE_POINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
HANGUL = range(0xAC00, 0xD7A4)
CJK_RANGES = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]  # as csrc/tokenizer.cpp (and HF: 2B920)

BERT_NORMALIZER = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                             lowercase=True)
BERT_PRE = pre_tokenizers.BertPreTokenizer()
CLIP_FOLD = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
CLIP_SPACE = normalizers.Replace(Regex(r"\s+"), " ")
CLIP_SPLIT = pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True)


def pieces(pre, text: str) -> list[str]:
    return [p for p, _ in pre.pre_tokenize_str(text)]


def category(ch: str) -> str:
    if CLIP_SPACE.normalize_str("a" + ch + "a") == "a a":
        assert pieces(BERT_PRE, "a" + ch + "a") == ["a", "a"], hex(ord(ch))
        return "Space"
    bert_punct = pieces(BERT_PRE, "a" + ch + "a") == ["a", ch, "a"]
    if pieces(CLIP_SPLIT, "a" + ch) == ["a" + ch]:
        assert not bert_punct, hex(ord(ch))
        return "Letter"
    if pieces(CLIP_SPLIT, "!" + ch) == ["!" + ch]:
        return "Punct" if bert_punct else "Other"
    assert pieces(CLIP_SPLIT, ch + ch) == [ch, ch] and not bert_punct, hex(ord(ch))
    return "Number"


def bert_fold(ch: str) -> str:
    """BertNormalizer of one character, without the spaces it puts around CJK ideographs."""
    out = BERT_NORMALIZER.normalize_str(ch)
    cjk = any(a <= ord(ch) <= b for a, b in CJK_RANGES)
    if cjk:
        assert len(out) == 3 and out[0] == out[2] == " ", hex(ord(ch))
        return out[1]
    assert not (len(out) == 3 and out[0] == out[2] == " " and out[1] != " "), hex(ord(ch))
    return out


def hangul_nfd(cp: int) -> str:
    s = cp - 0xAC00
    return chr(0x1100 + s // 588) + chr(0x1161 + s % 588 // 28) + (chr(0x11A7 + s % 28) if s % 28 else "")


def mapping_runs(fold, skip=()):
    """[start, end, step, kind, value] runs and the pool of explicit sequences (see the module docstring)."""
    runs, pool = [], []
    for cp in CODE_POINTS:
        if cp in skip:
            continue
        s = chr(cp)
        out = fold(s)
        if out == s:
            continue
        last = runs[-1] if runs else None
        if len(out) == 1 and last and _extend(last, cp, ord(out)):
            continue
        if len(out) == 1:
            runs.append([cp, cp, 1, 0, ord(out) - cp])
        elif not out:
            if last and last[3] == 1 and cp == last[1] + 1:
                last[1] = cp
            else:
                runs.append([cp, cp, 1, 1, 0])
        else:
            runs.append([cp, cp, 1, 2, len(pool) | (len(out) << 24)])
            pool.extend(map(ord, out))
    return runs, pool


def _extend(run, cp, target) -> bool:
    """Extend `run` by cp -> target when the run's step and mapping allow it."""
    start, end, step, kind, value = run
    gap = cp - end
    if kind not in (0, 3) or gap not in (1, 2) or (start != end and gap != step):
        return False
    if kind == 0 and value == target - cp:
        run[1], run[2] = cp, gap
        return True
    end_target = end + value if kind == 0 else value
    if end_target == target and (kind == 3 or start == end):
        run[1], run[2], run[3], run[4] = cp, gap, 3, target
        return True
    return False


def _rows(items, width=110):
    line = " "
    for item in items:
        if len(line) + len(item) + 2 > width:
            print(line)
            line = " "
        line += f" {item},"
    print(line)


def main():
    assert all(BERT_NORMALIZER.normalize_str(chr(cp)) == hangul_nfd(cp) for cp in HANGUL)
    cats = []
    for cp in CODE_POINTS:
        c = category(chr(cp))
        if cats and cats[-1][2] == c and cats[-1][1] == cp - 1:
            cats[-1][1] = cp
        else:
            cats.append([cp, cp, c])
    print("// Generated by csrc/tools/gen_unicode_tables.py from the `tokenizers` normalisers and pre-tokenizers "
          "ldmrt/tokenizer.py uses: do not edit.")
    print("static const CategoryRun kCategoryRuns[] = {")
    _rows([f"{{0x{start:X}, 0x{end:X}, Category::{c}}}" for start, end, c in cats if c != "Other"])
    print("};")
    for name, fold, skip in (("Bert", bert_fold, set(HANGUL)), ("Clip", CLIP_FOLD.normalize_str, ())):
        runs, pool = mapping_runs(fold, skip)
        print(f"static const char32_t k{name}Pool[] = {{")
        _rows([f"0x{c:X}" for c in pool] or ["0"])
        print("};")
        print(f"static const MapRun k{name}Runs[] = {{")
        _rows([f"{{0x{start:X}, 0x{end:X}, {step}, {kind}, {value}}}" for start, end, step, kind, value in runs])
        print("};")


if __name__ == "__main__":
    main()
