// ldmrt._C: a thin pybind11 layer over the C++ core (schedules, plans, the CPU loop, the RNG).
// std::invalid_argument from the core arrives in Python as ValueError (pybind11's standard translation).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "ldmrt/loop.h"
#include "ldmrt/rng.h"
#include "ldmrt/samplers.h"
#include "ldmrt/schedule.h"

namespace py = pybind11;
using namespace ldmrt;

namespace {

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

std::vector<double> to_vector(const py::array_t<double, py::array::c_style | py::array::forcecast>& a) {
  if (a.ndim() != 1) throw std::invalid_argument("alphas_cumprod must be 1-D, got " + std::to_string(a.ndim()) + " dims");
  return std::vector<double>(a.data(), a.data() + a.size());
}

template <typename Real>
using Array = py::array_t<Real, py::array::c_style>;

std::vector<py::ssize_t> shape_of(const py::array& a) { return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()); }

// What the loop needs from Python, for one dtype: the latent (modified in place) and the buffers the model sees are
// numpy arrays, so the model gets them without copies; the model's result is read in place when it is a
// C-contiguous array of the latent's dtype, else converted once.
template <typename Real>
struct NumpyLoop {
  Array<Real> latent;
  std::optional<Array<Real>> x0, mask;
  std::vector<Array<Real>> history;  // numpy, so a stage that evaluates a slot passes it without a copy
  Array<Real> model_input;
  Workspace<Real> ws;
  LoopInputs<Real> in;
  NoiseSource<Real> noise;
  std::optional<py::function> noise_fn;

  NumpyLoop(const Plan& plan, Array<Real> latent_, std::optional<Array<Real>> x0_, std::optional<Array<Real>> mask_,
            std::optional<double> guidance_scale, std::uint64_t seed, std::optional<py::function> noise_fn_)
      : latent(std::move(latent_)), x0(std::move(x0_)), mask(std::move(mask_)), noise_fn(std::move(noise_fn_)) {
    if (!latent.writeable()) throw std::invalid_argument("latent must be writeable");
    const std::vector<py::ssize_t> shape = shape_of(latent);
    for (auto* extra : {&x0, &mask})
      if (*extra && shape_of(**extra) != shape)
        throw std::invalid_argument(std::string(extra == &x0 ? "x0" : "mask") + " must have the latent's shape");
    if (guidance_scale && shape.empty()) throw std::invalid_argument("guidance needs a batch dimension");
    ws = Workspace<Real>::allocate(plan, count(), false);
    for (int k = 0; k < plan.history_slots; ++k) {
      history.emplace_back(shape);
      ws.history[static_cast<std::size_t>(k)] = history.back().mutable_data();
    }
    if (guidance_scale) {
      std::vector<py::ssize_t> doubled = shape;
      doubled[0] *= 2;
      model_input = Array<Real>(doubled);
      ws.model_input = model_input.mutable_data();
    }
    in.x0 = x0 ? x0->data() : nullptr;
    in.mask = mask ? mask->data() : nullptr;
    in.guidance_scale = guidance_scale;
    noise = philox_noise<Real>(seed);
    if (noise_fn) {
      noise = [this](int draw, Real* out, std::size_t n) {
        auto drawn = py::array_t<Real, py::array::c_style | py::array::forcecast>::ensure((*noise_fn)(draw));
        if (!drawn || static_cast<std::size_t>(drawn.size()) != n)
          throw std::invalid_argument("noise_fn must return an array with the latent's number of values");
        std::copy(drawn.data(), drawn.data() + n, out);
      };
    }
  }
  NumpyLoop(const NumpyLoop&) = delete;  // `noise` captures this
  std::size_t count() const { return static_cast<std::size_t>(latent.size()); }

  // The numpy array whose buffer is x (the latent, the doubled model input or a history slot).
  py::array array_of(const Real* x) const {
    if (x == ws.model_input) return model_input;
    for (std::size_t k = 0; k < history.size(); ++k)
      if (x == ws.history[k]) return history[k];
    return latent;
  }
};

