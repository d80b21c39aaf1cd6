#include "ldmrt/samplers.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "ldmrt/schedule.h"

namespace ldmrt {

int Plan::noise_draws(bool with_mask) const {
  int draws = 0;
  for (const Stage& s : stages) draws += (s.starts_step && with_mask) + (s.c_noise != 0);
  return draws;
}

namespace {

// The visited grid: timesteps, their sigmas and alphas_cumprod; the last step lands on sigma_after / alpha_after.
struct Steps {
  std::vector<double> t, sigma, alpha;
  std::vector<double> alpha_prev;  // where each step lands, when not on the next grid point (diffusers' DDIM)
  double alpha_after = 1;
  const std::vector<double>* alphas_cumprod = nullptr;  // for the timesteps of sigmas between grid points
  bool lower_order_final = false, euler_at_final = false;  // diffusers' DPMSolverMultistep options
  std::size_t size() const { return t.size(); }
  double alpha_next(std::size_t i) const {
    if (!alpha_prev.empty()) return alpha_prev[i];
    return i + 1 < size() ? alpha[i + 1] : alpha_after;
  }
  double sigma_next(std::size_t i) const { return i + 1 < size() ? sigma[i + 1] : sigma_of_alpha(alpha_after); }
  double timestep_of(double s) const { return timestep_of_sigma(*alphas_cumprod, s); }
  // The highest order a multistep sampler may use at step i, given `order` (k-diffusion: lower at the start and
  // into sigma = 0; diffusers adds lower_order_final (under 15 steps) and euler_at_final).
  int max_order(std::size_t i, int order) const {
    const std::size_t n = size();
    if (sigma_next(i) == 0 || (i + 1 == n && (euler_at_final || (lower_order_final && n < 15)))) return 1;
    if (i + 2 == n && lower_order_final && n < 15) order = std::min(order, 2);
    return std::min(order, static_cast<int>(i) + 1);
  }
};

// A value a stage's update can form: a linear combination of the latent (as it was before the stage), the stage's
// eps, history slots and the stage's noise draw. The samplers below write their references' formulas over these.
struct Terms {
  double latent = 0, eps = 0, noise = 0;
  std::vector<std::pair<int, double>> slots;
};
Terms operator+(Terms a, const Terms& b) {
  a.latent += b.latent;
  a.eps += b.eps;
  a.noise += b.noise;
  for (const auto& [k, c] : b.slots) {
    auto it = std::find_if(a.slots.begin(), a.slots.end(), [k = k](const auto& e) { return e.first == k; });
    if (it == a.slots.end()) a.slots.emplace_back(k, c);
    else it->second += c;
  }
  return a;
}
Terms operator*(double c, Terms a) {
  a.latent *= c;
  a.eps *= c;
  a.noise *= c;
  for (auto& e : a.slots) e.second *= c;
  return a;
}
Terms operator-(const Terms& a, const Terms& b) { return a + (-1.0) * b; }
const Terms kLatentTerm{1, 0, 0, {}}, kEps{0, 1, 0, {}}, kNoise{0, 0, 1, {}};
Terms slot(int k) { return Terms{0, 0, 0, {{k, 1.0}}}; }

// dst = value (the stage's fused update); throws std::logic_error past the loop's three history terms.
void set_update(Stage& s, const Terms& value) {
  s.c_latent = value.latent;
  s.c_eps = value.eps;
  s.c_noise = value.noise;
  int used = 0;
  for (const auto& [k, c] : value.slots) {
    if (c == 0) continue;
    if (used == 3) throw std::logic_error("a stage reads at most three history slots");
    s.history_slot[used] = k;
    s.c_history[used++] = c;
  }
}
// history[slot] = value, computed in the same pass; only the latent and eps can be pushed.
void set_push(Stage& s, int slot_index, const Terms& value) {
  if (value.noise != 0 || !value.slots.empty()) throw std::logic_error("a push reads only the latent and eps");
  s.push_slot = slot_index;
  s.push_latent = value.latent;
  s.push_eps = value.eps;
}
void set_noise_interval(Stage& s, double from, double to) {
  s.noise_from = from;
  s.noise_to = to;
}

Stage step_start(const Steps& steps, std::size_t i) {
  Stage s;
  s.timestep = steps.t[i];
  s.starts_step = true;
  s.blend_x0 = std::sqrt(steps.alpha[i]);
  s.blend_noise = std::sqrt(1 - steps.alpha[i]);
  return s;
}

// The second stage of a two-evaluation step: the model evaluates slot `trial` at sigma.
Stage trial_stage(const Steps& steps, int trial, double sigma) {
  Stage s;
  s.timestep = steps.timestep_of(sigma);
  s.model_input = trial;
  return s;
}

// DDIM from alpha a to alpha a_prev with noise sigma, as latent and eps coefficients:
// x_prev = sqrt(a_prev) * (x - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a_prev - sigma^2) eps + sigma noise.
void set_ddim(Stage& s, double a, double a_prev, double sigma) {
  s.c_latent = std::sqrt(a_prev / a);
  s.c_eps = std::sqrt(1 - a_prev - sigma * sigma) - std::sqrt(a_prev) * std::sqrt(1 - a) / std::sqrt(a);
  s.c_noise = sigma;
}

Plan ddpm(const Steps& steps) {
  Plan plan;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    // The posterior q(x_prev | x_t, x0) between consecutive visited timesteps (CompVis p_sample for stride 1,
    // clip_denoised off as for LDMs), with x0 predicted from eps.
    const double a = steps.alpha[i], a_prev = steps.alpha_next(i);
    const double beta = 1 - a / a_prev;
    const double coef_x0 = std::sqrt(a_prev) * beta / (1 - a);
    const double coef_xt = std::sqrt(a / a_prev) * (1 - a_prev) / (1 - a);
    Stage s = step_start(steps, i);
    s.c_latent = coef_x0 / std::sqrt(a) + coef_xt;
    s.c_eps = -coef_x0 * std::sqrt(1 - a) / std::sqrt(a);
    s.c_noise = std::sqrt(beta * (1 - a_prev) / (1 - a));
    set_noise_interval(s, steps.sigma[i], steps.sigma_next(i));
    plan.stages.push_back(s);
  }
  return plan;
}

Plan ddim(const Steps& steps, double eta) {
  Plan plan;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double a = steps.alpha[i], a_prev = steps.alpha_next(i);
    const double sigma = eta * std::sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev));
    Stage s = step_start(steps, i);
    set_ddim(s, a, a_prev, sigma);
    set_noise_interval(s, steps.sigma[i], steps.sigma_next(i));
    plan.stages.push_back(s);
  }
  return plan;
}

