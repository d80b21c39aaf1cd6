"""The C++ tokenizers (csrc/tokenizer.cpp) give the ids of the Python ones (ldmrt.tokenizer, HF `tokenizers`).

A small driver compiled with the core's sources reads a JSON array of texts (so csrc/json.cpp reads the input
and, for CLIP, vocab.json with its \\u escapes) and prints each text's ids. Texts: the sentences of
test_tokenizer.py plus 300 random strings over ASCII, Latin, Greek, Cyrillic, CJK, kana, Hangul, emoji,
punctuation blocks and control characters. Exact equality is required.
"""
import json
import random
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest

from helpers import write_clip_tokenizer
from ldmrt.tokenizer import BertTokenizer, ClipTokenizer

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++17 compiler")

DRIVER = r"""
#include <iostream>
#include <iterator>
#include "ldmrt/json.h"
#include "ldmrt/tokenizer.h"
int main(int, char** argv) {
  try {
    auto tokenizer = ldmrt::Tokenizer::from_folder(argv[1], argv[2], std::stoi(argv[3]));
    std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    const ldmrt::json::Value texts = ldmrt::json::Value::parse(input);
    for (const auto& text : texts.items()) {
      for (auto id : tokenizer->encode(text.as_string())) std::cout << id << ' ';
      std::cout << '\n';
    }
  } catch (const std::exception& e) {
    std::cerr << e.what() << '\n';
    return 1;
  }
}
"""

SENTENCES = [
    "A photo of a cat.", "  The   DOG's running!!  in\tthe\nPARK ", "Café au lait, naïve résumé",
    "xyzzy unknownword qqq", "playing cats and dogs, 3 cats 42", "a photo<|endoftext|>cat", "rocket 🚀 to mars!!! ... ??",
    "中文 text", "", "the cat " * 60, "[MASK] a [CLS]cat", "ÀÉÎÕÜ ǅ ΣΑΣ Привет İstanbul", "<|startoftext|>a<|endoftext|>",
    "ｆｕｌｌ　ｗｉｄｔｈ Ω Å ﬁ", "한국어 텍스트",
]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "play", "run",
              "park", "in", "cafe", "au", "lait", "naive", "resume", ",", ".", "!", "'", "s", "3", "4", "2", "##s",
              "##ing", "##ning", "##n", "and", "mars", "to", "rocket", "text", "##2", "中", "文", "?", "ᄒ", "##ᅡ"]
CLIP_WORDS = ["a", "photo", "of", "the", "cat", "dog", "'s", "running", "in", "park", "playing", "and", "to", "mars",
              "rocket", "!!", "...", "ca", "é", "привет", "ω"]


def random_texts(count=300, length=40, seed=0):
    rng = random.Random(seed)
    blocks = [(32, 127), (0xA0, 0x2FF), (0x370, 0x52F), (0x2000, 0x206F), (0x3000, 0x30FF), (0xAC00, 0xD7A3),
              (0x1F300, 0x1F6FF), (0x4E00, 0x9FFF), (0, 32), (0xFF00, 0xFFEF)]
    texts = []
    for _ in range(count):
        text = "".join(chr(rng.randrange(*rng.choice(blocks))) for _ in range(length))
        texts.append(unicodedata.normalize("NFC", text))  # the C++ CLIP tokenizer composes no sequences
    return texts


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocabs")
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    write_clip_tokenizer(root / "clip", CLIP_WORDS)
    return root


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    build = tmp_path_factory.mktemp("cpp_tokenizer")
    (build / "main.cpp").write_text(DRIVER)
    exe = build / "tokenize"
    sources = [ROOT / "csrc" / "tokenizer.cpp", ROOT / "csrc" / "json.cpp", build / "main.cpp"]
    subprocess.run([CXX, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'include'}", *map(str, sources), "-o", str(exe)],
                   check=True)
    return exe


def cpp_ids(driver, folder, kind, max_length, texts):
    done = subprocess.run([str(driver), str(folder), kind, str(max_length)], input=json.dumps(texts).encode(),
                          capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    return [list(map(int, line.split())) for line in done.stdout.decode().splitlines()]


@pytest.mark.parametrize("kind,max_length", [("bert", 77), ("bert", 16), ("clip", 77), ("clip", 8)])
def test_cpp_tokenizer_matches_python(driver, folders, kind, max_length):
    texts = SENTENCES + random_texts()
    if kind == "bert":
        python = BertTokenizer.from_file(folders / "bert" / "vocab.txt", max_length)
    else:
        python = ClipTokenizer.from_files(folders / "clip" / "vocab.json", folders / "clip" / "merges.txt", max_length)
    want = python(texts).tolist()
    got = cpp_ids(driver, folders / kind, kind, max_length, texts)
    mismatches = [(t, w, g) for t, w, g in zip(texts, want, got) if w != g]
    assert not mismatches, mismatches[:3]
    # The fixtures do exercise known words, word pieces, unknown words and padding.
    ids = {i for row in want for i in row}
    assert len(ids) > 20


def test_cpp_tokenizer_folder_errors(driver, folders, tmp_path):
    done = subprocess.run([str(driver), str(tmp_path), "", "77"], input=b"[]", capture_output=True)
    assert done.returncode == 1 and b"no tokenizer files" in done.stderr
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    done = subprocess.run([str(driver), str(tmp_path), "bert", "77"], input=b"[]", capture_output=True)
    assert done.returncode == 1 and b"has no [CLS] token" in done.stderr
    done = subprocess.run([str(driver), str(folders / "bert"), "bert", "77"], input=b'["a", ', capture_output=True)
    assert done.returncode == 1 and b"JSON error at byte" in done.stderr
