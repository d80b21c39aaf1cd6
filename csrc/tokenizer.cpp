#include "ldmrt/tokenizer.h"

#include <algorithm>
#include <array>
#include <climits>
#include <fstream>
#include <stdexcept>
#include <utility>

#include "ldmrt/json.h"

namespace ldmrt {
namespace {

// Letter, Number: CLIP's \p{L}, \p{N}. Space: whitespace. Punct: a word of its own for BERT, and like Other
// a symbol for CLIP. See csrc/tools/gen_unicode_tables.py.
enum class Category : std::uint8_t { Letter, Number, Space, Punct, Other };
struct CategoryRun {
  char32_t start, end;
  Category category;
};
struct MapRun {
  char32_t start, end;
  std::uint8_t step, kind;  // kind 0: cp + value, 1: removed, 2: pool sequence, 3: the code point `value`
  std::int32_t value;
};
#include "unicode_tables.inc"

Category category_of(char32_t cp) {
  auto it = std::upper_bound(std::begin(kCategoryRuns), std::end(kCategoryRuns), cp,
                             [](char32_t c, const CategoryRun& r) { return c < r.start; });
  if (it == std::begin(kCategoryRuns)) return Category::Other;
  --it;
  return cp <= it->end ? it->category : Category::Other;
}

// Appends what a run table makes of cp (cp itself where no run covers it).
template <std::size_t NRuns, std::size_t NPool>
void append_mapped(char32_t cp, const MapRun (&runs)[NRuns], const char32_t (&pool)[NPool], std::u32string& out) {
  auto it = std::upper_bound(std::begin(runs), std::end(runs), cp, [](char32_t c, const MapRun& r) { return c < r.start; });
  if (it != std::begin(runs)) {
    const MapRun& r = *--it;
    if (cp <= r.end && (cp - r.start) % r.step == 0) {
      switch (r.kind) {
        case 0: out += static_cast<char32_t>(static_cast<std::int64_t>(cp) + r.value); return;
        case 1: return;
        case 2: out.append(pool + (r.value & 0xFFFFFF), static_cast<std::size_t>(r.value >> 24)); return;
        default: out += static_cast<char32_t>(r.value); return;
      }
    }
  }
  out += cp;
}

bool is_white_space(char32_t c) { return category_of(c) == Category::Space; }

// The ideographs BertNormalizer puts spaces around (HF's ranges, 2B920 included).
bool is_cjk(char32_t c) {
  return (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0xF900 && c <= 0xFAFF) ||
         (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0x2F800 && c <= 0x2FA1F);
}

std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char b = static_cast<unsigned char>(s[i]);
    const int len = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
    char32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const unsigned char c = static_cast<unsigned char>(s[i + k]);
      ok = (c & 0xC0) == 0x80;
      cp = (cp << 6) | (c & 0x3F);
    }
    static constexpr std::array<char32_t, 5> kMin{{0, 0, 0x80, 0x800, 0x10000}};
    ok = ok && cp >= kMin[len] && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
    out += ok ? cp : 0xFFFD;  // malformed: one replacement character per bad lead byte
    i += ok ? len : 1;
  }
  return out;
}

using json::append_utf8;

std::string to_utf8(const std::u32string& s) {
  std::string out;
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

// Splits the raw text at special tokens (leftmost, longest first), as HF's added vocabulary does before
// normalising: calls segment(text piece) and special(id) in order.
template <typename Segment, typename Special>
void split_specials(const std::u32string& text, const std::vector<std::pair<std::u32string, std::int64_t>>& specials,
                    Segment&& segment, Special&& special) {
  std::size_t begin = 0;
  for (std::size_t i = 0; i < text.size();) {
    const std::pair<std::u32string, std::int64_t>* found = nullptr;
    for (const auto& s : specials)  // sorted longest first
      if (text.compare(i, s.first.size(), s.first) == 0) { found = &s; break; }
    if (!found) { ++i; continue; }
    if (i > begin) segment(text.substr(begin, i - begin));
    special(found->second);
    i += found->first.size();
    begin = i;
  }
  if (begin < text.size()) segment(text.substr(begin));
}

std::vector<std::pair<std::u32string, std::int64_t>> longest_first(const std::vector<std::pair<std::string, std::int64_t>>& specials) {
  std::vector<std::pair<std::u32string, std::int64_t>> out;
  for (const auto& [text, id] : specials) out.emplace_back(decode_utf8(text), id);
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  return out;
}

// [start] + ids truncated to max_length - 2 + [end], padded with `pad`.
std::vector<std::int64_t> frame(std::vector<std::int64_t> ids, std::int64_t start, std::int64_t end, std::int64_t pad,
                                int max_length) {
  const std::size_t keep = static_cast<std::size_t>(std::max(max_length - 2, 0));
  if (ids.size() > keep) ids.resize(keep);
  std::vector<std::int64_t> out;
  out.reserve(static_cast<std::size_t>(max_length));
  out.push_back(start);
  out.insert(out.end(), ids.begin(), ids.end());
  out.push_back(end);
  out.resize(std::max<std::size_t>(out.size(), static_cast<std::size_t>(max_length)), pad);
  out.resize(static_cast<std::size_t>(max_length));
  return out;
}

std::int64_t require_id(const std::unordered_map<std::string, std::int64_t>& vocab, const std::string& token,
                        const std::string& file) {
  auto it = vocab.find(token);
  if (it == vocab.end()) throw std::runtime_error(file + " has no " + token + " token");
  return it->second;
}

bool is_file(const std::string& path) { return std::ifstream(path).good(); }

}  // namespace

