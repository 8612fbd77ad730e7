#include "lmengine/moe_dispatch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "lmengine/moe_group_score.h"
#include "lmengine/ops.h"

namespace lme {

namespace {

// Rows of one work chunk: at up to 4 tokens a chunk streams its rows' weights once, so it is a
// long run (128 rows: the prefetchers restart at every chunk, and 32-row chunks left Mixtral's
// Q4_0 experts at ~42% of the copy bandwidth); with many tokens per expert 16 rows already
// amortise the activation reads over the token tile.
int64_t rows_per_chunk(int64_t n_tok) { return n_tok <= 4 ? 128 : 16; }
constexpr int64_t kMaxRowsPerChunk = 128;

std::string shape_str(int64_t rows, int64_t cols) {
  return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

Status check(const WeightTensor& t, const std::string& name, int64_t rows, int64_t cols, bool f32_only) {
  if (t.data == nullptr) return Status::Error(StatusCode::kBadModel, "missing tensor " + name);
  if (!dtype_is_supported(static_cast<int32_t>(t.type))) {
    return Status::Error(StatusCode::kUnsupported, "tensor " + name + " has unsupported type " +
                                                       std::to_string(static_cast<int>(t.type)));
  }
  if (f32_only && t.type != DType::F32) return Status::Error(StatusCode::kBadModel, "tensor " + name + " must be F32");
  if (t.rows != rows || t.cols != cols) {
    return Status::Error(StatusCode::kBadModel, "tensor " + name + " has shape " + shape_str(t.rows, t.cols) +
                                                    ", expected " + shape_str(rows, cols));
  }
  if (cols % dtype_block_size(t.type) != 0) {
    return Status::Error(StatusCode::kBadModel, "tensor " + name + ": row length " + std::to_string(cols) +
                                                    " is not a multiple of the " + dtype_name(t.type) +
                                                    " block size");
  }
  return Status::Ok();
}

}  // namespace

int64_t moe_f32_min_tokens(const MoEConfig& c, int64_t dense_min) {
  if (dense_min <= 0) return 0;
  const int64_t ratio = c.top_k > 0 ? std::max<int64_t>(1, c.n_experts / c.top_k) : 1;
  return dense_min * ratio;
}

namespace {

bool two_level_for(bool two, DType t) { return two && activation_is_quantized(t); }

// Activation rows of token t for weight type ty, laid out as Engine::forward does: one row at
// base + t*xs, or with wide activations (quant.h) one wide row of 2*xs bytes at base + 2t*xs.
void prepare_row(DType ty, const float* x, uint8_t* base, int64_t t, int64_t k, int64_t xs, bool two,
                 float* tmp) {
  if (two_level_for(two, ty)) {
    quantize_activation_row_wide(ty, x, base + 2 * t * xs, 2 * xs, tmp, k);
  } else {
    quantize_activation_row(ty, x, base + t * xs, k);
  }
}

// y[t * ldy + r] for rows r in [r0, r0 + nr) of w and n_tok activation rows at x.
void product_rows(const WeightTensor& w, int64_t r0, int64_t nr, const uint8_t* x, int64_t xs, int64_t n_tok,
                  bool two, float* y, int64_t ldy, float* tmp) {
  const int64_t rb = dtype_row_bytes(w.type, w.cols);
  if (!two_level_for(two, w.type)) {
    matmul_rows(w.type, w.cols, w.data + r0 * rb, rb, nr, x, xs, n_tok, y + r0, ldy);
    return;
  }
  matmul_rows_wide(w.type, w.cols, w.data + r0 * rb, rb, nr, x, 2 * xs, n_tok, y + r0, ldy, tmp);
}

// Rows to multiply: converted activation rows (x, xs bytes apart per row kind) and, for the rows
// whose flag is set (prompt-chunk tokens, see MoEDispatch::forward), their fp32 rows instead.
struct ProductRows {
  const uint8_t* x;
  int64_t xs;
  bool two;
  const float* const* f32_rows;  // [n] (may be null when no flag is set)
  const uint8_t* f32;            // [n] flags, or null: none
};

// As product_rows, runs of consecutive rows on the same path taken together.
void product_rows_mixed(const WeightTensor& w, int64_t r0, int64_t nr, const ProductRows& in, int64_t n_tok,
                        float* y, int64_t ldy, float* tmp) {
  if (in.f32 == nullptr) return product_rows(w, r0, nr, in.x, in.xs, n_tok, in.two, y, ldy, tmp);
  const int64_t rb = dtype_row_bytes(w.type, w.cols);
  const int64_t step = two_level_for(in.two, w.type) ? 2 * in.xs : in.xs;
  for (int64_t t0 = 0, t1; t0 < n_tok; t0 = t1) {
    for (t1 = t0 + 1; t1 < n_tok && in.f32[t1] == in.f32[t0];) ++t1;
    if (in.f32[t0]) {
      matmul_rows_f32(w.type, w.cols, w.data + r0 * rb, rb, nr, in.f32_rows + t0, t1 - t0, y + t0 * ldy + r0, ldy);
    } else {
      product_rows(w, r0, nr, in.x + t0 * step, in.xs, t1 - t0, in.two, y + t0 * ldy, ldy, tmp);
    }
  }
}

// Chooses token t's experts from its router logits. tmp: 2E floats. Ties go to the lower index.
void route_token(const MoEConfig& c, const float* logits, const float* bias, float* tmp, int32_t* sel,
                 float* weight) {
  const int32_t E = c.n_experts, k = c.top_k;
  float* score = tmp;
  float* choice = tmp + E;
  if (c.scoring == MoEScoring::kSoftmax) {
    float m = logits[0];
    for (int32_t e = 1; e < E; ++e) m = std::max(m, logits[e]);
    float sum = 0.f;
    for (int32_t e = 0; e < E; ++e) sum += (score[e] = std::exp(logits[e] - m));
    for (int32_t e = 0; e < E; ++e) choice[e] = (score[e] /= sum);
  } else {
    for (int32_t e = 0; e < E; ++e) {
      score[e] = 1.f / (1.f + std::exp(-logits[e]));
      choice[e] = score[e] + (bias ? bias[e] : 0.f);
    }
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (c.n_group > 1 && c.topk_group < c.n_group) {
    // A group's score is the sum of its two best choice values; experts outside the topk_group
    // best groups cannot be chosen.
    const int32_t gs = E / c.n_group;
    float group_score[256];
    bool keep[256];
    for (int32_t g = 0; g < c.n_group; ++g) {
      group_score[g] = moe_group_score(choice + g * gs, gs);
      keep[g] = false;
    }
    for (int32_t j = 0; j < c.topk_group; ++j) {
      int32_t best = -1;
      for (int32_t g = 0; g < c.n_group; ++g) {
        if (!keep[g] && (best < 0 || group_score[g] > group_score[best])) best = g;
      }
      keep[best] = true;
    }
    for (int32_t g = 0; g < c.n_group; ++g) {
      if (!keep[g]) std::fill(choice + g * gs, choice + (g + 1) * gs, neg_inf);
    }
  }
  // Chosen experts are marked NaN (never compared greater), masked ones -inf.
  float sum = 0.f;
  for (int32_t j = 0; j < k; ++j) {
    int32_t best = -1;
    for (int32_t e = 0; e < E; ++e) {
      if (!std::isnan(choice[e]) && (best < 0 || choice[e] > choice[best])) best = e;
    }
    sel[j] = best;
    weight[j] = score[best];
    sum += score[best];
    choice[best] = std::numeric_limits<float>::quiet_NaN();
  }
  if (c.norm_topk_prob) {
    const float denom = c.scoring == MoEScoring::kSigmoid ? sum + 1e-20f : sum;
    for (int32_t j = 0; j < k; ++j) weight[j] /= denom;
  }
  if (c.routed_scaling_factor != 1.f) {
    for (int32_t j = 0; j < k; ++j) weight[j] *= c.routed_scaling_factor;
  }
}

}  // namespace

Status validate_moe_config(const MoEConfig& c) {
  auto bad = [](const std::string& m) { return Status::Error(StatusCode::kBadModel, "MoE config: " + m); };
  if (c.n_experts < 1 || c.n_experts > 4096) return bad("n_experts must be in [1, 4096]");
  if (c.top_k < 1 || c.top_k > c.n_experts) return bad("top_k must be in [1, n_experts]");
  if (c.d_ff_expert < 1) return bad("the expert feed-forward width must be positive");
  if (c.d_ff_shared < 0) return bad("the shared expert width must be >= 0");
  if (c.shared_gate && c.d_ff_shared == 0) return bad("a shared-expert gate needs a shared expert");
  if (c.scoring != MoEScoring::kSoftmax && c.scoring != MoEScoring::kSigmoid) return bad("unknown scoring function");
  if (c.n_group < 1 || c.n_group > 256 || c.n_experts % c.n_group != 0) {
    return bad("n_group must be in [1, 256] and divide n_experts");
  }
  if (c.topk_group < 1 || c.topk_group > c.n_group) return bad("topk_group must be in [1, n_group]");
  if (int64_t(c.topk_group) * (c.n_experts / c.n_group) < c.top_k) {
    return bad("topk_group groups hold fewer than top_k experts");
  }
  if (!(c.routed_scaling_factor > 0.f) || !std::isfinite(c.routed_scaling_factor)) {
    return bad("routed_scaling_factor must be positive and finite");
  }
  return Status::Ok();
}

Status validate_moe_layer(const MoEConfig& c, int64_t d, const MoELayerWeights& w, const std::string& p) {
  Status s = validate_moe_config(c);
  if (!s.ok()) return s;
  const int64_t E = c.n_experts, ff = c.d_ff_expert, ffs = c.d_ff_shared;
  if (!(s = check(w.router, p + "ffn_gate_inp", E, d, false)).ok()) return s;
  if (w.score_bias.data != nullptr) {
    if (c.scoring != MoEScoring::kSigmoid) {
      return Status::Error(StatusCode::kUnsupported,
                           "tensor " + p + "exp_probs_b (selection bias) is only used with sigmoid scoring");
    }
    if (!(s = check(w.score_bias, p + "exp_probs_b", 1, E, true)).ok()) return s;
  }
  const char* names[3] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};
  const std::vector<WeightTensor>* sets[3] = {&w.gate, &w.up, &w.down};
  for (int j = 0; j < 3; ++j) {
    if (static_cast<int64_t>(sets[j]->size()) != E) {
      return Status::Error(StatusCode::kBadModel, "tensor " + p + names[j] + " holds " +
                                                      std::to_string(sets[j]->size()) + " experts, expected " +
                                                      std::to_string(E));
    }
    for (int64_t e = 0; e < E; ++e) {
      const std::string name = p + names[j] + "." + std::to_string(e);
      const WeightTensor& t = (*sets[j])[e];
      if (!(s = check(t, name, j == 2 ? d : ff, j == 2 ? ff : d, false)).ok()) return s;
      // One activation format per role: gate and up of every expert share a type, downs another.
      const DType want = j == 2 ? w.down[0].type : w.gate[0].type;
      if (t.type != want) {
        return Status::Error(StatusCode::kUnsupported, "tensor " + name + " has type " + dtype_name(t.type) +
                                                           "; the layer's other experts use " + dtype_name(want));
      }
    }
  }
  if (ffs > 0) {
    if (!(s = check(w.shared_gate, p + "ffn_gate_shexp", ffs, d, false)).ok()) return s;
    if (!(s = check(w.shared_up, p + "ffn_up_shexp", ffs, d, false)).ok()) return s;
    if (!(s = check(w.shared_down, p + "ffn_down_shexp", d, ffs, false)).ok()) return s;
    if (w.shared_up.type != w.shared_gate.type) {
      return Status::Error(StatusCode::kUnsupported,
                           "tensor " + p + "ffn_up_shexp must have the type of " + p + "ffn_gate_shexp");
    }
    if (c.shared_gate && !(s = check(w.shared_gate_inp, p + "ffn_gate_inp_shexp", 1, d, true)).ok()) return s;
  } else if (w.shared_gate.data || w.shared_up.data || w.shared_down.data) {
    return Status::Error(StatusCode::kBadModel, "layer " + p + " has shared-expert tensors but the config has none");
  }
  return Status::Ok();
}

void MoEStats::init(int32_t layers, int32_t experts) {
  n_layers = layers;
  n_experts = experts;
  last.assign(static_cast<size_t>(layers) * experts, 0);
  total.assign(last.size(), 0);
  passes = 0;
}

void MoEStats::reset() {
  std::fill(total.begin(), total.end(), 0);
  passes = 0;
}

void MoEStats::accumulate() {
  for (size_t i = 0; i < last.size(); ++i) total[i] += last[i];
  ++passes;
}

void MoEStats::distinct_last(int32_t* out) const {
  for (int32_t l = 0; l < n_layers; ++l) {
    int32_t n = 0;
    for (int32_t e = 0; e < n_experts; ++e) n += last[size_t(l) * n_experts + e] > 0;
    out[l] = n;
  }
}

void MoEDispatch::reserve(const MoEConfig& c, int64_t d, const std::vector<const MoELayerWeights*>& layers,
                          int64_t max_tokens, int n_threads, int64_t n_slots) {
  if (static_cast<int64_t>(op_sizes_.size()) < 3 * n_slots) op_sizes_.assign(3 * n_slots, 0);
  if (max_tokens <= cap_tokens_ && n_threads == n_threads_) return;
  cap_tokens_ = std::max<int64_t>({max_tokens, cap_tokens_, 1});
  n_threads_ = n_threads;
  const int64_t T = cap_tokens_, E = c.n_experts, k = c.top_k, ff = c.d_ff_expert, ffs = c.d_ff_shared;
  const int64_t P = T * k;
  cap_pairs_ = P;
  int64_t widest = 0;
  auto consider = [&](const WeightTensor& w) {
    if (w.data) widest = std::max(widest, activation_row_bytes(w.type, w.cols));
  };
  for (const MoELayerWeights* L : layers) {
    consider(L->router);
    consider(L->shared_gate);
    consider(L->shared_down);
    if (L->present()) {
      consider(L->gate[0]);
      consider(L->down[0]);
    }
  }
  slot_bytes_ = (widest + 63) / 64 * 64;
  const size_t row2 = static_cast<size_t>(2 * slot_bytes_);
  act_router_.assign(T * row2, 0);
  act_tok_.assign(T * row2, 0);
  act_shared_.assign(ffs > 0 ? T * row2 : 0, 0);
  act_shared_mid_.assign(ffs > 0 ? T * row2 : 0, 0);
  act_pairs_.assign(P * row2, 0);
  act_mid_.assign(P * row2, 0);
  logits_.assign(T * E, 0.f);
  sel_expert_.assign(P, 0);
  sel_weight_.assign(P, 0.f);
  pair_of_slot_.assign(P, 0);
  pair_token_.assign(P, 0);
  offsets_.assign(E + 1, 0);
  active_.assign(E, 0);
  chunk_start_.assign(2 * (E + 2), 0);
  tok_rows_.assign(T, nullptr);
  shared_mid_rows_.assign(T, nullptr);
  pair_rows_.assign(P, nullptr);
  mid_rows_.assign(P, nullptr);
  pair_f32_.assign(P, 0);
  h_gate_.assign(P * ff, 0.f);
  h_up_.assign(P * ff, 0.f);
  y_.assign(P * d, 0.f);
  s_gate_.assign(T * ffs, 0.f);
  s_up_.assign(T * ffs, 0.f);
  s_out_.assign(ffs > 0 ? T * d : 0, 0.f);
  s_scale_.assign(T, 1.f);
  route_tmp_.assign(static_cast<size_t>(n_threads) * 2 * E, 0.f);
  row_tmp_len_ = std::max<int64_t>({d, ff, ffs});
  row_tmp_.assign(static_cast<size_t>(n_threads) * row_tmp_len_, 0.f);
  mm_tmp_len_ = 2 * std::max<int64_t>(T, 4) * kMaxRowsPerChunk;  // two-level rows x any chunk
  mm_tmp_.assign(static_cast<size_t>(n_threads) * mm_tmp_len_, 0.f);
  ff_cap_ = ff;
  ffs_cap_ = ffs;
  e_cap_ = E;
}

void MoEDispatch::forward(ParallelContext& pc, const MoEConfig& c, const MoELayerWeights& w, const float* x,
                          int64_t T, int64_t d, bool two_gu, bool two_down, float* out, int64_t* counts,
                          int64_t slot, const uint8_t* f32_tok) {
  const int64_t E = c.n_experts, k = c.top_k, ff = c.d_ff_expert, ffs = c.d_ff_shared;
  const int64_t xs = slot_bytes_;
  const int tid = pc.tid();
  float* row_tmp = &row_tmp_[size_t(tid) * row_tmp_len_];
  float* mm_tmp = &mm_tmp_[size_t(tid) * mm_tmp_len_];
  const DType t_router = w.router.type, t_gu = w.gate[0].type, t_down = w.down[0].type;
  const bool shared = ffs > 0;
  // Bytes between consecutive tokens' activation rows of a given type.
  auto row_step = [&](DType ty, bool two) { return two_level_for(two, ty) ? 2 * xs : xs; };

  // 1. Activation rows of every token: for the router, the experts' gate/up and the shared expert
  // (fp32-path tokens keep x itself).
  pc.for_chunks(T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = x + t * d;
      tok_rows_[t] = xr;
      shared_mid_rows_[t] = shared ? &s_gate_[t * ffs] : nullptr;
      if (f32_tok && f32_tok[t]) continue;
      prepare_row(t_router, xr, act_router_.data(), t, d, xs, two_gu, row_tmp);
      prepare_row(t_gu, xr, act_tok_.data(), t, d, xs, two_gu, row_tmp);
      if (shared) prepare_row(w.shared_gate.type, xr, act_shared_.data(), t, d, xs, two_gu, row_tmp);
    }
  });
  const ProductRows router_in{act_router_.data(), xs, two_gu, tok_rows_.data(), f32_tok};
  const ProductRows shared_in{act_shared_.data(), xs, two_gu, tok_rows_.data(), f32_tok};
  const ProductRows shared_mid_in{act_shared_mid_.data(), xs, two_down, shared_mid_rows_.data(), f32_tok};

