// Mixture-of-Experts pieces of the bindings: config fields and per-layer expert tensors for
// lmengine._core.Engine (bind_engine.cpp), and lmengine._core.kernels.moe_forward for tests.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <string>

#include "lmengine/model.h"
#include "lmengine/moe_dispatch.h"

namespace lme_py {

// Reads the optional MoE and q/k-norm fields of the Engine config dict (absent: dense model).
void moe_config_from_dict(const pybind11::dict& cfg, lme::ModelConfig& c);

// Fills layer l's MoE weights (router, per-expert views, shared expert) through `get`, the
// Engine binding's tensor lookup: get(name, required).
void moe_layer_weights(const std::function<lme::WeightTensor(const std::string&, bool)>& get,
                       const lme::ModelConfig& c, int32_t l, lme::LayerWeights& L);

// One MoE layer given as the arguments of kernels.moe_forward (and cuda.moe_forward): weight
// views into the arrays, which `keep` holds alive, checked by validate_moe_layer (typed errors).
struct MoELayerArgs {
  lme::MoEConfig config;
  lme::MoELayerWeights weights;
  int64_t d_model = 0;
  pybind11::list keep;
};

void moe_layer_from_python(const pybind11::handle& router, const pybind11::sequence& gate,
                           const pybind11::sequence& up, const pybind11::sequence& down,
                           int32_t top_k, const std::string& scoring, bool norm_topk_prob,
                           int32_t n_group, int32_t topk_group, float routed_scaling_factor,
                           const pybind11::object& score_bias, const pybind11::object& shared,
                           const pybind11::object& shared_gate_inp, MoELayerArgs& out);

}  // namespace lme_py