Tokenizer::Tokenizer(int max_length) : max_length_(max_length) {
  if (max_length < 2) throw std::invalid_argument("tokenizer max_length must be >= 2");
}

std::unique_ptr<Tokenizer> Tokenizer::from_folder(const std::string& folder, const std::string& kind, int max_length) {
  if (!kind.empty() && kind != "bert" && kind != "clip")
    throw std::invalid_argument("tokenizer kind must be \"bert\", \"clip\" or \"\", not \"" + kind + "\"");
  for (const std::string& dir : {folder, folder + "/tokenizer"}) {
    const bool clip = (kind.empty() || kind == "clip") && is_file(dir + "/vocab.json") && is_file(dir + "/merges.txt");
    const bool bert = (kind.empty() || kind == "bert") && is_file(dir + "/vocab.txt");
    if (clip && bert) throw std::runtime_error(dir + " holds both a BERT and a CLIP vocabulary: pass kind");
    if (clip) return ClipTokenizer::from_files(dir + "/vocab.json", dir + "/merges.txt", max_length);
    if (bert) return WordPieceTokenizer::from_file(dir + "/vocab.txt", max_length);
  }
  throw std::runtime_error("no tokenizer files (vocab.txt, or vocab.json + merges.txt) in " + folder + " or " + folder +
                           "/tokenizer");
}

// ---- WordPiece ----------------------------------------------------------------------------------------

WordPieceTokenizer::WordPieceTokenizer(std::unordered_map<std::string, std::int64_t> vocab, int max_length)
    : Tokenizer(max_length), vocab_(std::move(vocab)) {}

std::unique_ptr<WordPieceTokenizer> WordPieceTokenizer::from_file(const std::string& vocab_txt, int max_length) {
  std::ifstream in(vocab_txt);
  if (!in) throw std::runtime_error("tokenizer file not found: " + vocab_txt);
  std::unordered_map<std::string, std::int64_t> vocab;
  std::string line;
  for (std::int64_t id = 0; std::getline(in, line); ++id) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
    vocab[line] = id;
  }
  std::unique_ptr<WordPieceTokenizer> t(new WordPieceTokenizer(std::move(vocab), max_length));
  t->pad_ = require_id(t->vocab_, "[PAD]", vocab_txt);
  t->unk_ = require_id(t->vocab_, "[UNK]", vocab_txt);
  t->cls_ = require_id(t->vocab_, "[CLS]", vocab_txt);
  t->sep_ = require_id(t->vocab_, "[SEP]", vocab_txt);
  for (const char* s : {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}) {
    auto it = t->vocab_.find(s);
    if (it != t->vocab_.end()) t->specials_.emplace_back(s, it->second);
  }
  return t;
}