// The model's output as a C-contiguous array of Real with n values (a copy only when it is not one already).
template <typename Real>
Array<Real> eps_array(const py::object& out, std::size_t n) {
  auto eps = Array<Real>::ensure(out);
  if (!eps) {
    PyErr_Clear();
    eps = py::array_t<Real, py::array::c_style | py::array::forcecast>::ensure(out);
    if (!eps) throw std::invalid_argument("the model must return an array (numpy or CPU torch tensor)");
  }
  if (static_cast<std::size_t>(eps.size()) != n)
    throw std::invalid_argument("the model returned " + std::to_string(eps.size()) + " values for an input of " +
                                std::to_string(n));
  return eps;
}

template <typename Real>
void run(const Plan& plan, Array<Real> latent, const py::function& model, std::optional<Array<Real>> x0,
         std::optional<Array<Real>> mask, std::optional<double> guidance_scale, std::uint64_t seed,
         std::optional<py::function> noise_fn) {
  NumpyLoop<Real> loop(plan, std::move(latent), std::move(x0), std::move(mask), guidance_scale, seed, std::move(noise_fn));
  Array<Real> held;  // keeps the model's last output alive while the loop reads it
  EpsModel<Real> eps_model = [&](const Real* x, std::size_t n, double t) -> const Real* {
    held = eps_array<Real>(model(loop.array_of(x), t), n);
    return held.data();
  };
  run_plan<Real>(plan, loop.latent.mutable_data(), loop.count(), eps_model, loop.noise, loop.in, loop.ws);
}

// ldmrt::Stepper over numpy buffers: one request's plan, stepped by the caller (a server batching requests).
template <typename Real>
struct PyStepper {
  NumpyLoop<Real> loop;
  Stepper<Real> stepper;
  PyStepper(const Plan& plan, Array<Real> latent, std::optional<Array<Real>> x0, std::optional<Array<Real>> mask,
            std::optional<double> guidance_scale, std::uint64_t seed, std::optional<py::function> noise_fn)
      : loop(plan, std::move(latent), std::move(x0), std::move(mask), guidance_scale, seed, std::move(noise_fn)),
        stepper(plan, loop.latent.mutable_data(), loop.count(), loop.noise, loop.in, loop.ws) {}
};

template <typename Real>
void bind_stepper(py::module_& m, const char* name) {
  using S = PyStepper<Real>;
  py::class_<S>(m, name)
      .def_property_readonly("done", [](const S& s) { return s.stepper.done(); })
      .def_property_readonly("stage", [](const S& s) { return s.stepper.stage(); })
      .def_property_readonly("latent", [](const S& s) { return s.loop.latent; })
      .def("next", [](S& s) {
        const auto e = s.stepper.next();
        return py::make_tuple(s.loop.array_of(e.input), e.timestep, e.doubled, e.shallow);
      }, "(x, t, doubled, shallow) of the current stage; x is the loop's buffer: read it, do not keep or change it")
      .def("apply", [](S& s, const py::object& eps) {
        if (s.stepper.done()) throw std::invalid_argument("the plan is finished: nothing to apply");
        const auto e = s.stepper.next();  // the input's size (and the blend, if next() was not called)
        s.stepper.apply(eps_array<Real>(eps, e.count).data());
      }, py::arg("eps"), "Apply the current stage's update with eps for next()'s x, and advance");
}

template <typename Real>
py::object make_stepper(const Plan& plan, Array<Real> latent, std::optional<Array<Real>> x0,
                        std::optional<Array<Real>> mask, std::optional<double> guidance_scale, std::uint64_t seed,
                        std::optional<py::function> noise_fn) {
  return py::cast(new PyStepper<Real>(plan, std::move(latent), std::move(x0), std::move(mask), guidance_scale, seed,
                                      std::move(noise_fn)), py::return_value_policy::take_ownership);
}

