// Prompt syntax as AUTOMATIC1111's web UI reads it, for C++ hosts: a port of ldmrt/prompts.py (keep the two in
// step; tests/test_cpp_host.py checks the C++ pieces and windows against Python's on the web UI fixtures).
//
//   (word) x1.1   ((word)) x1.21   (word:1.3) x1.3   [word] /1.1   \( \) \[ \] \\ literal   BREAK: a new window
//
// Long prompts (CLIP): 75-token windows, each BOS + 75 (padded with EOS) + EOS; a full window splits after its
// last comma when that is within its last 20 tokens. One fixed window (LDM-BERT): a longer prompt is an error
// naming its token count, never cut. Plain C++17 (ldmrt::core). Known difference from Python's `re`: BREAK's word
// boundaries and the whitespace around it are read on ASCII (any non-ASCII byte counts as a letter).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ldmrt/tokenizer.h"

namespace ldmrt {

// A prompt the syntax cannot take (a weight that is not a number, a model's window overflowed); the message names
// the fix. (Python raises InputError with the same text.)
class PromptError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct PromptPiece {
  std::string text;
  double weight = 1.0;
  bool is_break = false;
};

struct PromptChunk {
  std::vector<std::int64_t> ids;  // the text encoder's window: BOS, tokens padded with EOS/PAD, EOS
  std::vector<double> weights;    // one per id; 1.0 for BOS, EOS and padding
  std::vector<std::pair<int, std::string>> fixes;  // (offset in ids, trigger word): textual-inversion rows
};

// The prompt as runs of text of one weight, with BREAK markers; adjacent runs of equal weight merged.
std::vector<PromptPiece> parse_prompt(std::string_view prompt);

// The prompt's windows. long_prompts=false: exactly one window, or a PromptError naming the overflow.
// embeddings: (trigger word, vector count) of loaded textual-inversion files, in load order (long windows only).
std::vector<PromptChunk> prompt_chunks(std::string_view prompt, const Tokenizer& tokenizer, bool long_prompts,
                                       const std::vector<std::pair<std::string, int>>& embeddings = {});

}  // namespace ldmrt
