// ldmrt::Engine: an AOTInductor engine folder run by libtorch, with the C++ sampler core. Mirrors
// ldmrt/engine.py step for step (same inputs to the same graphs, same plan, noise and loop), which is what
// makes the C++ and Python images of a seed identical; keep the two in step.
#include "ldmrt/engine.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <unordered_map>

#include "ldmrt/json.h"
#include "ldmrt/loop.h"
#include "ldmrt/lora.h"
#include "ldmrt/prompts.h"
#include "ldmrt/rng.h"
#include "ldmrt/safetensors.h"
#include "ldmrt/samplers.h"

#ifndef LDMRT_VERSION
#error "LDMRT_VERSION must be defined by the build (CMakeLists.txt reads it from pyproject.toml)"
#endif

namespace ldmrt {
namespace {

namespace fs = std::filesystem;
constexpr const char* kFormat = "ldmrt-engine";
constexpr int kFormatVersion = 2;  // ldmrt/manifest.py FORMAT_VERSION
constexpr double kDefaultGuidance = 5.0;  // ldmrt/pipeline.py DEFAULT_GUIDANCE
constexpr const char* kTokenTableKey = "weight";  // ldmrt/engine.py TOKEN_TABLE_KEY
constexpr const char* kLoraTargets = "lora_targets.json";  // ldmrt/backends/aoti.py LORA_TARGETS

struct Graph {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
  std::vector<std::string> inputs, outputs;
};

// An engine folder is a closed world (ldmrt/manifest.py engine_file): `rel` is a normalised relative path, no
// component of it is a symlink, and it names a regular file (never a FIFO or device that could hang or leak).
fs::path checked_file(const fs::path& dir, const std::string& rel, const std::string& folder, const std::string& rebuild) {
  const fs::path p(rel);
  bool normal = !rel.empty() && p.is_relative() && rel.find('\\') == std::string::npos &&
                p.lexically_normal().generic_string() == rel;
  for (const auto& part : p) normal = normal && part != ".." && part != ".";
  if (!normal) throw EngineError(folder + ": the manifest names " + rel + ", which is not a normalised path inside the engine folder: " + rebuild);
  fs::path f = dir;
  for (const auto& part : p) {
    f /= part;
    const fs::file_status st = fs::symlink_status(f);
    if (!fs::exists(st)) throw EngineError(folder + " is missing " + rel + ": " + rebuild);
    if (fs::is_symlink(st)) throw EngineError(folder + "/" + rel + " goes through a symlink; engine folders hold plain files only: " + rebuild);
  }
  if (!fs::is_regular_file(fs::symlink_status(f))) throw EngineError(folder + "/" + rel + " is not a regular file: " + rebuild);
  return f;
}

std::string major_minor(const std::string& version) {
  const std::size_t first = version.find('.');
  return version.substr(0, first == std::string::npos ? first : version.find('.', first + 1));
}

// manifest "default_sampler" (ldmrt/schedulers.py: a diffusers folder's scheduler as make_plan options), or
// CompVis' DDIM when there is none.
SamplerConfig sampler_defaults(const json::Value* d, const std::vector<double>& alphas_cumprod) {
  SamplerConfig c;
  if (!d || d->is_null()) return c;
  for (const std::string& key : d->keys()) {
    const json::Value& v = d->at(key);
    if (key == "sampler") c.sampler = v.as_string();
    else if (key == "timestep_spacing") c.timestep_spacing = v.as_string();
    else if (key == "sigma_interpolation") c.sigma_interpolation = v.as_string();
    else if (key == "respace") c.respace = v.as_string();
    else if (key == "start_noise") c.start_noise = v.as_string();
    else if (key == "solver_type") c.solver_type = v.as_string();
    else if (key == "steps_offset") c.steps_offset = static_cast<int>(v.as_int());
    else if (key == "original_steps") c.original_steps = static_cast<int>(v.as_int());
    else if (key == "solver_order") c.solver_order = static_cast<int>(v.as_int());
    else if (key == "round_timesteps") c.round_timesteps = v.as_bool();
    else if (key == "drop_last_timestep") c.drop_last_timestep = v.as_bool();
    else if (key == "euler_at_final") c.euler_at_final = v.as_bool();
    else if (key == "prev_timestep_stride") c.prev_timestep_stride = v.as_bool();
    else if (key == "lower_order_final") { if (!v.is_null()) c.lower_order_final = v.as_bool(); }
    else if (key == "final_alpha_cumprod") {
      // a number, or "alphas_cumprod[0]" (diffusers' final_sigmas_type "sigma_min")
      if (v.is_string() && v.as_string() == "alphas_cumprod[0]") c.final_alpha_cumprod = alphas_cumprod.front();
      else if (!v.is_null()) c.final_alpha_cumprod = v.as_number();
    } else if (key == "eta") { if (!v.is_null()) c.eta = v.as_number(); }
    else throw std::runtime_error("default_sampler." + key + " is not a sampler setting this host knows");
  }
  return c;
}

}  // namespace

struct Engine::Impl {
  std::string path;
  ModelSummary summary;
  SamplerConfig default_sampler;  // what a request without a sampler runs
  std::map<std::string, Graph> graphs;
  std::unique_ptr<Tokenizer> tokenizer;
  std::int64_t token_length = 0;  // the text encoder's sequence length, when the manifest records it
  std::int64_t max_context_windows = 0;  // compiled shape ranges (AOTInductor): the most windows the UNet takes
  fs::path token_table_file;  // CLIP: the token table (textual inversion), empty elsewhere
  at::Tensor token_table;     // (vocab, width) float32, read on first use
  std::vector<std::pair<std::string, at::Tensor>> embeddings;  // trigger word -> (n, width), in load order
  std::map<std::pair<std::string, int>, at::Tensor> context_cache;  // (prompt, clip skip) -> (1, L, D)
  fs::path lora_targets_file;  // {component: {LoRA module name: weight name}}, written by the build; empty if none
  std::map<std::pair<std::string, std::string>, at::Tensor> base_weights;  // (graph, weight) -> loaded value, while changed

