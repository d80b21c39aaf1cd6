#include "ldmrt/schedule.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace ldmrt {
namespace {

const double kPi = 3.14159265358979323846;

std::vector<double> linspace(double start, double end, int n) {
  std::vector<double> out(n);
  // torch.linspace / np.linspace evaluate start + i * step; the last point is exact.
  const double step = n > 1 ? (end - start) / (n - 1) : 0.0;
  for (int i = 0; i < n; ++i) out[i] = start + i * step;
  if (n > 1) out[n - 1] = end;
  return out;
}

std::vector<double> cumprod_one_minus(const std::vector<double>& betas) {
  std::vector<double> alphas_cumprod(betas.size());
  double running = 1.0;
  for (std::size_t i = 0; i < betas.size(); ++i) {
    running *= 1.0 - betas[i];
    alphas_cumprod[i] = running;
  }
  return alphas_cumprod;
}

}  // namespace

std::vector<double> make_alphas_cumprod(const std::string& schedule, int num_timesteps,
                                        double linear_start, double linear_end, double cosine_s) {
  if (num_timesteps < 2) throw std::invalid_argument("num_timesteps must be >= 2, got " + std::to_string(num_timesteps));
  std::vector<double> betas;
  if (schedule == "linear") {
    betas = linspace(std::sqrt(linear_start), std::sqrt(linear_end), num_timesteps);
    for (double& b : betas) b = b * b;
  } else if (schedule == "sqrt_linear") {
    betas = linspace(linear_start, linear_end, num_timesteps);
  } else if (schedule == "sqrt") {
    betas = linspace(linear_start, linear_end, num_timesteps);
    for (double& b : betas) b = std::sqrt(b);
  } else if (schedule == "cosine") {
    std::vector<double> f(num_timesteps + 1);
    for (int i = 0; i <= num_timesteps; ++i) {
      const double c = std::cos((static_cast<double>(i) / num_timesteps + cosine_s) / (1 + cosine_s) * kPi / 2);
      f[i] = c * c;
    }
    betas.resize(num_timesteps);
    for (int i = 0; i < num_timesteps; ++i)
      betas[i] = std::clamp(1.0 - (f[i + 1] / f[0]) / (f[i] / f[0]), 0.0, 0.999);
  } else {
    throw std::invalid_argument("unknown schedule '" + schedule +
                                "' (expected linear, sqrt_linear, sqrt or cosine)");
  }
  return cumprod_one_minus(betas);
}

double sigma_of_alpha(double alpha_cumprod) { return std::sqrt((1.0 - alpha_cumprod) / alpha_cumprod); }
double alpha_of_sigma(double sigma) { return 1.0 / (1.0 + sigma * sigma); }

void check_alphas_cumprod(const std::vector<double>& alphas_cumprod) {
  if (alphas_cumprod.size() < 2)
    throw std::invalid_argument("alphas_cumprod needs at least 2 entries, got " +
                                std::to_string(alphas_cumprod.size()));
  for (double a : alphas_cumprod)
    if (!(a > 0.0 && a <= 1.0))
      throw std::invalid_argument("alphas_cumprod values must lie in (0, 1], got " + std::to_string(a));
}

double timestep_of_sigma(const std::vector<double>& alphas_cumprod, double sigma) {
  // k-diffusion: low = the last grid index whose log-sigma is <= log(sigma) (clamped to T - 2),
  // then linear interpolation of the index in log-sigma, weight clamped to [0, 1].
  const int T = static_cast<int>(alphas_cumprod.size());
  const double log_sigma = std::log(sigma);
  int low = 0;
  for (int i = 0; i < T; ++i)
    if (log_sigma - std::log(sigma_of_alpha(alphas_cumprod[i])) >= 0) low = i;
  low = std::min(low, T - 2);
  const double lo = std::log(sigma_of_alpha(alphas_cumprod[low]));
  const double hi = std::log(sigma_of_alpha(alphas_cumprod[low + 1]));
  const double w = std::clamp((lo - log_sigma) / (lo - hi), 0.0, 1.0);
  return (1 - w) * low + w * (low + 1);
}

double sigma_at(const std::vector<double>& alphas_cumprod, double timestep, const std::string& interpolation) {
  const int T = static_cast<int>(alphas_cumprod.size());
  if (!(timestep >= 0 && timestep <= T - 1))
    throw std::invalid_argument("timestep " + std::to_string(timestep) + " outside [0, " + std::to_string(T - 1) + "]");
  const int low = std::min(static_cast<int>(std::floor(timestep)), T - 1);
  const double w = timestep - low;
  const double lo = sigma_of_alpha(alphas_cumprod[low]);
  if (w == 0.0) return lo;
  const double hi = sigma_of_alpha(alphas_cumprod[low + 1]);
  if (interpolation == "linear") return (1 - w) * lo + w * hi;
  if (interpolation != "log")
    throw std::invalid_argument("unknown sigma interpolation '" + interpolation + "' (expected log or linear)");
  return std::exp((1 - w) * std::log(lo) + w * std::log(hi));
}

