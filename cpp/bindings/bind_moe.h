// Mixture-of-Experts pieces of the bindings: config fields and per-layer expert tensors for
// lmengine._core.Engine (bind_engine.cpp), and lmengine._core.kernels.moe_forward for tests.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <string>

#include "lmengine/model.h"

namespace lme_py {

// Reads the optional MoE and q/k-norm fields of the Engine config dict (absent: dense model).
void moe_config_from_dict(const pybind11::dict& cfg, lme::ModelConfig& c);

// Fills layer l's MoE weights (router, per-expert views, shared expert) through `get`, the
// Engine binding's tensor lookup: get(name, required).
void moe_layer_weights(const std::function<lme::WeightTensor(const std::string&, bool)>& get,
                       const lme::ModelConfig& c, int32_t l, lme::LayerWeights& L);

}  // namespace lme_py
