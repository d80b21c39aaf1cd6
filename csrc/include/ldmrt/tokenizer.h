// Text tokenizers for C++ hosts, reading the standard files an engine folder carries in tokenizer/:
//   WordPiece (BERT uncased, vocab.txt) and CLIP's byte-level BPE (vocab.json + merges.txt),
// giving the ids ldmrt's Python tokenizers (ldmrt/tokenizer.py, on HF `tokenizers`) give: special tokens
// written in the text stay whole, [CLS] ... [SEP] / <|startoftext|> ... <|endoftext|>, truncated and padded
// to max_length. Plain C++17, standard library only; the per-character classes and case/accent folding are
// tables read off those very `tokenizers` normalisers (csrc/unicode_tables.inc, written by
// csrc/tools/gen_unicode_tables.py). Known differences from the Python tokenizers:
// NFC composes only single characters (a letter followed by a combining accent is not composed for CLIP;
// precomposed input, the usual form, is unaffected), and malformed UTF-8
// is read as U+FFFD. A host with its own tokenizer can skip this and pass token ids to the engine.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace ldmrt {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // max_length ids: the start token, the text's tokens (truncated), the end token, padding.
  virtual std::vector<std::int64_t> encode(std::string_view utf8_text) const = 0;
  virtual std::string kind() const = 0;  // "bert" or "clip"
  int max_length() const { return max_length_; }
  // The text's ids without start/end tokens, truncation or padding (Python's encode_plain): what prompt
  // chunking (ldmrt/prompts.h) splits into windows itself.
  virtual std::vector<std::int64_t> tokenize(std::string_view utf8_text) const = 0;
  virtual std::int64_t start_id() const = 0;  // [CLS] / <|startoftext|>
  virtual std::int64_t end_id() const = 0;    // [SEP] / <|endoftext|>
  virtual std::int64_t pad_id() const = 0;    // [PAD] / <|endoftext|> (SD v1 pads with it)
  // The id of one vocabulary entry (e.g. ",</w>"), or -1 when the vocabulary has none.
  virtual std::int64_t token_id(const std::string& token) const = 0;

  // The tokenizer whose files lie in `folder` or its tokenizer/ subfolder. kind: "bert", "clip" or ""
  // (whichever is there; both present is an error). Throws std::runtime_error when files are missing.
  static std::unique_ptr<Tokenizer> from_folder(const std::string& folder, const std::string& kind = "",
                                                int max_length = 77);

 protected:
  explicit Tokenizer(int max_length);
  int max_length_;
};

// BERT WordPiece, uncased: clean text, split CJK ideographs, strip accents, lowercase; split on whitespace
// and punctuation; greedy longest-match word pieces ("##" continuations, words over 100 characters -> [UNK]).
class WordPieceTokenizer : public Tokenizer {
 public:
  static std::unique_ptr<WordPieceTokenizer> from_file(const std::string& vocab_txt, int max_length = 77);
  std::vector<std::int64_t> encode(std::string_view utf8_text) const override;
  std::string kind() const override { return "bert"; }
  // The word-piece ids of the text, without start/end tokens or padding.
  std::vector<std::int64_t> tokenize(std::string_view utf8_text) const override;
  std::int64_t start_id() const override { return cls_; }
  std::int64_t end_id() const override { return sep_; }
  std::int64_t pad_id() const override { return pad_; }
  std::int64_t token_id(const std::string& token) const override;

 private:
  WordPieceTokenizer(std::unordered_map<std::string, std::int64_t> vocab, int max_length);
  void encode_segment(const std::u32string& text, std::vector<std::int64_t>& out) const;
  std::unordered_map<std::string, std::int64_t> vocab_;
  std::vector<std::pair<std::string, std::int64_t>> specials_;  // [PAD], [UNK], [CLS], [SEP], [MASK]
  std::int64_t pad_, unk_, cls_, sep_;
};

// CLIP byte-level BPE: collapse whitespace, lowercase; split by CLIP's pattern (contractions, letter runs,
// single digits, other runs); map UTF-8 bytes to CLIP's printable alphabet; merge by rank; words end in </w>.
class ClipTokenizer : public Tokenizer {
 public:
  static std::unique_ptr<ClipTokenizer> from_files(const std::string& vocab_json, const std::string& merges_txt,
                                                   int max_length = 77);
  std::vector<std::int64_t> encode(std::string_view utf8_text) const override;
  std::string kind() const override { return "clip"; }
  std::vector<std::int64_t> tokenize(std::string_view utf8_text) const override;
  std::int64_t start_id() const override { return bos_; }
  std::int64_t end_id() const override { return eos_; }
  std::int64_t pad_id() const override { return eos_; }
  std::int64_t token_id(const std::string& token) const override;

 private:
  ClipTokenizer(std::unordered_map<std::string, std::int64_t> vocab,
                std::unordered_map<std::string, int> merge_ranks, int max_length);
  void encode_segment(const std::u32string& text, std::vector<std::int64_t>& out) const;
  void encode_word(const std::string& utf8_word, std::vector<std::int64_t>& out) const;
  std::unordered_map<std::string, std::int64_t> vocab_;
  std::unordered_map<std::string, int> merge_ranks_;  // "left right" -> rank
  std::int64_t bos_, eos_;
};

}  // namespace ldmrt
