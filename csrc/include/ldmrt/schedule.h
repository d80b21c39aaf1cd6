// Noise schedules and timestep spacings (discrete-time DDPM models, as CompVis trains them).
#pragma once
#include <string>
#include <vector>

namespace ldmrt {

// alphas_cumprod of a CompVis beta schedule, in float64 as CompVis computes it:
// "linear" = linspace(sqrt(start), sqrt(end), T)^2, "sqrt_linear" = linspace(start, end, T),
// "sqrt" = linspace(start, end, T)^0.5, "cosine" = Nichol & Dhariwal with offset cosine_s (betas clipped to 0.999).
std::vector<double> make_alphas_cumprod(const std::string& schedule, int num_timesteps,
                                        double linear_start = 1e-4, double linear_end = 2e-2,
                                        double cosine_s = 8e-3);

// k-diffusion's sigma of a discrete timestep: sqrt((1 - a) / a).
double sigma_of_alpha(double alpha_cumprod);
double alpha_of_sigma(double sigma);

// The timestep of a sigma on the discrete schedule, linear in log-sigma between neighbouring
// timesteps (k-diffusion DiscreteSchedule.sigma_to_t); fractional for sigmas between the grid points.
double timestep_of_sigma(const std::vector<double>& alphas_cumprod, double sigma);

// The grid a sampler visits: descending model timesteps and the sigma of each (k-diffusion's sigma, the
// variance-exploding noise level sqrt((1 - a) / a)). Spacings, for `steps` steps out of T = alphas_cumprod.size():
//  "uniform"     CompVis make_ddim_timesteps: range(0, T, T // steps) + 1 (may give a few more than `steps`
//                entries when T % steps != 0, exactly as CompVis; an entry reaching T is an error);
//  "leading"     diffusers: arange(steps) * (T // steps) + steps_offset;
//  "trailing"    diffusers: round(arange(T, 0, -T / steps)) - 1;
//  "linspace"    diffusers' DDIM/PNDM: round(linspace(0, T - 1, steps));
//  "kdiffusion"  k-diffusion's default (DiscreteSchedule.get_sigmas): fractional linspace(T - 1, 0, steps);
//  "karras"      Karras et al. (rho = 7) between the schedule's smallest and largest sigma;
//  "exponential" sigmas evenly spaced in log sigma over the same range;
//  "simple"      ComfyUI/A1111 "simple": t = T - 1 - floor(i * T / steps);
//  "sgm_uniform" ComfyUI/A1111 "SGM Uniform": fractional linspace(T - 1, 0, steps + 1) without its last point;
//  "lcm"         diffusers' LCMScheduler: `steps` of the distillation grid (k * (1..original_steps) - 1, k = T //
//                original_steps), evenly picked from the top.
struct GridOptions {
  std::string spacing = "uniform";
  int steps_offset = 0;  // diffusers' steps_offset, for "leading"
  // Sigma between integer timesteps: "log" (k-diffusion: log sigma linear in t) or "linear" (diffusers'
  // Euler/Heun/LMS/KDPM2 schedulers: np.interp of sigma).
  std::string interpolation = "log";
  // "karras" or "exponential": re-space the sigmas over the spaced grid's own range (diffusers' use_karras_sigmas /
  // use_exponential_sigmas with "leading" or "trailing"), timesteps from sigma_to_t; "": the spacing's sigmas.
  std::string respace;
  // Model timesteps of re-spaced sigmas rounded to integers, the sigmas kept (diffusers' multistep schedulers and
  // KDPM2 with Karras sigmas).
  bool round_timesteps = false;
  // The grid of steps + 1 points without its last (diffusers' multistep schedulers with "linspace"/"leading";
  // AUTOMATIC1111's discard_next_to_last_sigma for DPM2).
  bool drop_last_timestep = false;
  int original_steps = 50;  // "lcm": the distillation grid's size
};
struct Grid {
  std::vector<double> t, sigma;
  std::size_t size() const { return t.size(); }
};
// Throws std::invalid_argument for an unknown spacing, steps outside [1, T] or timesteps outside [0, T - 1].
Grid make_grid(int steps, const std::vector<double>& alphas_cumprod, const GridOptions& options);

// The timesteps of make_grid with the default options otherwise.
std::vector<double> make_timesteps(const std::string& spacing, int steps,
                                   const std::vector<double>& alphas_cumprod, int steps_offset = 0);

// sigma at a (possibly fractional) timestep, interpolated as GridOptions::interpolation says.
double sigma_at(const std::vector<double>& alphas_cumprod, double timestep, const std::string& interpolation = "log");

// Throws std::invalid_argument unless every value is in (0, 1] and there are at least two.
void check_alphas_cumprod(const std::vector<double>& alphas_cumprod);

}  // namespace ldmrt
