// Compiling a sampler into a Plan. One short function per sampler (samplers.cpp), k-diffusion style.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "ldmrt/plan.h"

namespace ldmrt {

struct SamplerConfig {
  std::string sampler = "ddim";  // one of sampler_names()
  int steps = 50;
  std::vector<double> alphas_cumprod;   // the model's schedule, one value per training timestep
  // DDIM's eta, or the noise eta of the ancestral and SDE samplers; unset: 0 for ddim, 1 for the others.
  // Other samplers accept only 0 (or unset).
  std::optional<double> eta;
  // The grid (schedule.h: GridOptions): spacing, steps_offset, sigma interpolation, re-spacing, rounding.
  std::string timestep_spacing = "uniform";
  int steps_offset = 0;
  std::string sigma_interpolation = "log";
  std::string respace;
  bool round_timesteps = false, drop_last_timestep = false;
  int original_steps = 50;
  // alphas_cumprod after the last step; unset: alphas_cumprod[0] for the CompVis-style samplers (CompVis, and
  // diffusers with set_alpha_to_one=False, the Stable Diffusion config; 1.0 is set_alpha_to_one=True), 1.0
  // (sigma 0) for the k-diffusion ones (diffusers' final_sigmas_type "sigma_min" is alphas_cumprod[0]).
  std::optional<double> final_alpha_cumprod;
  // The initial latent from x_T: "default" (sigma_max * x_T in x_ve for the k-diffusion samplers, x_T for the
  // others), "sigma" or "unit" (x_T: diffusers' init_noise_sigma sqrt(sigma_max^2 + 1) or 1).
  std::string start_noise = "default";
  // diffusers' lower_order_final: DPMSolverMultistep under 15 steps and UniPC always lower their order over the
  // last steps; unset: on for unipc (diffusers' default), off for the rest (k-diffusion). euler_at_final: the
  // DPM++ multistep samplers' last step first order always.
  std::optional<bool> lower_order_final;
  bool euler_at_final = false;
  // The DPM++ multistep samplers' second-order correction: "midpoint" or "heun" (k-diffusion's solver_type,
  // diffusers' too); "": midpoint for 2M, heun for 3M (k-diffusion's 3M warm-up step). unipc: "bh1" or "bh2"
  // (default). solver_order: unipc's order (1-3; 0: 2, diffusers' default).
  std::string solver_type;
  int solver_order = 0;
  // diffusers' DDIM and DDPM step from t to t - T // steps, not to the next grid point: the same for "leading",
  // not for "linspace" or "trailing" when steps does not divide T.
  bool prev_timestep_stride = false;
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