Plan plms(const Steps& steps) {
  // CompVis PLMSSampler: Adams-Bashforth on eps of orders 2-4 over the earlier eps (history slot i % 4 holds
  // step i's eps); the first step is a pseudo improved Euler needing a second evaluation at the next timestep,
  // of the trial point in slot 4.
  const int trial = 4;
  Plan plan;
  plan.history_slots = 5;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double a = steps.alpha[i], a_prev = steps.alpha_next(i);
    const int slot_i = static_cast<int>(i % 4);
    Stage s = step_start(steps, i);
    set_ddim(s, a, a_prev, 0.0);
    s.push_slot = slot_i;
    s.push_eps = 1;
    if (i == 0) {
      const double c_eps = s.c_eps;
      s.dst = trial;  // x' = DDIM step with e_0; then e' = (e_0 + eps(x', t_next)) / 2
      plan.stages.push_back(s);
      Stage second;
      second.timestep = steps.t[steps.size() > 1 ? 1 : 0];
      second.model_input = trial;
      second.c_latent = s.c_latent;
      second.c_eps = c_eps / 2;
      second.history_slot[0] = slot_i;
      second.c_history[0] = c_eps / 2;
      plan.stages.push_back(second);
      continue;
    }
    static const double kWeights[3][4] = {
        {3.0 / 2, -1.0 / 2, 0, 0}, {23.0 / 12, -16.0 / 12, 5.0 / 12, 0}, {55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24}};
    const int order = static_cast<int>(i < 3 ? i : 3);  // earlier eps available
    const double* w = kWeights[order - 1];
    const double c_eps = s.c_eps;
    s.c_eps = c_eps * w[0];
    for (int k = 0; k < order; ++k) {
      s.history_slot[k] = static_cast<int>((i - 1 - k) % 4);
      s.c_history[k] = c_eps * w[k + 1];
    }
    plan.stages.push_back(s);
  }
  return plan;
}

Plan lcm(const Steps& steps) {
  // diffusers LCMScheduler: the consistency function's boundary condition (c_skip, c_out at 10 t, sigma_data 0.5)
  // mixes the latent with the predicted x0; then the latent is re-noised to the next timestep (none after the last).
  Plan plan;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double a = steps.alpha[i], a_prev = steps.alpha_next(i);
    const double scaled_t = 10 * steps.t[i], sigma_data = 0.5;
    const double c_skip = sigma_data * sigma_data / (scaled_t * scaled_t + sigma_data * sigma_data);
    const double c_out = scaled_t / std::sqrt(scaled_t * scaled_t + sigma_data * sigma_data);
    const Terms x0 = (1 / std::sqrt(a)) * (kLatentTerm - std::sqrt(1 - a) * kEps);
    const Terms denoised = c_out * x0 + c_skip * kLatentTerm;
    Stage s = step_start(steps, i);
    if (i + 1 == steps.size()) {
      set_update(s, denoised);
    } else {
      set_update(s, std::sqrt(a_prev) * denoised + std::sqrt(1 - a_prev) * kNoise);
      set_noise_interval(s, steps.sigma[i], steps.sigma_next(i));
    }
    plan.stages.push_back(s);
  }
  return plan;
}

// The k-diffusion samplers act on x_ve = x / sqrt(a) = scale * x (scale = sqrt(1 + sigma^2)), where the eps
// model's denoised estimate is x_ve - sigma * eps and the ODE derivative d = (x_ve - denoised) / sigma is eps. Each
// update below is k-diffusion's, written in x_ve and divided by the next scale to stay in the latent's
// variance-preserving form; a trial point is stored the same way, at its own sigma.
double ve_scale(double sigma) { return std::sqrt(1 + sigma * sigma); }
Terms ve_latent(double sigma) { return ve_scale(sigma) * kLatentTerm; }
Terms ve_slot(int k, double sigma) { return ve_scale(sigma) * slot(k); }
Terms in_vp(const Terms& x_ve, double sigma) { return (1 / ve_scale(sigma)) * x_ve; }

// k-diffusion get_ancestral_step: (sigma_down, sigma_up).
std::pair<double, double> ancestral_step(double sigma_from, double sigma_to, double eta) {
  if (eta == 0) return {sigma_to, 0.0};
  const double up = std::min(sigma_to, eta * std::sqrt(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) /
                                                       (sigma_from * sigma_from)));
  return {std::sqrt(sigma_to * sigma_to - up * up), up};
}

