#include "lmengine/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <unordered_set>

#include "lmengine/attention.h"
#include "lmengine/attention_chunk.h"
#include "lmengine/attention_sparse.h"
#include "lmengine/ops.h"

namespace lme {

namespace {

constexpr int64_t kMaxRowsPerChunk = 32;
// Decode (<= kDecodeTokens activation rows per product) streams each weight once. The hardware
// and software prefetchers start cold at every chunk, so decode chunks are long contiguous runs
// of rows: about kDecodeChunksPerThread per thread (enough to rebalance when one thread is slow),
// at most kMaxDecodeChunkRows.
constexpr int64_t kDecodeTokens = 4;
constexpr int64_t kDecodeChunksPerThread = 6;
constexpr int64_t kMaxDecodeChunkRows = 1024;
// Dense decode attention of a long context is split flash-decoding style: one work item per
// (token, KV head, split of ModelConfig::decode_split_pages or more pages), at most
// kMaxDecodeSplits splits, partials merged by log-sum-exp. Without splits a batch-1 step has only
// n_kv_heads items per layer (3 for SmolLM2: one of two threads idles a third of the time).
constexpr int64_t kMaxDecodeSplits = 8;

std::string shape_str(int64_t rows, int64_t cols) {
  return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

Status check_tensor(const WeightTensor& t, const char* name, int64_t rows, int64_t cols,
                    bool float_only) {
  if (t.data == nullptr) return Status::Error(StatusCode::kBadModel, std::string("missing tensor ") + name);
  if (!dtype_is_supported(static_cast<int32_t>(t.type))) {
    return Status::Error(StatusCode::kUnsupported, std::string("tensor ") + name + " has unsupported type " +
                                                       std::to_string(static_cast<int>(t.type)));
  }
  if (float_only && t.type != DType::F32) {
    return Status::Error(StatusCode::kBadModel, std::string("tensor ") + name + " must be F32");
  }
  if (t.rows != rows || t.cols != cols) {
    return Status::Error(StatusCode::kBadModel, std::string("tensor ") + name + " has shape " +
                                                           shape_str(t.rows, t.cols) + ", expected " +
                                                           shape_str(rows, cols));
  }
  if (cols % dtype_block_size(t.type) != 0) {
    return Status::Error(StatusCode::kBadModel,
                         std::string("tensor ") + name + ": row length " + std::to_string(cols) +
                             " is not a multiple of the " + dtype_name(t.type) + " block size");
  }
  return Status::Ok();
}

int64_t row_bytes(const WeightTensor& w) { return dtype_row_bytes(w.type, w.cols); }

bool is_moe_layer(const ModelConfig& c, int32_t l) {
  return c.moe.n_experts > 0 && l < static_cast<int32_t>(c.moe_layers.size()) && c.moe_layers[l] != 0;
}

}  // namespace

Status validate_model(const ModelConfig& c, const ModelWeights& w) {
  if (c.n_layers <= 0 || c.d_model <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0 ||
      c.d_ff <= 0 || c.vocab_size <= 0 || c.max_context <= 0) {
    return Status::Error(StatusCode::kBadModel, "model config has a non-positive dimension");
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return Status::Error(StatusCode::kBadModel, "n_heads must be a multiple of n_kv_heads");
  }
  if (c.head_dim > 4096) {  // a sanity bound: no supported architecture comes near it
    return Status::Error(StatusCode::kBadModel, "head_dim " + std::to_string(c.head_dim) + " exceeds 4096");
  }
  if (c.head_dim % 2 != 0 || static_cast<int32_t>(c.rope_inv_freq.size()) != c.head_dim / 2) {
    return Status::Error(StatusCode::kBadModel, "rope_inv_freq must have head_dim/2 entries");
  }
  if (!c.rope_inv_freq_local.empty() && static_cast<int32_t>(c.rope_inv_freq_local.size()) != c.head_dim / 2) {
    return Status::Error(StatusCode::kBadModel, "rope_inv_freq_local must be empty or have head_dim/2 entries");
  }
  if (!c.layer_sliding_window.empty() && static_cast<int32_t>(c.layer_sliding_window.size()) != c.n_layers) {
    return Status::Error(StatusCode::kBadModel, "layer_sliding_window must be empty or have n_layers entries");
  }
  for (int32_t win : c.layer_sliding_window) {
    if (win < 0) return Status::Error(StatusCode::kBadModel, "negative sliding window");
  }
  if (c.sliding_window < 0) return Status::Error(StatusCode::kBadModel, "negative sliding window");
  if (c.ffn_activation != kActSiLU && c.ffn_activation != kActGeluTanh) {
    return Status::Error(StatusCode::kBadModel, "unknown ffn_activation " + std::to_string(c.ffn_activation));
  }
  if (!(c.embed_scale >= 0.f) || !std::isfinite(c.embed_scale)) {
    return Status::Error(StatusCode::kBadModel, "embed_scale must be finite and >= 0");
  }
  if (static_cast<int32_t>(w.layers.size()) != c.n_layers) {
    return Status::Error(StatusCode::kBadModel, "number of layer weight sets != n_layers");
  }
  const int64_t d = c.d_model, q_dim = int64_t(c.n_heads) * c.head_dim,
                kv_dim = int64_t(c.n_kv_heads) * c.head_dim;
  Status s;
  if (c.moe.n_experts > 0) {
    if (!(s = validate_moe_config(c.moe)).ok()) return s;
    if (static_cast<int32_t>(c.moe_layers.size()) != c.n_layers) {
      return Status::Error(StatusCode::kBadModel, "moe_layers must have n_layers entries");
    }
  }
  if (c.qk_norm < 0 || c.qk_norm > 2) return Status::Error(StatusCode::kBadModel, "qk_norm must be 0, 1 or 2");
  if (!(s = check_tensor(w.tok_embd, "token_embd", c.vocab_size, d, false)).ok()) return s;
  if (!(s = check_tensor(w.out_norm, "output_norm", 1, d, true)).ok()) return s;
  if (!(s = check_tensor(w.lm_head, "output", c.vocab_size, d, false)).ok()) return s;
  const int64_t hd_check = c.head_dim;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string p = "blk." + std::to_string(l) + ".";
    struct Item { const WeightTensor* t; std::string name; int64_t rows, cols; bool f32; };
    std::vector<Item> items = {
        {&L.attn_norm, p + "attn_norm", 1, d, true},  {&L.wq, p + "attn_q", q_dim, d, false},
        {&L.wk, p + "attn_k", kv_dim, d, false},      {&L.wv, p + "attn_v", kv_dim, d, false},
        {&L.wo, p + "attn_output", d, q_dim, false},  {&L.ffn_norm, p + "ffn_norm", 1, d, true}};
    if (is_moe_layer(c, l)) {
      if (!(s = validate_moe_layer(c.moe, d, L.moe, p)).ok()) return s;
    } else {
      items.push_back({&L.w_gate, p + "ffn_gate", c.d_ff, d, false});
      items.push_back({&L.w_up, p + "ffn_up", c.d_ff, d, false});
      items.push_back({&L.w_down, p + "ffn_down", d, c.d_ff, false});
    }
    if (c.qk_norm != 0) {
      items.push_back({&L.q_norm, p + "attn_q_norm", 1, c.qk_norm == 1 ? hd_check : q_dim, true});
      items.push_back({&L.k_norm, p + "attn_k_norm", 1, c.qk_norm == 1 ? hd_check : kv_dim, true});
    }
    if (c.post_norms) {
      items.push_back({&L.post_attn_norm, p + "post_attention_norm", 1, d, true});
      items.push_back({&L.post_ffn_norm, p + "post_ffw_norm", 1, d, true});
    }
    if (c.qkv_bias) {
      items.push_back({&L.bq, p + "attn_q.bias", 1, q_dim, true});
      items.push_back({&L.bk, p + "attn_k.bias", 1, kv_dim, true});
      items.push_back({&L.bv, p + "attn_v.bias", 1, kv_dim, true});
    }
    for (const Item& it : items) {
      if (!(s = check_tensor(*it.t, it.name.c_str(), it.rows, it.cols, it.f32)).ok()) return s;
    }
  }
  return Status::Ok();
}

// Per-step working memory, grown on demand and reused: steady-state steps allocate nothing.
struct Engine::Scratch {
  int64_t cap_tokens = 0, cap_out = 0;
  std::vector<float> x, xn, q, k, v, attn, gate, up, proj;
  std::vector<uint8_t> act[3];  // activations converted for up to 3 weight types at once
  int64_t act_slot_bytes = 0;
  std::vector<int32_t> tok_pos, tok_seq, tok_id;
  std::vector<int64_t> out_tok;
  std::vector<float> rope_cos, rope_sin;  // [token][head_dim/2]
  std::vector<float> rope_cos_local, rope_sin_local;  // the same for rope_inv_freq_local
  std::vector<float> row_tmp;             // [thread][widest row]: residual quantization
  std::vector<float> mm_tmp;              // [thread][2*tokens][rows per chunk]: two-level products
  int64_t row_tmp_len = 0, mm_tmp_len = 0;
  MoEDispatch moe;  // MoE layers' routing and expert scratch
  // Multi-token chunks: query-tiled attention work plans (attention_chunk.h), one per distinct
  // sliding window of the layers (Gemma 3: local and global); single tokens take
  // attention_sparse_partial over all their blocks or a split's share of them.
  std::vector<std::pair<int32_t, ChunkAttentionPlan>> chunk_plans;  // (window, plan)
  std::vector<float> chunk_tmp;       // [thread][attention_chunk_scratch_floats]
  std::vector<float> chunk_partials;  // [partial slot][chunk_attention_partial_floats]
  std::vector<int64_t> single_tokens;  // step tokens that are a sequence's only new token
  // Dense single-token attention items of this step: (index into single_tokens, KV head, split,
  // splits); every item keeps its max and sum in [item][group] x 2; items of split tokens write
  // partial outputs [item][group*head_dim], merged per (token, head) by the entries of
  // split_merges (first item, splits); an unsplit item writes its output in place.
  struct DecodeItem {
    int32_t single, head, split, n_split;
  };
  std::vector<DecodeItem> decode_items;
  std::vector<std::pair<int64_t, int32_t>> split_merges;
  std::vector<float> split_out, decode_m, decode_l;
  std::vector<int32_t> block_iota;  // 0, 1, 2, ...: the block list of dense decode items
  std::vector<float> decode_work;   // [thread][decode_work_len]
  int64_t decode_work_len = 0;
  int64_t chunk_tmp_len = 0;
  ChunkAttentionPlan& plan_for_window(int32_t window) {
    for (auto& [w, plan] : chunk_plans) {
      if (w == window) return plan;
    }
    return chunk_plans.front().second;  // unreachable: every layer's window has a plan
  }
  // Tokens (tok_f32, by token) and logit rows (out_f32, by output row) whose products take fp32
  // activations (ModelConfig::f32_prompt_min_tokens); f32_rows[slot * cap_tokens + t] is the fp32
  // row prepare() left for activation slot `slot` instead of converting it.
  std::vector<uint8_t> tok_f32, out_f32;
  std::vector<uint8_t> tok_f32_moe;  // the same for MoE layers' products (moe_f32_min_tokens)
  std::vector<const float*> f32_rows;
};

Engine::Engine(ModelConfig config, ModelWeights weights, const KVCacheConfig& kv_config,
               int n_threads)
    : config_(std::move(config)),
      weights_(std::move(weights)),
      kv_(kv_config),
      pool_(n_threads),
      scratch_(new Scratch),
      sparse_(config_.n_layers, config_.n_kv_heads,
              config_.n_heads / std::max(1, config_.n_kv_heads), config_.head_dim,
              kv_config.page_size, config_.sparse_score_blocks) {
  if (config_.attn_scale <= 0.f) config_.attn_scale = 1.0f / std::sqrt(static_cast<float>(config_.head_dim));
  counters_.configure(config_, weights_, kv_config);
  moe_stats_.init(config_.n_layers, config_.moe.n_experts);
}

Engine::~Engine() = default;

const char* op_kind_name(int kind) {
  static const char* const names[kNumOpKinds] = {"embed",     "norm_quant", "matmul_attn", "rope_kv",
                                                 "attention", "matmul_ffn", "activation",  "lm_head",
                                                 "block_summary", "sparse_select", "sparse_attention"};
  return kind >= 0 && kind < kNumOpKinds ? names[kind] : "unknown";
}

void Engine::reset_op_seconds() {
  for (double& s : op_seconds_) s = 0.0;
  steps_run_ = 0;
  tokens_run_ = 0;
  sparse_.reset_counters();
}

Status Engine::set_sparse_attention(const SparseAttentionConfig& c) {
  if (!kv_.config().block_summaries) {
    return Status::Error(StatusCode::kInvalidArgument, "sparse attention needs a KV cache built with block summaries");
  }
  Status s = sparse_config_validate(c);
  if (s.ok()) sparse_.set_config(c);
  return s;
}

int64_t Engine::output_rows(const std::vector<StepSequence>& batch) {
  int64_t n = 0;
  for (const auto& s : batch) n += s.all_logits ? s.n_tokens : 1;
  return n;
}

void Engine::ensure_scratch(int64_t n_tokens, int64_t n_out) {
  Scratch& S = *scratch_;
  const ModelConfig& c = config_;
  if (n_tokens > S.cap_tokens) {
    S.cap_tokens = std::max<int64_t>(n_tokens, 8);
    const int64_t T = S.cap_tokens;
    const int64_t q_dim = int64_t(c.n_heads) * c.head_dim, kv_dim = int64_t(c.n_kv_heads) * c.head_dim;
    S.x.assign(T * c.d_model, 0.f);
    S.xn.assign(T * c.d_model, 0.f);
    S.q.assign(T * q_dim, 0.f);
    S.k.assign(T * kv_dim, 0.f);
    S.v.assign(T * kv_dim, 0.f);
    S.attn.assign(T * q_dim, 0.f);
    S.gate.assign(T * c.d_ff, 0.f);
    S.up.assign(T * c.d_ff, 0.f);
    S.proj.assign(T * c.d_model, 0.f);
    S.tok_pos.assign(T, 0);
    S.tok_seq.assign(T, 0);
    S.tok_id.assign(T, 0);
    S.rope_cos.assign(T * (c.head_dim / 2), 0.f);
    S.rope_sin.assign(T * (c.head_dim / 2), 0.f);
    if (!c.rope_inv_freq_local.empty()) {
      S.rope_cos_local.assign(T * (c.head_dim / 2), 0.f);
      S.rope_sin_local.assign(T * (c.head_dim / 2), 0.f);
    }
    // Largest activation row over every weight type and input width the model uses.
    int64_t widest = 0;
    auto consider = [&](const WeightTensor& w) { widest = std::max(widest, activation_row_bytes(w.type, w.cols)); };
    consider(weights_.lm_head);
    for (const auto& L : weights_.layers) {
      for (const WeightTensor* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) consider(*w);
    }
    S.act_slot_bytes = (widest + 63) / 64 * 64;
    for (auto& a : S.act) a.assign(2 * T * S.act_slot_bytes, 0);
    S.row_tmp_len = std::max<int64_t>({c.d_model, c.d_ff, int64_t(c.n_heads) * c.head_dim});
    S.row_tmp.assign(pool_.size() * S.row_tmp_len, 0.f);
    S.mm_tmp_len = std::max(2 * T * kMaxRowsPerChunk, 2 * kDecodeTokens * kMaxDecodeChunkRows);
    S.mm_tmp.assign(pool_.size() * S.mm_tmp_len, 0.f);
    if (c.moe.n_experts > 0) {
      std::vector<const MoELayerWeights*> moe_layers;
      for (int32_t l = 0; l < c.n_layers; ++l) {
        if (is_moe_layer(c, l)) moe_layers.push_back(&weights_.layers[l].moe);
      }
      S.moe.reserve(c.moe, c.d_model, moe_layers, T, pool_.size(), c.n_layers);
    }
    S.tok_f32.assign(T, 0);
    S.tok_f32_moe.assign(T, 0);
    S.f32_rows.assign(3 * T, nullptr);
  }
  if (n_out > S.cap_out) {
    S.cap_out = n_out;
    S.out_tok.assign(n_out, 0);
    S.out_f32.assign(n_out, 0);
  }
  if (S.chunk_tmp.empty()) {
    const int32_t group = c.n_heads / c.n_kv_heads, rows = chunk_tile_tokens(group) * group;
    S.chunk_tmp_len = attention_chunk_scratch_floats(rows, kv_.config().page_size, c.head_dim);
    S.chunk_tmp.assign(pool_.size() * S.chunk_tmp_len, 0.f);
  }
}

void Engine::plan_decode_splits() {
  const ModelConfig& c = config_;
  Scratch& S = *scratch_;
  const int64_t ps = kv_.config().page_size, group = c.n_heads / c.n_kv_heads;
  S.decode_items.clear();
  S.split_merges.clear();
  int64_t max_pages = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(S.single_tokens.size()); ++i) {
    const int64_t t = S.single_tokens[i];
    const int64_t n_pages = S.tok_pos[t] / ps + 1;
    const int32_t n_split = sparse_.is_sparse(t) || c.decode_split_pages == 0
                                ? 1
                                : static_cast<int32_t>(
                                      std::clamp<int64_t>(n_pages / c.decode_split_pages, 1, kMaxDecodeSplits));
    max_pages = std::max(max_pages, n_pages);
    for (int32_t h = 0; h < c.n_kv_heads; ++h) {
      if (n_split > 1) S.split_merges.push_back({static_cast<int64_t>(S.decode_items.size()), n_split});
      for (int32_t sp = 0; sp < n_split; ++sp) {
        S.decode_items.push_back({static_cast<int32_t>(i), h, sp, n_split});
      }
    }
  }
  const size_t n_items = S.decode_items.size();
  if (!S.split_merges.empty() && S.split_out.size() < n_items * group * c.head_dim) {
    S.split_out.resize(n_items * group * c.head_dim);
  }
  if (S.decode_m.size() < n_items * group) {
    S.decode_m.resize(n_items * group);
    S.decode_l.resize(n_items * group);
  }
  if (static_cast<int64_t>(S.block_iota.size()) < max_pages) {
    const size_t old = S.block_iota.size();
    S.block_iota.resize(static_cast<size_t>(max_pages));
    for (size_t b = old; b < S.block_iota.size(); ++b) S.block_iota[b] = static_cast<int32_t>(b);
  }
  S.decode_work_len =
      attention_partial_work_floats(static_cast<int32_t>(group), static_cast<int32_t>(ps));
  const size_t work = static_cast<size_t>(pool_.size() * S.decode_work_len);
  if (S.decode_work.size() < work) S.decode_work.resize(work);
}

