// LoRA files for C++ hosts, read as ldmrt/lora.py reads them (keep the two in step): .safetensors in the kohya /
// AUTOMATIC1111 layout (lora_unet_* / lora_te_*: lora_up, lora_down, alpha; LoCon convolutions) and the diffusers /
// PEFT layout (unet.* / text_encoder.*: lora_A, lora_B, with PEFT's lora_alpha in the file's metadata; diffusers'
// older lora.up / lora_linear_layer / attention-processor forms). Plain C++17 (ldmrt::core); the engine turns the
// factors into weight deltas (csrc/engine.cpp).
#pragma once
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ldmrt/safetensors.h"

namespace ldmrt {

struct LoraModule {
  std::string component;  // "unet", "text_encoder", or "unknown" (a diffusers key without a component prefix)
  std::string name;       // diffusers' dotted module name, or kohya's underscored one
  SafeTensor up, down;    // (out, rank[, 1, 1]) and (rank, in[, kh, kw]), checked to multiply
  std::optional<SafeTensor> alpha;  // the file's own alpha (a scalar), if any
  std::optional<double> peft_alpha;  // else the alpha PEFT scales with (metadata), if any; neither: alpha = rank
};

struct LoraFile {
  std::vector<LoraModule> modules;  // in key order
  std::vector<std::string> ignored;  // keys that are no LoRA factor (DoRA scales, LoHa, ...)
};

// The LoRA modules of a .safetensors file. Throws std::invalid_argument naming the file and the fix: not
// .safetensors (pickles are refused, with the conversion command), damaged, a module without both factors or with
// factors that do not multiply, a DoRA adapter, or no LoRA keys at all.
LoraFile read_lora(const std::string& path);

// "file.safetensors:0.8" -> (file, 0.8); without a number after the last ':' the whole text and 1.0.
std::pair<std::string, double> parse_lora_spec(const std::string& text);

}  // namespace ldmrt
