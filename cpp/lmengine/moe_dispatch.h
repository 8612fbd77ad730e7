// Mixture-of-Experts feed-forward: routing and expert dispatch on the CPU.
//
// One MoE layer over T normalised token rows x [T, d]:
//   router logits  = W_router · x                                   [T, E]
//   scores         = softmax(logits)            (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V2)
//                  | sigmoid(logits)            (DeepSeek-V3; + a bias used only for choosing,
//                                                experts chosen inside the top topk_group groups)
//   top-k per token, weights = scores of the chosen experts, optionally renormalised to sum 1,
//   then × routed_scaling_factor
//   histogram of the T·k (token, slot) pairs per expert -> prefix sum -> pairs grouped by expert
//   per expert e with n_e > 0 pairs: gathered activation rows [n_e] -> gate, up [n_e, ff]
//   -> silu(gate)·up -> down [n_e, d]
//   out[t] = Σ_slot weight(t, slot) · y[pair(t, slot)]    (slot order: no dependence on threads)
//          + shared(t) · (sigmoid(w_sg · x[t]) if the model gates its shared expert, else 1)
//
// Every product is a matmul_rows call on the weights as stored (quantized or float), with the
// activation rows converted once per token and copied to each of its k pairs. All working memory
// lives in MoEDispatch and is sized by reserve(): steady-state steps allocate nothing.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lmengine/status.h"
#include "lmengine/thread_pool.h"
#include "lmengine/weight_tensor.h"

namespace lme {

enum class MoEScoring : int32_t { kSoftmax = 0, kSigmoid = 1 };

struct MoEConfig {
  int32_t n_experts = 0;  // 0: no MoE layer in the model
  int32_t top_k = 0;
  MoEScoring scoring = MoEScoring::kSoftmax;
  bool norm_topk_prob = false;  // renormalise the k chosen weights to sum 1
  int32_t n_group = 1;          // group-limited choice: experts split into n_group equal groups,
  int32_t topk_group = 1;       // only the topk_group best groups (sum of their top-2) compete
  float routed_scaling_factor = 1.f;
  int32_t d_ff_expert = 0;  // inner width of one routed expert
  int32_t d_ff_shared = 0;  // inner width of the shared expert(s), 0: none
  bool shared_gate = false; // Qwen2-MoE: shared output × sigmoid(shared_gate_inp · x)
};

// One MoE layer's weights. Experts are per-expert 2-D views so that both the GGUF layout (one
// 3-D tensor per projection) and HF's per-expert tensors are passed without copies.
struct MoELayerWeights {
  WeightTensor router;      // [E, d]
  WeightTensor score_bias;  // [1, E] F32, sigmoid scoring: added for the choice only (optional)
  std::vector<WeightTensor> gate, up, down;  // E each: [ff, d], [ff, d], [d, ff]
  WeightTensor shared_gate_inp;              // [1, d] F32 when MoEConfig::shared_gate
  WeightTensor shared_gate, shared_up, shared_down;  // [ffs, d], [ffs, d], [d, ffs]
  bool present() const { return !gate.empty(); }
};

// Chunk length from which a sequence's tokens take fp32 activations in MoE layers: the dense
// models' rule (dense_min, ModelConfig::f32_prompt_min_tokens) times E / k, so that each expert
// expects about dense_min of the chunk's rows (the fp32 path dequantizes weight panels, which
// only pays off over several rows); 0: never.
int64_t moe_f32_min_tokens(const MoEConfig& c, int64_t dense_min);

// Checks the layer's tensors against the config; messages name the tensor (prefix + name).
Status validate_moe_config(const MoEConfig& c);
Status validate_moe_layer(const MoEConfig& c, int64_t d_model, const MoELayerWeights& w,
                          const std::string& prefix);

// Expert histograms of an engine's forward passes: the last pass and the sum since reset,
// [n_layers][n_experts] (rows of dense layers stay 0).
struct MoEStats {
  int32_t n_layers = 0, n_experts = 0;
  std::vector<int64_t> last, total;
  int64_t passes = 0;
  void init(int32_t layers, int32_t experts);
  void reset();
  // Adds `last` to `total` (called once per pass).
  void accumulate();
  // Distinct experts that received at least one token in the last pass, per layer.
  void distinct_last(int32_t* out) const;
};

class MoEDispatch {
 public:
  // Sizes the scratch for up to max_tokens tokens per call and n_threads threads, for the given
  // layers (their weight types and widths), and n_slots distinct `slot`s of forward(). Call
  // outside the parallel region.
  void reserve(const MoEConfig& c, int64_t d_model, const std::vector<const MoELayerWeights*>& layers,
               int64_t max_tokens, int n_threads, int64_t n_slots);

