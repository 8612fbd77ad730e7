#include "bind_moe.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>
#include <vector>

#include "errors.h"
#include "lmengine/moe_dispatch.h"
#include "lmengine/thread_pool.h"

namespace py = pybind11;

namespace lme_py {

namespace {

template <typename T>
T field_or(const py::dict& cfg, const char* key, T fallback) {
  if (!cfg.contains(key) || cfg[key].is_none()) return fallback;
  try {
    return cfg[key].cast<T>();
  } catch (const py::cast_error&) {
    raise_error("InvalidRequestError", std::string("model config field '") + key + "' has the wrong type");
  }
}

lme::MoEScoring scoring_from(const std::string& s) {
  if (s == "softmax") return lme::MoEScoring::kSoftmax;
  if (s == "sigmoid") return lme::MoEScoring::kSigmoid;
  raise_error("UnsupportedModelError", "MoE scoring function '" + s + "' is not supported (softmax, sigmoid)");
}

// (ggml_type, array, rows, cols) -> a view; the array is kept alive by `keep`.
lme::WeightTensor weight_from_tuple(const py::handle& h, const std::string& name, py::list& keep) {
  py::tuple item;
  try {
    item = h.cast<py::tuple>();
  } catch (const py::cast_error&) {
    raise_error("InvalidRequestError", "tensor '" + name + "' must be (ggml_type, array, rows, cols)");
  }
  if (item.size() != 4) raise_error("InvalidRequestError", "tensor '" + name + "' must be (ggml_type, array, rows, cols)");
  const int32_t type = item[0].cast<int32_t>();
  if (!lme::dtype_is_supported(type)) {
    raise_error("UnsupportedModelError", "tensor '" + name + "' has unsupported type id " + std::to_string(type));
  }
  py::array arr = py::array::ensure(item[1]);
  if (!arr || !(arr.flags() & py::array::c_style)) {
    raise_error("InvalidRequestError", "tensor '" + name + "' must be a C-contiguous array");
  }
  lme::WeightTensor t;
  t.type = static_cast<lme::DType>(type);
  t.rows = item[2].cast<int64_t>();
  t.cols = item[3].cast<int64_t>();
  if (t.rows <= 0 || t.cols <= 0 || t.cols % lme::dtype_block_size(t.type) != 0) {
    raise_error("ModelFileError", "tensor '" + name + "' has an invalid shape for its type " + lme::dtype_name(t.type));
  }
  const int64_t expect = t.rows * lme::dtype_row_bytes(t.type, t.cols);
  if (static_cast<int64_t>(arr.nbytes()) != expect) {
    raise_error("ModelFileError", "tensor '" + name + "' holds " + std::to_string(arr.nbytes()) +
                                      " bytes, its shape and type need " + std::to_string(expect));
  }
  t.data = static_cast<const uint8_t*>(arr.data());
  keep.append(arr);
  return t;
}

lme::WeightTensor f32_vector(const py::handle& h, const std::string& name, py::list& keep) {
  py::array_t<float, py::array::c_style | py::array::forcecast> a =
      py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(h);
  if (!a || a.ndim() != 1) raise_error("InvalidRequestError", name + " must be a 1-D float array");
  keep.append(a);
  lme::WeightTensor t;
  t.type = lme::DType::F32;
  t.data = reinterpret_cast<const uint8_t*>(a.data());
  t.rows = 1;
  t.cols = a.shape(0);
  return t;
}

// One MoE layer held with its own thread pool and scratch, so repeated forward() calls cost what
// an engine step's MoE layer costs (kernels.MoELayer; kernels.moe_forward is one call of it).
class PyMoELayer {
 public:
  PyMoELayer(const py::handle& router, const py::sequence& gate, const py::sequence& up, const py::sequence& down,
             int32_t top_k, const std::string& scoring, bool norm_topk_prob, int32_t n_group, int32_t topk_group,
             float routed_scaling_factor, const py::object& score_bias, const py::object& shared,
             const py::object& shared_gate_inp, int32_t activation_bits, int n_threads,
             int64_t fp32_prompt_min_tokens) {
    if (activation_bits != 8 && activation_bits != 16) raise_error("InvalidRequestError", "activation_bits must be 8 or 16");
    if (fp32_prompt_min_tokens < 0) raise_error("InvalidRequestError", "fp32_prompt_min_tokens must be >= 0");
    fp32_min_ = fp32_prompt_min_tokens;
    if (n_threads < 1 || n_threads > 256) raise_error("InvalidRequestError", "n_threads must be in [1, 256]");
    moe_layer_from_python(router, gate, up, down, top_k, scoring, norm_topk_prob, n_group, topk_group,
                          routed_scaling_factor, score_bias, shared, shared_gate_inp, layer_);
    two_level_ = activation_bits == 16;
    pool_ = std::make_unique<lme::ThreadPool>(n_threads);
  }