Plan euler(const Steps& steps, double eta, bool ancestral) {
  Plan plan;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double sigma = steps.sigma[i], sigma_next = steps.sigma_next(i);
    auto [down, up] = ancestral && sigma_next > 0 ? ancestral_step(sigma, sigma_next, eta) : std::pair{sigma_next, 0.0};
    Stage st = step_start(steps, i);
    set_update(st, in_vp(ve_latent(sigma) + (down - sigma) * kEps + up * kNoise, sigma_next));
    if (up != 0) set_noise_interval(st, sigma, sigma_next);
    plan.stages.push_back(st);
  }
  return plan;
}

Plan heun(const Steps& steps) {
  // k-diffusion sample_heun (s_churn = 0): Euler to sigma_next, then the trapezoid of the two slopes. Slot 0 holds the
  // first slope, slot 1 the trial point; into sigma = 0, Euler.
  Plan plan;
  plan.history_slots = 2;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double sigma = steps.sigma[i], sigma_next = steps.sigma_next(i), dt = sigma_next - sigma;
    const Terms x = ve_latent(sigma);
    Stage first = step_start(steps, i);
    if (sigma_next == 0) {
      set_update(first, in_vp(x + dt * kEps, sigma_next));
      plan.stages.push_back(first);
      continue;
    }
    set_update(first, in_vp(x + dt * kEps, sigma_next));
    first.dst = 1;
    set_push(first, 0, kEps);
    plan.stages.push_back(first);
    Stage second = trial_stage(steps, 1, sigma_next);
    second.timestep = i + 1 < steps.size() ? steps.t[i + 1] : steps.timestep_of(sigma_next);
    set_update(second, in_vp(x + (dt / 2) * (slot(0) + kEps), sigma_next));
    plan.stages.push_back(second);
  }
  return plan;
}

Plan dpm_2(const Steps& steps, double eta, bool ancestral) {
  // k-diffusion sample_dpm_2 / sample_dpm_2_ancestral: a midpoint step in log sigma (trial point in slot 0), then
  // the step with the midpoint's slope (to sigma_down, plus sigma_up noise, when ancestral); Euler into sigma = 0.
  Plan plan;
  plan.history_slots = 1;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double sigma = steps.sigma[i], sigma_next = steps.sigma_next(i);
    auto [down, up] = ancestral ? ancestral_step(sigma, sigma_next, eta) : std::pair{sigma_next, 0.0};
    const Terms x = ve_latent(sigma);
    Stage first = step_start(steps, i);
    if (down == 0) {
      set_update(first, in_vp(x - sigma * kEps, sigma_next));
      plan.stages.push_back(first);
      continue;
    }
    const double mid = std::exp((std::log(sigma) + std::log(down)) / 2);
    set_update(first, in_vp(x + (mid - sigma) * kEps, mid));
    first.dst = 0;
    plan.stages.push_back(first);
    Stage second = trial_stage(steps, 0, mid);
    set_update(second, in_vp(x + (down - sigma) * kEps + up * kNoise, sigma_next));
    if (up != 0) set_noise_interval(second, sigma, sigma_next);
    plan.stages.push_back(second);
  }
  return plan;
}

// k-diffusion linear_multistep_coeff: the integral over [sigma_i, sigma_next] of the Lagrange basis polynomial of
// node j among nodes[0..order) (node k = the sigma of step i - k). Gauss-Legendre with 3 points is exact for the
// basis' degree <= 3 (k-diffusion integrates with scipy's quad, exact for polynomials too).
double lms_coefficient(const std::vector<double>& nodes, int j, double from, double to) {
  static const double kX[3] = {-0.7745966692414834, 0.0, 0.7745966692414834}, kW[3] = {5.0 / 9, 8.0 / 9, 5.0 / 9};
  double integral = 0;
  for (int q = 0; q < 3; ++q) {
    const double tau = (from + to) / 2 + (to - from) / 2 * kX[q];
    double basis = 1;
    for (std::size_t k = 0; k < nodes.size(); ++k)
      if (static_cast<int>(k) != j) basis *= (tau - nodes[k]) / (nodes[j] - nodes[k]);
    integral += kW[q] * basis;
  }
  return integral * (to - from) / 2;
}

Plan lms(const Steps& steps, int order) {
  // k-diffusion sample_lms: x_ve += sum_j c_j d_{i-j} with the Adams coefficients of the sigma grid; slot i % 4
  // holds step i's slope (eps).
  Plan plan;
  plan.history_slots = 4;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double sigma = steps.sigma[i], sigma_next = steps.sigma_next(i);
    const int cur = std::min(static_cast<int>(i) + 1, order);
    std::vector<double> nodes;
    for (int k = 0; k < cur; ++k) nodes.push_back(steps.sigma[i - k]);
    Terms x = ve_latent(sigma) + lms_coefficient(nodes, 0, sigma, sigma_next) * kEps;
    for (int j = 1; j < cur; ++j) x = x + lms_coefficient(nodes, j, sigma, sigma_next) * slot(static_cast<int>((i - j) % 4));
    Stage st = step_start(steps, i);
    set_update(st, in_vp(x, sigma_next));
    set_push(st, static_cast<int>(i % 4), kEps);
    plan.stages.push_back(st);
  }
  return plan;
}

