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

// The timesteps a sampler visits, descending, for `steps` steps out of T = alphas_cumprod.size():
//  "uniform"  CompVis make_ddim_timesteps: range(0, T, T // steps) + 1 (may give a few more than `steps`
//             entries when T % steps != 0, exactly as CompVis; an entry reaching T is an error);
//  "leading"  diffusers: arange(steps) * (T // steps) + steps_offset;
//  "trailing" diffusers: round(arange(T, 0, -T / steps)) - 1;
//  "linspace" diffusers: round(linspace(0, T - 1, steps));
//  "karras"   Karras et al. sigmas (rho = 7) between the schedule's smallest and largest sigma, mapped to
//             fractional timesteps by timestep_of_sigma.
std::vector<double> make_timesteps(const std::string& spacing, int steps,
                                   const std::vector<double>& alphas_cumprod, int steps_offset = 0);

// alphas_cumprod at a (possibly fractional) timestep: exact on the grid, else from the interpolated sigma.
double alpha_at(const std::vector<double>& alphas_cumprod, double timestep);

// Throws std::invalid_argument unless every value is in (0, 1] and there are at least two.
void check_alphas_cumprod(const std::vector<double>& alphas_cumprod);

}  // namespace ldmrt