  py::tuple forward(const py::array& x_in) {
    auto x = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(x_in);
    const int64_t d = layer_.d_model;
    if (!x || x.ndim() != 2 || x.shape(0) < 1 || x.shape(1) != d) {
      raise_error("InvalidRequestError", "x must be float32 [T >= 1, d = " + std::to_string(d) + "]");
    }
    const int64_t T = x.shape(0);
    const lme::MoEConfig& c = layer_.config;
    py::array_t<float> out({T, d});
    py::array_t<int64_t> counts(c.n_experts);
    const float* xp = x.data();
    float* op = out.mutable_data();
    int64_t* cp = counts.mutable_data();
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mutex_);
      dispatch_.reserve(c, d, {&layer_.weights}, T, pool_->size(), 1);
      // The T rows as one sequence's chunk: the engine's prompt-chunk rule picks their path.
      const int64_t moe_min = lme::moe_f32_min_tokens(c, fp32_min_);
      f32_tok_.assign(static_cast<size_t>(T), moe_min > 0 && T >= moe_min ? 1 : 0);
      pool_->run(
          [&](int tid, int nth) {
            lme::ParallelContext pc(*pool_, tid, nth);
            dispatch_.forward(pc, c, layer_.weights, xp, T, d, two_level_, two_level_, op, cp, 0, f32_tok_.data());
          },
          lme::MoEDispatch::kOpsPerLayer + 1);
    }
    return py::make_tuple(out, counts);
  }

 private:
  MoELayerArgs layer_;
  bool two_level_ = true;
  int64_t fp32_min_ = 0;
  std::vector<uint8_t> f32_tok_;
  std::unique_ptr<lme::ThreadPool> pool_;
  lme::MoEDispatch dispatch_;
  std::mutex mutex_;
};

}  // namespace

void moe_layer_from_python(const py::handle& router, const py::sequence& gate, const py::sequence& up,
                           const py::sequence& down, int32_t top_k, const std::string& scoring, bool norm_topk_prob,
                           int32_t n_group, int32_t topk_group, float routed_scaling_factor,
                           const py::object& score_bias, const py::object& shared, const py::object& shared_gate_inp,
                           MoELayerArgs& out) {
  lme::MoEConfig& c = out.config;
  c.n_experts = static_cast<int32_t>(py::len(gate));
  c.top_k = top_k;
  c.scoring = scoring_from(scoring);
  c.norm_topk_prob = norm_topk_prob;
  c.n_group = n_group;
  c.topk_group = topk_group;
  c.routed_scaling_factor = routed_scaling_factor;
  lme::MoELayerWeights& w = out.weights;
  py::list& keep = out.keep;
  w.router = weight_from_tuple(router, "router", keep);
  for (size_t e = 0; e < py::len(gate); ++e) w.gate.push_back(weight_from_tuple(gate[e], "gate." + std::to_string(e), keep));
  for (size_t e = 0; e < py::len(up); ++e) w.up.push_back(weight_from_tuple(up[e], "up." + std::to_string(e), keep));
  for (size_t e = 0; e < py::len(down); ++e) w.down.push_back(weight_from_tuple(down[e], "down." + std::to_string(e), keep));
  if (!w.gate.empty()) c.d_ff_expert = static_cast<int32_t>(w.gate[0].rows);
  if (!score_bias.is_none()) w.score_bias = f32_vector(score_bias, "score_bias", keep);
  if (!shared.is_none()) {
    py::sequence s = shared.cast<py::sequence>();
    if (py::len(s) != 3) raise_error("InvalidRequestError", "shared must be (gate, up, down)");
    w.shared_gate = weight_from_tuple(s[0], "shared.gate", keep);
    w.shared_up = weight_from_tuple(s[1], "shared.up", keep);
    w.shared_down = weight_from_tuple(s[2], "shared.down", keep);
    c.d_ff_shared = static_cast<int32_t>(w.shared_gate.rows);
  }
  if (!shared_gate_inp.is_none()) {
    w.shared_gate_inp = f32_vector(shared_gate_inp, "shared_gate_inp", keep);
    c.shared_gate = true;
  }
  out.d_model = w.router.cols;
  raise_if_error(lme::validate_moe_layer(c, out.d_model, w, ""));
}

