// Decoder-only transformer of the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) running
// batched steps over the paged KV cache.
//
// One step takes any mix of sequences: each contributes a chunk of new tokens (a whole prompt,
// a prompt chunk, or one decode token) appended at its current length. All tokens of the step
// go through each weight matrix together, so weights are read once per step, not per sequence.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "lmengine/kv_cache.h"
#include "lmengine/quant.h"
#include "lmengine/status.h"
#include "lmengine/thread_pool.h"

namespace lme {

struct ModelConfig {
  int32_t n_layers = 0;
  int32_t d_model = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t d_ff = 0;
  int32_t vocab_size = 0;
  int64_t max_context = 0;
  float rms_eps = 1e-5f;
  float attn_scale = 0.f;      // 1/sqrt(head_dim) unless the model says otherwise
  bool rope_interleaved = false;  // rotate adjacent pairs (GGUF llama) instead of halves (HF)
  std::vector<float> rope_inv_freq;  // head_dim / 2 frequencies, scaling already applied
  int32_t sliding_window = 0;  // 0: attend to the whole context
  bool qkv_bias = false;
  // 16: activations of quantized products are two 8-bit rows (value + rounding residual), close
  // to fp32 results; 8: one 8-bit row, as llama.cpp does (faster prefill, ~1% logit error).
  int32_t activation_bits = 16;
  int32_t two_level_mask = 31;  // which products get two-level rows when activation_bits == 16
  // A sequence's chunk of at least this many tokens (a prompt chunk) multiplies quantized weights
  // with fp32 activations instead (matmul_rows_f32: faster there, and exact activations); 0: never.
  int32_t f32_prompt_min_tokens = 8;
};

// Product classes for ModelConfig::two_level_mask.
enum : int32_t {
  kTwoLevelQKV = 1,
  kTwoLevelO = 2,
  kTwoLevelGateUp = 4,
  kTwoLevelDown = 8,
  kTwoLevelHead = 16,
};

// A 2-D weight stored row-major: `rows` rows of `cols` elements in dtype `type`. 1-D vectors
// (norm weights, biases) are always F32 with rows == 1.
struct WeightTensor {
  DType type = DType::F32;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  const float* f32() const { return reinterpret_cast<const float*>(data); }
};

struct LayerWeights {
  WeightTensor attn_norm, wq, wk, wv, wo, bq, bk, bv;
  WeightTensor ffn_norm, w_gate, w_up, w_down;
};

struct ModelWeights {
  WeightTensor tok_embd, out_norm, lm_head;
  std::vector<LayerWeights> layers;
};

// Checks every tensor's shape and type against the config (before any memory is read).
Status validate_model(const ModelConfig& c, const ModelWeights& w);

// Where a step's wall time goes (measured barrier to barrier by thread 0).
enum OpKind : int {
  kOpEmbed = 0,
  kOpNormQuant,   // RMSNorm + activation conversion for the next products
  kOpMatmulAttn,  // Q, K, V and O products
  kOpRopeKV,      // bias, RoPE, K/V written into pages
  kOpAttention,
  kOpMatmulFFN,   // gate, up and down products
  kOpActivation,  // SiLU * up and its conversion
  kOpLMHead,      // final norm + LM head
  kNumOpKinds
};
const char* op_kind_name(int kind);

struct StepSequence {
  int32_t seq = -1;
  const int32_t* tokens = nullptr;
  int32_t n_tokens = 0;
  bool all_logits = false;  // logits for every new token, else only for the last one
};

class Engine {
 public:
  Engine(ModelConfig config, ModelWeights weights, const KVCacheConfig& kv_config, int n_threads);
  ~Engine();

  const ModelConfig& config() const { return config_; }
  KVCache& kv() { return kv_; }
  int n_threads() const { return pool_.size(); }

  // Rows of logits step() writes for this batch (sum of n_tokens or 1 per sequence).
  static int64_t output_rows(const std::vector<StepSequence>& batch);
  // Validates the whole batch, reserves KV pages, then runs the forward pass and writes
  // output_rows(batch) x vocab_size floats to `logits`. On error nothing is changed.
  Status step(const std::vector<StepSequence>& batch, float* logits);

  // Accumulated wall seconds per OpKind since the last reset, plus steps and tokens run.
  const double* op_seconds() const { return op_seconds_; }
  int64_t steps_run() const { return steps_run_; }
  int64_t tokens_run() const { return tokens_run_; }
  void reset_op_seconds();

 private:
  struct Scratch;
  void forward(ParallelContext& pc, const std::vector<StepSequence>& batch, float* logits);
  void ensure_scratch(int64_t n_tokens, int64_t n_out, int64_t max_ctx);

  ModelConfig config_;
  ModelWeights weights_;
  KVCache kv_;
  ThreadPool pool_;
  std::unique_ptr<Scratch> scratch_;
  double op_seconds_[kNumOpKinds] = {};
  int64_t steps_run_ = 0;
  int64_t tokens_run_ = 0;
};

}  // namespace lme
