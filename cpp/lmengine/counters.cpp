#include "lmengine/counters.h"

#include <algorithm>

#include "lmengine/model.h"

namespace lme {

const char* pass_mode_name(int32_t mode) {
  switch (mode) {
    case 0:
      return "prefill";
    case 1:
      return "decode";
    case 2:
      return "mixed";
    default:
      return "unknown";
  }
}

const char* flop_term_name(int term) {
  static const char* const names[kNumFlopTerms] = {"attn_proj", "attn_scores",   "dense_ffn",
                                                   "lm_head",   "norm",          "router",
                                                   "experts",   "shared_experts"};
  return term >= 0 && term < kNumFlopTerms ? names[term] : "unknown";
}

const char* weight_term_name(int term) {
  static const char* const names[kNumWeightTerms] = {
      "attn", "dense_ffn", "embed", "lm_head", "norm", "router", "experts", "shared_experts"};
  return term >= 0 && term < kNumWeightTerms ? names[term] : "unknown";
}

namespace {
constexpr DType kSlotTypes[kNumDTypeSlots] = {DType::F32,  DType::F16,  DType::BF16,
                                              DType::Q8_0, DType::Q4_0, DType::Q4_1,
                                              DType::Q5_0, DType::Q4_K, DType::Q6_K};

double tensor_bytes(const WeightTensor& t) {
  return t.data == nullptr ? 0.0 : static_cast<double>(t.rows * dtype_row_bytes(t.type, t.cols));
}
double tensor_params(const WeightTensor& t) {
  return t.data == nullptr ? 0.0 : static_cast<double>(t.rows * t.cols);
}
}  // namespace

int dtype_slot(DType t) {
  for (int i = 0; i < kNumDTypeSlots; ++i) {
    if (kSlotTypes[i] == t) return i;
  }
  return 0;
}

DType dtype_of_slot(int slot) { return kSlotTypes[slot >= 0 && slot < kNumDTypeSlots ? slot : 0]; }

void dense_attention_terms_add(const AttentionShape& s, int64_t start, int64_t n,
                               AttentionTerms* out) {
  if (n <= 0) return;
  if (!s.layer_windows.empty()) {
    // Per group of layers sharing a window, the single-window terms of that many layers; the
    // bytes written and keys unique to the pass are per layer too, so the sums stay exact.
    AttentionShape g = s;
    g.layer_windows.clear();
    AttentionTerms sum;
    for (const auto& [window, layers] : s.layer_windows) {
      g.sliding_window = window;
      g.n_layers = layers;
      AttentionTerms part;
      dense_attention_terms_add(g, start, n, &part);
      sum.context_attended += part.context_attended * layers;
      sum.context_unique = std::max(sum.context_unique, part.context_unique);
      sum.kv_bytes_read += part.kv_bytes_read;
      sum.kv_bytes_unique += part.kv_bytes_unique;
      sum.kv_bytes_written += part.kv_bytes_written;
      sum.flops += part.flops;
    }
    // context_attended is per query token and layer-averaged, as for a single window.
    out->context_attended += s.n_layers > 0 ? sum.context_attended / s.n_layers : 0;
    out->context_unique += sum.context_unique;
    out->kv_bytes_read += sum.kv_bytes_read;
    out->kv_bytes_unique += sum.kv_bytes_unique;
    out->kv_bytes_written += sum.kv_bytes_written;
    out->flops += sum.flops;
    return;
  }
  const int64_t ps = s.page_size > 0 ? s.page_size : 1;
  auto lo_of = [&](int64_t p) {
    return s.sliding_window > 0 ? std::max<int64_t>(0, p - s.sliding_window + 1) : 0;
  };
  int64_t keys = 0, k_slots = 0;  // attended keys; K slots read (whole pages)
  for (int64_t p = start; p < start + n; ++p) {
    const int64_t lo = lo_of(p);
    keys += p - lo + 1;
    k_slots += (p / ps - lo / ps + 1) * ps;
  }
  const int64_t unique = start + n - lo_of(start);
  // Bytes of one key (or value) vector across every layer and KV head.
  const double row = static_cast<double>(s.n_layers * s.n_kv_heads * s.head_dim * s.kv_elem_bytes);
  out->context_attended += keys;
  out->context_unique += unique;
  out->kv_bytes_read += row * static_cast<double>(k_slots + keys);
  out->kv_bytes_unique += 2.0 * row * static_cast<double>(unique);
  out->kv_bytes_written += 2.0 * row * static_cast<double>(n);
  out->flops +=
      4.0 * static_cast<double>(s.n_layers * s.n_heads * s.head_dim) * static_cast<double>(keys);
}

AttentionTerms block_sparse_attention_terms(const AttentionShape& s, int64_t n_query_tokens,
                                            const int64_t* selected_blocks,
                                            const int64_t* summaries_scored,
                                            int64_t summary_bytes) {
  AttentionTerms t;
  const double hd = static_cast<double>(s.head_dim), ps = static_cast<double>(s.page_size);
  const double group = s.n_kv_heads > 0 ? static_cast<double>(s.n_heads / s.n_kv_heads) : 0.0;
  const double block_kv_bytes = 2.0 * ps * hd * static_cast<double>(s.kv_elem_bytes);
  int64_t blocks = 0;
  for (int64_t l = 0; l < s.n_layers; ++l) {
    const double b = static_cast<double>(selected_blocks[l]);
    const double sm = summaries_scored == nullptr ? 0.0 : static_cast<double>(summaries_scored[l]);
    blocks += selected_blocks[l];
    t.kv_bytes_read += b * block_kv_bytes + sm * static_cast<double>(summary_bytes);
    t.flops += b * ps * 4.0 * hd * group + sm * 2.0 * hd * group;
  }
  t.blocks_selected = blocks;
  const int64_t heads_layers = s.n_layers * s.n_kv_heads;
  t.context_attended = heads_layers > 0 ? blocks * s.page_size / heads_layers : 0;
  t.context_unique = t.context_attended;
  t.kv_bytes_unique = t.kv_bytes_read;
  t.kv_bytes_written = 2.0 * static_cast<double>(n_query_tokens * s.n_layers * s.n_kv_heads *
                                                 s.head_dim * s.kv_elem_bytes);
  return t;
}

MoeLayerTerms moe_layer_terms(const MoeLayerShape& s, const int32_t* expert_hits,
                              int64_t n_tokens) {
  MoeLayerTerms t;
  int64_t hits = 0;
  for (int32_t e = 0; e < s.n_experts; ++e) {
    hits += expert_hits[e];
    if (expert_hits[e] > 0) ++t.experts_active;
  }
  const double T = static_cast<double>(n_tokens);
  t.flops[kFlopRouter] = 2.0 * T * static_cast<double>(s.router_params);
  t.flops[kFlopExperts] = 2.0 * static_cast<double>(hits) * static_cast<double>(s.expert_params);
  t.flops[kFlopSharedExperts] = 2.0 * T * static_cast<double>(s.shared_params);
  for (int i = 0; i < kNumDTypeSlots; ++i) {
    const double experts = t.experts_active * s.expert_bytes_by_dtype[i];
    t.weight_bytes[kWeightExperts] += experts;
    t.weight_bytes[kWeightRouter] += s.router_bytes_by_dtype[i];
    t.weight_bytes[kWeightSharedExperts] += s.shared_bytes_by_dtype[i];
    t.weight_bytes_by_dtype[i] = experts + s.router_bytes_by_dtype[i] + s.shared_bytes_by_dtype[i];
  }
  return t;
}

void PassCounters::configure(const ModelConfig& c, const ModelWeights& w, const KVCacheConfig& kv,
                             int64_t capacity) {
  attn_shape_.n_layers = c.n_layers;
  attn_shape_.n_heads = c.n_heads;
  attn_shape_.n_kv_heads = c.n_kv_heads;
  attn_shape_.head_dim = c.head_dim;
  attn_shape_.page_size = kv.page_size;
  attn_shape_.kv_elem_bytes = kv_dtype_bytes(kv.dtype);
  attn_shape_.sliding_window = c.sliding_window;
  attn_shape_.layer_windows.clear();
  for (int32_t l = 0; l < static_cast<int32_t>(c.layer_sliding_window.size()); ++l) {
    const int64_t win = c.layer_sliding_window[l];
    auto it = std::find_if(attn_shape_.layer_windows.begin(), attn_shape_.layer_windows.end(),
                           [&](const auto& g) { return g.first == win; });
    if (it == attn_shape_.layer_windows.end()) {
      attn_shape_.layer_windows.emplace_back(win, 1);
    } else {
      ++it->second;
    }
  }

  auto add_bytes = [&](const WeightTensor& t, int term) {
    const double b = tensor_bytes(t);
    fixed_weight_bytes_[term] += b;
    fixed_bytes_by_dtype_[dtype_slot(t.type)] += b;
  };
  for (const LayerWeights& L : w.layers) {
    for (const WeightTensor* t : {&L.wq, &L.wk, &L.wv, &L.wo, &L.bq, &L.bk, &L.bv})
      add_bytes(*t, kWeightAttn);
    for (const WeightTensor* t : {&L.w_gate, &L.w_up, &L.w_down}) add_bytes(*t, kWeightDenseFFN);
    for (const WeightTensor* t :
         {&L.attn_norm, &L.ffn_norm, &L.q_norm, &L.k_norm, &L.post_attn_norm, &L.post_ffn_norm})
      add_bytes(*t, kWeightNorm);
    flops_per_token_[kFlopAttnProj] += 2.0 * (tensor_params(L.wq) + tensor_params(L.wk) +
                                              tensor_params(L.wv) + tensor_params(L.wo)) +
                                       tensor_params(L.bq) + tensor_params(L.bk) +
                                       tensor_params(L.bv);
    flops_per_token_[kFlopDenseFFN] +=
        2.0 * (tensor_params(L.w_gate) + tensor_params(L.w_up) + tensor_params(L.w_down));
  }
  moe_layers_.clear();
  moe_n_experts_ = c.moe.n_experts;
  moe_hits_.assign(static_cast<size_t>(std::max(c.moe.n_experts, 0)), 0);
  for (int32_t l = 0; l < c.n_layers && c.moe.n_experts > 0; ++l) {
    const MoELayerWeights& m = w.layers[l].moe;
    if (!m.present()) continue;
    MoeLayerShape shape;
    shape.n_experts = c.moe.n_experts;
    shape.top_k = c.moe.top_k;
    shape.d_model = c.d_model;
    // Experts of one layer share shapes and (in every format the loaders produce) dtypes: expert
    // 0 stands for all of them.
    shape.expert_params = static_cast<int64_t>(tensor_params(m.gate[0]) + tensor_params(m.up[0]) +
                                               tensor_params(m.down[0]));
    for (const WeightTensor* t : {&m.gate[0], &m.up[0], &m.down[0]})
      shape.expert_bytes_by_dtype[dtype_slot(t->type)] += tensor_bytes(*t);
    shape.router_params = static_cast<int64_t>(tensor_params(m.router));
    shape.router_bytes_by_dtype[dtype_slot(m.router.type)] += tensor_bytes(m.router);
    for (const WeightTensor* t : {&m.shared_gate, &m.shared_up, &m.shared_down, &m.shared_gate_inp}) {
      shape.shared_params += static_cast<int64_t>(tensor_params(*t));
      shape.shared_bytes_by_dtype[dtype_slot(t->type)] += tensor_bytes(*t);
    }
    moe_layers_.emplace_back(l, shape);
  }
  add_bytes(w.out_norm, kWeightNorm);
  add_bytes(w.lm_head, kWeightLMHead);
  // ~4 FLOPs per element of each normalised row: 2 (or 4 with post-norms) rows of d_model per
  // layer, plus every q and k head with q/k norms.
  const double rows_per_layer = c.post_norms ? 4.0 : 2.0;
  const double qk = c.qk_norm ? static_cast<double>(c.n_heads + c.n_kv_heads) * c.head_dim : 0.0;
  norm_flops_per_row_ = 4.0 * static_cast<double>(c.n_layers) * (rows_per_layer * c.d_model + qk);
  final_norm_flops_per_row_ = 4.0 * c.d_model;
  lm_head_flops_per_row_ = 2.0 * tensor_params(w.lm_head);
  embed_row_bytes_ = static_cast<double>(dtype_row_bytes(w.tok_embd.type, w.tok_embd.cols));
  embed_slot_ = dtype_slot(w.tok_embd.type);

  ring_.assign(static_cast<size_t>(std::max<int64_t>(capacity, 1)), PassRecord());
  count_ = 0;
  passes_ = 0;
  epoch_ = Clock::now();
}

void PassCounters::begin_pass(const std::vector<StepSequence>& batch, const KVCache& kv) {
  PassRecord& r = cur_;
  r = PassRecord();
  r.index = passes_;
  r.n_sequences = static_cast<int32_t>(batch.size());
  AttentionTerms attn;
  int n_decode = 0;
  for (const StepSequence& s : batch) {
    const int64_t start = kv.seq_length(s.seq);
    r.n_tokens += s.n_tokens;
    r.n_output_rows += s.all_logits ? s.n_tokens : 1;
    if (s.n_tokens == 1 && start > 0) ++n_decode;
    if (s.sparse && s.n_tokens == 1) continue;  // block-sparse: add_block_sparse_attention
    dense_attention_terms_add(attn_shape_, start, s.n_tokens, &attn);
  }
  r.mode = static_cast<int32_t>(n_decode == r.n_sequences ? PassMode::kDecode
                                : n_decode == 0           ? PassMode::kPrefill
                                                          : PassMode::kMixed);
  const double T = static_cast<double>(r.n_tokens), n_out = static_cast<double>(r.n_output_rows);
  for (int i = 0; i < kNumWeightTerms; ++i) r.weight_bytes[i] = fixed_weight_bytes_[i];
  for (int i = 0; i < kNumDTypeSlots; ++i) r.weight_bytes_by_dtype[i] = fixed_bytes_by_dtype_[i];
  r.weight_bytes[kWeightEmbed] = T * embed_row_bytes_;
  r.weight_bytes_by_dtype[embed_slot_] += T * embed_row_bytes_;
  for (int i = 0; i < kNumFlopTerms; ++i) r.flops[i] = T * flops_per_token_[i];
  r.flops[kFlopLMHead] = n_out * lm_head_flops_per_row_;
  r.flops[kFlopNorm] = T * norm_flops_per_row_ + n_out * final_norm_flops_per_row_;
  replace_attention(attn);
  t_begin_ = Clock::now();
}

void PassCounters::replace_attention(const AttentionTerms& t) {
  cur_.context_attended = t.context_attended;
  cur_.context_unique = t.context_unique;
  cur_.kv_bytes_read = t.kv_bytes_read;
  cur_.kv_bytes_unique = t.kv_bytes_unique;
  cur_.kv_bytes_written = t.kv_bytes_written;
  cur_.flops[kFlopAttnScores] = t.flops;
  cur_.attention_blocks_selected = t.blocks_selected;
}

void PassCounters::add_block_sparse_attention(int64_t n_tokens, int64_t blocks_selected,
                                              int64_t summaries_scored, int64_t summary_bytes) {
  const int64_t L = attn_shape_.n_layers;
  if (L <= 0 || n_tokens <= 0) return;
  sparse_selected_.assign(static_cast<size_t>(L), blocks_selected / L);
  sparse_scored_.assign(static_cast<size_t>(L), summaries_scored / L);
  const AttentionTerms t = block_sparse_attention_terms(attn_shape_, n_tokens, sparse_selected_.data(),
                                                        sparse_scored_.data(), summary_bytes);
  cur_.context_attended += t.context_attended;
  cur_.context_unique += t.context_unique;
  cur_.kv_bytes_read += t.kv_bytes_read;
  cur_.kv_bytes_unique += t.kv_bytes_unique;
  cur_.kv_bytes_written += t.kv_bytes_written;
  cur_.flops[kFlopAttnScores] += t.flops;
  cur_.attention_blocks_selected += t.blocks_selected;
}

void PassCounters::add_moe_layer(const MoeLayerTerms& t) {
  for (int i = 0; i < kNumFlopTerms; ++i) cur_.flops[i] += t.flops[i];
  for (int i = 0; i < kNumWeightTerms; ++i) cur_.weight_bytes[i] += t.weight_bytes[i];
  for (int i = 0; i < kNumDTypeSlots; ++i)
    cur_.weight_bytes_by_dtype[i] += t.weight_bytes_by_dtype[i];
  cur_.moe_layers += 1;
  cur_.experts_active_sum += t.experts_active;
}

void PassCounters::add_moe_pass(const int64_t* expert_counts, int64_t n_tokens) {
  for (const auto& [layer, shape] : moe_layers_) {
    const int64_t* row = expert_counts + static_cast<int64_t>(layer) * moe_n_experts_;
    for (int32_t e = 0; e < moe_n_experts_; ++e) moe_hits_[e] = static_cast<int32_t>(row[e]);
    add_moe_layer(moe_layer_terms(shape, moe_hits_.data(), n_tokens));
  }
}

void PassCounters::end_pass() {
  if (ring_.empty()) return;  // not configured
  const Clock::time_point now = Clock::now();
  cur_.seconds = std::chrono::duration<double>(now - t_begin_).count();
  cur_.t_end = std::chrono::duration<double>(now - epoch_).count();
  ring_[static_cast<size_t>(count_ % capacity())] = cur_;
  ++count_;
  ++passes_;
}

const PassRecord& PassCounters::at(int64_t i) const {
  const int64_t first = count_ - size();  // oldest record held
  return ring_[static_cast<size_t>((first + i) % capacity())];
}

}  // namespace lme