  void load(const std::string& folder);
  const Graph& graph(const std::string& name) const;
  std::vector<at::Tensor> run(const std::string& name, const std::map<std::string, at::Tensor>& inputs) const;
  at::Tensor output(const std::string& graph_name, const std::vector<at::Tensor>& out, const std::string& name) const;
  at::Tensor window_context(const PromptChunk& window, int clip_skip);
  at::Tensor text_context(const std::string& text, int clip_skip);
  at::Tensor ids_context(const std::vector<std::int64_t>& ids, int clip_skip);
  at::Tensor text_contexts(const GenerateOptions& o, bool guided);
  const at::Tensor& tokens_table();
  void set_weight_deltas(const std::map<std::string, at::Tensor>& deltas);
};

void Engine::Impl::load(const std::string& folder) {
  path = folder;
  const std::string rebuild = "rebuild it: ldmrt build --backend aoti -o " + folder;
  const fs::path dir(folder);
  if (!fs::is_directory(dir)) throw EngineError("no engine at " + folder + ": build one with `ldmrt build --backend aoti -o " + folder + "`");
  if (!fs::is_regular_file(dir / "manifest.json"))
    throw EngineError(folder + " has no manifest.json: not an ldmrt engine, or an interrupted build; " + rebuild);
  json::Value m;
  try {
    m = json::Value::parse(json::read_file((dir / "manifest.json").string()));
    if (m.at("format").as_string() != kFormat) throw EngineError(folder + "/manifest.json is not an ldmrt engine manifest");
    if (m.at("format_version").as_int() != kFormatVersion)
      throw EngineError(folder + " has engine format " + std::to_string(m.at("format_version").as_int()) +
                        ", this ldmrt " LDMRT_VERSION " reads format " + std::to_string(kFormatVersion) + ": " + rebuild);
    const std::string built = m.at("ldmrt_version").as_string();
    if (major_minor(built) != major_minor(LDMRT_VERSION))
      throw EngineError(folder + " was built by ldmrt " + built + ", this is ldmrt " LDMRT_VERSION ": " + rebuild);
    const std::string backend = m.at("backend").as_string();
    if (backend != "aoti")
      throw EngineError(folder + " is a " + backend + " engine; C++ hosts run AOTInductor engines: build one with "
                        "`ldmrt build --backend aoti -o DIR`");
    if (m.at("device").at("type").as_string() != "cpu")
      throw EngineError(folder + " was compiled for " + m.at("device").at("type").as_string() +
                        "; the C++ host runs CPU engines: " + rebuild);
    const json::Value& files = m.at("files");
    for (std::size_t i = 0; i < files.size(); ++i) {
      const std::string& rel = files.keys()[i];
      const fs::path f = checked_file(dir, rel, folder, rebuild);
      const auto bytes = m.at("files")[i].at("bytes").as_int();
      if (static_cast<std::int64_t>(fs::file_size(f)) != bytes)
        throw EngineError(folder + "/" + rel + " has " + std::to_string(fs::file_size(f)) + " bytes, the manifest says " +
                          std::to_string(bytes) + " (truncated or replaced): " + rebuild);
    }
    const json::Value& s = m.at("model").at("summary");
    summary.conditioning = s.at("conditioning").as_string();
    summary.latent_channels = static_cast<int>(s.at("latent_channels").as_int());
    summary.latent_factor = static_cast<int>(s.at("latent_factor").as_int());
    summary.size_multiple = static_cast<int>(s.at("size_multiple").as_int());
    summary.default_size = static_cast<int>(s.at("default_size").as_int());
    for (const json::Value& a : s.at("alphas_cumprod").items()) summary.alphas_cumprod.push_back(a.as_number());
    if (const json::Value* n = s.find("num_classes")) summary.num_classes = n->as_int();
    if (const json::Value* u = s.find("uncond_class"); u && !u->is_null()) summary.uncond_class = u->as_int();
    summary.unconditional_input = s.at("unconditional_input").as_bool();
    if (const json::Value* l = s.find("long_prompts")) summary.long_prompts = l->as_bool();
    if (summary.long_prompts) summary.context_window = static_cast<int>(s.at("context_window").as_int());
    if (const json::Value* c = s.find("clip_layers")) summary.clip_layers = static_cast<int>(c->as_int());
    if (const json::Value* sh = m.find("shapes"); sh && sh->is_object())
      if (const json::Value* w = sh->find("max_context_windows"); w && !w->is_null()) max_context_windows = w->as_int();
    default_sampler = sampler_defaults(m.find("default_sampler"), summary.alphas_cumprod);
    const json::Value& g = m.at("graphs");
    for (std::size_t i = 0; i < g.size(); ++i) {
      Graph graph;
      for (const json::Value& v : g[i].at("inputs").items()) graph.inputs.push_back(v.as_string());
      for (const json::Value& v : g[i].at("outputs").items()) graph.outputs.push_back(v.as_string());
      const std::string& file = g[i].at("file").as_string();
      if (!files.find(file)) throw EngineError(folder + ": graph " + g.keys()[i] + " names " + file + ", which the manifest does not list in 'files': " + rebuild);
      graph.package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(checked_file(dir, file, folder, rebuild).string());
      graphs.emplace(g.keys()[i], std::move(graph));
    }
    if (files.find(kLoraTargets)) lora_targets_file = checked_file(dir, kLoraTargets, folder, rebuild);
    if (const json::Value* t = m.find("tokenizer"); t && !t->is_null()) {
      token_length = t->at("max_length").as_int();
      for (const json::Value& f : t->at("files").items())
        if (!files.find(f.as_string())) throw EngineError(folder + ": tokenizer file " + f.as_string() + " is not listed in 'files': " + rebuild);
      tokenizer = Tokenizer::from_folder((dir / "tokenizer").string(), t->at("kind").as_string(),
                                         static_cast<int>(token_length));
      if (const json::Value* table = t->find("token_embedding"); table && !table->is_null()) {
        if (!files.find(table->as_string()))
          throw EngineError(folder + ": tokenizer.token_embedding names " + table->as_string() + ", which 'files' does not list: " + rebuild);
        token_table_file = checked_file(dir, table->as_string(), folder, rebuild);
      }
    }
  } catch (const EngineError&) {
    throw;
  } catch (const std::exception& e) {
    throw EngineError(folder + " cannot be loaded (" + e.what() + "): " + rebuild);
  }
}

const Graph& Engine::Impl::graph(const std::string& name) const {
  auto it = graphs.find(name);
  if (it == graphs.end()) throw EngineError(path + " has no " + name + " graph");
  return it->second;
}

std::vector<at::Tensor> Engine::Impl::run(const std::string& name, const std::map<std::string, at::Tensor>& inputs) const {
  const Graph& g = graph(name);
  std::vector<at::Tensor> args;
  for (const std::string& input : g.inputs) {
    auto it = inputs.find(input);
    if (it == inputs.end()) throw EngineError("graph " + name + " needs input " + input);
    args.push_back(it->second.contiguous());
  }
  std::vector<at::Tensor> out = g.package->run(args);
  for (at::Tensor& t : out) t = t.to(at::kFloat).contiguous();
  return out;
}

at::Tensor Engine::Impl::output(const std::string& graph_name, const std::vector<at::Tensor>& out,
                                const std::string& name) const {
  const std::vector<std::string>& names = graph(graph_name).outputs;
  const auto it = std::find(names.begin(), names.end(), name);
  if (it == names.end() || static_cast<std::size_t>(it - names.begin()) >= out.size())
    throw EngineError(path + ": graph " + graph_name + " has no output " + name + " (an engine built before it existed: "
                      "rebuild it: ldmrt build --backend aoti -o " + path + ")");
  return out[static_cast<std::size_t>(it - names.begin())];
}

// One text-encoder window, batch 1, as Python's pipeline._window_context: from the layer CLIP skip names (1: the
// graph's context); a window with textual-inversion rows is looked up here and runs the graph of token embeddings.
at::Tensor Engine::Impl::window_context(const PromptChunk& window, int clip_skip) {
  std::vector<at::Tensor> out;
  std::string name = "cond_stage";
  at::Tensor ids = at::tensor(window.ids, at::kLong).reshape({1, static_cast<std::int64_t>(window.ids.size())});
  if (!window.fixes.empty()) {
    name = "cond_stage_embeds";
    at::Tensor rows = tokens_table().index_select(0, ids[0]);
    for (const auto& [offset, trigger] : window.fixes) {
      const auto it = std::find_if(embeddings.begin(), embeddings.end(), [&](const auto& e) { return e.first == trigger; });
      rows.narrow(0, offset, it->second.size(0)).copy_(it->second);
    }
    out = run(name, {{"token_embeds", rows.unsqueeze(0)}});
  } else {
    out = run(name, {{"cond", ids}});
  }
  return clip_skip == 1 ? output(name, out, "context") : output(name, out, "layer_contexts").select(1, -clip_skip);
}

// z with each token's embedding times its weight, rescaled to the unweighted mean (ldmrt/prompts.py emphasized:
// the same float32 ops in the same order, so the same bits).
static at::Tensor emphasized(const at::Tensor& z, const std::vector<double>& weights) {
  if (std::all_of(weights.begin(), weights.end(), [](double w) { return w == 1.0; })) return z;
  const at::Tensor original_mean = z.mean();
  const at::Tensor weighted = z * at::tensor(weights, at::kDouble).to(at::kFloat).reshape({1, -1, 1});
  return weighted * (original_mean / weighted.mean());
}

at::Tensor Engine::Impl::text_context(const std::string& text, int clip_skip) {
  auto cached = context_cache.find({text, clip_skip});
  if (cached != context_cache.end()) return cached->second;
  if (!tokenizer) throw EngineError(path + " has no tokenizer files: pass token_ids, or rebuild it from a checkpoint that has them");
  std::vector<std::pair<std::string, int>> counts;
  for (const auto& [trigger, vectors] : embeddings) counts.emplace_back(trigger, static_cast<int>(vectors.size(0)));
  std::vector<at::Tensor> parts;
  for (const PromptChunk& window : prompt_chunks(text, *tokenizer, summary.long_prompts, counts))
    parts.push_back(emphasized(window_context(window, clip_skip), window.weights));
  at::Tensor context = at::cat(parts, 1);
  context_cache.emplace(std::make_pair(text, clip_skip), context);
  return context;
}

at::Tensor Engine::Impl::ids_context(const std::vector<std::int64_t>& ids, int clip_skip) {
  if (token_length > 0 && static_cast<std::int64_t>(ids.size()) != token_length)
    throw std::invalid_argument("token_ids must hold the text encoder's " + std::to_string(token_length) +
                                " ids (padded), got " + std::to_string(ids.size()));
  PromptChunk window;
  window.ids = ids;
  return window_context(window, clip_skip);
}

// (B, L, D): the negative prompt's and the prompt's contexts when guided, the shorter padded with the empty
// prompt's windows to the longer (Python's pipeline.text_contexts).
at::Tensor Engine::Impl::text_contexts(const GenerateOptions& o, bool guided) {
  if (o.clip_skip != 1) {
    if (!summary.clip_layers)
      throw std::invalid_argument("clip_skip is for CLIP text encoders (SD v1); this model's engine has none (engines "
                                  "built before clip_skip existed: rebuild them)");
    if (o.clip_skip < 1 || o.clip_skip > summary.clip_layers)
      throw std::invalid_argument("clip_skip must be an integer in 1.." + std::to_string(summary.clip_layers) + ", not " +
                                  std::to_string(o.clip_skip));
  }
  const auto context_of = [&](const std::vector<std::int64_t>& ids, const std::string& text) {
    return ids.empty() ? text_context(text, o.clip_skip) : ids_context(ids, o.clip_skip);
  };
  std::vector<at::Tensor> contexts;
  if (guided) contexts.push_back(context_of(o.negative_token_ids, o.negative_prompt));
  contexts.push_back(context_of(o.token_ids, o.prompt));
  std::int64_t longest = 0;
  for (const at::Tensor& c : contexts) longest = std::max(longest, c.size(1));
  if (max_context_windows && summary.context_window && longest > max_context_windows * summary.context_window)
    throw std::invalid_argument("the prompt needs " + std::to_string(longest / summary.context_window) +
                                " windows of 75 tokens; this aoti engine was compiled for at most " +
                                std::to_string(max_context_windows) + ": shorten it");
  for (at::Tensor& c : contexts) {
    if (c.size(1) < longest) {
      const at::Tensor empty = text_context("", o.clip_skip);
      c = at::cat({c, empty.repeat({1, (longest - c.size(1)) / empty.size(1), 1})}, 1);
    }
  }
  const std::int64_t batch = o.batch_size;
  for (at::Tensor& c : contexts) c = c.expand({batch, -1, -1});
  return at::cat(contexts).contiguous();
}

const at::Tensor& Engine::Impl::tokens_table() {
  if (!token_table.defined()) {
    const std::map<std::string, SafeTensor> file = read_safetensors(token_table_file.string());
    const auto it = file.find(kTokenTableKey);
    if (it == file.end() || it->second.dtype != "F32" || it->second.shape.size() != 2)
      throw EngineError(token_table_file.string() + " does not hold the float32 token table '" + kTokenTableKey +
                        "': rebuild it: ldmrt build --backend aoti -o " + path);
    token_table = at::from_blob(const_cast<std::uint8_t*>(it->second.data.data()), it->second.shape, at::kFloat).clone();
  }
  return token_table;
}

static at::ScalarType float_type(const std::string& dtype) {
  if (dtype == "F32") return at::kFloat;
  if (dtype == "F16") return at::kHalf;
  if (dtype == "BF16") return at::kBFloat16;
  if (dtype == "F64") return at::kDouble;
  return at::ScalarType::Undefined;
}

std::vector<std::string> Engine::load_embedding(const std::string& file) {
  Impl& e = *impl_;
  if (e.token_table_file.empty() || !e.graphs.count("cond_stage_embeds"))
    throw EngineError(e.path + " takes no textual-inversion embeddings: they are for CLIP text encoders (SD v1), in "
                      "engines built by this ldmrt (rebuild it: ldmrt build --backend aoti -o " + e.path + ")");
  const fs::path p(file);
  if (!fs::is_regular_file(p)) throw std::invalid_argument("embedding file " + file + " does not exist");
  if (p.extension() != ".safetensors")
    throw std::invalid_argument(
        file + " is not a .safetensors file: .pt and .bin embeddings are Python pickles, which the C++ host does not "
        "read. Convert it once: python -c \"import sys, torch, safetensors.torch as st; d = torch.load(sys.argv[1], "
        "weights_only=True); st.save_file({'emb_params': next(iter(d['string_to_param'].values())).contiguous()} if "
        "'string_to_param' in d else {k: v.contiguous() for k, v in d.items()}, sys.argv[2])\" " + file + " " +
        fs::path(p).replace_extension(".safetensors").string() + " (or use Python's Engine.load_embedding, which reads both)");
  std::map<std::string, SafeTensor> data;
  try {
    data = read_safetensors(file);
  } catch (const std::runtime_error& err) {
    throw std::invalid_argument(err.what());
  }
  std::vector<std::pair<std::string, SafeTensor*>> found;  // as ldmrt/embeddings.py read_embedding_file
  if (data.size() == 1 && data.count("emb_params")) found.emplace_back(p.stem().string(), &data.at("emb_params"));
  else for (auto& [trigger, tensor] : data) found.emplace_back(trigger, &tensor);
  const std::int64_t width = e.tokens_table().size(1);
  std::vector<std::pair<std::string, at::Tensor>> vectors;
  for (const auto& [trigger, t] : found) {
    const at::ScalarType type = float_type(t->dtype);
    if (type == at::ScalarType::Undefined)
      throw std::invalid_argument(file + ": the vectors of '" + trigger + "' are not a float tensor: not a "
                                  "textual-inversion embedding (AUTOMATIC1111 .safetensors or diffusers learned_embeds)");
    at::Tensor v = at::from_blob(t->data.data(), t->shape, type).to(at::kFloat).clone();
    if (v.dim() == 1) v = v.unsqueeze(0);  // diffusers: one (width,)
    if (v.dim() != 2 || v.size(1) != width || v.size(0) == 0) {
      std::string shape;
      for (std::int64_t d : t->shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
      throw std::invalid_argument(file + ": '" + trigger + "' has vectors of shape (" + shape + "); this model's text "
                                  "encoder takes (n, " + std::to_string(width) + "): the embedding was trained for another model");
    }
    if (trigger.find_first_not_of(" \t\n\r\f\v") == std::string::npos)
      throw std::invalid_argument(file + ": an embedding has an empty trigger word: rename the file");
    vectors.emplace_back(trigger, v.contiguous());
  }
  std::vector<std::string> triggers;
  for (auto& [trigger, v] : vectors) {
    triggers.push_back(trigger);
    auto it = std::find_if(e.embeddings.begin(), e.embeddings.end(), [&](const auto& x) { return x.first == trigger; });
    if (it != e.embeddings.end()) it->second = std::move(v);  // a dict update: the word keeps its place
    else e.embeddings.emplace_back(trigger, std::move(v));
  }
  e.context_cache.clear();  // cached prompts may hold a trigger word
  return triggers;
}

// Each weight of every graph = its loaded value + deltas (summed in float32, cast to its dtype), written into the
// package's own buffers; the loaded values of changed weights are kept, and one without a delta gets them back bit
// for bit. As ldmrt/backends/aoti.py set_weight_deltas (same float32 ops, so the same bits).
void Engine::Impl::set_weight_deltas(const std::map<std::string, at::Tensor>& deltas) {
  for (auto& [graph_name, g] : graphs) {
    std::unordered_map<std::string, at::Tensor> update;
    for (const auto& [name, value] : g.package->get_runner()->extract_constants_map(false)) {  // live buffers
      const auto delta = deltas.find(name);
      auto base = base_weights.find({graph_name, name});
      if (delta == deltas.end() && base == base_weights.end()) continue;
      if (base == base_weights.end()) base = base_weights.emplace(std::make_pair(graph_name, name), value.clone()).first;
      if (delta != deltas.end()) {
        update[name] = (base->second.to(at::kFloat) + delta->second).to(base->second.scalar_type());
      } else {
        update[name] = base->second;
        base_weights.erase(base);
      }
    }
    if (!update.empty()) g.package->load_constants(update, false, false);
  }
}

static std::string tuple_text(at::IntArrayRef shape) {  // as Python prints a shape tuple
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

static at::Tensor float_tensor(const SafeTensor& t, const std::string& where) {
  const at::ScalarType type = float_type(t.dtype);
  if (type == at::ScalarType::Undefined) throw std::invalid_argument(where + " is not a float tensor: the file is not a LoRA");
  return at::from_blob(const_cast<std::uint8_t*>(t.data.data()), t.shape, type).to(at::kFloat, false, true);
}

// (alpha / rank) * up @ down, shaped as the weight (float32): ldmrt/lora.py module_delta.
static at::Tensor module_delta(const LoraModule& m, at::IntArrayRef shape, const std::string& where) {
  const at::Tensor up_full = float_tensor(m.up, where), down_full = float_tensor(m.down, where);
  const at::Tensor up = up_full.flatten(1), down = down_full.flatten(1);
  const std::int64_t rank = down.size(0);
  const bool fits = up.size(0) == shape[0] && down.size(1) == c10::multiply_integers(shape.slice(1)) &&
                    (down_full.dim() == 2 || down_full.sizes().slice(1) == shape.slice(1));
  if (!fits)
    throw std::invalid_argument(where + ": up " + tuple_text(up_full.sizes()) + " @ down " + tuple_text(down_full.sizes()) +
                                " does not fit the weight " + tuple_text(shape) + ": the LoRA was made for another model "
                                "(another size or SD version); pass one made for this model");
  std::optional<double> alpha = m.peft_alpha;
  if (m.alpha) alpha = float_tensor(*m.alpha, where + " alpha").item<double>();
  const double scale = alpha ? *alpha / static_cast<double>(rank) : 1.0;
  return (at::matmul(up, down) * scale).reshape(shape);
}

std::vector<LoraReport> Engine::set_loras(const std::vector<std::pair<std::string, double>>& loras) {
  Impl& e = *impl_;
  if (e.lora_targets_file.empty() && !loras.empty())
    throw EngineError(e.path + " takes no LoRA: it has no " + kLoraTargets + " (a model without UNet or CLIP weights to "
                      "adapt, or an engine built before LoRA support: rebuild it: ldmrt build --backend aoti -o " + e.path + ")");
  std::map<std::pair<std::string, std::string>, std::string> targets;  // (component, module) -> weight name
  std::map<std::string, at::Tensor> shapes;  // weight name -> a graph's tensor of it (its shape)
  if (!loras.empty()) {
    const json::Value table = json::Value::parse(json::read_file(e.lora_targets_file.string()));
    for (std::size_t c = 0; c < table.size(); ++c)
      for (std::size_t i = 0; i < table[c].size(); ++i) targets[{table.keys()[c], table[c].keys()[i]}] = table[c][i].as_string();
    for (auto& [graph_name, g] : e.graphs)
      for (const auto& [name, value] : g.package->get_runner()->extract_constants_map(false)) shapes.emplace(name, value);
  }
  std::map<std::string, at::Tensor> deltas;
  std::vector<LoraReport> reports;
  for (const auto& [path, strength] : loras) {
    if (!std::isfinite(strength))
      throw std::invalid_argument("LoRA strength of " + path + " is " + std::to_string(strength) +
                                  ": give a finite number (1.0 is full strength)");
    const LoraFile file = read_lora(path);
    LoraReport report{path, strength, 0, {}, file.ignored};
    for (const LoraModule& m : file.modules) {
      const auto target = targets.find({m.component, m.name});
      const auto weight = target == targets.end() ? shapes.end() : shapes.find(target->second);
      if (weight == shapes.end()) {
        report.unmatched.push_back(m.component + ":" + m.name);
        continue;
      }
      const std::string& name = target->second;
      const at::Tensor delta = module_delta(m, weight->second.sizes(), path + ": LoRA module " + m.name + " for " + name);
      auto sum = deltas.find(name);
      if (sum == deltas.end()) deltas.emplace(name, strength * delta);
      else sum->second = sum->second + strength * delta;
      ++report.matched;
    }
    if (!report.matched)
      throw std::invalid_argument(path + ": none of its " + std::to_string(file.modules.size()) + " LoRA modules is a "
                                  "module of this engine's UNet or text encoder (first: " + report.unmatched.front() +
                                  "); ldmrt reads LoRAs of SD v1 models (kohya or diffusers layout): pass a LoRA made for this model");
    reports.push_back(std::move(report));
  }
  e.context_cache.clear();  // the text encoder may change
  try {
    e.set_weight_deltas(deltas);
  } catch (...) {  // never some graphs merged and others not: back to the base
    e.set_weight_deltas({});
    throw;
  }
  return reports;
}

Engine::Engine(const std::string& path, const EngineOptions& options) : impl_(std::make_unique<Impl>()) {
  if (options.threads > 0) at::set_num_threads(options.threads);
  impl_->load(path);
}
Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;

const ModelSummary& Engine::summary() const { return impl_->summary; }
const Tokenizer* Engine::tokenizer() const { return impl_->tokenizer.get(); }
const std::string& Engine::path() const { return impl_->path; }

Latent Engine::generate_latent(const GenerateOptions& o) {
  const ModelSummary& s = impl_->summary;
  if (o.batch_size < 1) throw std::invalid_argument("batch_size must be >= 1, got " + std::to_string(o.batch_size));
  const int height = o.height ? o.height : s.default_size, width = o.width ? o.width : s.default_size;
  const int m = s.size_multiple;
  if (height <= 0 || width <= 0 || height % m || width % m)
    throw std::invalid_argument("size " + std::to_string(width) + "x" + std::to_string(height) +
                                " is not supported by this model: width and height must be positive multiples of " +
                                std::to_string(m));
  const std::int64_t batch = o.batch_size;
  const std::vector<std::int64_t> shape{batch, s.latent_channels, height / s.latent_factor, width / s.latent_factor};

  // Conditioning and guidance, as ldmrt/pipeline.py (_guided, conditioning).
  const std::string& kind = s.conditioning;
  const bool has_uncond = s.unconditional_input;
  const bool custom = o.guidance_scale && *o.guidance_scale != 1.0;
  bool guided = false;
  if (kind == "text" || kind == "class") {
    if (custom && !has_uncond)
      throw std::invalid_argument("this model has no unconditional input, so no classifier-free guidance: leave "
                                  "guidance_scale unset (or 1)");
    guided = (!o.guidance_scale || custom) && has_uncond;
  } else if (custom) {
    throw std::invalid_argument("classifier-free guidance needs a text or class-conditional model; this one is "
                                "conditioned on " + kind);
  }
  at::Tensor context;
  if (kind == "text") {
    if (o.prompt.empty() && o.token_ids.empty())
      throw std::invalid_argument("this is a text-to-image model: give a prompt (or token_ids)");
    context = impl_->text_contexts(o, guided);
  } else if (kind == "class") {
    if (!o.class_label) throw std::invalid_argument("this is a class-conditional model: give class_label (0.." +
                                                    std::to_string(s.num_classes - 1) + ")");
    if (*o.class_label < 0 || *o.class_label >= s.num_classes)
      throw std::invalid_argument("class_label must be in 0.." + std::to_string(s.num_classes - 1));
    at::Tensor labels = at::full({batch}, *o.class_label, at::kLong);
    if (guided) labels = at::cat({at::full({batch}, *s.uncond_class, at::kLong), labels});
    context = impl_->run("cond_stage", {{"cond", labels}})[0];
  } else if (kind == "none") {
    if (!o.prompt.empty()) throw std::invalid_argument("this model is unconditional: it takes no prompt");
  } else {
    throw EngineError("the C++ Engine generates with text, class-conditional and unconditional models; this one is "
                      "conditioned on " + kind + ": use Python's ldmrt.Engine");
  }
  if (context.defined()) context = context.contiguous();
  const double scale = o.guidance_scale.value_or(kDefaultGuidance);

  // As Python's ldmrt.schedulers.choose (without its AUTOMATIC1111 aliases): no sampler named, the engine's default
  // with its options; a named one on CompVis' grid unless a spacing is given.
  SamplerConfig config = o.sampler.empty() ? impl_->default_sampler : SamplerConfig{};
  if (!o.sampler.empty()) config.sampler = o.sampler;
  if (!o.timestep_spacing.empty()) config.timestep_spacing = o.timestep_spacing;
  config.steps = o.steps;
  config.alphas_cumprod = s.alphas_cumprod;
  if (o.eta) config.eta = o.eta;
  config.cache_interval = o.cache_interval;
  config.cache_schedule = o.cache_schedule;
  config.guidance_from = o.guidance_from;
  config.guidance_until = o.guidance_until;
  const Plan plan = make_plan(config);

  std::size_t count = 1;
  for (std::int64_t d : shape) count *= static_cast<std::size_t>(d);
  Latent latent{shape, std::vector<float>(count)};
  randn<float>(o.seed, 0, latent.values.data(), count);

  // The model follows the plan's stages, one call each (ldmrt/pipeline.py UNetCalls): an unguided stage of a
  // guided run passes the batch alone (the conditional context); a shallow one runs unet_shallow on the deep
  // feature kept by the last full call (its conditional half when that was doubled).
  at::Tensor eps, deep;  // the last model output (alive while the loop reads it) and the kept deep feature
  std::size_t call = 0;
  const EpsModel<float> model = [&](const float* x, std::size_t n, double t) -> const float* {
    const Stage& stage = plan.stages.at(call++);
    std::vector<std::int64_t> x_shape = shape;
    x_shape[0] = static_cast<std::int64_t>(n / (count / static_cast<std::size_t>(batch)));
    std::map<std::string, at::Tensor> inputs{
        {"x", at::from_blob(const_cast<float*>(x), x_shape, at::kFloat)},
        {"t", at::full({x_shape[0]}, static_cast<float>(t), at::kFloat)}};
    if (context.defined())
      inputs.emplace("context", context.size(0) == x_shape[0] ? context : context.narrow(0, context.size(0) - x_shape[0], x_shape[0]));
    if (stage.shallow) {
      if (!deep.defined()) throw EngineError("a shallow stage before any full one: the plan is inconsistent");
      inputs.emplace("deep", deep.size(0) == x_shape[0] ? deep : deep.narrow(0, deep.size(0) - x_shape[0], x_shape[0]));
      eps = impl_->run("unet_shallow", inputs)[0];  // (run takes the inputs the graph names: maybe no context)
    } else {
      std::vector<at::Tensor> out = impl_->run("unet", inputs);
      eps = out[0];
      if (out.size() > 1) deep = out[1].contiguous();
    }
    if (static_cast<std::size_t>(eps.numel()) != n) throw EngineError("the unet graph returned a tensor of the wrong size");
    return eps.data_ptr<float>();
  };
  LoopInputs<float> in;
  if (guided) in.guidance_scale = scale;
  Workspace<float> workspace = Workspace<float>::allocate(plan, count, guided);
  run_plan<float>(plan, latent.values.data(), count, model, philox_noise<float>(o.seed), in, workspace);
  return latent;
}

std::vector<Image> Engine::decode(const Latent& latent) {
  at::Tensor z = at::from_blob(const_cast<float*>(latent.values.data()), latent.shape, at::kFloat);
  const at::Tensor image = impl_->run("decoder", {{"latent", z}})[0];  // (B, 3, H, W) about [-1, 1]
  const std::int64_t batch = image.size(0), height = image.size(2), width = image.size(3);
  const float* data = image.data_ptr<float>();
  std::vector<Image> images;
  for (std::int64_t b = 0; b < batch; ++b) {
    Image out{static_cast<int>(width), static_cast<int>(height), std::vector<std::uint8_t>(height * width * 3)};
    for (std::int64_t c = 0; c < 3; ++c) {
      const float* plane = data + (b * 3 + c) * height * width;
      for (std::int64_t i = 0; i < height * width; ++i) {
        // The float32 operations of Python's Engine: ((clamp(x, -1, 1) + 1) / 2 * 255).round(), half to even.
        const float v = (std::min(std::max(plane[i], -1.0f), 1.0f) + 1.0f) / 2.0f * 255.0f;
        out.rgb[static_cast<std::size_t>(i * 3 + c)] = static_cast<std::uint8_t>(std::nearbyint(v));
      }
    }
    images.push_back(std::move(out));
  }
  return images;
}

std::vector<Image> Engine::generate(const GenerateOptions& options) { return decode(generate_latent(options)); }

}  // namespace ldmrt
