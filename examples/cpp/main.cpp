// ldmrt_generate ENGINE PROMPT OUT.png [--steps N] [--seed S] [--guidance G] [--sampler NAME] [--size PX]
//                [--batch B] [--class LABEL] [--threads T] [--latent OUT.f32] [--cache N]
//                [--guidance-from F] [--guidance-until F] [--negative TEXT] [--clip-skip N] [--embedding FILE]...
//                [--lora FILE[:STRENGTH]]...
// Writes OUT.png (batch > 1: OUT-0.png, OUT-1.png, ...); --latent also writes the sampled latent as raw
// float32 values (for comparisons with Python's Engine). PROMPT and --negative take AUTOMATIC1111's syntax
// ((word:1.3), [word], BREAK; CLIP engines: any length); --embedding loads a textual-inversion .safetensors;
// --lora applies a LoRA .safetensors at a strength (default 1), repeatable: the set applies together.
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "ldmrt/engine.h"
#include "ldmrt/lora.h"
#include "png.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " ENGINE PROMPT OUT.png [--steps N] [--seed S] [--guidance G] [--sampler NAME]"
              << " [--size PX] [--batch B] [--class LABEL] [--threads T] [--latent OUT.f32] [--cache N]"
              << " [--guidance-from F] [--guidance-until F] [--negative TEXT] [--clip-skip N] [--embedding FILE]..."
              << " [--lora FILE[:STRENGTH]]...\n";
    return 2;
  }
  const std::string engine_dir = argv[1], out = argv[3];
  ldmrt::GenerateOptions options{.prompt = argv[2], .steps = 50, .seed = 0};
  ldmrt::EngineOptions engine_options;
  std::string latent_file;
  std::vector<std::string> embedding_files;
  std::vector<std::pair<std::string, double>> loras;
  for (int i = 4; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--steps") options.steps = std::stoi(value);
    else if (flag == "--seed") options.seed = std::stoull(value);
    else if (flag == "--guidance") options.guidance_scale = std::stod(value);
    else if (flag == "--sampler") options.sampler = value;
    else if (flag == "--size") options.height = options.width = std::stoi(value);
    else if (flag == "--batch") options.batch_size = std::stoi(value);
    else if (flag == "--class") options.class_label = std::stoll(value);
    else if (flag == "--threads") engine_options.threads = std::stoi(value);
    else if (flag == "--latent") latent_file = value;
    else if (flag == "--cache") options.cache_interval = std::stoi(value);
    else if (flag == "--cache-schedule") options.cache_schedule = value;
    else if (flag == "--guidance-from") options.guidance_from = std::stod(value);
    else if (flag == "--guidance-until") options.guidance_until = std::stod(value);
    else if (flag == "--negative") options.negative_prompt = value;
    else if (flag == "--clip-skip") options.clip_skip = std::stoi(value);
    else if (flag == "--embedding") embedding_files.push_back(value);
    else if (flag == "--lora") loras.push_back(ldmrt::parse_lora_spec(value));
    else { std::cerr << "unknown option " << flag << "\n"; return 2; }
  }
  try {
    ldmrt::Engine engine(engine_dir, engine_options);
    for (const std::string& file : embedding_files)
      for (const std::string& trigger : engine.load_embedding(file)) std::cout << "embedding " << trigger << " from " << file << "\n";
    for (const ldmrt::LoraReport& r : engine.set_loras(loras)) {
      std::cout << "lora " << r.path << " at " << r.strength << ": " << r.matched << " modules\n";
      if (!r.unmatched.empty())
        std::cerr << "warning: " << r.path << ": " << r.unmatched.size() << " LoRA modules are not in this engine and "
                  << "were left out (first: " << r.unmatched.front() << ")\n";
      if (!r.ignored.empty())
        std::cerr << "warning: " << r.path << ": " << r.ignored.size() << " keys are not LoRA up/down/alpha weights "
                  << "and were left out (first: " << r.ignored.front() << ")\n";
    }
    if (engine.summary().conditioning != "text") options.prompt.clear();  // PROMPT is ignored ("")
    const ldmrt::Latent latent = engine.generate_latent(options);
    if (!latent_file.empty()) {
      std::ofstream f(latent_file, std::ios::binary);
      f.write(reinterpret_cast<const char*>(latent.values.data()), static_cast<std::streamsize>(latent.values.size() * sizeof(float)));
    }
    const std::vector<ldmrt::Image> images = engine.decode(latent);
    for (std::size_t b = 0; b < images.size(); ++b) {
      std::string path = out;
      if (images.size() > 1) path = out.substr(0, out.rfind('.')) + "-" + std::to_string(b) + ".png";
      write_png(path, images[b].width, images[b].height, images[b].rgb);
      std::cout << "wrote " << path << " (" << images[b].width << "x" << images[b].height << ")\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "ldmrt_generate: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