void moe_config_from_dict(const py::dict& cfg, lme::ModelConfig& c) {
  const std::string qk = field_or<std::string>(cfg, "qk_norm", "");
  if (qk == "") {
    c.qk_norm = 0;
  } else if (qk == "head") {
    c.qk_norm = 1;
  } else if (qk == "full") {
    c.qk_norm = 2;
  } else {
    raise_error("InvalidRequestError", "qk_norm must be '', 'head' or 'full', got '" + qk + "'");
  }
  lme::MoEConfig& m = c.moe;
  m.n_experts = field_or<int32_t>(cfg, "n_experts", 0);
  if (m.n_experts == 0) return;
  m.top_k = field_or<int32_t>(cfg, "top_k", 0);
  m.scoring = scoring_from(field_or<std::string>(cfg, "moe_scoring", "softmax"));
  m.norm_topk_prob = field_or<bool>(cfg, "norm_topk_prob", false);
  m.n_group = field_or<int32_t>(cfg, "n_group", 1);
  m.topk_group = field_or<int32_t>(cfg, "topk_group", 1);
  m.routed_scaling_factor = field_or<float>(cfg, "routed_scaling_factor", 1.f);
  m.d_ff_expert = field_or<int32_t>(cfg, "d_ff_expert", 0);
  m.d_ff_shared = field_or<int32_t>(cfg, "d_ff_shared", 0);
  m.shared_gate = field_or<bool>(cfg, "shared_gate", false);
  const std::vector<bool> layers = field_or<std::vector<bool>>(cfg, "moe_layers", std::vector<bool>());
  if (static_cast<int32_t>(layers.size()) != c.n_layers) {
    raise_error("InvalidRequestError", "moe_layers must list n_layers booleans");
  }
  c.moe_layers.assign(layers.begin(), layers.end());
  raise_if_error(lme::validate_moe_config(m));
}

void moe_layer_weights(const std::function<lme::WeightTensor(const std::string&, bool)>& get,
                       const lme::ModelConfig& c, int32_t l, lme::LayerWeights& L) {
  const std::string p = "blk." + std::to_string(l) + ".";
  if (c.qk_norm != 0) {
    L.q_norm = get(p + "attn_q_norm", true);
    L.k_norm = get(p + "attn_k_norm", true);
  }
  if (c.moe.n_experts == 0 || c.moe_layers[l] == 0) return;
  lme::MoELayerWeights& w = L.moe;
  w.router = get(p + "ffn_gate_inp", true);
  w.score_bias = get(p + "exp_probs_b", false);
  for (int32_t e = 0; e < c.moe.n_experts; ++e) {
    const std::string s = "." + std::to_string(e);
    w.gate.push_back(get(p + "ffn_gate_exps" + s, true));
    w.up.push_back(get(p + "ffn_up_exps" + s, true));
    w.down.push_back(get(p + "ffn_down_exps" + s, true));
  }
  const bool shared = c.moe.d_ff_shared > 0;
  w.shared_gate = get(p + "ffn_gate_shexp", shared);
  w.shared_up = get(p + "ffn_up_shexp", shared);
  w.shared_down = get(p + "ffn_down_shexp", shared);
  w.shared_gate_inp = get(p + "ffn_gate_inp_shexp", c.moe.shared_gate);
}

}  // namespace lme_py