Status Engine::step(const std::vector<StepSequence>& batch, float* logits) {
  const ModelConfig& c = config_;
  if (batch.empty()) return Status::Error(StatusCode::kInvalidArgument, "empty batch");
  std::unordered_set<int32_t> seen;
  int64_t n_tokens = 0, pages_needed = 0;
  for (const auto& s : batch) {
    if (!kv_.seq_valid(s.seq)) {
      return Status::Error(StatusCode::kInvalidArgument, "unknown sequence id " + std::to_string(s.seq));
    }
    if (!seen.insert(s.seq).second) {
      return Status::Error(StatusCode::kInvalidArgument,
                           "sequence " + std::to_string(s.seq) + " appears twice in one step");
    }
    if (s.n_tokens <= 0 || s.tokens == nullptr) {
      return Status::Error(StatusCode::kInvalidArgument, "sequence " + std::to_string(s.seq) + " has no tokens");
    }
    if (s.sparse && !kv_.config().block_summaries) {
      return Status::Error(StatusCode::kInvalidArgument,
                           "sparse attention needs a KV cache built with block summaries");
    }
    for (int32_t i = 0; i < s.n_tokens; ++i) {
      if (s.tokens[i] < 0 || s.tokens[i] >= c.vocab_size) {
        return Status::Error(StatusCode::kInvalidArgument,
                             "token id " + std::to_string(s.tokens[i]) + " out of range [0, " +
                                 std::to_string(c.vocab_size) + ")");
      }
    }
    const int64_t new_len = kv_.seq_length(s.seq) + s.n_tokens;
    if (new_len > c.max_context) {
      return Status::Error(StatusCode::kContextOverflow,
                           "sequence " + std::to_string(s.seq) + " would reach " + std::to_string(new_len) +
                               " tokens, beyond the context of " + std::to_string(c.max_context));
    }
    pages_needed += kv_.pages_for(new_len) - static_cast<int64_t>(kv_.seq_pages(s.seq).size());
    n_tokens += s.n_tokens;
  }
  if (pages_needed > kv_.free_pages()) {
    return Status::Error(StatusCode::kOutOfPages,
                         "KV cache full: step needs " + std::to_string(pages_needed) + " more pages, " +
                             std::to_string(kv_.free_pages()) + " of " + std::to_string(kv_.total_pages()) +
                             " are free");
  }
  for (const auto& s : batch) {
    Status st = kv_.seq_reserve(s.seq, kv_.seq_length(s.seq) + s.n_tokens);
    if (!st.ok()) return st;  // cannot happen after the check above
  }

  ensure_scratch(n_tokens, output_rows(batch));
  Scratch& S = *scratch_;
  int64_t t = 0, o = 0;
  const int32_t half = c.head_dim / 2;
  const int64_t moe_min = c.moe.n_experts > 0 ? moe_f32_min_tokens(c.moe, c.f32_prompt_min_tokens) : 0;
  sparse_.begin_step(n_tokens);
  for (int32_t b = 0; b < static_cast<int32_t>(batch.size()); ++b) {
    const auto& s = batch[b];
    const int64_t start = kv_.seq_length(s.seq);
    if (kv_.config().block_summaries) sparse_.add_written(s.seq, start, start + s.n_tokens, kv_.config().page_size);
    if (s.sparse && s.n_tokens == 1) {
      const int64_t lo = c.sliding_window > 0 ? std::max<int64_t>(0, start - c.sliding_window + 1) : 0;
      sparse_.add_sparse_token(t, s.seq, lo, start);
    }
    for (int32_t i = 0; i < s.n_tokens; ++i, ++t) {
      S.tok_pos[t] = static_cast<int32_t>(start + i);
      S.tok_seq[t] = b;
      S.tok_id[t] = s.tokens[i];
      const float pos = static_cast<float>(start + i);
      for (int32_t j = 0; j < half; ++j) {
        const float angle = pos * c.rope_inv_freq[j];
        S.rope_cos[t * half + j] = std::cos(angle);
        S.rope_sin[t * half + j] = std::sin(angle);
      }
      for (int32_t j = 0; j < static_cast<int32_t>(c.rope_inv_freq_local.size()); ++j) {
        const float angle = pos * c.rope_inv_freq_local[j];
        S.rope_cos_local[t * half + j] = std::cos(angle);
        S.rope_sin_local[t * half + j] = std::sin(angle);
      }
      // The path is chosen per sequence chunk, so a token's numerics never depend on its batch.
      const bool f32 = c.f32_prompt_min_tokens > 0 && s.n_tokens >= c.f32_prompt_min_tokens;
      S.tok_f32[t] = f32;
      S.tok_f32_moe[t] = moe_min > 0 && s.n_tokens >= moe_min;
      if (s.all_logits || i == s.n_tokens - 1) {
        S.out_f32[o] = f32 && s.all_logits;  // a single logit row is cheaper through 8-bit rows
        S.out_tok[o++] = t;
      }
    }
  }
  const SparseCounters sparse_before = sparse_.counters();
  sparse_.finish_plan(pool_.size());
  if (S.chunk_plans.empty()) {
    // One plan per distinct window (built once; cleared and refilled every step).
    std::vector<int32_t> windows(c.layer_sliding_window.begin(), c.layer_sliding_window.end());
    if (windows.empty()) windows.push_back(c.sliding_window);
    for (int32_t w : windows) {
      const bool known = std::any_of(S.chunk_plans.begin(), S.chunk_plans.end(),
                                     [&](const auto& wp) { return wp.first == w; });
      if (!known) S.chunk_plans.emplace_back(w, ChunkAttentionPlan());
    }
  }
  S.single_tokens.clear();
  for (auto& wp : S.chunk_plans) wp.second.clear();
  int64_t max_partials = 0;
  for (auto& [window, plan] : S.chunk_plans) {
    for (int64_t b = 0, t0 = 0; b < static_cast<int64_t>(batch.size()); t0 += batch[b].n_tokens, ++b) {
      if (batch[b].n_tokens == 1) continue;
      chunk_attention_plan_add(plan, kv_.seq_pages(batch[b].seq).data(), t0, &S.tok_pos[t0],
                               batch[b].n_tokens, c.n_kv_heads, c.n_heads / c.n_kv_heads,
                               kv_.config().page_size, window, kChunkSegmentKeys);
    }
    max_partials = std::max(max_partials, plan.n_partials);
  }
  for (int64_t b = 0, t0 = 0; b < static_cast<int64_t>(batch.size()); t0 += batch[b].n_tokens, ++b) {
    if (batch[b].n_tokens == 1) S.single_tokens.push_back(t0);
  }
  plan_decode_splits();
  const int64_t partial_floats = max_partials * chunk_attention_partial_floats(c.n_heads / c.n_kv_heads, c.head_dim);
  if (partial_floats > static_cast<int64_t>(S.chunk_partials.size())) S.chunk_partials.resize(partial_floats);
  // forward() runs 2 + 12 per dense layer ops, + 4 with sparse attention (MoE layers: 9 +
  // MoEDispatch::kOpsPerLayer); the bound leaves room to add more.
  const int64_t max_ops = (20 + MoEDispatch::kOpsPerLayer) * int64_t(c.n_layers) + 16;
  counters_.begin_pass(batch, kv_);
  if (sparse_.has_sparse_tokens()) {
    // Block-sparse tokens read their selected blocks and every candidate's summary instead of
    // the whole context (begin_pass counted only the dense tokens' attention).
    const SparseCounters& after = sparse_.counters();
    counters_.add_block_sparse_attention(after.tokens - sparse_before.tokens,
                                         after.blocks_selected - sparse_before.blocks_selected,
                                         after.blocks_candidate - sparse_before.blocks_candidate,
                                         kv_.summary_bytes());
  }
  pool_.run(
      [&](int tid, int nth) {
        ParallelContext pc(pool_, tid, nth, op_seconds_);
        forward(pc, batch, logits);
      },
      max_ops);
  if (c.moe.n_experts > 0) counters_.add_moe_pass(moe_stats_.last.data(), n_tokens);
  counters_.end_pass();
  ++steps_run_;
  tokens_run_ += n_tokens;
  if (c.moe.n_experts > 0) moe_stats_.accumulate();
  for (const auto& s : batch) kv_.seq_set_length(s.seq, kv_.seq_length(s.seq) + s.n_tokens);
  return Status::Ok();
}