Plan dpmpp_2s_ancestral(const Steps& steps, double eta) {
  // k-diffusion sample_dpmpp_2s_ancestral: DPM-Solver++(2S) to sigma_down through the midpoint in log sigma (trial
  // point in slot 0), plus sigma_up noise; Euler when sigma_down = 0.
  Plan plan;
  plan.history_slots = 1;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double sigma = steps.sigma[i], sigma_next = steps.sigma_next(i);
    auto [down, up] = ancestral_step(sigma, sigma_next, eta);
    if (sigma_next == 0) up = 0;
    const Terms x = ve_latent(sigma), denoised = x - sigma * kEps;
    Stage first = step_start(steps, i);
    if (down == 0) {
      set_update(first, in_vp(x - sigma * kEps + up * kNoise, sigma_next));
      if (up != 0) set_noise_interval(first, sigma, sigma_next);
      plan.stages.push_back(first);
      continue;
    }
    const double h = std::log(sigma) - std::log(down), mid = std::sqrt(sigma * down);  // t = -log sigma
    set_update(first, in_vp((mid / sigma) * x - std::expm1(-h / 2) * denoised, mid));
    first.dst = 0;
    plan.stages.push_back(first);
    Stage second = trial_stage(steps, 0, mid);
    const Terms denoised_2 = ve_slot(0, mid) - mid * kEps;
    set_update(second, in_vp((down / sigma) * x - std::expm1(-h) * denoised_2 + up * kNoise, sigma_next));
    if (up != 0) set_noise_interval(second, sigma, sigma_next);
    plan.stages.push_back(second);
  }
  return plan;
}

Plan dpmpp_sde(const Steps& steps, double eta) {
  // k-diffusion sample_dpmpp_sde (r = 1/2): an ancestral DPM-Solver++ step to the midpoint s (trial point in slot 1,
  // the first eps in slot 0), then one from sigma to sigma_next with the denoised estimates mixed; Euler into 0.
  const double r = 0.5, fac = 1 / (2 * r);
  Plan plan;
  plan.history_slots = 2;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double sigma = steps.sigma[i], sigma_next = steps.sigma_next(i);
    const Terms x = ve_latent(sigma);
    Stage first = step_start(steps, i);
    if (sigma_next == 0) {
      set_update(first, in_vp(x - sigma * kEps, sigma_next));
      plan.stages.push_back(first);
      continue;
    }
    const double h = std::log(sigma) - std::log(sigma_next);
    const double s = std::exp(std::log(sigma) - h * r);  // sigma at t + r h
    auto [down_1, up_1] = ancestral_step(sigma, s, eta);
    set_update(first, in_vp((down_1 / sigma) * x - std::expm1(std::log(down_1) - std::log(sigma)) * (x - sigma * kEps) +
                                up_1 * kNoise, s));
    if (up_1 != 0) set_noise_interval(first, sigma, s);
    first.dst = 1;
    set_push(first, 0, kEps);
    plan.stages.push_back(first);

    Stage second = trial_stage(steps, 1, s);
    auto [down_2, up_2] = ancestral_step(sigma, sigma_next, eta);
    const Terms denoised = x - sigma * slot(0), denoised_2 = ve_slot(1, s) - s * kEps;
    const Terms mixed = (1 - fac) * denoised + fac * denoised_2;
    set_update(second, in_vp((down_2 / sigma) * x - std::expm1(std::log(down_2) - std::log(sigma)) * mixed +
                                 up_2 * kNoise, sigma_next));
    if (up_2 != 0) set_noise_interval(second, sigma, sigma_next);
    plan.stages.push_back(second);
  }
  return plan;
}

Plan dpmpp_multistep(const Steps& steps, int order, double eta, bool heun_correction) {
  // k-diffusion sample_dpmpp_2m (order 2, eta 0), sample_dpmpp_2m_sde (order 2) and sample_dpmpp_3m_sde (order 3):
  // exponential-integrator steps on the denoised estimates D (slot i % 3 holds D_i), h = log(sigma / sigma_next);
  // the SDE forms damp by exp(-eta h) and add matching noise. A second-order step's correction is the midpoint or
  // the heun form (k-diffusion's solver_type; 3M's warm-up step uses the heun form). Equal to diffusers'
  // DPMSolverMultistepScheduler (dpmsolver++ / sde-dpmsolver++, solver_type) with its order rules.
  Plan plan;
  plan.history_slots = 3;
  std::vector<double> hs;  // h of each step
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double sigma = steps.sigma[i], sigma_next = steps.sigma_next(i);
    const Terms x = ve_latent(sigma), denoised = x - sigma * kEps;
    auto d_at = [&](std::size_t k) { return slot(static_cast<int>(k % 3)); };  // D of an earlier step k
    Stage st = step_start(steps, i);
    set_push(st, static_cast<int>(i % 3), denoised);
    const int cur = steps.max_order(i, order);
    if (sigma_next == 0) {
      set_update(st, denoised);
      hs.push_back(0);
      plan.stages.push_back(st);
      continue;
    }
    const double h = std::log(sigma) - std::log(sigma_next), h_eta = h * (1 + eta);
    hs.push_back(h);
    Terms x_next = (sigma_next / sigma * std::exp(-eta * h)) * x - std::expm1(-h_eta) * denoised;
    if (cur == 2) {
      const double r = hs[i - 1] / h;
      const Terms d = (1 / r) * (denoised - d_at(i - 1));
      if (heun_correction) x_next = x_next + (-std::expm1(-h_eta) / (-h_eta) + 1) * d;
      else x_next = x_next + (-0.5 * std::expm1(-h_eta)) * d;
    } else if (cur == 3) {
      const double r0 = hs[i - 1] / h, r1 = hs[i - 2] / h;
      const Terms d1_0 = (1 / r0) * (denoised - d_at(i - 1)), d1_1 = (1 / r1) * (d_at(i - 1) - d_at(i - 2));
      const Terms d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), d2 = (1 / (r0 + r1)) * (d1_0 - d1_1);
      const double phi_2 = std::expm1(-h_eta) / h_eta + 1, phi_3 = phi_2 / h_eta - 0.5;
      x_next = x_next + phi_2 * d1 - phi_3 * d2;
    }
    if (eta != 0) {
      x_next = x_next + (sigma_next * std::sqrt(-std::expm1(-2 * eta * h))) * kNoise;
      set_noise_interval(st, sigma, sigma_next);
    }
    set_update(st, in_vp(x_next, sigma_next));
    plan.stages.push_back(st);
  }
  return plan;
}

