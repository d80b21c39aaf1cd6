// The sampling loop on CPU: "evaluate the model, apply the stage's fused update", for float or double latents.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "ldmrt/plan.h"

namespace ldmrt {

// The eps model: given `count` input values (the batch, or with guidance the doubled batch [x; x] whose first
// half is evaluated with the unconditional and second with the conditional conditioning) at timestep t, return a
// pointer to `count` eps values that stays valid until the next call. It is called once per plan stage, in
// order, so a model that follows the stages' `shallow` flags counts its calls; in a guided run a stage with
// guided == false passes the batch alone (evaluate it with the conditional conditioning).
template <typename Real>
using EpsModel = std::function<const Real*(const Real* x, std::size_t count, double t)>;

// Fills `out` with `count` standard normal values for noise draw number `draw` (0, 1, ... in loop order: per
// stage, the inpainting blend's noise first, then the update's noise; draws with a zero coefficient are skipped).
template <typename Real>
using NoiseSource = std::function<void(int draw, Real* out, std::size_t count)>;

// Draw d is Philox stream d + 1 of `seed` (stream 0 is left for the caller's initial x_T).
template <typename Real>
NoiseSource<Real> philox_noise(std::uint64_t seed);

template <typename Real>
struct LoopInputs {
  const Real* x0 = nullptr;    // known latent: img2img start (plan.uses_x0()) and inpainting
  const Real* mask = nullptr;  // inpainting, `count` values: 1 keeps x0, 0 samples (CompVis)
  std::optional<double> guidance_scale;  // eps = eps_u + s (eps_c - eps_u) from one doubled model call
};

// Buffers the loop needs besides the latent. A host may provide its own (the Python binding passes numpy
// arrays so the model sees them without copies); `allocate` makes owned ones.
template <typename Real>
struct Workspace {
  Real* model_input = nullptr;  // 2 * count values with guidance
  Real* noise = nullptr;        // count values when the plan draws noise or inpaints
  std::vector<Real*> history;   // plan.history_slots buffers of count values (a stage may evaluate one)
  std::vector<std::vector<Real>> owned;
  static Workspace allocate(const Plan& plan, std::size_t count, bool guided);

  // The pointers above point into `owned`: a copy would alias the original's buffers. Move only.
  Workspace() = default;
  Workspace(Workspace&&) noexcept = default;
  Workspace& operator=(Workspace&&) noexcept = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
};

// One request's plan run step by step, so that a server can batch the model evaluations of several requests (at
// different stages, of different plans) into one call: next() names the evaluation the current stage needs,
// apply(eps) makes the stage's update and moves on. run_plan is this loop with one model call per stage.
// The latent, inputs and workspace stay the caller's and must outlive the stepper.
template <typename Real>
class Stepper {
 public:
  struct Evaluation {
    const Real* input;  // count values, or 2 * count ([x; x]: uncond, cond) when doubled
    std::size_t count;
    double timestep;
    bool doubled;  // guided run and guided stage
    bool shallow;  // DeepCache: the UNet's shallow branch on the last full evaluation's deep feature
  };
  // Checks the inputs and forms the initial latent from x_T (and x0 for img2img) in place.
  Stepper(Plan plan, Real* latent, std::size_t count, NoiseSource<Real> noise, const LoopInputs<Real>& inputs,
          Workspace<Real>& workspace);
  bool done() const { return stage_ >= plan_.stages.size(); }
  std::size_t stage() const { return stage_; }  // evaluations applied so far
  // The current stage's evaluation; makes its inpainting blend (and noise draw) on the first call per stage.
  Evaluation next();
  // Applies the current stage's update with the model's output for next()'s input (2 * count values when
  // doubled), then advances; eps must not alias the workspace.
  void apply(const Real* eps);

 private:
  Plan plan_;
  Real* latent_;
  std::size_t count_;
  NoiseSource<Real> noise_;
  LoopInputs<Real> in_;
  Workspace<Real>* ws_;
  std::size_t stage_ = 0;
  int draw_ = 0;
  bool prepared_ = false;  // next() already ran for this stage
};

// Runs the plan in place: `latent` holds x_T (count values) on entry and the sample on return.
// Throws std::invalid_argument for missing inputs, or what the model or noise source throws.
template <typename Real>
void run_plan(const Plan& plan, Real* latent, std::size_t count, const EpsModel<Real>& model,
              const NoiseSource<Real>& noise, const LoopInputs<Real>& inputs, Workspace<Real>& workspace);

// One stage's fused update on CPU (exposed for benchmarks and a future device twin):
// eps_u / eps_c are the two halves of a guided model output (eps_c == nullptr: unguided eps in eps_u).
template <typename Real>
void apply_update(const Stage& stage, Real* dst, const Real* latent, const Real* eps_u, const Real* eps_c,
                  double guidance_scale, Real* const* history, const Real* noise, std::size_t count);

}  // namespace ldmrt
