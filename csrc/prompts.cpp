// A port of ldmrt/prompts.py, function for function (parse, chunks, _Windows, _trigger_ids, _single_window): the
// same weights from the same products in the same order, the same windows. Read that file for the why.
#include "ldmrt/prompts.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

namespace ldmrt {
namespace {

constexpr double kRoundMultiplier = 1.1;
constexpr double kSquareMultiplier = 1 / 1.1;
constexpr int kChunkTokens = 75;    // between BOS and EOS
constexpr int kCommaBacktrack = 20;  // tokens back from a full window's end that a comma may be
constexpr const char* kClipComma = ",</w>";

// The characters the syntax gives a meaning to; every other byte is text.
bool is_syntax(char c) { return c == '\\' || c == '(' || c == ')' || c == '[' || c == ']' || c == ':'; }
bool is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }
// Python's \w on str patterns: letters, digits, underscore; non-ASCII bytes are taken as letters (see prompts.h).
bool is_word(unsigned char c) { return std::isalnum(c) || c == '_' || c >= 0x80; }

// re.split(r"\s*\bBREAK\b\s*", text): the leftmost match from each position, whitespace runs taken greedily.
std::vector<std::string> split_breaks(const std::string& text) {
  std::vector<std::string> parts;
  const std::size_t n = text.size();
  std::size_t from = 0, part_start = 0;
  while (from < n) {
    std::size_t match = std::string::npos, end = 0;
    for (std::size_t p = from; p < n && match == std::string::npos; ++p) {
      std::size_t q = p;
      while (q < n && is_space(static_cast<unsigned char>(text[q]))) ++q;
      if (text.compare(q, 5, "BREAK") != 0) continue;
      const bool left = q == 0 || !is_word(static_cast<unsigned char>(text[q - 1]));
      const bool right = q + 5 == n || !is_word(static_cast<unsigned char>(text[q + 5]));
      if (!left || !right) continue;
      match = p;
      end = q + 5;
      while (end < n && is_space(static_cast<unsigned char>(text[end]))) ++end;
    }
    if (match == std::string::npos) break;
    parts.push_back(text.substr(part_start, match - part_start));
    part_start = from = end;
  }
  parts.push_back(text.substr(part_start));
  return parts;
}

double parse_weight(const std::string& text, std::string_view prompt) {
  const char* begin = text.c_str();
  char* end = nullptr;
  const double value = std::strtod(begin, &end);
  if (end == begin || *end != '\0')
    throw PromptError("the emphasis weight '" + text + "' in prompt '" + std::string(prompt) +
                      "' is not a number: write e.g. (word:1.2), or \\( and \\) for literal brackets");
  return value;
}

class Windows {
 public:
  explicit Windows(const Tokenizer& t) : t_(t), comma_(t.token_id(kClipComma)) {}

  void close() {
    PromptChunk c;
    const int pad = kChunkTokens - static_cast<int>(ids_.size());
    c.ids.push_back(t_.start_id());
    c.ids.insert(c.ids.end(), ids_.begin(), ids_.end());
    c.ids.insert(c.ids.end(), pad + 1, t_.end_id());
    c.weights.push_back(1.0);
    c.weights.insert(c.weights.end(), weights_.begin(), weights_.end());
    c.weights.insert(c.weights.end(), pad + 1, 1.0);
    for (const auto& [at, name] : fixes_) c.fixes.emplace_back(at + 1, name);  // +1: offsets count from BOS
    done_.push_back(std::move(c));
    ids_.clear(), weights_.clear(), fixes_.clear();
    last_comma_ = -1;
  }

  // Before `token` goes in: a full window closes, after its last comma when one is within reach.
  void make_room(std::int64_t token) {
    const int size = static_cast<int>(ids_.size());
    if (token == comma_) {
      last_comma_ = size;
    } else if (size == kChunkTokens && last_comma_ != -1 && size - last_comma_ <= kCommaBacktrack) {
      const int keep = last_comma_ + 1;  // the comma stays; what follows it opens the next window
      std::vector<std::int64_t> ids(ids_.begin() + keep, ids_.end());
      std::vector<double> weights(weights_.begin() + keep, weights_.end());
      std::vector<std::pair<int, std::string>> moved, kept;
      for (const auto& [at, name] : fixes_) (at >= keep ? moved : kept).emplace_back(at >= keep ? at - keep : at, name);
      ids_.resize(keep), weights_.resize(keep);
      fixes_ = kept;
      close();
      ids_ = std::move(ids), weights_ = std::move(weights), fixes_ = std::move(moved);
    }
    if (static_cast<int>(ids_.size()) == kChunkTokens) close();
  }