// Solves the k x k system a z = b (k <= 3) by Gaussian elimination with partial pivoting.
std::vector<double> solve(std::vector<std::vector<double>> a, std::vector<double> b) {
  const std::size_t k = b.size();
  for (std::size_t c = 0; c < k; ++c) {
    std::size_t p = c;
    for (std::size_t r = c + 1; r < k; ++r)
      if (std::abs(a[r][c]) > std::abs(a[p][c])) p = r;
    std::swap(a[c], a[p]);
    std::swap(b[c], b[p]);
    for (std::size_t r = c + 1; r < k; ++r) {
      const double f = a[r][c] / a[c][c];
      for (std::size_t j = c; j < k; ++j) a[r][j] -= f * a[c][j];
      b[r] -= f * b[c];
    }
  }
  std::vector<double> z(k);
  for (std::size_t r = k; r-- > 0;) {
    double v = b[r];
    for (std::size_t j = r + 1; j < k; ++j) v -= a[r][j] * z[j];
    z[r] = v / a[r][r];
  }
  return z;
}

// A UniPC update as coefficients: x_t = x * sample + sum_k m[k] * (model output of step k), where the model output
// is the data prediction (ldmrt's denoised D).
struct UniUpdate {
  double sample = 0;
  std::vector<std::pair<std::size_t, double>> m;
};

// diffusers UniPCMultistepScheduler (predict_x0, bh1/bh2): the predictor from step s0 to t with the model outputs of
// steps s0, s0 - 1, ... (order of them), or the corrector (model_t: the output at t, order from s0 down).
UniUpdate uni_update(const Steps& steps, std::size_t s0, double sigma_t, int order, bool bh2, bool corrector) {
  auto lambda = [](double sigma) { return -std::log(sigma); };  // log(alpha / sigma_vp)
  auto vp = [](double sigma) { return sigma / ve_scale(sigma); };
  const double alpha_t = 1 / ve_scale(sigma_t), sigma_s0 = steps.sigma[s0];
  const double h = lambda(sigma_t) - lambda(sigma_s0), hh = -h, h_phi_1 = std::expm1(hh);
  const double b_h = bh2 ? std::expm1(hh) : hh;
  std::vector<double> rks;
  for (int k = 1; k < order; ++k) rks.push_back((lambda(steps.sigma[s0 - k]) - lambda(sigma_s0)) / h);
  rks.push_back(1.0);
  std::vector<std::vector<double>> r(static_cast<std::size_t>(order), std::vector<double>(rks.size()));
  std::vector<double> b;
  double h_phi_k = h_phi_1 / hh - 1, factorial = 1;
  for (int i = 1; i <= order; ++i) {
    for (std::size_t j = 0; j < rks.size(); ++j) r[i - 1][j] = std::pow(rks[j], i - 1);
    b.push_back(h_phi_k * factorial / b_h);
    factorial *= i + 1;
    h_phi_k = h_phi_k / hh - 1 / factorial;
  }
  std::vector<double> rhos;
  if (corrector) {
    rhos = order == 1 ? std::vector<double>{0.5} : solve(r, b);
  } else if (order == 2) {
    rhos = {0.5};
  } else if (order > 2) {
    r.pop_back();
    for (auto& row : r) row.pop_back();
    b.pop_back();
    rhos = solve(r, b);
  }
  // x_t = (sigma_vp_t / sigma_vp_s0) x - alpha_t h_phi_1 m0 - alpha_t B_h (sum_k rho_k (m_k - m0) / r_k [+ rho_t (m_t - m0)])
  UniUpdate u;
  u.sample = vp(sigma_t) / vp(sigma_s0);
  double m0 = -alpha_t * h_phi_1;
  for (int k = 1; k < order; ++k) {
    const double c = -alpha_t * b_h * rhos[k - 1] / rks[k - 1];
    u.m.emplace_back(s0 - k, c);
    m0 -= c;
  }
  if (corrector) {
    const double c = -alpha_t * b_h * rhos.back();
    u.m.emplace_back(s0 + 1, c);
    m0 -= c;
  }
  u.m.emplace_back(s0, m0);
  return u;
}

Plan unipc(const Steps& steps, int order, bool bh2) {
  // diffusers UniPCMultistepScheduler: at each step the corrector refines the sample with this step's model output,
  // then the predictor steps on. The loop keeps only the predicted latent; the corrected sample of the step before
  // is recovered from it (the predictor is linear: latent = a x_c + sum c_k m_k), so a stage reads the latent, eps
  // and the model outputs of the three steps before (slot k % 4 holds step k's).
  Plan plan;
  plan.history_slots = 4;
  const std::size_t n = steps.size();
  UniUpdate previous;  // the last step's predictor
  int previous_order = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double sigma = steps.sigma[i], sigma_next = steps.sigma_next(i);
    const Terms m_i = ve_latent(sigma) - sigma * kEps;
    auto output = [&](std::size_t k) { return k == i ? m_i : slot(static_cast<int>(k % 4)); };
    auto apply = [&](const UniUpdate& u, const Terms& x) {
      Terms out = u.sample * x;
      for (const auto& [k, c] : u.m) out = out + c * output(k);
      return out;
    };
    Terms x = kLatentTerm;
    if (i > 0) {
      Terms rest;
      for (const auto& [k, c] : previous.m) rest = rest + c * output(k);
      const Terms corrected_before = (1 / previous.sample) * (kLatentTerm - rest);
      x = apply(uni_update(steps, i - 1, sigma, previous_order, bh2, true), corrected_before);
    }
    int cur = std::min({order, static_cast<int>(i) + 1, steps.lower_order_final ? static_cast<int>(n - i) : order});
    if (sigma_next == 0) cur = 1;
    Stage st = step_start(steps, i);
    set_push(st, static_cast<int>(i % 4), m_i);
    if (sigma_next == 0) {
      set_update(st, m_i);
    } else {
      previous = uni_update(steps, i, sigma_next, cur, bh2, false);
      set_update(st, apply(previous, x));
    }
    previous_order = cur;
    plan.stages.push_back(st);
  }
  return plan;
}

