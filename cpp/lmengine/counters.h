// Per-pass work counters: what each forward pass computed and moved, recorded for the S-MBU /
// S-MFU metrics of MoE-CAP (arXiv 2412.07067; formulas in docs/performance.md).
//
// Every Engine::step calls PassCounters::begin_pass before its forward pass and end_pass after
// it. begin_pass fills the dense terms from the batch shape alone (closed forms over the
// sequences' positions, O(tokens) integer arithmetic); end_pass stamps the wall time and commits
// the record to a ring buffer allocated once at construction. Steady-state passes allocate
// nothing and take no lock: the Engine's caller serialises steps, and reading the ring happens
// between steps (the binding holds the engine's mutex).
//
// The counts are additive terms, so a feature adds its own between begin_pass and end_pass:
//   - MoE layers: moe_layer_terms() from the layer's per-expert hit histogram (the dispatch's
//     by-product), then add_moe_layer(). A layer with experts has no dense FFN tensors, so
//     configure() leaves its dense-FFN terms out.
//   - Block-sparse attention (ReSA): block_sparse_attention_terms() from the per-layer counts of
//     selected blocks and scored block summaries, then replace_attention().
// Conventions: one multiply-add = 2 FLOPs; bytes are the bytes of the stored format (quantized
// blocks with their scales, the KV cache's dtype); a weight is counted once per pass however
// many tokens the pass has (every product tiles tokens over each weight row).
#pragma once

#include <chrono>
#include <cstdint>
#include <utility>
#include <vector>

#include "lmengine/kv_cache.h"
#include "lmengine/quant.h"

namespace lme {

struct ModelConfig;
struct ModelWeights;
struct StepSequence;

enum class PassMode : int32_t { kPrefill = 0, kDecode = 1, kMixed = 2 };
const char* pass_mode_name(int32_t mode);

// FLOPs of one pass, by where they are spent.
enum FlopTerm : int {
  kFlopAttnProj = 0,   // Q, K, V, O products and the QKV biases
  kFlopAttnScores,     // q.K and p.V over the attended keys (4 * n_heads * head_dim per key)
  kFlopDenseFFN,       // gate, up, down products of dense layers
  kFlopLMHead,         // output head on the rows whose logits are wanted
  kFlopNorm,           // RMSNorms, 4 per element (square, add, scale, weight)
  kFlopRouter,         // MoE router logits
  kFlopExperts,        // MoE routed experts: top_k per token
  kFlopSharedExperts,  // MoE shared experts
  kNumFlopTerms
};
const char* flop_term_name(int term);

// Weight bytes read by one pass, by role.
enum WeightTerm : int {
  kWeightAttn = 0,       // Q, K, V, O (+ biases) of every layer
  kWeightDenseFFN,       // gate, up, down of dense layers
  kWeightEmbed,          // the embedding rows looked up (one row per token)
  kWeightLMHead,         // the whole output head
  kWeightNorm,           // RMSNorm weights
  kWeightRouter,         // MoE router
  kWeightExperts,        // MoE: the distinct experts hit in the pass
  kWeightSharedExperts,  // MoE shared experts
  kNumWeightTerms
};
const char* weight_term_name(int term);

// Weight dtypes the counters split bytes by (a compact index of the supported GGML types).
constexpr int kNumDTypeSlots = 9;
int dtype_slot(DType t);
DType dtype_of_slot(int slot);

// One forward pass.
struct PassRecord {
  int64_t index = 0;        // pass number since the engine started
  int32_t mode = 0;         // PassMode
  int32_t n_sequences = 0;  // sequences in the pass
  int64_t n_tokens = 0;     // tokens computed
  int64_t n_output_rows = 0;
  int64_t context_attended = 0;  // sum over query tokens of the keys each attends (window-aware)
  int64_t context_unique = 0;    // sum over sequences of the distinct keys attended in the pass
  double flops[kNumFlopTerms] = {};
  double weight_bytes[kNumWeightTerms] = {};
  double weight_bytes_by_dtype[kNumDTypeSlots] = {};
  // KV traffic at the cache's dtype, summed over layers and KV heads.
  double kv_bytes_read = 0;       // what the kernel reads: per query token, K by whole pages
  double kv_bytes_unique = 0;     // each sequence's attended K/V once per layer (ideal reuse)
  double kv_bytes_written = 0;    // the new tokens' K/V
  int32_t moe_layers = 0;         // layers that added MoE terms
  double experts_active_sum = 0;  // sum over those layers of distinct experts hit (E_act sum)
  int64_t attention_blocks_selected = 0;  // block-sparse attention: blocks read (all layers)
  double seconds = 0;                     // wall time of the forward pass
  double t_end = 0;  // seconds since the counters were configured, when the pass ended
};

// Shapes the attention terms need.
struct AttentionShape {
  int64_t n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, page_size = 16;
  int64_t kv_elem_bytes = 4;
  int64_t sliding_window = 0;  // 0: the whole context
  // Layers grouped by window when they differ (Gemma 3: local and global layers): pairs of
  // (window, number of layers). Empty: every layer uses sliding_window.
  std::vector<std::pair<int64_t, int64_t>> layer_windows;
};

struct AttentionTerms {
  int64_t context_attended = 0, context_unique = 0;
  double kv_bytes_read = 0, kv_bytes_unique = 0, kv_bytes_written = 0;
  double flops = 0;
  int64_t blocks_selected = 0;
};

// Adds the dense causal attention of one sequence's chunk: new positions [start, start + n).
// Query at p attends keys [lo(p), p], lo(p) = max(0, p - window + 1); the kernel reads the K
// pages touched whole and the V rows attended.
void dense_attention_terms_add(const AttentionShape& s, int64_t start, int64_t n,
                               AttentionTerms* out);

// Block-sparse attention (ReSA hook). Per layer l: selected_blocks[l] = blocks of page_size keys
// read, summed over query tokens and KV heads; summaries_scored[l] = block summaries scored, same
// sum; a summary is summary_bytes bytes and costs 2 * head_dim FLOPs per query head sharing the KV
// head. n_query_tokens / n_new_tokens: tokens of the pass (new K/V written for each).
// kv_bytes_unique is taken as kv_bytes_read (exact for decode, one query per sequence).
AttentionTerms block_sparse_attention_terms(const AttentionShape& s, int64_t n_query_tokens,
                                            const int64_t* selected_blocks,
                                            const int64_t* summaries_scored, int64_t summary_bytes);

// One MoE layer's shapes (MoE hook). Bytes are at the stored dtypes, split by dtype slot.
struct MoeLayerShape {
  int32_t n_experts = 0;
  int32_t top_k = 0;
  int64_t d_model = 0;
  int64_t expert_params = 0;  // one routed expert (3 * d_model * d_ff_expert for SwiGLU)
  double expert_bytes_by_dtype[kNumDTypeSlots] = {};  // one routed expert
  int64_t router_params = 0;                          // d_model * n_experts
  double router_bytes_by_dtype[kNumDTypeSlots] = {};
  int64_t shared_params = 0;  // all shared experts (+ their gate), 0 if none
  double shared_bytes_by_dtype[kNumDTypeSlots] = {};
};

struct MoeLayerTerms {
  int32_t experts_active = 0;  // distinct experts hit by any token of the pass
  double flops[kNumFlopTerms] = {};
  double weight_bytes[kNumWeightTerms] = {};
  double weight_bytes_by_dtype[kNumDTypeSlots] = {};
};

// expert_hits[e] = (token, slot) pairs routed to expert e in this layer (sums to n_tokens * top_k
// when every token picks top_k experts).
MoeLayerTerms moe_layer_terms(const MoeLayerShape& s, const int32_t* expert_hits, int64_t n_tokens);

class PassCounters {
 public:
  // 4096 records of 312 bytes: 1.3 MB per engine, written once at start-up.
  static constexpr int64_t kDefaultCapacity = 4096;

