#include "ldmrt/loop.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "ldmrt/rng.h"

namespace ldmrt {
namespace {

// The update loop specialised on what it reads and writes, so each instance is one branch-free contiguous loop
// the compiler vectorises.
template <typename Real, bool Guided, int NumHistory, bool Noisy, bool Push>
void fused_update(const Stage& s, Real* dst, const Real* latent, const Real* eps_u, const Real* eps_c, Real g,
                  Real* const* history, const Real* noise, std::size_t count) {
  const Real c_latent = static_cast<Real>(s.c_latent), c_eps = static_cast<Real>(s.c_eps);
  const Real c_noise = static_cast<Real>(s.c_noise);
  const Real push_latent = static_cast<Real>(s.push_latent), push_eps = static_cast<Real>(s.push_eps);
  const Real c_h0 = static_cast<Real>(s.c_history[0]), c_h1 = static_cast<Real>(s.c_history[1]);
  const Real c_h2 = static_cast<Real>(s.c_history[2]);
  const Real* h0 = NumHistory > 0 ? history[s.history_slot[0]] : nullptr;
  const Real* h1 = NumHistory > 1 ? history[s.history_slot[1]] : nullptr;
  const Real* h2 = NumHistory > 2 ? history[s.history_slot[2]] : nullptr;
  Real* pushed = Push ? history[s.push_slot] : nullptr;
  // Element i reads and writes only index i (dst may be the latent itself), so there is no loop-carried
  // dependency; telling GCC so spares it runtime alias checks over up to seven pointers, past which it
  // would not vectorise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
  for (std::size_t i = 0; i < count; ++i) {
    const Real x = latent[i];
    Real e = eps_u[i];
    if constexpr (Guided) e = e + g * (eps_c[i] - e);
    Real v = c_latent * x + c_eps * e;
    if constexpr (NumHistory > 0) v += c_h0 * h0[i];
    if constexpr (NumHistory > 1) v += c_h1 * h1[i];
    if constexpr (NumHistory > 2) v += c_h2 * h2[i];
    if constexpr (Noisy) v += c_noise * noise[i];
    if constexpr (Push) pushed[i] = push_latent * x + push_eps * e;
    dst[i] = v;
  }
}

template <typename Real, bool Guided, int NumHistory, bool Noisy>
void dispatch_push(const Stage& s, Real* dst, const Real* latent, const Real* eu, const Real* ec, Real g,
                   Real* const* history, const Real* noise, std::size_t count) {
  if (s.push_slot >= 0) fused_update<Real, Guided, NumHistory, Noisy, true>(s, dst, latent, eu, ec, g, history, noise, count);
  else fused_update<Real, Guided, NumHistory, Noisy, false>(s, dst, latent, eu, ec, g, history, noise, count);
}

template <typename Real, bool Guided, int NumHistory>
void dispatch_noise(const Stage& s, Real* dst, const Real* latent, const Real* eu, const Real* ec, Real g,
                    Real* const* history, const Real* noise, std::size_t count) {
  if (s.c_noise != 0) dispatch_push<Real, Guided, NumHistory, true>(s, dst, latent, eu, ec, g, history, noise, count);
  else dispatch_push<Real, Guided, NumHistory, false>(s, dst, latent, eu, ec, g, history, noise, count);
}

template <typename Real, bool Guided>
void dispatch_history(const Stage& s, Real* dst, const Real* latent, const Real* eu, const Real* ec, Real g,
                      Real* const* history, const Real* noise, std::size_t count) {
  const int used = static_cast<int>(std::count_if(s.history_slot.begin(), s.history_slot.end(), [](int k) { return k >= 0; }));
  switch (used) {
    case 0: return dispatch_noise<Real, Guided, 0>(s, dst, latent, eu, ec, g, history, noise, count);
    case 1: return dispatch_noise<Real, Guided, 1>(s, dst, latent, eu, ec, g, history, noise, count);
    case 2: return dispatch_noise<Real, Guided, 2>(s, dst, latent, eu, ec, g, history, noise, count);
    default: return dispatch_noise<Real, Guided, 3>(s, dst, latent, eu, ec, g, history, noise, count);
  }
}

}  // namespace

template <typename Real>
void apply_update(const Stage& stage, Real* dst, const Real* latent, const Real* eps_u, const Real* eps_c,
                  double guidance_scale, Real* const* history, const Real* noise, std::size_t count) {
  const Real g = static_cast<Real>(guidance_scale);
  if (eps_c) dispatch_history<Real, true>(stage, dst, latent, eps_u, eps_c, g, history, noise, count);
  else dispatch_history<Real, false>(stage, dst, latent, eps_u, eps_c, g, history, noise, count);
}

template <typename Real>
NoiseSource<Real> philox_noise(std::uint64_t seed) {
  return [seed](int draw, Real* out, std::size_t count) { randn<Real>(seed, static_cast<std::uint64_t>(draw) + 1, out, count); };
}

template <typename Real>
Workspace<Real> Workspace<Real>::allocate(const Plan& plan, std::size_t count, bool guided) {
  Workspace w;
  w.owned.reserve(2 + plan.history_slots);  // pointers into `owned` must stay put
  auto make = [&](std::size_t n) { return w.owned.emplace_back(n).data(); };
  if (guided) w.model_input = make(2 * count);
  w.noise = make(count);
  for (int k = 0; k < plan.history_slots; ++k) w.history.push_back(make(count));
  return w;
}

template <typename Real>
Stepper<Real>::Stepper(Plan plan, Real* latent, std::size_t count, NoiseSource<Real> noise, const LoopInputs<Real>& in,
                       Workspace<Real>& ws)
    : plan_(std::move(plan)), latent_(latent), count_(count), noise_(std::move(noise)), in_(in), ws_(&ws) {
  if ((plan_.uses_x0() || in.mask) && !in.x0)
    throw std::invalid_argument(in.mask ? "inpainting with a mask needs x0 (the known latent)"
                                        : "img2img (strength < 1) needs x0 (the latent to start from)");
  if (in.guidance_scale && !ws.model_input) throw std::invalid_argument("guidance needs a workspace with model_input");
  if (static_cast<int>(ws.history.size()) < plan_.history_slots)
    throw std::invalid_argument("workspace has " + std::to_string(ws.history.size()) + " history buffers, plan needs " +
                                std::to_string(plan_.history_slots));
  const Real init_noise = static_cast<Real>(plan_.init_noise), init_x0 = static_cast<Real>(plan_.init_x0);
  for (std::size_t i = 0; i < count; ++i)
    latent[i] = init_noise * latent[i] + (plan_.init_x0 != 0 ? init_x0 * in.x0[i] : Real(0));
}

template <typename Real>
typename Stepper<Real>::Evaluation Stepper<Real>::next() {
  if (done()) throw std::logic_error("the plan is finished: no evaluation left");
  const Stage& stage = plan_.stages[stage_];
  Workspace<Real>& ws = *ws_;
  const std::size_t count = count_;
  const bool doubled = in_.guidance_scale.has_value() && stage.guided;  // else one conditional evaluation
  const Real* input = stage.model_input == kLatent ? latent_ : ws.history[stage.model_input];
  if (!prepared_) {
    prepared_ = true;
    if (stage.starts_step && in_.mask) {
      noise_(draw_++, ws.noise, count);
      const Real bx = static_cast<Real>(stage.blend_x0), bn = static_cast<Real>(stage.blend_noise);
      for (std::size_t i = 0; i < count; ++i)
        latent_[i] = in_.mask[i] * (bx * in_.x0[i] + bn * ws.noise[i]) + (Real(1) - in_.mask[i]) * latent_[i];
    }
    if (doubled) {
      std::memcpy(ws.model_input, input, count * sizeof(Real));
      std::memcpy(ws.model_input + count, input, count * sizeof(Real));
    }
  }
  return {doubled ? ws.model_input : input, doubled ? 2 * count : count, stage.timestep, doubled, stage.shallow};
}

template <typename Real>
void Stepper<Real>::apply(const Real* eps) {
  if (done()) throw std::logic_error("the plan is finished: nothing to apply");
  if (!prepared_) next();  // the blend belongs before the update even when the caller skipped next()
  const Stage& stage = plan_.stages[stage_];
  Workspace<Real>& ws = *ws_;
  const bool doubled = in_.guidance_scale.has_value() && stage.guided;
  if (stage.c_noise != 0) noise_(draw_++, ws.noise, count_);
  Real* dst = stage.dst == kLatent ? latent_ : ws.history[stage.dst];
  apply_update<Real>(stage, dst, latent_, eps, doubled ? eps + count_ : nullptr, in_.guidance_scale.value_or(1.0),
                     ws.history.data(), ws.noise, count_);
  ++stage_;
  prepared_ = false;
}

template <typename Real>
void run_plan(const Plan& plan, Real* latent, std::size_t count, const EpsModel<Real>& model,
              const NoiseSource<Real>& noise, const LoopInputs<Real>& in, Workspace<Real>& ws) {
  Stepper<Real> stepper(plan, latent, count, noise, in, ws);
  while (!stepper.done()) {
    const auto e = stepper.next();
    stepper.apply(model(e.input, e.count, e.timestep));
  }
}

#define LDMRT_INSTANTIATE(Real)                                                                                    \
  template void apply_update<Real>(const Stage&, Real*, const Real*, const Real*, const Real*, double, Real* const*, \
                                   const Real*, std::size_t);                                                      \
  template NoiseSource<Real> philox_noise<Real>(std::uint64_t);                                                    \
  template struct Workspace<Real>;                                                                                 \
  template class Stepper<Real>;                                                                                    \
  template void run_plan<Real>(const Plan&, Real*, std::size_t, const EpsModel<Real>&, const NoiseSource<Real>&,   \
                               const LoopInputs<Real>&, Workspace<Real>&);
LDMRT_INSTANTIATE(float)
LDMRT_INSTANTIATE(double)
#undef LDMRT_INSTANTIATE

}  // namespace ldmrt