Plan dpmpp_2s(const Steps& steps, bool heun) {
  // diffusers DPMSolverSinglestepScheduler (dpmsolver++, order 2): steps grouped in pairs, the second of each pair a
  // second-order step from the pair's start using the model output at the grid point between (no extra
  // evaluation). Orders per step as its get_order_list; the pair's start sample is recovered from the latent (the
  // first-order step is linear: latent = a x + c m), slot k % 2 holding step k's model output.
  const std::size_t n = steps.size();
  std::vector<int> orders;
  for (std::size_t i = 0; i < n; ++i) orders.push_back(i % 2 == 0 ? 1 : 2);
  if (steps.lower_order_final && n % 2 == 0 && n >= 2) orders[n - 2] = orders[n - 1] = 1;
  if (steps.sigma_next(n - 1) == 0) orders[n - 1] = 1;  // final_sigmas_type "zero"
  auto vp = [](double sigma) { return sigma / ve_scale(sigma); };
  Plan plan;
  plan.history_slots = 2;
  double a_prev = 1, c_prev = 0;  // the last first-order step: latent = a_prev x + c_prev m
  for (std::size_t i = 0; i < n; ++i) {
    const double sigma = steps.sigma[i], sigma_next = steps.sigma_next(i), alpha_t = 1 / ve_scale(sigma_next);
    const Terms m_i = ve_latent(sigma) - sigma * kEps;
    Stage st = step_start(steps, i);
    set_push(st, static_cast<int>(i % 2), m_i);
    if (sigma_next == 0) {
      set_update(st, m_i);
    } else if (orders[i] == 1) {
      const double h = std::log(sigma) - std::log(sigma_next);
      a_prev = vp(sigma_next) / vp(sigma);
      c_prev = -alpha_t * std::expm1(-h);
      set_update(st, a_prev * kLatentTerm + c_prev * m_i);
    } else {
      const double sigma_s1 = steps.sigma[i - 1];
      const double h = std::log(sigma_s1) - std::log(sigma_next), r0 = (std::log(sigma_s1) - std::log(sigma)) / h;
      const Terms m_s1 = slot(static_cast<int>((i - 1) % 2));
      const Terms x_s1 = (1 / a_prev) * (kLatentTerm - c_prev * m_s1);
      const Terms d1 = (1 / r0) * (m_i - m_s1);
      const double c_d1 = heun ? alpha_t * (std::expm1(-h) / h + 1) : -0.5 * alpha_t * std::expm1(-h);
      set_update(st, (vp(sigma_next) / vp(sigma_s1)) * x_s1 - alpha_t * std::expm1(-h) * m_s1 + c_d1 * d1);
    }
    plan.stages.push_back(st);
  }
  return plan;
}

// Every sampler make_plan knows: k-diffusion's act on x_ve (start from sigma_max * x_T by default, land on sigma 0),
// CompVis/diffusers' on the variance-preserving latent (start from x_T, land on alphas_cumprod[0] by default).
struct SamplerInfo {
  const char* name;
  bool k_diffusion;
  bool takes_eta;
  double default_eta;
};
// diffusers' samplers that start from x_T and land on sigma 0 by default, in the variance-preserving latent.
bool lands_on_zero(const SamplerInfo& s) {
  const std::string name = s.name;
  return s.k_diffusion || name == "ddpm" || name == "unipc" || name == "dpmpp_2s";
}
const SamplerInfo kSamplers[] = {
    {"ddpm", false, false, 0},          {"ddim", false, true, 0},
    {"plms", false, false, 0},          {"lcm", false, false, 0},
    {"euler", true, false, 0},          {"euler_ancestral", true, true, 1},
    {"heun", true, false, 0},           {"dpm_2", true, false, 0},
    {"dpm_2_ancestral", true, true, 1}, {"lms", true, false, 0},
    {"dpmpp_2s_ancestral", true, true, 1}, {"dpmpp_sde", true, true, 1},
    {"dpmpp_2m", true, false, 0},       {"dpmpp_2m_sde", true, true, 1},
    {"dpmpp_3m", true, false, 0},       {"dpmpp_3m_sde", true, true, 1},    {"unipc", false, false, 0},
    {"dpmpp_2s", false, false, 0},
};

const SamplerInfo* find_sampler(const std::string& name) {
  for (const SamplerInfo& s : kSamplers)
    if (name == s.name) return &s;
  return nullptr;
}

