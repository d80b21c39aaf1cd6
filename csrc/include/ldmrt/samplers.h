// Compiling a sampler into a Plan. One short function per sampler (samplers.cpp), k-diffusion style.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "ldmrt/plan.h"

namespace ldmrt {

struct SamplerConfig {
  std::string sampler = "ddim";  // ddpm, ddim, plms, dpmpp_2m, euler, euler_ancestral
  int steps = 50;
  std::vector<double> alphas_cumprod;   // the model's schedule, one value per training timestep
  // DDIM's eta, or the ancestral-noise eta of euler_ancestral; unset: 0 for ddim, 1 for euler_ancestral.
  // Other samplers accept only 0 (or unset).
  std::optional<double> eta;
  std::string timestep_spacing = "uniform";  // uniform, leading, trailing, linspace, karras
  int steps_offset = 0;                 // diffusers' steps_offset, for "leading"
  // alphas_cumprod after the last DDIM/PLMS step; unset: alphas_cumprod[0] as CompVis (and diffusers with
  // set_alpha_to_one=False, the Stable Diffusion config); 1.0 is diffusers' set_alpha_to_one=True.
  std::optional<double> final_alpha_cumprod;
  // img2img: run only the last int(strength * steps) steps, starting from x0 noised to the first of them.
  double strength = 1;
  // DeepCache: the full UNet on every cache_interval-th step (and where guidance switches on or off), its
  // shallow branch in between. 1: always the full UNet (exact).
  int cache_interval = 1;
  // Where the full steps go: "uniform" (every cache_interval-th) or "quadratic" (as many, denser around 30% of
  // the schedule and sparser towards its ends: DeepCache's non-uniform schedule, in ldmrt's own formula).
  std::string cache_schedule = "uniform";
  // Guidance only on the steps k (0-based, of the n the plan runs) with guidance_from <= k / n < guidance_until;
  // elsewhere one conditional evaluation. (0, 1): every step (exact).
  double guidance_from = 0, guidance_until = 1;
};

// Throws std::invalid_argument with a clear message for any bad argument.
Plan make_plan(const SamplerConfig& config);

// The names make_plan accepts.
std::vector<std::string> sampler_names();

}  // namespace ldmrt
