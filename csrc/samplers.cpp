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

// The visited timesteps and their alphas_cumprod; `alpha_after` is the alpha the last step lands on.
struct Steps {
  std::vector<double> t, alpha;
  double alpha_after = 1;
  std::size_t size() const { return t.size(); }
  double alpha_next(std::size_t i) const { return i + 1 < size() ? alpha[i + 1] : alpha_after; }
  double sigma(std::size_t i) const { return sigma_of_alpha(alpha[i]); }
  // k-diffusion appends sigma = 0 after the last step.
  double sigma_next(std::size_t i) const { return i + 1 < size() ? sigma(i + 1) : 0.0; }
};

Stage step_start(const Steps& steps, std::size_t i) {
  Stage s;
  s.timestep = steps.t[i];
  s.starts_step = true;
  s.blend_x0 = std::sqrt(steps.alpha[i]);
  s.blend_noise = std::sqrt(1 - steps.alpha[i]);
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
    plan.stages.push_back(s);
  }
  return plan;
}

Plan plms(const Steps& steps) {
  // CompVis PLMSSampler: Adams-Bashforth on eps of orders 2-4 over the earlier eps (history slot i % 4 holds
  // step i's eps); the first step is a pseudo improved Euler needing a second evaluation at the next timestep.
  Plan plan;
  plan.history_slots = 4;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double a = steps.alpha[i], a_prev = steps.alpha_next(i);
    const int slot = static_cast<int>(i % 4);
    Stage s = step_start(steps, i);
    set_ddim(s, a, a_prev, 0.0);
    s.push_slot = slot;
    s.push_eps = 1;
    if (i == 0) {
      const double c_eps = s.c_eps;
      s.dst = Buffer::Trial;  // x' = DDIM step with e_0; then e' = (e_0 + eps(x', t_next)) / 2
      plan.stages.push_back(s);
      Stage second;
      second.timestep = steps.t[steps.size() > 1 ? 1 : 0];
      second.model_input = Buffer::Trial;
      second.c_latent = s.c_latent;
      second.c_eps = c_eps / 2;
      second.history_slot[0] = slot;
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

// The k-diffusion samplers act on x_ve = x / sqrt(a) = scale * x (scale = sqrt(1 + sigma^2)), where the eps
// model's denoised estimate is x_ve - sigma * eps. Each update below is written in x_ve and divided by the next
// scale to stay in the latent's variance-preserving form.
double ve_scale(double sigma) { return std::sqrt(1 + sigma * sigma); }

Plan euler(const Steps& steps, double eta, bool ancestral) {
  Plan plan;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double sigma = steps.sigma(i), sigma_next = steps.sigma_next(i);
    double sigma_down = sigma_next, sigma_up = 0;
    if (ancestral && sigma_next > 0) {  // k-diffusion get_ancestral_step
      sigma_up = std::min(sigma_next, eta * std::sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) /
                                                      (sigma * sigma)));
      sigma_down = std::sqrt(sigma_next * sigma_next - sigma_up * sigma_up);
    }
    const double s = ve_scale(sigma), s_next = ve_scale(sigma_next);
    Stage st = step_start(steps, i);
    st.c_latent = s / s_next;  // x_ve' = x_ve + (sigma_down - sigma) eps + sigma_up noise
    st.c_eps = (sigma_down - sigma) / s_next;
    st.c_noise = sigma_up / s_next;
    plan.stages.push_back(st);
  }
  return plan;
}