Plan build(const std::string& name, const Steps& steps, double eta, const std::string& solver_type, int order) {
  if (name == "unipc") return unipc(steps, order == 0 ? 2 : order, solver_type != "bh1");
  if (name == "dpmpp_2s") return dpmpp_2s(steps, solver_type == "heun");
  if (name == "ddpm") return ddpm(steps);
  if (name == "ddim") return ddim(steps, eta);
  if (name == "plms") return plms(steps);
  if (name == "lcm") return lcm(steps);
  if (name == "euler" || name == "euler_ancestral") return euler(steps, eta, name == "euler_ancestral");
  if (name == "heun") return heun(steps);
  if (name == "dpm_2" || name == "dpm_2_ancestral") return dpm_2(steps, eta, name == "dpm_2_ancestral");
  if (name == "lms") return lms(steps, 4);
  if (name == "dpmpp_2s_ancestral") return dpmpp_2s_ancestral(steps, eta);
  if (name == "dpmpp_sde") return dpmpp_sde(steps, eta);
  const bool third = name == "dpmpp_3m" || name == "dpmpp_3m_sde";
  return dpmpp_multistep(steps, third ? 3 : 2, eta, solver_type.empty() ? third : solver_type == "heun");
}

}  // namespace

std::vector<std::string> sampler_names() {
  std::vector<std::string> names;
  for (const SamplerInfo& s : kSamplers) names.push_back(s.name);
  return names;
}

// Per stage: guided or not (step k of n is guided when from <= k / n < until), full UNet or shallow branch (a
// step k with k % interval == 0 runs full, and so does the first step after guidance switches, whose batch
// differs from the kept feature's; every stage of a step shares its step's choice).
// The steps that run the full UNet: every interval-th, or (quadratic) the same number placed at
// c + sign(u) |u|^p for u evenly spaced in [-c^(1/p), (n-1-c)^(1/p)], c = 0.3 (n - 1): dense near c, sparse at the
// ends, step 0 and the last included; p starts at 1.4 and drops towards 1 until the positions are distinct.
static std::vector<bool> full_steps(int n, int interval, const std::string& schedule) {
  std::vector<bool> full(static_cast<std::size_t>(std::max(n, 1)), false);
  const int k = (n + interval - 1) / interval;
  if (schedule == "uniform" || k >= n || k < 2) {
    for (int i = 0; i < n; i += interval) full[static_cast<std::size_t>(i)] = true;
    return full;
  }
  const double c = 0.3 * (n - 1);
  for (double p = 1.4; p > 1.0; p -= 0.02) {
    const double a = std::pow(c, 1 / p), b = std::pow(n - 1 - c, 1 / p);
    std::vector<int> at;
    for (int j = 0; j < k; ++j) {
      const double u = -a + (a + b) * j / (k - 1);
      const int pos = static_cast<int>(std::lround(c + (u < 0 ? -1 : 1) * std::pow(std::abs(u), p)));
      if (at.empty() || pos != at.back()) at.push_back(std::min(std::max(pos, 0), n - 1));
    }
    if (static_cast<int>(at.size()) == k) {
      for (int i : at) full[static_cast<std::size_t>(i)] = true;
      return full;
    }
  }
  for (int i = 0; i < n; i += interval) full[static_cast<std::size_t>(i)] = true;  // no distinct placement
  return full;
}

static void schedule_evaluations(Plan& plan, int interval, const std::string& schedule, double from, double until) {
  int step = -1;
  bool last_full_guided = true, full_step = true;
  const double n = plan.num_steps > 0 ? plan.num_steps : 1;
  const std::vector<bool> full = full_steps(plan.num_steps, interval, schedule);
  for (Stage& s : plan.stages) {
    if (s.starts_step || step < 0) {
      ++step;
      s.guided = from <= step / n && step / n < until;
      full_step = full[static_cast<std::size_t>(step)] || s.guided != last_full_guided || step == 0;
    } else {
      s.guided = (&s - 1)->guided;
    }
    s.shallow = !full_step;
    if (full_step) last_full_guided = s.guided;
  }
}