  // 2. Router logits [T, E] and the shared expert's gate/up [T, ffs], one op.
  {
    const int64_t rpc = rows_per_chunk(T);
    const int64_t n_router = (E + rpc - 1) / rpc, n_shared = shared ? (ffs + rpc - 1) / rpc : 0;
    pc.for_chunks(n_router + 2 * n_shared, 1, [&](int64_t ci, int64_t) {
      if (ci < n_router) {
        const int64_t r0 = ci * rpc;
        product_rows_mixed(w.router, r0, std::min(rpc, E - r0), router_in, T, logits_.data(), E, mm_tmp);
        return;
      }
      ci -= n_router;
      const bool is_up = ci >= n_shared;
      const int64_t r0 = (is_up ? ci - n_shared : ci) * rpc;
      product_rows_mixed(is_up ? w.shared_up : w.shared_gate, r0, std::min(rpc, ffs - r0), shared_in, T,
                         is_up ? s_up_.data() : s_gate_.data(), ffs, mm_tmp);
    });
  }

  // 3. Per token: choose the experts; shared expert's activation and its gate value.
  pc.for_chunks(T, 1, [&](int64_t t0, int64_t t1) {
    float* tmp = &route_tmp_[size_t(tid) * 2 * E];
    for (int64_t t = t0; t < t1; ++t) {
      route_token(c, &logits_[t * E], w.score_bias.data ? w.score_bias.f32() : nullptr, tmp, &sel_expert_[t * k],
                  &sel_weight_[t * k]);
      if (shared) {
        float* g = &s_gate_[t * ffs];
        silu_mul_row(g, &s_up_[t * ffs], ffs);
        if (!(f32_tok && f32_tok[t])) prepare_row(w.shared_down.type, g, act_shared_mid_.data(), t, ffs, xs, two_down, row_tmp);
        s_scale_[t] = c.shared_gate ? 1.f / (1.f + std::exp(-dot_f32(w.shared_gate_inp.f32(), x + t * d, d))) : 1.f;
      }
    }
  });