Plan dpmpp_2m(const Steps& steps) {
  // k-diffusion sample_dpmpp_2m; history slot i % 2 holds step i's denoised estimate D_i = x_ve - sigma eps.
  Plan plan;
  plan.history_slots = 2;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const double sigma = steps.sigma(i), sigma_next = steps.sigma_next(i);
    const double s = ve_scale(sigma), s_next = ve_scale(sigma_next);
    // x_ve' = (sigma_next / sigma) x_ve + (1 - sigma_next / sigma) D', with D' = D for a first-order step, else
    // D' = (1 + 1/(2r)) D - 1/(2r) D_prev with r = h_prev / h and h = log(sigma / sigma_next).
    const double ratio = sigma_next / sigma;
    double c_d = 1, c_prev = 0;
    if (i > 0 && sigma_next > 0) {
      const double h = std::log(sigma) - std::log(sigma_next);
      const double h_prev = std::log(steps.sigma(i - 1)) - std::log(sigma);
      const double r = h_prev / h;
      c_d = 1 + 1 / (2 * r);
      c_prev = -1 / (2 * r);
    }
    Stage st = step_start(steps, i);
    st.c_latent = (ratio * s + (1 - ratio) * c_d * s) / s_next;
    st.c_eps = -(1 - ratio) * c_d * sigma / s_next;
    if (c_prev != 0) {
      st.history_slot[0] = static_cast<int>((i - 1) % 2);
      st.c_history[0] = (1 - ratio) * c_prev / s_next;
    }
    st.push_slot = static_cast<int>(i % 2);
    st.push_latent = s;
    st.push_eps = -sigma;
    plan.stages.push_back(st);
  }
  return plan;
}

bool is_k_sampler(const std::string& name) {
  return name == "euler" || name == "euler_ancestral" || name == "dpmpp_2m";
}

}  // namespace

std::vector<std::string> sampler_names() {
  return {"ddpm", "ddim", "plms", "dpmpp_2m", "euler", "euler_ancestral"};
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
  bool known = false;
  for (const std::string& n : sampler_names()) known = known || n == name;
  if (!known)
    throw std::invalid_argument("unknown sampler '" + name +
                                "' (expected ddpm, ddim, plms, dpmpp_2m, euler or euler_ancestral)");
  if (config.eta && !(*config.eta >= 0)) throw std::invalid_argument("eta must be >= 0, got " + std::to_string(*config.eta));
  const bool takes_eta = name == "ddim" || name == "euler_ancestral";
  if (config.eta && *config.eta != 0 && !takes_eta)
    throw std::invalid_argument("sampler '" + name + "' takes no eta (only ddim and euler_ancestral do), got " +
                                std::to_string(*config.eta));
  const double eta = config.eta.value_or(name == "euler_ancestral" ? 1.0 : 0.0);
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

  Steps steps;
  steps.t = make_timesteps(config.timestep_spacing, config.steps, config.alphas_cumprod, config.steps_offset);
  if (config.final_alpha_cumprod) {
    const double a = *config.final_alpha_cumprod;
    if (!(a > 0 && a <= 1)) throw std::invalid_argument("final_alpha_cumprod must be in (0, 1], got " + std::to_string(a));
    if (name != "ddim" && name != "plms")
      throw std::invalid_argument("final_alpha_cumprod applies only to ddim and plms");
  }
  steps.alpha_after = name == "ddpm" ? 1.0 : config.final_alpha_cumprod.value_or(config.alphas_cumprod.front());

  // img2img (diffusers' rule, CompVis' t_enc): keep the last int(strength * n) steps.
  const bool img2img = config.strength < 1;
  const std::size_t keep = static_cast<std::size_t>(config.strength * static_cast<double>(steps.size()));
  steps.t.erase(steps.t.begin(), steps.t.end() - static_cast<std::ptrdiff_t>(keep));
  for (double t : steps.t) steps.alpha.push_back(alpha_at(config.alphas_cumprod, t));

  Plan plan;
  if (name == "ddpm") plan = ddpm(steps);
  else if (name == "ddim") plan = ddim(steps, eta);
  else if (name == "plms") plan = plms(steps);
  else if (name == "dpmpp_2m") plan = dpmpp_2m(steps);
  else plan = euler(steps, eta, name == "euler_ancestral");
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
    // CompVis samplers start from x_T itself; k-diffusion from sigma_max * x_T in x_ve.
    plan.init_noise = is_k_sampler(name) ? steps.sigma(0) / ve_scale(steps.sigma(0)) : 1.0;
  }
  return plan;
}

}  // namespace ldmrt