  void add(std::int64_t id, double weight, int count = 1) {
    ids_.insert(ids_.end(), count, id);
    weights_.insert(weights_.end(), count, weight);
  }

  void add_embedding(const std::string& name, int vectors, double weight) {
    if (static_cast<int>(ids_.size()) + vectors > kChunkTokens) close();  // an embedding never straddles
    fixes_.emplace_back(static_cast<int>(ids_.size()), name);
    add(t_.end_id(), weight, vectors);
  }

  std::vector<PromptChunk> finish() {
    if (!ids_.empty() || done_.empty()) close();
    return std::move(done_);
  }

 private:
  const Tokenizer& t_;
  std::int64_t comma_;
  std::vector<PromptChunk> done_;
  std::vector<std::int64_t> ids_;
  std::vector<double> weights_;
  std::vector<std::pair<int, std::string>> fixes_;  // (index in ids_, trigger word)
  int last_comma_ = -1;
};

struct Trigger {
  std::string name;
  std::vector<std::int64_t> ids;
  int vectors;
};

// Longest ids first (stable: load order among equals), so that the longest trigger matches.
std::vector<Trigger> trigger_ids(const std::vector<std::pair<std::string, int>>& embeddings, const Tokenizer& t) {
  std::vector<Trigger> found;
  for (const auto& [name, vectors] : embeddings) {
    if (vectors <= 0 || vectors > kChunkTokens)
      throw PromptError("the embedding '" + name + "' has " + std::to_string(vectors) + " vectors; a prompt chunk holds " +
                        std::to_string(kChunkTokens));
    std::vector<std::int64_t> ids = t.tokenize(name);
    if (!ids.empty()) found.push_back({name, std::move(ids), vectors});
  }
  std::stable_sort(found.begin(), found.end(), [](const Trigger& a, const Trigger& b) { return a.ids.size() > b.ids.size(); });
  return found;
}

PromptChunk single_window(const std::vector<PromptPiece>& pieces, const Tokenizer& t) {
  std::vector<std::int64_t> ids;
  std::vector<double> weights;
  for (const PromptPiece& piece : pieces) {
    if (piece.is_break)
      throw PromptError("BREAK starts a new chunk of a long prompt, which this model's text encoder (one fixed window) "
                        "does not take: remove it");
    const std::vector<std::int64_t> tokens = t.tokenize(piece.text);
    ids.insert(ids.end(), tokens.begin(), tokens.end());
    weights.insert(weights.end(), tokens.size(), piece.weight);
  }
  const int room = t.max_length() - 2, count = static_cast<int>(ids.size());
  if (count > room)
    throw PromptError("the prompt is " + std::to_string(count) + " tokens long; this model's text encoder takes at most " +
                      std::to_string(room) + " (it has no long-prompt chunking): shorten it by " +
                      std::to_string(count - room) + " tokens");
  PromptChunk c;
  c.ids.push_back(t.start_id());
  c.ids.insert(c.ids.end(), ids.begin(), ids.end());
  c.ids.push_back(t.end_id());
  c.ids.insert(c.ids.end(), room - count, t.pad_id());
  c.weights.push_back(1.0);
  c.weights.insert(c.weights.end(), weights.begin(), weights.end());
  c.weights.insert(c.weights.end(), room - count + 1, 1.0);
  return c;
}

}  // namespace