namespace {

struct MatmulJob {
  const WeightTensor* w;
  const uint8_t* x;  // activation rows prepared for w->type (see prepare_activation)
  float* y;
  int64_t ldy;
};

// Assigns each distinct weight type of a group to an activation slot.
int act_slot(const DType* types, int n, DType t) {
  for (int i = 0; i < n; ++i) {
    if (types[i] == t) return i;
  }
  return 0;
}


}  // namespace

void Engine::forward(ParallelContext& pc, const std::vector<StepSequence>& batch, float* logits) {
  const ModelConfig& c = config_;
  Scratch& S = *scratch_;
  const int64_t T = [&] {
    int64_t n = 0;
    for (const auto& s : batch) n += s.n_tokens;
    return n;
  }();
  const int64_t d = c.d_model, hd = c.head_dim, half = hd / 2;
  const int64_t q_dim = int64_t(c.n_heads) * hd, kv_dim = int64_t(c.n_kv_heads) * hd;
  const int64_t group = c.n_heads / c.n_kv_heads;
  const int64_t xs = S.act_slot_bytes;
  const int64_t page_size = kv_.config().page_size;

  // Which products get two-level activations (bit per product class, see ModelConfig).
  const int32_t two_mask = c.activation_bits > 8 ? c.two_level_mask : 0;
  bool two_now = false;
  // Per token (per logit row for the LM head): 1 where products take fp32 activations.
  const uint8_t* f32_now = S.tok_f32.data();
  auto slot_of = [&](const uint8_t* base) {
    int i = 0;
    while (i < 2 && S.act[i].data() != base) ++i;
    return i;
  };

  // Activation rows of token t for weight type ty: one row at base + t*xs, or with wide
  // activations (quant.h) one wide row of 2*xs bytes at base + 2t*xs. fp32-path tokens keep
  // x itself (it stays unchanged until the product has run).
  auto prepare = [&](DType ty, const float* x, uint8_t* base, int64_t t, int64_t k) {
    if (f32_now[t]) {
      S.f32_rows[slot_of(base) * S.cap_tokens + t] = x;
    } else if (two_now && activation_is_quantized(ty)) {
      float* tmp = &S.row_tmp[int64_t(pc.tid()) * S.row_tmp_len];
      quantize_activation_row_wide(ty, x, base + 2 * t * xs, 2 * xs, tmp, k);
    } else {
      quantize_activation_row(ty, x, base + t * xs, k);
    }
  };

  // One barrier-delimited op computing several independent products (e.g. Q, K and V).
  auto run_matmuls = [&](const MatmulJob* jobs, int n_jobs, int64_t n_tok) {
    // Rows per chunk: prefill takes kMaxRowsPerChunk (one fp32 panel group of matmul_rows_f32,
    // amortising the activation reads); decode takes long runs (see kDecodeChunksPerThread).
    int64_t first_chunk[4] = {0, 0, 0, 0}, chunk_rows[4] = {0, 0, 0, 0};
    int64_t total = 0;
    for (int j = 0; j < n_jobs; ++j) {
      const int64_t rows = jobs[j].w->rows;
      int64_t per = kMaxRowsPerChunk;
      if (n_tok <= kDecodeTokens) {
        const int64_t n_chunks = kDecodeChunksPerThread * pc.nth();
        per = (rows + n_chunks - 1) / n_chunks;
        per = (per + kMaxRowsPerChunk - 1) / kMaxRowsPerChunk * kMaxRowsPerChunk;
        per = std::clamp(per, kMaxRowsPerChunk, kMaxDecodeChunkRows);
      }
      chunk_rows[j] = per;
      first_chunk[j] = total;
      total += (rows + per - 1) / per;
    }
    pc.for_chunks(total, 1, [&](int64_t c0, int64_t) {
      int j = n_jobs - 1;
      while (c0 < first_chunk[j]) --j;
      const MatmulJob& job = jobs[j];
      const WeightTensor& w = *job.w;
      const int64_t r0 = (c0 - first_chunk[j]) * chunk_rows[j];
      const int64_t nr = std::min(chunk_rows[j], w.rows - r0);
      const int64_t rb = row_bytes(w);
      const uint8_t* wr = w.data + r0 * rb;
      const bool two = two_now && activation_is_quantized(w.type);
      // Runs of consecutive tokens on the same path (sequences are contiguous in the step).
      for (int64_t t0 = 0, t1; t0 < n_tok; t0 = t1) {
        for (t1 = t0 + 1; t1 < n_tok && f32_now[t1] == f32_now[t0];) ++t1;
        const int64_t n = t1 - t0;
        float* y0 = job.y + t0 * job.ldy + r0;
        if (f32_now[t0]) {
          const float* const* rows = &S.f32_rows[slot_of(job.x) * S.cap_tokens + t0];
          matmul_rows_f32(w.type, w.cols, wr, rb, nr, rows, n, y0, job.ldy);
        } else if (!two) {
          matmul_rows(w.type, w.cols, wr, rb, nr, job.x + t0 * xs, xs, n, y0, job.ldy);
        } else {
          float* tmp = &S.mm_tmp[int64_t(pc.tid()) * S.mm_tmp_len];
          matmul_rows_wide(w.type, w.cols, wr, rb, nr, job.x + 2 * t0 * xs, 2 * xs, n, y0, job.ldy,
                           tmp);
        }
      }
    });
  };

  // Embedding lookup: dequantize the rows of the token ids.
  pc.set_kind(kOpEmbed);
  const int64_t emb_rb = row_bytes(weights_.tok_embd);
  pc.for_chunks(T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* xr = &S.x[t * d];
      dequantize_row(weights_.tok_embd.type, weights_.tok_embd.data + S.tok_id[t] * emb_rb, xr, d);
      if (c.embed_scale > 0.f) {
        for (int64_t i = 0; i < d; ++i) xr[i] *= c.embed_scale;
      }
    }
  });

  // x += residual row t, the residual first normalised by `post_norm` when the model has
  // post-norms (residual rows are scratch, normalised in place).
  auto add_residual = [&](float* xr, float* residual, const WeightTensor* post_norm, int64_t t) {
    float* rr = residual + t * d;
    if (post_norm != nullptr) rmsnorm_row(rr, post_norm->f32(), rr, d, c.rms_eps);
    for (int64_t i = 0; i < d; ++i) xr[i] += rr[i];
  };

  // Normalises rows of x (optionally after adding `residual`) and converts them for each weight
  // type of the next group of products.
  auto norm_and_prepare = [&](const WeightTensor& norm, float* residual, const WeightTensor* post_norm,
                              const DType* types, int n_types, int64_t k) {
    pc.for_chunks(T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* xr = &S.x[t * d];
        if (residual != nullptr) add_residual(xr, residual, post_norm, t);
        float* xn = &S.xn[t * d];
        rmsnorm_row(xr, norm.f32(), xn, d, c.rms_eps);
        for (int i = 0; i < n_types; ++i) {
          prepare(types[i], xn, S.act[i].data(), t, k);
        }
      }
    });
  };

  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = weights_.layers[l];
    const int64_t window = c.layer_sliding_window.empty() ? c.sliding_window : c.layer_sliding_window[l];

    // Attention block: x += Wo · attn(rope(Wq xn), rope(Wk xn), Wv xn)
    DType qkv_types[3];
    int n_qkv_types = 0;
    for (DType ty : {L.wq.type, L.wk.type, L.wv.type}) {
      if (std::find(qkv_types, qkv_types + n_qkv_types, ty) == qkv_types + n_qkv_types) {
        qkv_types[n_qkv_types++] = ty;
      }
    }
    pc.set_kind(kOpNormQuant);
    two_now = two_mask & kTwoLevelQKV;
    norm_and_prepare(L.attn_norm, l == 0 ? nullptr : S.proj.data(),
                     l > 0 && c.post_norms ? &weights_.layers[l - 1].post_ffn_norm : nullptr, qkv_types,
                     n_qkv_types, d);
    MatmulJob qkv[3] = {
        {&L.wq, S.act[act_slot(qkv_types, n_qkv_types, L.wq.type)].data(), S.q.data(), q_dim},
        {&L.wk, S.act[act_slot(qkv_types, n_qkv_types, L.wk.type)].data(), S.k.data(), kv_dim},
        {&L.wv, S.act[act_slot(qkv_types, n_qkv_types, L.wv.type)].data(), S.v.data(), kv_dim},
    };
    pc.set_kind(kOpMatmulAttn);
    run_matmuls(qkv, 3, T);
    pc.set_kind(kOpRopeKV);

    // Bias, RoPE, and the new K/V into their pages.
    pc.for_chunks(T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* qr = &S.q[t * q_dim];
        float* kr = &S.k[t * kv_dim];
        float* vr = &S.v[t * kv_dim];
        if (c.qkv_bias) {
          for (int64_t i = 0; i < q_dim; ++i) qr[i] += L.bq.f32()[i];
          for (int64_t i = 0; i < kv_dim; ++i) kr[i] += L.bk.f32()[i];
          for (int64_t i = 0; i < kv_dim; ++i) vr[i] += L.bv.f32()[i];
        }
        if (c.qk_norm == 1) {
          for (int32_t h = 0; h < c.n_heads; ++h) rmsnorm_row(qr + h * hd, L.q_norm.f32(), qr + h * hd, hd, c.rms_eps);
          for (int32_t h = 0; h < c.n_kv_heads; ++h) rmsnorm_row(kr + h * hd, L.k_norm.f32(), kr + h * hd, hd, c.rms_eps);
        } else if (c.qk_norm == 2) {
          rmsnorm_row(qr, L.q_norm.f32(), qr, q_dim, c.rms_eps);
          rmsnorm_row(kr, L.k_norm.f32(), kr, kv_dim, c.rms_eps);
        }
        const bool local = window > 0 && !c.rope_inv_freq_local.empty();
        const float* cs = local ? &S.rope_cos_local[t * half] : &S.rope_cos[t * half];
        const float* sn = local ? &S.rope_sin_local[t * half] : &S.rope_sin[t * half];
        for (int32_t h = 0; h < c.n_heads; ++h) rope_row(qr + h * hd, cs, sn, hd, c.rope_interleaved);
        for (int32_t h = 0; h < c.n_kv_heads; ++h) rope_row(kr + h * hd, cs, sn, hd, c.rope_interleaved);
        const int32_t seq = batch[S.tok_seq[t]].seq;
        const int64_t pos = S.tok_pos[t];
        const int32_t page = kv_.seq_pages(seq)[pos / page_size];
        for (int32_t h = 0; h < c.n_kv_heads; ++h) {
          kv_store_token(kv_, page, l, h, pos % page_size, kr + h * hd, vr + h * hd);
        }
      }
    });

    if (sparse_.has_written()) {
      pc.set_kind(kOpBlockSummary);
      sparse_.refresh_summaries(pc, kv_, l);
    }
    if (sparse_.has_sparse_tokens()) {
      pc.set_kind(kOpSparseSelect);
      sparse_.select(pc, kv_, l, S.q.data(), q_dim, c.attn_scale);
      pc.set_kind(kOpSparseAttention);
      sparse_.attend(pc, kv_, l, S.q.data(), q_dim, c.attn_scale, S.attn.data());
    }

    pc.set_kind(kOpAttention);
    // Causal attention over the pages. Multi-token chunks: the query-tiled plan's items (tile x KV
    // head x key segment), then the merges of segmented tiles. Single tokens: one work item per
    // (token, KV head) serving its query group; block-sparse ones ran above.
    const ChunkAttentionPlan& chunk_plan = S.plan_for_window(static_cast<int32_t>(window));
    const ChunkAttentionStep chunk_step = {S.q.data(), q_dim, S.attn.data(), q_dim, S.tok_pos.data(),
                                           static_cast<int32_t>(group), l, c.attn_scale,
                                           static_cast<int32_t>(window)};
    const int64_t n_chunk_items = static_cast<int64_t>(chunk_plan.items.size());
    const int64_t n_decode_items = static_cast<int64_t>(S.decode_items.size());
    pc.for_chunks(n_chunk_items + n_decode_items, 1, [&](int64_t i0, int64_t) {
      if (i0 < n_chunk_items) {
        chunk_attention_run_item(chunk_plan, i0, kv_, chunk_step, &S.chunk_tmp[pc.tid() * S.chunk_tmp_len],
                                 S.chunk_partials.data());
        return;
      }
      i0 -= n_chunk_items;
      const Scratch::DecodeItem& item = S.decode_items[i0];
      const int64_t t = S.single_tokens[item.single];
      if (sparse_.is_sparse(t)) return;
      const int32_t h = item.head;
      const int32_t seq = batch[S.tok_seq[t]].seq;
      const int64_t pos = S.tok_pos[t];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      // This item's share of the token's pages (all of them unsplit), clipped to the layer's
      // window.
      const int64_t n_pages = pos / page_size + 1;
      const int64_t b0 = std::max(n_pages * item.split / item.n_split, lo / page_size);
      const int64_t b1 = n_pages * (item.split + 1) / item.n_split;
      const int64_t gw = group * hd;
      float* dst = item.n_split > 1 ? &S.split_out[i0 * gw] : &S.attn[t * q_dim + int64_t(h) * gw];
      float* mx = &S.decode_m[i0 * group];
      float* sum = &S.decode_l[i0 * group];
      attention_sparse_partial(&S.q[t * q_dim + int64_t(h) * gw], static_cast<int32_t>(group),
                               c.attn_scale, kv_, kv_.seq_pages(seq).data(), l, h,
                               S.block_iota.data() + std::min(b0, b1),
                               static_cast<int32_t>(std::max<int64_t>(0, b1 - b0)), lo, pos,
                               &S.decode_work[int64_t(pc.tid()) * S.decode_work_len], dst, mx, sum);
      if (item.n_split == 1)
        attention_partial_normalize(dst, sum, static_cast<int32_t>(group),
                                    static_cast<int32_t>(hd));
    });
    if (!chunk_plan.merges.empty()) {
      pc.for_chunks(static_cast<int64_t>(chunk_plan.merges.size()), 1, [&](int64_t i0, int64_t) {
        chunk_attention_run_merge(chunk_plan, i0, c.head_dim, chunk_step, S.chunk_partials.data());
      });
    }
    if (!S.split_merges.empty()) {
      pc.for_chunks(static_cast<int64_t>(S.split_merges.size()), 1, [&](int64_t i0, int64_t) {
        const auto [first, n] = S.split_merges[i0];
        const Scratch::DecodeItem& item = S.decode_items[first];
        const int64_t t = S.single_tokens[item.single], gw = group * hd;
        attention_sparse_merge(&S.split_out[first * gw], &S.decode_m[first * group],
                               &S.decode_l[first * group], n, static_cast<int32_t>(group),
                               static_cast<int32_t>(hd),
                               &S.attn[t * q_dim + int64_t(item.head) * gw]);
      });
    }

    // Output projection.
    pc.set_kind(kOpNormQuant);
    two_now = two_mask & kTwoLevelO;
    pc.for_chunks(T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        prepare(L.wo.type, &S.attn[t * q_dim], S.act[0].data(), t, q_dim);
      }
    });
    MatmulJob wo = {&L.wo, S.act[0].data(), S.proj.data(), d};
    pc.set_kind(kOpMatmulAttn);
    run_matmuls(&wo, 1, T);

    if (is_moe_layer(c, l)) {
      // MoE block: x += Σ_k w_k · expert_k(xn) (+ shared expert), see moe_dispatch.h.
      pc.set_kind(kOpNormQuant);
      norm_and_prepare(L.ffn_norm, S.proj.data(), c.post_norms ? &L.post_attn_norm : nullptr, nullptr, 0, d);
      pc.set_kind(kOpMatmulFFN);
      S.moe.forward(pc, c.moe, L.moe, S.xn.data(), T, d, two_mask & kTwoLevelGateUp, two_mask & kTwoLevelDown,
                    S.proj.data(), &moe_stats_.last[size_t(l) * c.moe.n_experts], l, S.tok_f32_moe.data());
      continue;
    }
    // MLP block: x += Wdown · (silu(Wgate xn) * Wup xn)
    DType ffn_types[2] = {L.w_gate.type, L.w_up.type};
    const int n_ffn_types = L.w_gate.type == L.w_up.type ? 1 : 2;
    pc.set_kind(kOpNormQuant);
    two_now = two_mask & kTwoLevelGateUp;
    norm_and_prepare(L.ffn_norm, S.proj.data(), c.post_norms ? &L.post_attn_norm : nullptr, ffn_types,
                     n_ffn_types, d);
    pc.set_kind(kOpMatmulFFN);
    MatmulJob gate_up[2] = {
        {&L.w_gate, S.act[0].data(), S.gate.data(), c.d_ff},
        {&L.w_up, S.act[n_ffn_types == 1 ? 0 : 1].data(), S.up.data(), c.d_ff},
    };
    run_matmuls(gate_up, 2, T);
    pc.set_kind(kOpActivation);
    two_now = two_mask & kTwoLevelDown;
    pc.for_chunks(T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* gr = &S.gate[t * c.d_ff];
        if (c.ffn_activation == kActGeluTanh) {
          gelu_tanh_mul_row(gr, &S.up[t * c.d_ff], c.d_ff);
        } else {
          silu_mul_row(gr, &S.up[t * c.d_ff], c.d_ff);
        }
        prepare(L.w_down.type, gr, S.act[0].data(), t, c.d_ff);
      }
    });
    MatmulJob down = {&L.w_down, S.act[0].data(), S.proj.data(), d};
    pc.set_kind(kOpMatmulFFN);
    run_matmuls(&down, 1, T);
  }

  // Final norm and LM head, only on the rows whose logits are wanted.
  const int64_t n_out = output_rows(batch);
  pc.set_kind(kOpLMHead);
  two_now = two_mask & kTwoLevelHead;
  f32_now = S.out_f32.data();
  pc.for_chunks(n_out, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t t = S.out_tok[o];
      float* xr = &S.x[t * d];
      add_residual(xr, S.proj.data(), c.post_norms ? &weights_.layers[c.n_layers - 1].post_ffn_norm : nullptr, t);
      rmsnorm_row(xr, weights_.out_norm.f32(), &S.xn[o * d], d, c.rms_eps);
      prepare(weights_.lm_head.type, &S.xn[o * d], S.act[0].data(), o, d);
    }
  });
  MatmulJob head = {&weights_.lm_head, S.act[0].data(), logits, c.vocab_size};
  run_matmuls(&head, 1, n_out);
}

}  // namespace lme