void WordPieceTokenizer::encode_segment(const std::u32string& raw, std::vector<std::int64_t>& out) const {
  // BertNormalizer: drop NUL, U+FFFD and control characters, whitespace -> ' ', NFD, drop nonspacing marks,
  // lowercase (one table); Hangul syllables decompose into jamo; CJK ideographs get spaces around them.
  std::u32string text;
  for (char32_t c : raw) {
    const bool cjk = is_cjk(c);
    if (cjk) text += U' ';
    if (c >= 0xAC00 && c <= 0xD7A3) {  // Hangul syllable: L V [T] jamo (Unicode 3.12)
      const char32_t s = c - 0xAC00;
      text += static_cast<char32_t>(0x1100 + s / 588);
      text += static_cast<char32_t>(0x1161 + (s % 588) / 28);
      if (s % 28) text += static_cast<char32_t>(0x11A7 + s % 28);
    } else {
      append_mapped(c, kBertRuns, kBertPool, text);
    }
    if (cjk) text += U' ';
  }
  // BertPreTokenizer: whitespace separates words, each punctuation character is a word of its own.
  std::vector<std::u32string> words;
  std::u32string word;
  for (char32_t c : text) {
    const bool punct = category_of(c) == Category::Punct;
    if (is_white_space(c) || punct) {
      if (!word.empty()) words.push_back(std::move(word));
      word.clear();
      if (punct) words.emplace_back(1, c);
    } else {
      word += c;
    }
  }
  if (!word.empty()) words.push_back(std::move(word));
  // WordPiece: greedy longest match, continuations prefixed "##"; a word with an unknown piece is [UNK].
  for (const std::u32string& w : words) {
    if (w.size() > 100) { out.push_back(unk_); continue; }
    std::vector<std::int64_t> pieces;
    bool known = true;
    for (std::size_t start = 0; start < w.size() && known;) {
      known = false;
      for (std::size_t end = w.size(); end > start; --end) {
        const std::string piece = (start > 0 ? "##" : "") + to_utf8(w.substr(start, end - start));
        auto it = vocab_.find(piece);
        if (it != vocab_.end()) {
          pieces.push_back(it->second);
          start = end;
          known = true;
          break;
        }
      }
    }
    if (known) out.insert(out.end(), pieces.begin(), pieces.end());
    else out.push_back(unk_);
  }
}

std::vector<std::int64_t> WordPieceTokenizer::tokenize(std::string_view utf8_text) const {
  std::vector<std::int64_t> ids;
  split_specials(decode_utf8(utf8_text), longest_first(specials_), [&](const std::u32string& s) { encode_segment(s, ids); },
                 [&](std::int64_t id) { ids.push_back(id); });
  return ids;
}

std::int64_t WordPieceTokenizer::token_id(const std::string& token) const {
  auto it = vocab_.find(token);
  return it == vocab_.end() ? -1 : it->second;
}
std::vector<std::int64_t> WordPieceTokenizer::encode(std::string_view utf8_text) const {
  return frame(tokenize(utf8_text), cls_, sep_, pad_, max_length_);
}

// ---- CLIP BPE -----------------------------------------------------------------------------------------

namespace {
constexpr const char* kBos = "<|startoftext|>";
constexpr const char* kEos = "<|endoftext|>";

// CLIP/GPT-2's printable stand-in for each byte: printable Latin-1 bytes map to themselves, the others
// to 256, 257, ... in byte order.
const std::array<std::string, 256>& byte_alphabet() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      append_utf8(t[static_cast<std::size_t>(b)], printable ? static_cast<char32_t>(b) : next++);
    }
    return t;
  }();
  return table;
}
}  // namespace

ClipTokenizer::ClipTokenizer(std::unordered_map<std::string, std::int64_t> vocab,
                             std::unordered_map<std::string, int> merge_ranks, int max_length)
    : Tokenizer(max_length), vocab_(std::move(vocab)), merge_ranks_(std::move(merge_ranks)) {}

std::unique_ptr<ClipTokenizer> ClipTokenizer::from_files(const std::string& vocab_json, const std::string& merges_txt,
                                                         int max_length) {
  if (!is_file(vocab_json)) throw std::runtime_error("tokenizer file not found: " + vocab_json);
  if (!is_file(merges_txt)) throw std::runtime_error("tokenizer file not found: " + merges_txt);
  const json::Value v = json::Value::parse(json::read_file(vocab_json));
  std::unordered_map<std::string, std::int64_t> vocab;
  vocab.reserve(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) vocab[v.keys()[i]] = v.items()[i].as_int();
  std::unordered_map<std::string, int> ranks;
  std::ifstream in(merges_txt);
  std::string line;
  int rank = 0;
  while (std::getline(in, line)) {
    while (!line.empty() && (line.back() == '\r' || line.back() == '\n')) line.pop_back();
    if (line.rfind("#version", 0) == 0 || line.empty()) continue;
    const std::size_t space = line.find(' ');
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos)
      throw std::runtime_error(merges_txt + ": a merge line must be two symbols separated by one space: \"" + line + "\"");
    ranks.emplace(line, rank++);  // the first occurrence of a pair keeps its rank
  }
  std::unique_ptr<ClipTokenizer> t(new ClipTokenizer(std::move(vocab), std::move(ranks), max_length));
  t->bos_ = require_id(t->vocab_, kBos, vocab_json);
  t->eos_ = require_id(t->vocab_, kEos, vocab_json);
  return t;
}

