// ldmrt::Engine for C++ hosts: loads an engine folder built with `ldmrt build --backend aoti` (AOTInductor
// packages, run by the libtorch of the torch that built them) and generates images with the same sampler
// plans, Philox noise and loop as Python's ldmrt.Engine, so a seed gives the same image in both.
//
//   ldmrt::Engine engine("engines/shapes");
//   std::vector<ldmrt::Image> images = engine.generate({.prompt = "a red circle", .steps = 30, .seed = 1});
//
// (Designated initialisers are C++20; in C++17 set the fields one by one.) This header needs no torch
// headers; link the CMake target ldmrt::ldmrt (find_package(ldmrt), see examples/cpp). CPU engines only;
// text, class-conditional and unconditional models (Python's Engine covers the image-conditioned ones). Prompts
// read as Python reads them: AUTOMATIC1111's syntax and long prompts (ldmrt/prompts.h), CLIP skip, textual
// inversion from .safetensors; LoRA .safetensors files (ldmrt/lora.h) with strengths, switched without a rebuild.
// An Engine is not thread-safe: use one per thread, or serialise calls.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ldmrt/tokenizer.h"

namespace ldmrt {

// An engine folder that cannot be used here (wrong format, backend or files), or a request the engine's
// model cannot serve; the message says what to do.
class EngineError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct EngineOptions {
  int threads = 0;  // intra-op threads for the graphs (libtorch is process-wide); 0 leaves libtorch's default
};

// The fields Python's Engine.generate takes, with the same defaults, in an order that lets
// {.prompt = ..., .steps = ..., .seed = ...} read naturally (every member has an initialiser, so designated
// initialisers may leave any out).
struct GenerateOptions {
  // Text models. AUTOMATIC1111's syntax (ldmrt/prompts.h): (word:1.3), [word], escapes, BREAK; CLIP engines take
  // any length as 75-token windows (up to the engine's max_context_windows), LDM-BERT one window (longer: an error).
  std::string prompt{};
  int steps = 50;
  std::uint64_t seed = 0;        // x_T is Philox stream 0 of the seed, the samplers' noise streams 1, 2, ...
  std::optional<double> guidance_scale{};  // unset: 5 where the model has an unconditional input, else none
  std::string negative_prompt{};  // the unconditional text of classifier-free guidance
  // Empty: the engine's default (a diffusers folder's scheduler, else ddim); else one of sampler_names().
  std::string sampler{};
  std::optional<double> eta{};
  std::string timestep_spacing{};  // empty: the default sampler's grid, or CompVis' "uniform" for a named one
  int height = 0, width = 0;     // 0: the model's default size; else multiples of summary().size_multiple
  int batch_size = 1;
  std::optional<std::int64_t> class_label{};  // class-conditional models
  // Token ids instead of prompt / negative_prompt (a host with its own tokenizer): one window of max_length ids
  // each, as the cond stage takes them, unweighted. Empty: the prompt is parsed and tokenised here.
  std::vector<std::int64_t> token_ids{}, negative_token_ids{};
  // Doing less per image, as Python's cache_interval and guidance_interval (SamplerConfig): the full UNet every
  // cache_interval-th step and its shallow branch between; guidance only on steps in [from, until).
  int cache_interval = 1;
  std::string cache_schedule = "uniform";  // or "quadratic"
  double guidance_from = 0, guidance_until = 1;
  // CLIP skip (CLIP engines): the text encoder layer, counted from the last, whose output through the final layer
  // norm conditions the UNet; 1 is the last layer. AUTOMATIC1111's numbering (diffusers' clip_skip + 1).
  int clip_skip = 1;
};

// What one LoRA file of the active set changed (Python: ldmrt.lora.Applied): `matched` modules; left out: the file's
// modules this engine lacks (`unmatched`, "component:module") and its keys that are no LoRA factor (`ignored`).
struct LoraReport {
  std::string path;
  double strength = 1.0;
  int matched = 0;
  std::vector<std::string> unmatched, ignored;
};

struct Image {
  int width = 0, height = 0;
  std::vector<std::uint8_t> rgb;  // height * width * 3 bytes, rows top to bottom
};

struct Latent {
  std::vector<std::int64_t> shape;  // (batch, channels, height / factor, width / factor)
  std::vector<float> values;
};

// What generate needs to know about the model (manifest.json "model" -> "summary").
struct ModelSummary {
  std::string conditioning;  // "text", "class", "none", or a kind the C++ Engine does not serve
  int latent_channels = 0, latent_factor = 1, size_multiple = 1, default_size = 0;
  std::vector<double> alphas_cumprod;
  std::int64_t num_classes = 0;
  std::optional<std::int64_t> uncond_class;
  bool unconditional_input = false;  // classifier-free guidance possible (computed by ldmrt/manifest.py)
  bool long_prompts = false;  // CLIP: prompts of any length, as windows of context_window tokens
  int context_window = 0;
  int clip_layers = 0;        // CLIP: the text encoder's layers (clip_skip's range), 0 elsewhere
};

class Engine {
 public:
  // Reads and checks `path`/manifest.json and the files it lists (sizes), then loads the graphs.
  explicit Engine(const std::string& path, const EngineOptions& options = {});
  ~Engine();
  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;

  std::vector<Image> generate(const GenerateOptions& options);
  // The sampled latent, before the decoder (Python: output_type="latent").
  Latent generate_latent(const GenerateOptions& options);
  std::vector<Image> decode(const Latent& latent);

  // Textual inversion (CLIP engines): reads an AUTOMATIC1111 .safetensors ({"emb_params": (n, width)}; trigger
  // word: the file's stem) or a diffusers learned_embeds.safetensors ({token: (width,) or (n, width)}) and returns
  // its trigger words; where one stands in a later prompt, its vectors take the place of its tokens. Pickles
  // (.pt, .bin) are refused: convert them to .safetensors (the message says how). Reading a file again replaces it.
  std::vector<std::string> load_embedding(const std::string& path);

  // LoRA (the UNet and CLIP text encoder): makes `loras` [(file, strength), ...] the active set, as Python's
  // Engine.set_loras: every weight a file adapts becomes its loaded value + the sum of strength * (alpha / rank) *
  // up @ down over the files, in the loaded graphs; {} is the base model again, bit for bit. Throws
  // std::invalid_argument for a file that cannot be read or matches no module of this engine (the active set is then
  // left as it was); a file that matches only some modules is applied and its report lists the rest. Engines built
  // without the LoRA table (lora_targets.json) take none: EngineError.
  std::vector<LoraReport> set_loras(const std::vector<std::pair<std::string, double>>& loras);

  const ModelSummary& summary() const;
  const Tokenizer* tokenizer() const;  // nullptr when the engine has no tokenizer files
  const std::string& path() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ldmrt