  // Called by every thread of one ThreadPool::run. x: T rows of d floats (normalised input);
  // out: T rows of d floats, overwritten with the layer's output; counts (optional): n_experts
  // int64 written with the tokens each expert received. two_level_*: activation rows of
  // quantized products carry an 8-bit residual row too (ModelConfig::activation_bits == 16).
  // Uses 9 for_chunks ops. slot (< n_slots): a value distinct for each call within one
  // ThreadPool::run (the layer index), see op_sizes_. f32_tok (optional, [T]): tokens whose
  // products take fp32 activations (matmul_rows_f32), the engine's prompt-chunk tokens; a token's
  // path never depends on the other tokens routed to its experts.
  void forward(ParallelContext& pc, const MoEConfig& c, const MoELayerWeights& w, const float* x,
               int64_t T, int64_t d, bool two_level_gate_up, bool two_level_down, float* out,
               int64_t* counts, int64_t slot, const uint8_t* f32_tok = nullptr);

  static constexpr int kOpsPerLayer = 9;

 private:
  int64_t cap_tokens_ = 0, cap_pairs_ = 0;
  int64_t slot_bytes_ = 0;   // bytes of one activation row (value or residual), 64-aligned
  int64_t row_tmp_len_ = 0;  // floats of one thread's residual-quantization row
  int64_t mm_tmp_len_ = 0;   // floats of one thread's two-level product tile
  int64_t ff_cap_ = 0, ffs_cap_ = 0, e_cap_ = 0;
  std::vector<uint8_t> act_router_, act_shared_, act_tok_;  // [T][2][slot]
  std::vector<uint8_t> act_pairs_, act_mid_, act_shared_mid_;  // [P or T][2][slot]
  std::vector<float> logits_;                        // [T][E]
  std::vector<int32_t> sel_expert_;                  // [T][k]
  std::vector<float> sel_weight_;                    // [T][k]
  std::vector<int32_t> pair_of_slot_;                // [T][k] -> position in grouped order
  std::vector<int32_t> pair_token_;                  // [P] token of each grouped pair
  std::vector<int64_t> offsets_;                     // [E + 1] prefix sum of the histogram
  std::vector<int32_t> active_;                      // experts with >= 1 pair
  std::vector<int64_t> chunk_start_;                 // [active + 1] first chunk of each
  std::vector<float> h_gate_, h_up_, y_;             // [P][ff], [P][ff], [P][d]
  // fp32-path rows: tokens' inputs and shared silu rows [T]; pairs' inputs and silu rows [P].
  std::vector<const float*> tok_rows_, shared_mid_rows_, pair_rows_, mid_rows_;
  std::vector<uint8_t> pair_f32_;                    // [P] the pair's token flag
  std::vector<float> s_gate_, s_up_, s_out_, s_scale_;  // shared expert: [T][ffs] x2, [T][d], [T]
  std::vector<float> route_tmp_;                     // [thread][2E]
  std::vector<float> row_tmp_, mm_tmp_;              // [thread][...]
  // Per slot: active experts and the chunk counts of the two expert-product ops. A thread that
  // was descheduled may read them after the others have moved on to the next layer, so each
  // layer's values stay in their own slot for the whole run (a wrong op size would hang it).
  std::vector<int64_t> op_sizes_;  // [slot][3]
  int n_threads_ = 0;
};

}  // namespace lme