void ClipTokenizer::encode_word(const std::string& utf8_word, std::vector<std::int64_t>& out) const {
  std::vector<std::string> symbols;
  for (unsigned char b : utf8_word) symbols.push_back(byte_alphabet()[b]);
  symbols.back() += "</w>";
  // Merge the lowest-ranked adjacent pair, every occurrence left to right, until none is in the merges.
  for (;;) {
    int best = INT_MAX;
    std::string best_pair;
    for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = merge_ranks_.find(symbols[i] + " " + symbols[i + 1]);
      if (it != merge_ranks_.end() && it->second < best) { best = it->second; best_pair = it->first; }
    }
    if (best == INT_MAX) break;
    const std::size_t space = best_pair.find(' ');
    const std::string left = best_pair.substr(0, space), right = best_pair.substr(space + 1);
    std::vector<std::string> merged;
    for (std::size_t i = 0; i < symbols.size(); ++i) {
      if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
        merged.push_back(left + right);
        ++i;
      } else {
        merged.push_back(symbols[i]);
      }
    }
    symbols = std::move(merged);
  }
  for (const std::string& s : symbols) {
    auto it = vocab_.find(s);
    out.push_back(it != vocab_.end() ? it->second : eos_);  // the unknown token, unreachable with CLIP's alphabet
  }
}

void ClipTokenizer::encode_segment(const std::u32string& raw, std::vector<std::int64_t>& out) const {
  // Normaliser: NFC (of single characters, see tokenizer.h), each whitespace run -> ' ', lowercase.
  std::u32string text;
  for (std::size_t i = 0; i < raw.size(); ++i) {
    if (!is_white_space(raw[i])) append_mapped(raw[i], kClipRuns, kClipPool, text);
    else if (i == 0 || !is_white_space(raw[i - 1])) text += U' ';
  }
  // CLIP's pattern, alternatives in order: <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
  // [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ ; what no alternative matches (whitespace) is dropped.
  static const std::u32string kLiterals[] = {U"<|startoftext|>", U"<|endoftext|>", U"'s", U"'t", U"'re", U"'ve",
                                             U"'m", U"'ll", U"'d"};
  const auto is_other = [](char32_t c) {
    const Category k = category_of(c);
    return k == Category::Punct || k == Category::Other;
  };
  for (std::size_t i = 0; i < text.size();) {
    std::size_t end = i;
    for (const std::u32string& literal : kLiterals)
      if (text.compare(i, literal.size(), literal) == 0) { end = i + literal.size(); break; }
    if (end == i && category_of(text[i]) == Category::Letter) {
      while (end < text.size() && category_of(text[end]) == Category::Letter) ++end;
    } else if (end == i && category_of(text[i]) == Category::Number) {
      end = i + 1;
    } else if (end == i && is_other(text[i])) {
      while (end < text.size() && is_other(text[end])) ++end;
    }
    if (end == i) { ++i; continue; }
    encode_word(to_utf8(text.substr(i, end - i)), out);
    i = end;
  }
}

std::vector<std::int64_t> ClipTokenizer::tokenize(std::string_view utf8_text) const {
  std::vector<std::int64_t> ids;
  split_specials(decode_utf8(utf8_text), longest_first({{kBos, bos_}, {kEos, eos_}}),
                 [&](const std::u32string& s) { encode_segment(s, ids); }, [&](std::int64_t id) { ids.push_back(id); });
  return ids;
}

std::int64_t ClipTokenizer::token_id(const std::string& token) const {
  auto it = vocab_.find(token);
  return it == vocab_.end() ? -1 : it->second;
}
std::vector<std::int64_t> ClipTokenizer::encode(std::string_view utf8_text) const {
  return frame(tokenize(utf8_text), bos_, eos_, eos_, max_length_);  // SD v1 pads with <|endoftext|>
}

}  // namespace ldmrt