  // 4. Histogram -> prefix sum -> pairs grouped by expert (token order within an expert), and
  // the chunk tables of the two product ops. One thread; T*k is at most a few thousand.
  int64_t n_active = 0, n_chunks_gu = 0, n_chunks_down = 0;
  int64_t* gu_start = chunk_start_.data();           // [E + 2]
  int64_t* down_start = chunk_start_.data() + E + 2;  // [E + 2]
  pc.for_chunks(1, 1, [&](int64_t, int64_t) {
    std::fill(offsets_.begin(), offsets_.end(), 0);
    for (int64_t i = 0; i < T * k; ++i) ++offsets_[sel_expert_[i] + 1];
    if (counts) {
      for (int64_t e = 0; e < E; ++e) counts[e] = offsets_[e + 1];
    }
    for (int64_t e = 0; e < E; ++e) offsets_[e + 1] += offsets_[e];
    for (int64_t i = 0; i < T * k; ++i) {
      const int32_t e = sel_expert_[i];
      const int64_t p = offsets_[e]++;
      pair_token_[p] = static_cast<int32_t>(i / k);
      pair_of_slot_[i] = static_cast<int32_t>(p);
    }
    for (int64_t e = E; e > 0; --e) offsets_[e] = offsets_[e - 1];  // undo the placement shift
    offsets_[0] = 0;
    int64_t na = 0, g = 0, dn = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = offsets_[e + 1] - offsets_[e];
      if (n == 0) continue;
      const int64_t rpc = rows_per_chunk(n);
      gu_start[na] = g;
      down_start[na] = dn;
      active_[na++] = static_cast<int32_t>(e);
      g += 2 * ((ff + rpc - 1) / rpc);
      dn += (d + rpc - 1) / rpc;
    }
    gu_start[na] = g;
    down_start[na] = dn;
    // The shared expert's down product rides along with the experts' gate/up op.
    gu_start[na + 1] = g + (shared ? (d + rows_per_chunk(T) - 1) / rows_per_chunk(T) : 0);
    down_start[na + 1] = dn;
    int64_t* sizes = &op_sizes_[3 * slot];
    sizes[0] = na;
    sizes[1] = gu_start[na + 1];
    sizes[2] = dn;
  });
  n_active = op_sizes_[3 * slot];
  n_chunks_gu = op_sizes_[3 * slot + 1];
  n_chunks_down = op_sizes_[3 * slot + 2];
  const int64_t P = T * k;

  // 5. Gather each pair's activation rows (its token's, converted once in step 1; fp32-path pairs
  // point at their token's row and at their own silu(gate)*up row instead).
  {
    const int64_t step = row_step(t_gu, two_gu);
    pc.for_chunks(P, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t t = pair_token_[p];
        pair_rows_[p] = x + t * d;
        mid_rows_[p] = &h_gate_[p * ff];
        pair_f32_[p] = f32_tok ? f32_tok[t] : 0;
        if (pair_f32_[p]) continue;
        std::memcpy(&act_pairs_[p * step], &act_tok_[t * step], static_cast<size_t>(step));
      }
    });
  }
  const uint8_t* pair_f32 = f32_tok ? pair_f32_.data() : nullptr;

  // Maps a chunk index to (active expert slot, chunk within it) by binary search on the starts.
  auto locate = [&](const int64_t* starts, int64_t ci) {
    return static_cast<int64_t>(std::upper_bound(starts, starts + n_active + 1, ci) - starts) - 1;
  };

  // 6. Gate and up products of every active expert over its gathered rows; shared down product.
  pc.for_chunks(n_chunks_gu, 1, [&](int64_t ci, int64_t) {
    if (ci >= gu_start[n_active]) {
      const int64_t rpc = rows_per_chunk(T);
      const int64_t r0 = (ci - gu_start[n_active]) * rpc;
      product_rows_mixed(w.shared_down, r0, std::min(rpc, d - r0), shared_mid_in, T, s_out_.data(), d, mm_tmp);
      return;
    }
    const int64_t a = locate(gu_start, ci);
    const int32_t e = active_[a];
    const int64_t p0 = offsets_[e], n = offsets_[e + 1] - p0, rpc = rows_per_chunk(n);
    const int64_t per = (ff + rpc - 1) / rpc;
    int64_t j = ci - gu_start[a];
    const bool is_up = j >= per;
    if (is_up) j -= per;
    const int64_t r0 = j * rpc;
    const ProductRows in{&act_pairs_[p0 * row_step(t_gu, two_gu)], xs, two_gu, pair_rows_.data() + p0,
                         pair_f32 ? pair_f32 + p0 : nullptr};
    product_rows_mixed(is_up ? w.up[e] : w.gate[e], r0, std::min(rpc, ff - r0), in, n,
                       (is_up ? h_up_.data() : h_gate_.data()) + p0 * ff, ff, mm_tmp);
  });

  // 7. silu(gate) * up per pair, converted for the down products.
  pc.for_chunks(P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* g = &h_gate_[p * ff];
      silu_mul_row(g, &h_up_[p * ff], ff);
      if (!(pair_f32 && pair_f32[p])) prepare_row(t_down, g, act_mid_.data(), p, ff, xs, two_down, row_tmp);
    }
  });

  // 8. Down products per active expert.
  pc.for_chunks(n_chunks_down, 1, [&](int64_t ci, int64_t) {
    const int64_t a = locate(down_start, ci);
    const int32_t e = active_[a];
    const int64_t p0 = offsets_[e], n = offsets_[e + 1] - p0, rpc = rows_per_chunk(n);
    const int64_t r0 = (ci - down_start[a]) * rpc;
    const ProductRows in{&act_mid_[p0 * row_step(t_down, two_down)], xs, two_down, mid_rows_.data() + p0,
                         pair_f32 ? pair_f32 + p0 : nullptr};
    product_rows_mixed(w.down[e], r0, std::min(rpc, d - r0), in, n, y_.data() + p0 * d, d, mm_tmp);
  });

  // 9. Scatter-add back per token, slots in order (the same sum whatever the thread timing).
  pc.for_chunks(T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + t * d;
      if (shared) {
        const float s = s_scale_[t];
        const float* so = &s_out_[t * d];
        for (int64_t i = 0; i < d; ++i) o[i] = s * so[i];
      } else {
        std::fill(o, o + d, 0.f);
      }
      for (int64_t j = 0; j < k; ++j) {
        const float wt = sel_weight_[t * k + j];
        const float* y = &y_[int64_t(pair_of_slot_[t * k + j]) * d];
        for (int64_t i = 0; i < d; ++i) o[i] += wt * y[i];
      }
    }
  });
}

}  // namespace lme
