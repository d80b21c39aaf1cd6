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

#include "ldmrt/json.h"
#include "ldmrt/loop.h"
#include "ldmrt/rng.h"
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
  std::map<std::vector<std::int64_t>, at::Tensor> context_cache;  // token ids -> (1, L, D)

  void load(const std::string& folder);
  const Graph& graph(const std::string& name) const;
  std::vector<at::Tensor> run(const std::string& name, const std::map<std::string, at::Tensor>& inputs) const;
  at::Tensor text_context(const std::vector<std::int64_t>& ids, const std::string& text);
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
    if (const json::Value* t = m.find("tokenizer"); t && !t->is_null()) {
      token_length = t->at("max_length").as_int();
      for (const json::Value& f : t->at("files").items())
        if (!files.find(f.as_string())) throw EngineError(folder + ": tokenizer file " + f.as_string() + " is not listed in 'files': " + rebuild);
      tokenizer = Tokenizer::from_folder((dir / "tokenizer").string(), t->at("kind").as_string(),
                                         static_cast<int>(token_length));
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

at::Tensor Engine::Impl::text_context(const std::vector<std::int64_t>& given, const std::string& text) {
  std::vector<std::int64_t> ids = given;
  if (ids.empty()) {
    if (!tokenizer) throw EngineError(path + " has no tokenizer files: pass token_ids, or rebuild it from a checkpoint that has them");
    ids = tokenizer->encode(text);
  } else if (token_length > 0 && static_cast<std::int64_t>(ids.size()) != token_length) {
    throw std::invalid_argument("token_ids must hold the text encoder's " + std::to_string(token_length) +
                                " ids (padded), got " + std::to_string(ids.size()));
  }
  auto cached = context_cache.find(ids);
  if (cached != context_cache.end()) return cached->second;
  // One prompt at a time, batch 1, as Python's Engine._text_context (batching changes the GEMM blocking).
  at::Tensor cond = at::tensor(ids, at::kLong).reshape({1, static_cast<std::int64_t>(ids.size())});
  at::Tensor context = run("cond_stage", {{"cond", cond}})[0];
  context_cache.emplace(ids, context);
  return context;
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
    at::Tensor cond = impl_->text_context(o.token_ids, o.prompt).expand({batch, -1, -1});
    context = guided ? at::cat({impl_->text_context(o.negative_token_ids, o.negative_prompt).expand({batch, -1, -1}), cond})
                     : cond;
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
