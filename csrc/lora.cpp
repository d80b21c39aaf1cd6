// ldmrt/lora.py's reader in C++: the same key forms, checks and alpha rules (its _module_name, read_lora,
// adapter_configs, peft_alpha).
#include "ldmrt/lora.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <regex>
#include <stdexcept>

#include "ldmrt/json.h"

namespace ldmrt {
namespace {

// Suffix -> factor, diffusers' forms first (they end in the kohya ones' words too): lora.py FACTORS.
const std::vector<std::pair<std::string, std::string>> kFactors{
    {".lora_A.weight", "down"}, {".lora_B.weight", "up"}, {".lora.down.weight", "down"}, {".lora.up.weight", "up"},
    {".lora_linear_layer.down.weight", "down"}, {".lora_linear_layer.up.weight", "up"},
    {".lora_down.weight", "down"}, {".lora_up.weight", "up"}, {".alpha", "alpha"},
    {"_lora.down.weight", "down"}, {"_lora.up.weight", "up"}};
const std::vector<std::pair<std::string, std::string>> kKohyaPrefixes{{"lora_unet_", "unet"}, {"lora_te_", "text_encoder"}};
const std::vector<std::pair<std::string, std::string>> kDiffusersPrefixes{{"unet.", "unet"}, {"text_encoder.", "text_encoder"}};
const std::vector<std::pair<std::string, std::string>> kProcessorLoras{
    {"processor.to_q_lora", "to_q"}, {"processor.to_k_lora", "to_k"}, {"processor.to_v_lora", "to_v"},
    {"processor.to_out_lora", "to_out.0"}};
constexpr const char* kAdapterMetadata = "lora_adapter_metadata";

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

struct KeyName {
  std::string component, module, factor;
};

// (component, module, factor) of a LoRA key, or nothing for a key that is no factor.
std::optional<KeyName> module_name(const std::string& key) {
  const auto factor = std::find_if(kFactors.begin(), kFactors.end(), [&](const auto& f) { return ends_with(key, f.first); });
  if (factor == kFactors.end()) return std::nullopt;
  std::string stem = key.substr(0, key.size() - factor->first.size());
  for (const auto& [prefix, component] : kKohyaPrefixes)
    if (starts_with(stem, prefix) && stem.find('.') == std::string::npos)
      return KeyName{component, stem.substr(prefix.size()), factor->second};
  // diffusers' unet.save_attn_procs files name UNet modules without a component prefix
  std::string component =
      starts_with(stem, "down_blocks.") || starts_with(stem, "mid_block.") || starts_with(stem, "up_blocks.") ? "unet" : "unknown";
  for (const auto& [prefix, name] : kDiffusersPrefixes)
    if (starts_with(stem, prefix)) {
      component = name;
      stem = stem.substr(prefix.size());
      break;
    }
  if (starts_with(factor->first, "_lora.")) {
    stem += "_lora";
    const auto p = std::find_if(kProcessorLoras.begin(), kProcessorLoras.end(),
                                [&](const auto& x) { return ends_with(stem, "." + x.first); });
    if (p == kProcessorLoras.end()) return std::nullopt;
    stem = stem.substr(0, stem.size() - p->first.size()) + p->second;
  }
  return KeyName{component, stem, factor->second};
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// {component: {PEFT LoraConfig field: value}} from the metadata diffusers saves beside PEFT weights.
std::map<std::string, std::map<std::string, json::Value>> adapter_configs(const std::string& path,
                                                                        const std::map<std::string, std::string>& metadata) {
  std::map<std::string, std::map<std::string, json::Value>> configs;
  const auto raw = metadata.find(kAdapterMetadata);
  if (raw == metadata.end() || raw->second.empty()) return configs;
  json::Value fields;
  try {
    fields = json::Value::parse(raw->second);
  } catch (const std::exception&) {
    throw std::invalid_argument(path + ": its " + kAdapterMetadata + " metadata is not JSON: the file is damaged; download or save it again");
  }
  if (!fields.is_object()) return configs;
  for (std::size_t i = 0; i < fields.size(); ++i) {
    const std::string& key = fields.keys()[i];
    const std::size_t dot = key.find('.');
    configs[key.substr(0, dot)][dot == std::string::npos ? "" : key.substr(dot + 1)] = fields[i];
  }
  for (const auto& [component, config] : configs) {
    const auto dora = config.find("use_dora");
    if (dora != config.end() && dora->second.is_bool() && dora->second.as_bool())
      throw std::invalid_argument(path + ": its " + component + " adapter is DoRA (use_dora), which ldmrt does not apply; pass a plain LoRA file");
  }
  return configs;
}

// The alpha PEFT scales `module` with (alpha_pattern as PEFT matches it, else lora_alpha; rsLoRA's sqrt(rank) folded in).
std::optional<double> peft_alpha(const std::map<std::string, json::Value>* config, const std::string& module, std::int64_t rank) {
  if (!config) return std::nullopt;
  const auto alpha_field = config->find("lora_alpha");
  if (alpha_field == config->end() || alpha_field->second.is_null()) return std::nullopt;
  double alpha = alpha_field->second.as_number();
  if (const auto patterns = config->find("alpha_pattern"); patterns != config->end() && patterns->second.is_object()) {
    for (std::size_t i = 0; i < patterns->second.size(); ++i)
      if (std::regex_match(module, std::regex("(.*\\.)?(" + patterns->second.keys()[i] + ")"))) {
        alpha = patterns->second[i].as_number();
        break;
      }
  }
  const auto rs = config->find("use_rslora");
  const bool rslora = rs != config->end() && rs->second.is_bool() && rs->second.as_bool();
  return alpha * (rslora ? std::sqrt(static_cast<double>(rank)) : 1.0);
}

}  // namespace

LoraFile read_lora(const std::string& path) {
  const std::filesystem::path p(path);
  if (!std::filesystem::is_regular_file(p)) throw std::invalid_argument("LoRA file " + path + " does not exist");
  if (p.extension() != ".safetensors")
    throw std::invalid_argument(
        path + " is not a .safetensors file: .pt, .bin and .ckpt LoRAs are Python pickles, which the C++ host does not "
        "read. Convert it once: python -c \"import sys, torch, safetensors.torch as st; st.save_file({k: v.contiguous() "
        "for k, v in torch.load(sys.argv[1], weights_only=True).items()}, sys.argv[2])\" " + path + " " +
        std::filesystem::path(p).replace_extension(".safetensors").string() + " (or use Python's Engine, which reads both)");
  std::map<std::string, std::string> metadata;
  std::map<std::string, SafeTensor> tensors;
  try {
    tensors = read_safetensors(path, &metadata);
  } catch (const std::runtime_error& e) {
    throw std::invalid_argument(e.what());
  }
  const auto configs = adapter_configs(path, metadata);
  LoraFile file;
  std::vector<std::pair<std::string, std::string>> order;  // (component, module) in key order
  std::map<std::pair<std::string, std::string>, std::map<std::string, SafeTensor*>> factors;
  for (auto& [key, tensor] : tensors) {
    const std::optional<KeyName> name = module_name(key);
    if (!name) {
      file.ignored.push_back(key);
      continue;
    }
    auto& parts = factors[{name->component, name->module}];
    if (parts.empty()) order.emplace_back(name->component, name->module);
    parts[name->factor] = &tensor;
  }
  for (const auto& id : order) {
    auto& parts = factors.at(id);
    const std::string& module = id.second;
    if (!parts.count("up") || !parts.count("down")) {
      std::string have;
      for (const auto& [factor, _] : parts) have += (have.empty() ? "" : ", ") + factor;
      throw std::invalid_argument(path + ": LoRA module " + module + " has " + have + " but not both up and down weights: "
                                  "the file is damaged or not a LoRA; download or save it again");
    }
    const SafeTensor &up = *parts.at("up"), &down = *parts.at("down");
    const std::size_t dims = up.shape.size();
    if ((dims != 2 && dims != 4) || dims != down.shape.size() || up.shape[1] != down.shape[0] ||
        (dims == 4 && (up.shape[2] != 1 || up.shape[3] != 1)))
      throw std::invalid_argument(path + ": LoRA module " + module + " has up " + shape_text(up.shape) + " and down " +
                                  shape_text(down.shape) + ", which do not multiply (up (out, rank[, 1, 1]) @ down (rank, "
                                  "in[, kh, kw])): the file is damaged or not a LoRA");
    LoraModule m{id.first, module, up, down, std::nullopt, std::nullopt};
    if (parts.count("alpha")) {
      m.alpha = *parts.at("alpha");
    } else {
      const auto config = configs.find(id.first);
      m.peft_alpha = peft_alpha(config == configs.end() ? nullptr : &config->second, module, down.shape[0]);
    }
    file.modules.push_back(std::move(m));
  }
  if (file.modules.empty())
    throw std::invalid_argument(path + " holds no LoRA weights (no lora_unet_*/lora_te_* .lora_up/.lora_down or "
                                "unet.*/text_encoder.* .lora_A/.lora_B keys; first key: " +
                                (tensors.empty() ? std::string("None") : tensors.begin()->first) +
                                "): pass a LoRA file in the kohya or diffusers layout");
  return file;
}

std::pair<std::string, double> parse_lora_spec(const std::string& text) {
  const std::size_t colon = text.rfind(':');
  if (colon != std::string::npos) {
    const std::string number = text.substr(colon + 1);
    try {
      std::size_t used = 0;
      const double strength = std::stod(number, &used);
      if (used == number.size()) return {text.substr(0, colon), strength};
    } catch (const std::exception&) {
    }
  }
  return {text, 1.0};
}

}  // namespace ldmrt
