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

#include "lmengine/attention_sparse.h"
#include "lmengine/counters.h"
#include "lmengine/kv_cache.h"
#include "lmengine/moe_dispatch.h"
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
  // Gemma-style options; all off for the Llama family.
  float embed_scale = 0.f;       // embeddings are multiplied by this (Gemma: sqrt(d_model)); 0: none
  int32_t ffn_activation = 0;    // kActSiLU or kActGeluTanh, applied to the gate product
  bool post_norms = false;       // RMSNorm of the attention and MLP outputs before each residual add
  // Per-layer window (0 = whole context); empty: sliding_window for every layer. Layers with a
  // window use rope_inv_freq_local when it is given (Gemma 3: local base 10000, global 1e6).
  std::vector<int32_t> layer_sliding_window;
  std::vector<float> rope_inv_freq_local;
  // 16: quantized products take wide activation rows (quant.h: 16-bit blocks, or value + residual
  // 8-bit rows for K-quants), close to fp32 results; 8: one 8-bit row, as llama.cpp does (~1%
  // logit error).
  int32_t activation_bits = 16;
  int32_t two_level_mask = 31;  // which products get wide rows when activation_bits == 16
  // RMSNorm of q and k before RoPE: 0 none, 1 per head over head_dim (Qwen3), 2 over the whole
  // projection (OLMoE).
  int32_t qk_norm = 0;
  // Mixture-of-Experts FFN (moe.n_experts > 0): moe_layers[l] != 0 marks the layers whose FFN is
  // routed; the others are dense with width d_ff (DeepSeek's first k layers, Qwen2-MoE's
  // mlp_only_layers).
  MoEConfig moe;
  std::vector<uint8_t> moe_layers;
  // A sequence's chunk of at least this many tokens (a prompt chunk) multiplies quantized weights
  // with fp32 activations instead (matmul_rows_f32: faster there, and exact activations); 0: never.
  int32_t f32_prompt_min_tokens = 8;
  // Dense decode attention splits a token's context into flash-decoding parts of at least this
  // many KV pages (up to 8 parts, merged by log-sum-exp); 0: never split.
  int32_t decode_split_pages = 16;
  // Block-sparse selection scores a token's candidate blocks in work items of this many blocks
  // (>= 1), so one token's KV heads do not leave threads idle; the kept set does not depend on it.
  int32_t sparse_score_blocks = 1024;
};

enum : int32_t { kActSiLU = 0, kActGeluTanh = 1 };

// Product classes for ModelConfig::two_level_mask.
enum : int32_t {
  kTwoLevelQKV = 1,
  kTwoLevelO = 2,
  kTwoLevelGateUp = 4,
  kTwoLevelDown = 8,
  kTwoLevelHead = 16,
};

struct LayerWeights {
  WeightTensor attn_norm, wq, wk, wv, wo, bq, bk, bv;
  WeightTensor ffn_norm, w_gate, w_up, w_down;  // dense FFN (absent in MoE layers)
  WeightTensor q_norm, k_norm;                   // ModelConfig::qk_norm != 0
  WeightTensor post_attn_norm, post_ffn_norm;    // ModelConfig::post_norms
  MoELayerWeights moe;                           // MoE layers
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
  kOpBlockSummary,     // key min/max of the blocks a step wrote (sparse attention enabled)
  kOpSparseSelect,     // block scores and top-n per sparse decode token and KV head
  kOpSparseAttention,  // attention over the selected blocks + LSE merge
  kNumOpKinds
};
const char* op_kind_name(int kind);

struct StepSequence {
  int32_t seq = -1;
  const int32_t* tokens = nullptr;
  int32_t n_tokens = 0;
  bool all_logits = false;  // logits for every new token, else only for the last one
  // A one-token chunk attends block-sparsely (see attention_sparse.h); longer chunks (prompts,
  // rectification) always attend densely. Needs a cache with block summaries.
  bool sparse = false;
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

  // K/V import (KV transfer, prefix restore; kv_import.cpp): writes post-RoPE K and V of positions
  // [pos0, pos0 + n) for layers [layer0, layer0 + n_layers) into the sequence's pages, in the
  // cache's dtype. k, v: [n_layers][n][n_kv_heads][head_dim] fp32. pos0 <= length (no gaps); a
  // write past the length must cover every layer, and then the length becomes pos0 + n.
  // Validates everything (and reserves pages) before writing; on error nothing is changed.
  Status seq_write_kv(int32_t seq, int32_t layer0, int32_t n_layers, int64_t pos0, int64_t n, const float* k,
                      const float* v);
  // Reads positions [pos0, pos0 + n) < length of one layer back as fp32 [n][n_kv_heads][head_dim].
  Status seq_read_kv(int32_t seq, int32_t layer, int64_t pos0, int64_t n, float* k, float* v);

  // Accumulated wall seconds per OpKind since the last reset, plus steps and tokens run.
  const double* op_seconds() const { return op_seconds_; }
  int64_t steps_run() const { return steps_run_; }
  int64_t tokens_run() const { return tokens_run_; }
  void reset_op_seconds();
  // Per-pass work records (FLOPs, bytes, wall time) for S-MBU / S-MFU; see counters.h.
  PassCounters& counters() { return counters_; }
  // Tokens routed to each expert per layer: in the last step and accumulated since reset.
  const MoEStats& moe_stats() const { return moe_stats_; }
  void reset_moe_stats() { moe_stats_.reset(); }

  // Block-sparse decoding: selection parameters (needs a KV cache built with block_summaries) and
  // the blocks read so far (reset with reset_op_seconds).
  Status set_sparse_attention(const SparseAttentionConfig& c);
  const SparseCounters& sparse_counters() const { return sparse_.counters(); }

 private:
  struct Scratch;
  void forward(ParallelContext& pc, const std::vector<StepSequence>& batch, float* logits);
  void plan_decode_splits();  // dense single-token attention items of the step (model.cpp)
  void ensure_scratch(int64_t n_tokens, int64_t n_out);

  ModelConfig config_;
  ModelWeights weights_;
  KVCache kv_;
  ThreadPool pool_;
  std::unique_ptr<Scratch> scratch_;
  BlockSparseDecode sparse_;
  double op_seconds_[kNumOpKinds] = {};
  int64_t steps_run_ = 0;
  int64_t tokens_run_ = 0;
  PassCounters counters_;
  MoEStats moe_stats_;
};

}  // namespace lme