namespace {

// Integer timesteps, ascending, of the CompVis/diffusers spacings.
std::vector<double> discrete_timesteps(const std::string& spacing, int steps, int T, int steps_offset) {
  std::vector<double> ascending;
  if (spacing == "uniform") {
    for (int t = 0; t < T; t += T / steps) ascending.push_back(t + 1);
    if (ascending.back() > T - 1)
      throw std::invalid_argument("'uniform' spacing with " + std::to_string(steps) + " of " + std::to_string(T) +
                                  " steps reaches timestep " + std::to_string(T) +
                                  ", past the schedule (CompVis fails here too); choose another step count or "
                                  "spacing");
  } else if (spacing == "leading") {
    const int ratio = T / steps;
    for (int i = 0; i < steps; ++i) ascending.push_back(i * ratio + steps_offset);
  } else if (spacing == "trailing") {
    const double ratio = static_cast<double>(T) / steps;
    // np.arange(T, 0, -ratio) has ceil(T / ratio) entries; np.round rounds half to even, as nearbyint.
    const int count = static_cast<int>(std::ceil(T / ratio));
    for (int i = count - 1; i >= 0; --i) ascending.push_back(std::nearbyint(T - i * ratio) - 1);
  } else {  // linspace
    for (double t : linspace(0, T - 1, steps)) ascending.push_back(std::nearbyint(t));
  }
  return ascending;
}

std::vector<double> respaced_sigmas(const std::string& how, int steps, double sigma_max, double sigma_min) {
  std::vector<double> sigmas;
  if (how == "karras") {
    const double rho = 7.0, min_inv_rho = std::pow(sigma_min, 1 / rho), max_inv_rho = std::pow(sigma_max, 1 / rho);
    for (double ramp : linspace(0, 1, steps)) sigmas.push_back(std::pow(max_inv_rho + ramp * (min_inv_rho - max_inv_rho), rho));
  } else if (how == "exponential") {
    for (double l : linspace(std::log(sigma_max), std::log(sigma_min), steps)) sigmas.push_back(std::exp(l));
  } else {
    throw std::invalid_argument("unknown sigma re-spacing '" + how + "' (expected karras or exponential)");
  }
  return sigmas;
}

}  // namespace

Grid make_grid(int steps, const std::vector<double>& alphas_cumprod, const GridOptions& o) {
  check_alphas_cumprod(alphas_cumprod);
  const int T = static_cast<int>(alphas_cumprod.size());
  if (steps < 1 || steps > T)
    throw std::invalid_argument("steps must be in [1, " + std::to_string(T) + "], got " + std::to_string(steps));
  if (o.interpolation != "log" && o.interpolation != "linear")
    throw std::invalid_argument("unknown sigma interpolation '" + o.interpolation + "' (expected log or linear)");
  std::string spacing = o.spacing, respace = o.respace;
  const bool whole_schedule = spacing == "karras" || spacing == "exponential";  // k-diffusion's range
  if (whole_schedule) {
    respace = spacing;
    spacing = "kdiffusion";
  }
  const int n = steps + (o.drop_last_timestep ? 1 : 0);
  Grid g;
  if (spacing == "uniform" || spacing == "leading" || spacing == "trailing" || spacing == "linspace") {
    const std::vector<double> ascending = discrete_timesteps(spacing, n, T, o.steps_offset);
    g.t.assign(ascending.rbegin(), ascending.rend());
  } else if (spacing == "kdiffusion") {
    g.t = linspace(T - 1, 0, n);
  } else if (spacing == "sgm_uniform") {
    g.t = linspace(T - 1, 0, n + 1);
    g.t.pop_back();
  } else if (spacing == "simple") {
    const double stride = static_cast<double>(T) / n;
    for (int i = 0; i < n; ++i) g.t.push_back(T - 1 - static_cast<int>(i * stride));
  } else if (spacing == "lcm") {
    if (o.original_steps < 1 || o.original_steps > T || n > o.original_steps)
      throw std::invalid_argument("the 'lcm' grid needs 1 <= steps <= original_steps <= " + std::to_string(T) +
                                  ", got steps " + std::to_string(n) + ", original_steps " +
                                  std::to_string(o.original_steps));
    const int k = T / o.original_steps;
    for (int i = 0; i < n; ++i) {  // index floor(i * N / n) into the descending distillation grid
      const int index = static_cast<int>(std::floor(static_cast<double>(i) * o.original_steps / n));
      g.t.push_back((o.original_steps - index) * k - 1.0);
    }
  } else {
    throw std::invalid_argument("unknown timestep spacing '" + o.spacing +
                                "' (expected uniform, leading, trailing, linspace, kdiffusion, karras, exponential, "
                                "simple, sgm_uniform or lcm)");
  }
  for (double t : g.t)
    if (!(t >= 0 && t <= T - 1))
      throw std::invalid_argument("spacing '" + o.spacing + "' gives timestep " + std::to_string(t) + " outside [0, " +
                                  std::to_string(T - 1) + "] (check steps_offset)");
  for (double t : g.t) g.sigma.push_back(sigma_at(alphas_cumprod, t, o.interpolation));
  if (!respace.empty()) {
    g.sigma = respaced_sigmas(respace, n, g.sigma.front(), g.sigma.back());
    g.t.clear();
    for (double s : g.sigma) {
      const double t = timestep_of_sigma(alphas_cumprod, s);
      g.t.push_back(o.round_timesteps ? std::nearbyint(t) : t);
    }
  }
  if (o.drop_last_timestep) {
    g.t.pop_back();
    g.sigma.pop_back();
  }
  return g;
}

std::vector<double> make_timesteps(const std::string& spacing, int steps, const std::vector<double>& alphas_cumprod,
                                   int steps_offset) {
  GridOptions o;
  o.spacing = spacing;
  o.steps_offset = steps_offset;
  return make_grid(steps, alphas_cumprod, o).t;
}

}  // namespace ldmrt
