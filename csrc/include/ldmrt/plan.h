// A sampler compiled into a plan: a list of stages, each "evaluate the model once, apply one fused update".
//
// Every sampler here updates the latent with a linear combination of the current latent, this stage's model
// output (eps), earlier outputs kept in history slots, and fresh Gaussian noise; the coefficients depend only on
// the schedule and the step list, so they are computed once. The latent is always the variance-preserving
// x_t = sqrt(a) x0 + sqrt(1 - a) eps that the eps-model takes as input (k-diffusion's x / sqrt(sigma^2 + 1)),
// so no stage needs an input scaling. The plan is plain data: the CPU loop (loop.h) applies it, and a device
// implementation can apply the same Stage with one kernel.
#pragma once
#include <array>
#include <string>
#include <vector>

namespace ldmrt {

// A stage's buffers are the latent or a history slot: kLatent, or the slot's index k >= 0. A two-evaluation step
// (Heun, DPM2, PLMS warm-up, the DPM++ singlestep samplers) writes its trial point to a slot the next stage evaluates.
constexpr int kLatent = -1;

struct Stage {
  double timestep = 0;       // model timestep, fractional between grid points (Karras sigmas, midpoints)
  int model_input = kLatent;  // the buffer the model evaluates
  // Which evaluation the model makes (the model follows them; the loop only sizes the call):
  // guided: in a guided run, the doubled [uncond; cond] batch; false: the conditional batch alone (guidance
  //   interval: Kynkaanniemi et al. 2024), and eps is that output.
  // shallow: DeepCache (Ma et al. 2024): only the UNet's shallow branch, on the deep feature kept by the last
  //   full evaluation; false: the full UNet, whose deep feature the model keeps.
  bool guided = true;
  bool shallow = false;

  // Inpainting: a stage that starts a step first blends, where mask == 1, the known latent noised to this
  // step's level: latent = mask * (blend_x0 * x0 + blend_noise * noise) + (1 - mask) * latent (CompVis).
  bool starts_step = false;
  double blend_x0 = 0, blend_noise = 0;

  // The fused update, after the evaluation giving eps (already guidance-combined):
  //   dst = c_latent * latent + c_eps * eps + sum_k c_history[k] * history[history_slot[k]] + c_noise * noise
  // and, when push_slot >= 0, in the same pass: history[push_slot] = push_latent * latent + push_eps * eps
  // (all reads see the values from before the stage).
  int dst = kLatent;
  double c_latent = 0, c_eps = 0, c_noise = 0;
  // The noise draw's interval in k-diffusion's sigma (sigma_from > sigma_to), for callers whose noise depends on
  // it: k-diffusion's Brownian-tree noise_sampler(sigma_from, sigma_to). Set where c_noise != 0.
  double noise_from = 0, noise_to = 0;
  std::array<int, 3> history_slot{{-1, -1, -1}};  // -1: unused
  std::array<double, 3> c_history{{0, 0, 0}};
  int push_slot = -1;
  double push_latent = 0, push_eps = 0;
};

struct Plan {
  std::string sampler;
  std::vector<Stage> stages;
  int num_steps = 0;      // sampler steps (a two-evaluation step has two stages)
  int history_slots = 0;  // history buffers the loop must allocate (trial points included)
  // Initial latent: init_x0 * x0 + init_noise * x_T (init_x0 is 0 unless img2img, strength < 1).
  double init_x0 = 0, init_noise = 1;
  bool uses_x0() const { return init_x0 != 0; }
  // Number of noise draws (stage noise plus inpainting blends) the loop will make.
  int noise_draws(bool with_mask) const;
};

}  // namespace ldmrt