std::vector<PromptPiece> parse_prompt(std::string_view prompt) {
  std::vector<PromptPiece> pieces;  // weights multiplied in place as brackets close
  std::vector<std::size_t> open_round, open_square;
  const auto weigh_from = [&](std::size_t start, double factor) {
    for (std::size_t i = start; i < pieces.size(); ++i)
      if (!pieces[i].is_break) pieces[i].weight *= factor;
  };
  const auto add_text = [&](const std::string& element) {  // text, a stray closing bracket, a colon
    const std::vector<std::string> parts = split_breaks(element);
    for (std::size_t i = 0; i < parts.size(); ++i) {
      if (i) pieces.push_back({"BREAK", 1.0, true});
      pieces.push_back({parts[i], 1.0, false});
    }
  };
  const std::size_t n = prompt.size();
  for (std::size_t i = 0; i < n;) {
    const char c = prompt[i];
    if (c == '\\') {  // an escaped character; a lone backslash is dropped, as in the web UI
      const bool escape = i + 1 < n && is_syntax(prompt[i + 1]) && prompt[i + 1] != ':';
      pieces.push_back({escape ? std::string(1, prompt[i + 1]) : std::string(), 1.0, false});
      i += escape ? 2 : 1;
    } else if (c == '(') {
      open_round.push_back(pieces.size()), ++i;
    } else if (c == '[') {
      open_square.push_back(pieces.size()), ++i;
    } else if (c == ':') {  // ":<weight>)" closes a round bracket with that weight; else a literal colon
      std::size_t j = i + 1;
      if (j < n && (prompt[j] == '+' || prompt[j] == '-')) ++j;
      std::size_t k = j;
      while (k < n && (std::isdigit(static_cast<unsigned char>(prompt[k])) || prompt[k] == '.')) ++k;
      if (k > j && k < n && prompt[k] == ')') {
        if (!open_round.empty()) {
          const std::size_t start = open_round.back();
          open_round.pop_back();
          weigh_from(start, parse_weight(std::string(prompt.substr(i + 1, k - i - 1)), prompt));
        } else {
          add_text(std::string(prompt.substr(i, k + 1 - i)));
        }
        i = k + 1;
      } else {
        add_text(":"), ++i;
      }
    } else if (c == ')' && !open_round.empty()) {
      const std::size_t start = open_round.back();
      open_round.pop_back();
      weigh_from(start, kRoundMultiplier), ++i;
    } else if (c == ']' && !open_square.empty()) {
      const std::size_t start = open_square.back();
      open_square.pop_back();
      weigh_from(start, kSquareMultiplier), ++i;
    } else if (c == ')' || c == ']') {
      add_text(std::string(1, c)), ++i;
    } else {
      std::size_t j = i;
      while (j < n && !is_syntax(prompt[j])) ++j;
      add_text(std::string(prompt.substr(i, j - i)));
      i = j;
    }
  }
  for (std::size_t start : open_round) weigh_from(start, kRoundMultiplier);  // unclosed brackets weigh to the end
  for (std::size_t start : open_square) weigh_from(start, kSquareMultiplier);
  if (pieces.empty()) pieces.push_back({"", 1.0, false});
  std::vector<PromptPiece> merged;
  for (PromptPiece& p : pieces) {
    if (!merged.empty() && !p.is_break && !merged.back().is_break && merged.back().weight == p.weight)
      merged.back().text += p.text;
    else
      merged.push_back(std::move(p));
  }
  return merged;
}

std::vector<PromptChunk> prompt_chunks(std::string_view prompt, const Tokenizer& tokenizer, bool long_prompts,
                                       const std::vector<std::pair<std::string, int>>& embeddings) {
  const std::vector<PromptPiece> pieces = parse_prompt(prompt);
  if (!long_prompts) return {single_window(pieces, tokenizer)};
  Windows windows(tokenizer);
  const std::vector<Trigger> triggers = trigger_ids(embeddings, tokenizer);
  for (const PromptPiece& piece : pieces) {
    if (piece.is_break) {
      windows.close();
      continue;
    }
    const std::vector<std::int64_t> tokens = tokenizer.tokenize(piece.text);
    for (std::size_t position = 0; position < tokens.size();) {
      windows.make_room(tokens[position]);
      const Trigger* match = nullptr;
      for (const Trigger& t : triggers) {
        if (position + t.ids.size() <= tokens.size() && std::equal(t.ids.begin(), t.ids.end(), tokens.begin() + position)) {
          match = &t;
          break;
        }
      }
      if (!match) {
        windows.add(tokens[position], piece.weight);
        ++position;
      } else {
        windows.add_embedding(match->name, match->vectors, piece.weight);
        position += match->ids.size();
      }
    }
  }
  return windows.finish();
}

}  // namespace ldmrt