Plan make_plan(const SamplerConfig& config) {
  const std::string& name = config.sampler;
  const SamplerInfo* info = find_sampler(name);
  if (!info) {
    std::string known;
    for (const SamplerInfo& s : kSamplers) known += std::string(known.empty() ? "" : ", ") + s.name;
    throw std::invalid_argument("unknown sampler '" + name + "' (expected one of " + known + ")");
  }
  if (config.eta && !(*config.eta >= 0)) throw std::invalid_argument("eta must be >= 0, got " + std::to_string(*config.eta));
  if (config.eta && *config.eta != 0 && !info->takes_eta)
    throw std::invalid_argument("sampler '" + name + "' takes no eta (ddim and the ancestral and SDE samplers do), got " +
                                std::to_string(*config.eta));
  const double eta = config.eta.value_or(info->default_eta);
  if (!(config.strength >= 0 && config.strength <= 1))
    throw std::invalid_argument("strength must be in [0, 1], got " + std::to_string(config.strength));
  if (config.cache_interval < 1)
    throw std::invalid_argument("cache_interval must be >= 1 (1: no feature caching), got " +
                                std::to_string(config.cache_interval));
  if (config.cache_schedule != "uniform" && config.cache_schedule != "quadratic")
    throw std::invalid_argument("cache_schedule must be 'uniform' or 'quadratic', got '" + config.cache_schedule + "'");
  if (!(config.guidance_from >= 0 && config.guidance_from <= config.guidance_until && config.guidance_until <= 1))
    throw std::invalid_argument("the guidance interval must satisfy 0 <= from <= until <= 1 (fractions of the "
                                "steps), got (" + std::to_string(config.guidance_from) + ", " +
                                std::to_string(config.guidance_until) + ")");
  const bool dpmpp_multistep_sampler = name == "dpmpp_2m" || name == "dpmpp_2m_sde" || name == "dpmpp_3m" ||
                                       name == "dpmpp_3m_sde" || name == "dpmpp_2s";
  if (!config.solver_type.empty()) {
    if (name == "unipc" && config.solver_type != "bh1" && config.solver_type != "bh2")
      throw std::invalid_argument("unipc's solver_type must be 'bh1' or 'bh2', got '" + config.solver_type + "'");
    if (dpmpp_multistep_sampler && config.solver_type != "midpoint" && config.solver_type != "heun")
      throw std::invalid_argument("solver_type must be 'midpoint' or 'heun', got '" + config.solver_type + "'");
    if (name != "unipc" && !dpmpp_multistep_sampler)
      throw std::invalid_argument("solver_type applies only to the DPM++ multistep samplers and unipc, not '" + name + "'");
  }
  if (config.solver_order != 0 && (name != "unipc" || config.solver_order < 1 || config.solver_order > 3))
    throw std::invalid_argument("solver_order (1, 2 or 3) applies only to unipc (the DPM++ samplers name theirs), got " +
                                std::to_string(config.solver_order) + " for '" + name + "'");
  if (config.start_noise != "default" && config.start_noise != "sigma" && config.start_noise != "unit")
    throw std::invalid_argument("start_noise must be 'default', 'sigma' or 'unit', got '" + config.start_noise + "'");

  GridOptions grid;
  grid.spacing = config.timestep_spacing;
  grid.steps_offset = config.steps_offset;
  grid.interpolation = config.sigma_interpolation;
  grid.respace = config.respace;
  grid.round_timesteps = config.round_timesteps;
  grid.drop_last_timestep = config.drop_last_timestep;
  grid.original_steps = config.original_steps;
  const Grid g = make_grid(config.steps, config.alphas_cumprod, grid);
  if (config.final_alpha_cumprod) {
    const double a = *config.final_alpha_cumprod;
    if (!(a > 0 && a <= 1)) throw std::invalid_argument("final_alpha_cumprod must be in (0, 1], got " + std::to_string(a));
    if (name == "ddpm") throw std::invalid_argument("final_alpha_cumprod does not apply to ddpm (it ends on x0)");
  }
  Steps steps;
  steps.alphas_cumprod = &config.alphas_cumprod;
  steps.lower_order_final = config.lower_order_final.value_or(name == "unipc");  // diffusers' default for UniPC
  steps.euler_at_final = config.euler_at_final;
  const double default_after = lands_on_zero(*info) ? 1.0 : config.alphas_cumprod.front();
  steps.alpha_after = config.final_alpha_cumprod.value_or(default_after);

  // img2img (diffusers' rule, CompVis' t_enc): keep the last int(strength * n) steps.
  const bool img2img = config.strength < 1;
  const std::size_t keep = static_cast<std::size_t>(config.strength * static_cast<double>(g.size()));
  for (std::size_t i = g.size() - keep; i < g.size(); ++i) {
    const double t = g.t[i], sigma = g.sigma[i];
    steps.t.push_back(t);
    steps.sigma.push_back(sigma);
    // On the grid alphas_cumprod itself (CompVis' samplers read it so), between grid points from the sigma.
    const bool on_grid = t == std::floor(t) && sigma == sigma_of_alpha(config.alphas_cumprod[static_cast<std::size_t>(t)]);
    steps.alpha.push_back(on_grid ? config.alphas_cumprod[static_cast<std::size_t>(t)] : alpha_of_sigma(sigma));
  }

  if (config.prev_timestep_stride) {
    // diffusers' DDIM/DDPM: each step lands on t - T // steps (alphas_cumprod there, or the final alpha below 0).
    if (name != "ddim" && name != "ddpm")
      throw std::invalid_argument("prev_timestep_stride applies only to ddim and ddpm (diffusers' rule)");
    const int stride = static_cast<int>(config.alphas_cumprod.size()) / config.steps;
    for (double t : steps.t) {
      const int prev = static_cast<int>(t) - stride;
      steps.alpha_prev.push_back(prev >= 0 ? config.alphas_cumprod[static_cast<std::size_t>(prev)] : steps.alpha_after);
    }
  }
  Plan plan = build(name, steps, eta, config.solver_type, config.solver_order);
  if (info->k_diffusion && !plan.stages.empty() && steps.alpha_after < 1) {
    // k-diffusion's result is x_ve itself: landing on sigma > 0 (diffusers' final_sigmas_type "sigma_min"), the last
    // update is not divided by its scale, so the decoder gets the sample diffusers decodes.
    Stage& last = plan.stages.back();
    const double scale = ve_scale(sigma_of_alpha(steps.alpha_after));
    last.c_latent *= scale;
    last.c_eps *= scale;
    last.c_noise *= scale;
    for (double& c : last.c_history) c *= scale;
  }
  plan.sampler = name;
  plan.num_steps = static_cast<int>(steps.size());

  schedule_evaluations(plan, config.cache_interval, config.cache_schedule, config.guidance_from, config.guidance_until);

  if (steps.size() == 0) {  // strength 0: the latent is x0 unchanged
    plan.init_x0 = 1;
    plan.init_noise = 0;
  } else if (img2img) {
    plan.init_x0 = std::sqrt(steps.alpha[0]);
    plan.init_noise = std::sqrt(1 - steps.alpha[0]);
  } else {
    // CompVis samplers start from x_T itself; k-diffusion from sigma_max * x_T in x_ve; "unit" is x_T itself
    // (diffusers' sqrt(sigma_max^2 + 1) * x_T for "leading" spacing).
    const bool sigma_start = config.start_noise == "default" ? info->k_diffusion : config.start_noise == "sigma";
    plan.init_noise = sigma_start ? steps.sigma[0] / ve_scale(steps.sigma[0]) : 1.0;
  }
  return plan;
}

}  // namespace ldmrt