py::dict stage_dict(const Stage& s) {
  py::dict d;
  d["timestep"] = s.timestep;
  d["model_input"] = s.model_input;  // -1: the latent, else a history slot
  d["starts_step"] = s.starts_step;
  d["blend_x0"] = s.blend_x0;
  d["blend_noise"] = s.blend_noise;
  d["dst"] = s.dst;
  d["noise_from"] = s.noise_from;
  d["noise_to"] = s.noise_to;
  d["c_latent"] = s.c_latent;
  d["c_eps"] = s.c_eps;
  d["c_noise"] = s.c_noise;
  d["history_slot"] = s.history_slot;
  d["c_history"] = s.c_history;
  d["push_slot"] = s.push_slot;
  d["push_latent"] = s.push_latent;
  d["push_eps"] = s.push_eps;
  d["guided"] = s.guided;
  d["shallow"] = s.shallow;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ldmrt C++ core: noise schedules, sampler plans, the CPU sampling loop, Philox noise";

  m.def("make_alphas_cumprod", [](const std::string& schedule, int T, double start, double end, double cosine_s) {
    return to_numpy(make_alphas_cumprod(schedule, T, start, end, cosine_s));
  }, py::arg("schedule"), py::arg("num_timesteps"), py::arg("linear_start") = 1e-4, py::arg("linear_end") = 2e-2,
     py::arg("cosine_s") = 8e-3);
  m.def("make_timesteps", [](const std::string& spacing, int steps, const py::array_t<double, py::array::c_style | py::array::forcecast>& ac,
                             int steps_offset) {
    return to_numpy(make_timesteps(spacing, steps, to_vector(ac), steps_offset));
  }, py::arg("spacing"), py::arg("steps"), py::arg("alphas_cumprod"), py::arg("steps_offset") = 0);

  py::class_<Plan>(m, "Plan")
      .def_readonly("sampler", &Plan::sampler)
      .def_readonly("num_steps", &Plan::num_steps)
      .def_readonly("history_slots", &Plan::history_slots)
      .def_readonly("init_x0", &Plan::init_x0)
      .def_readonly("init_noise", &Plan::init_noise)
      .def("noise_draws", &Plan::noise_draws, py::arg("with_mask"))
      .def_property_readonly("stages", [](const Plan& p) {
        py::list out;
        for (const Stage& s : p.stages) out.append(stage_dict(s));
        return out;
      })
      .def_property_readonly("timesteps", [](const Plan& p) {
        std::vector<double> t;
        for (const Stage& s : p.stages)
          if (s.starts_step) t.push_back(s.timestep);
        return to_numpy(t);
      })
      .def("noise_intervals", [](const Plan& p, bool with_mask) {
        // (sigma_from, sigma_to) of every noise draw in loop order; an inpainting blend's draw has (0, 0).
        std::vector<std::pair<double, double>> out;
        for (const Stage& s : p.stages) {
          if (s.starts_step && with_mask) out.emplace_back(0.0, 0.0);
          if (s.c_noise != 0) out.emplace_back(s.noise_from, s.noise_to);
        }
        return out;
      }, py::arg("with_mask") = false)
      .def("__repr__", [](const Plan& p) {
        return "<ldmrt Plan " + p.sampler + ", " + std::to_string(p.num_steps) + " steps, " +
               std::to_string(p.stages.size()) + " model evaluations>";
      });

  m.def("make_plan", [](const std::string& sampler, int steps, const py::array_t<double, py::array::c_style | py::array::forcecast>& ac,
                        std::optional<double> eta, const std::string& spacing, int steps_offset,
                        std::optional<double> final_alpha_cumprod, double strength, int cache_interval,
                        std::pair<double, double> guidance_interval, const std::string& cache_schedule,
                        const std::string& sigma_interpolation, const std::string& respace, bool round_timesteps,
                        bool drop_last_timestep,
                        int original_steps, const std::string& start_noise, std::optional<bool> lower_order_final,
                        bool euler_at_final, const std::string& solver_type, int solver_order,
                        bool prev_timestep_stride) {
    SamplerConfig c;
    c.cache_interval = cache_interval;
    c.cache_schedule = cache_schedule;
    c.guidance_from = guidance_interval.first;
    c.guidance_until = guidance_interval.second;
    c.sampler = sampler;
    c.steps = steps;
    c.alphas_cumprod = to_vector(ac);
    c.eta = eta;
    c.timestep_spacing = spacing;
    c.steps_offset = steps_offset;
    c.sigma_interpolation = sigma_interpolation;
    c.respace = respace;
    c.round_timesteps = round_timesteps;
    c.drop_last_timestep = drop_last_timestep;
    c.original_steps = original_steps;
    c.final_alpha_cumprod = final_alpha_cumprod;
    c.start_noise = start_noise;
    c.lower_order_final = lower_order_final;
    c.euler_at_final = euler_at_final;
    c.solver_type = solver_type;
    c.solver_order = solver_order;
    c.prev_timestep_stride = prev_timestep_stride;
    c.strength = strength;
    return make_plan(c);
  }, py::arg("sampler"), py::arg("steps"), py::arg("alphas_cumprod"), py::arg("eta") = py::none(),
     py::arg("timestep_spacing") = "uniform", py::arg("steps_offset") = 0, py::arg("final_alpha_cumprod") = py::none(),
     py::arg("strength") = 1.0, py::arg("cache_interval") = 1,
     py::arg("guidance_interval") = std::pair<double, double>(0.0, 1.0), py::arg("cache_schedule") = "uniform",
     py::arg("sigma_interpolation") = "log", py::arg("respace") = "", py::arg("round_timesteps") = false,
     py::arg("drop_last_timestep") = false,
     py::arg("original_steps") = 50, py::arg("start_noise") = "default", py::arg("lower_order_final") = py::none(),
     py::arg("euler_at_final") = false, py::arg("solver_type") = "", py::arg("solver_order") = 0,
     py::arg("prev_timestep_stride") = false);
  m.def("sampler_names", &sampler_names);

  m.def("run_plan", &run<float>, py::arg("plan"), py::arg("latent").noconvert(), py::arg("model"),
        py::arg("x0").noconvert() = py::none(), py::arg("mask").noconvert() = py::none(),
        py::arg("guidance_scale") = py::none(), py::arg("seed") = 0, py::arg("noise_fn") = py::none());
  m.def("run_plan", &run<double>, py::arg("plan"), py::arg("latent").noconvert(), py::arg("model"),
        py::arg("x0").noconvert() = py::none(), py::arg("mask").noconvert() = py::none(),
        py::arg("guidance_scale") = py::none(), py::arg("seed") = 0, py::arg("noise_fn") = py::none(),
        "Run a plan in place on a C-contiguous float32/float64 latent holding x_T; the model is called as "
        "model(x, t) and returns eps (with guidance_scale, x is the doubled batch [x; x] = [uncond; cond]).");

  bind_stepper<float>(m, "StepperFloat32");
  bind_stepper<double>(m, "StepperFloat64");
  m.def("stepper", &make_stepper<float>, py::arg("plan"), py::arg("latent").noconvert(),
        py::arg("x0").noconvert() = py::none(), py::arg("mask").noconvert() = py::none(),
        py::arg("guidance_scale") = py::none(), py::arg("seed") = 0, py::arg("noise_fn") = py::none());
  m.def("stepper", &make_stepper<double>, py::arg("plan"), py::arg("latent").noconvert(),
        py::arg("x0").noconvert() = py::none(), py::arg("mask").noconvert() = py::none(),
        py::arg("guidance_scale") = py::none(), py::arg("seed") = 0, py::arg("noise_fn") = py::none(),
        "run_plan's arguments without the model: a stepper over the latent (modified in place) whose next() names "
        "each evaluation and apply(eps) makes its update");

  m.def("randn", [](std::uint64_t seed, std::vector<py::ssize_t> shape, std::uint64_t stream, const std::string& dtype) -> py::array {
    if (dtype == "float32") {
      Array<float> out(shape);
      randn<float>(seed, stream, out.mutable_data(), static_cast<std::size_t>(out.size()));
      return std::move(out);
    }
    if (dtype == "float64") {
      Array<double> out(shape);
      randn<double>(seed, stream, out.mutable_data(), static_cast<std::size_t>(out.size()));
      return std::move(out);
    }
    throw std::invalid_argument("dtype must be float32 or float64, got " + dtype);
  }, py::arg("seed"), py::arg("shape"), py::arg("stream") = 0, py::arg("dtype") = "float32",
     "Standard normal noise from Philox4x32-10 (counter = (pair index, stream), key = seed) and Box-Muller.");
  m.def("philox_words", [](std::uint64_t seed, std::uint64_t stream, std::size_t count) {
    if (count % 4) throw std::invalid_argument("count must be a multiple of 4");
    py::array_t<std::uint32_t> out(static_cast<py::ssize_t>(count));
    philox_words(seed, stream, out.mutable_data(), count);
    return out;
  }, py::arg("seed"), py::arg("stream"), py::arg("count"));
  m.def("philox4x32_10", &philox4x32_10, py::arg("counter"), py::arg("key"));
}