  // Precomputes the per-pass constants from the model; allocates the ring.
  void configure(const ModelConfig& c, const ModelWeights& w, const KVCacheConfig& kv,
                 int64_t capacity = kDefaultCapacity);

  // Before the forward pass: positions come from the KV lengths before the step.
  void begin_pass(const std::vector<StepSequence>& batch, const KVCache& kv);
  void add_moe_layer(const MoeLayerTerms& t);
  // Adds every MoE layer's terms from the pass's expert histograms, [n_layers][n_experts] tokens
  // routed per expert (rows of dense layers are ignored).
  void add_moe_pass(const int64_t* expert_counts, int64_t n_tokens);
  void replace_attention(const AttentionTerms& t);
  // Adds the attention of the pass's block-sparse decode tokens (begin_pass counts dense tokens
  // only): blocks selected and candidate summaries scored, summed over tokens, layers and KV
  // heads (the same count in every layer).
  void add_block_sparse_attention(int64_t n_tokens, int64_t blocks_selected, int64_t summaries_scored,
                                  int64_t summary_bytes);
  // After the forward pass: stamps the wall time and commits the record.
  void end_pass();

  // Records still held, oldest first; passes beyond the capacity drop the oldest.
  int64_t size() const { return count_ < capacity() ? count_ : capacity(); }
  int64_t capacity() const { return static_cast<int64_t>(ring_.size()); }
  int64_t dropped() const { return count_ > capacity() ? count_ - capacity() : 0; }
  const PassRecord& at(int64_t i) const;
  void clear() { count_ = 0; }

 private:
  using Clock = std::chrono::steady_clock;
  AttentionShape attn_shape_;
  // Per-pass constants: every weight except the embedding rows is read once per pass.
  double fixed_weight_bytes_[kNumWeightTerms] = {};
  double fixed_bytes_by_dtype_[kNumDTypeSlots] = {};
  double flops_per_token_[kNumFlopTerms] = {};  // terms linear in tokens
  double lm_head_flops_per_row_ = 0, norm_flops_per_row_ = 0, final_norm_flops_per_row_ = 0;
  double embed_row_bytes_ = 0;
  std::vector<std::pair<int32_t, MoeLayerShape>> moe_layers_;  // (layer, shape) of MoE layers
  int32_t moe_n_experts_ = 0;
  std::vector<int32_t> moe_hits_;
  std::vector<int64_t> sparse_selected_, sparse_scored_;  // per layer, for one pass  // one layer's histogram, converted for moe_layer_terms
  int embed_slot_ = 0;
  std::vector<PassRecord> ring_;
  int64_t count_ = 0;   // passes committed since the last clear
  int64_t passes_ = 0;  // passes since configure
  PassRecord cur_;
  Clock::time_point epoch_, t_begin_;
};

}  // namespace lme