void bind_moe(py::module_& m) {
  py::module_ k = m.attr("kernels").cast<py::module_>();
  const char* doc =
      "Weights are (ggml_type, array, rows, cols) tuples as Engine takes them: router [E, d], gate/up "
      "lists of E [ff, d], down a list of E [d, ff]; shared = (gate, up, down) of the shared expert, "
      "shared_gate_inp float32[d] scales it by sigmoid(w . x); score_bias float32[E] is added to "
      "sigmoid scores for the choice only. fp32_prompt_min_tokens > 0: the engine's prompt-chunk rule "
      "for dense layers; the T rows (one sequence's chunk) are multiplied with fp32 activations when "
      "T >= fp32_prompt_min_tokens * max(1, E // top_k), as the engine's MoE layers do (0: never). "
      "forward(x: float32[T, d]) -> (out float32[T, d], counts int64[E]).";
  py::class_<lme_py::PyMoELayer>(k, "MoELayer", doc)
      .def(py::init<const py::handle&, const py::sequence&, const py::sequence&, const py::sequence&, int32_t,
                    const std::string&, bool, int32_t, int32_t, float, const py::object&, const py::object&,
                    const py::object&, int32_t, int, int64_t>(),
           py::arg("router"), py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("top_k"),
           py::arg("scoring") = "softmax", py::arg("norm_topk_prob") = false, py::arg("n_group") = 1,
           py::arg("topk_group") = 1, py::arg("routed_scaling_factor") = 1.0f, py::arg("score_bias") = py::none(),
           py::arg("shared") = py::none(), py::arg("shared_gate_inp") = py::none(),
           py::arg("activation_bits") = 16, py::arg("n_threads") = 2, py::arg("fp32_prompt_min_tokens") = 0)
      .def("forward", &lme_py::PyMoELayer::forward, py::arg("x"));
  static const std::string fdoc =
      std::string("moe_forward(x, router, gate, up, down, top_k, ...): one forward() of a fresh MoELayer. ") + doc;
  k.def(
      "moe_forward",
      [](const py::array& x, const py::handle& router, const py::sequence& gate, const py::sequence& up,
         const py::sequence& down, int32_t top_k, const std::string& scoring, bool norm_topk_prob, int32_t n_group,
         int32_t topk_group, float routed_scaling_factor, const py::object& score_bias, const py::object& shared,
         const py::object& shared_gate_inp, int32_t activation_bits, int n_threads,
         int64_t fp32_prompt_min_tokens) {
        auto xa = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(x);
        if (!xa || xa.ndim() != 2) lme_py::raise_error("InvalidRequestError", "x must be float32 [T >= 1, d]");
        lme_py::PyMoELayer layer(router, gate, up, down, top_k, scoring, norm_topk_prob, n_group, topk_group,
                                 routed_scaling_factor, score_bias, shared, shared_gate_inp, activation_bits,
                                 n_threads, fp32_prompt_min_tokens);
        return layer.forward(xa);
      },
      py::arg("x"), py::arg("router"), py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("top_k"),
      py::arg("scoring") = "softmax", py::arg("norm_topk_prob") = false, py::arg("n_group") = 1,
      py::arg("topk_group") = 1, py::arg("routed_scaling_factor") = 1.0f, py::arg("score_bias") = py::none(),
      py::arg("shared") = py::none(), py::arg("shared_gate_inp") = py::none(), py::arg("activation_bits") = 16,
      py::arg("n_threads") = 2, py::arg("fp32_prompt_min_tokens") = 0, fdoc.c_str());
}
