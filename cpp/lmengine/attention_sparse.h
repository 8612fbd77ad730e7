// Block-sparse decode attention over the paged KV cache (ReSA, arXiv 2506.04108; selection as in
// Quest). A block is one KV page; kv_summaries.h keeps each block's key min/max.
//
// Per decode token and KV head:
//   1. selection: q̄ = attn_scale * mean of the group's post-RoPE queries; block i scores
//      s_i = sum_j max(q̄_j kmin_ij, q̄_j kmax_ij) (an upper bound of its best scaled dot product);
//      keep n = max(ceil(M * keep), min(M, n_min)) of the M candidate blocks, always including the
//      last n_local and the first n_sink; the rest by score (ties: lower block first).
//   2. attention over the kept blocks only, flash-decoding style: the kept list is cut into splits,
//      each split computes an unnormalised partial output with its running max and sum for all
//      query heads of the group, and the splits are merged by log-sum-exp.
// Napkin math per (token, KV head): reads M summaries (2 * head_dim fp32 each) plus n blocks of
// K and V: with b = 16 and keep 0.1, ~1/16 * (8 / kv_bytes) + 0.1 of the dense KV bytes.
#pragma once

#include <cstdint>
#include <vector>

#include "lmengine/kv_cache.h"
#include "lmengine/status.h"
#include "lmengine/thread_pool.h"

namespace lme {

struct SparseAttentionConfig {
  double keep = 0.1;    // kept fraction of the blocks, in (0, 1]
  int32_t n_min = 16;   // never fewer kept blocks than this (or all of them)
  int32_t n_local = 1;  // the last n_local blocks are always kept (1: the current block)
  int32_t n_sink = 0;   // the first n_sink blocks are always kept (attention sinks)
};

Status sparse_config_validate(const SparseAttentionConfig& c);

// Blocks kept out of n_blocks candidates: max(ceil(M * keep), min(M, n_min)), at least the forced
// sink and local blocks, at most M.
int64_t sparse_blocks_kept(const SparseAttentionConfig& c, int64_t n_blocks);

// Selection for one (token, KV head): candidates are the blocks covering [lo, pos] of the sequence
// whose page table is `pages`. q: [group][head_dim] post-RoPE queries of the group. Writes the
// kept logical block numbers in ascending order to `blocks` and returns how many.
// Scratch: q_mean [head_dim], scores [2 * M]; blocks needs room for M entries.
int32_t sparse_select_blocks(const SparseAttentionConfig& c, const float* q, int32_t group, float scale,
                             KVCache& kv, const int32_t* pages, int32_t layer, int32_t head, int64_t lo,
                             int64_t pos, float* q_mean, float* scores, int32_t* blocks);

// The stages of sparse_select_blocks, for callers that spread the scoring over threads.
// q_mean[d] = scale * mean over the group of q[g][d].
void sparse_pooled_query(const float* q, int32_t group, int32_t head_dim, float scale,
                         float* q_mean);
// scores[i - i0] for the candidate blocks i in [i0, i1) of the n_cand candidates starting at
// logical block b_lo (the forced sink and local blocks score +inf).
void sparse_score_blocks(const SparseAttentionConfig& c, const float* q_mean, KVCache& kv,
                         const int32_t* pages, int32_t layer, int32_t head, int64_t b_lo,
                         int64_t n_cand, int64_t i0, int64_t i1, float* scores);
// The n_keep < n_cand best of the candidates' scores (ties: the lower block), written to blocks
// as ascending logical block numbers; returns n_keep. tmp: n_cand floats.
int32_t sparse_pick_blocks(const float* scores, int64_t n_cand, int64_t n_keep, int64_t b_lo,
                           float* tmp, int32_t* blocks);

// Pages per online-softmax step of attention_sparse_partial.
constexpr int32_t kPartialPages = 4;

// Floats of the work buffer attention_sparse_partial needs.
int64_t attention_partial_work_floats(int32_t group, int32_t page_size);

// Partial attention of the group over the listed logical blocks (ascending), masked to positions
// [lo, pos]: out[g] = sum_j exp(s_gj - m[g]) V_j (unnormalised), l[g] = sum_j exp(s_gj - m[g]),
// s = scale q.k. An empty list gives m = -inf, l = 0, out = 0. This is the CPU decode kernel of
// every single-token attention, dense (all blocks, or a split's share) and block-sparse.
// work: attention_partial_work_floats(group, page_size).
void attention_sparse_partial(const float* q, int32_t group, float scale, KVCache& kv, const int32_t* pages,
                              int32_t layer, int32_t head, const int32_t* blocks, int32_t n_blocks, int64_t lo,
                              int64_t pos, float* work, float* out, float* m, float* l);

// out[g] /= l[g] (0 where l[g] is 0): an unsplit partial becomes the attention output.
void attention_partial_normalize(float* out, const float* l, int32_t group, int32_t head_dim);

// Merges n_parts partials ([part][group][head_dim] outputs, [part][group] maxima and sums) into
// out [group][head_dim].
void attention_sparse_merge(const float* part_out, const float* part_m, const float* part_l, int32_t n_parts,
                            int32_t group, int32_t head_dim, float* out);

// Totals since the last reset: each sparse (token, layer, KV head) adds its candidate and kept
// block counts. KV bytes read = kept * 2 * block bytes + candidates * summary bytes.
struct SparseCounters {
  int64_t tokens = 0;            // decode tokens that ran block-sparse
  int64_t blocks_candidate = 0;  // blocks dense attention would have read
  int64_t blocks_selected = 0;   // blocks read
};

// The engine's per-step state for block-sparse decoding and summary upkeep: planned serially
// before the forward pass (lists of sparse tokens and of written blocks, scratch sized once,
// grown only), run inside it by every thread of the pool.
class BlockSparseDecode {
 public:
  BlockSparseDecode(int32_t n_layers, int32_t n_kv_heads, int32_t group, int32_t head_dim,
                    int32_t page_size, int32_t score_blocks);

  const SparseAttentionConfig& config() const { return config_; }
  void set_config(const SparseAttentionConfig& c) { config_ = c; }
  const SparseCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = SparseCounters{}; }

  // Planning, serial. n_tokens: tokens of the step.
  void begin_step(int64_t n_tokens);
  // Token t of the step (sequence seq, attending to [lo, pos]) runs block-sparse.
  void add_sparse_token(int64_t t, int32_t seq, int64_t lo, int64_t pos);
  // The step writes positions [pos_begin, pos_end) of seq; their blocks' summaries get refreshed.
  void add_written(int32_t seq, int64_t pos_begin, int64_t pos_end, int32_t page_size);
  // Sizes scratch and splits for n_threads and adds the step to the counters.
  void finish_plan(int n_threads);

  bool has_sparse_tokens() const { return n_sparse_ > 0; }
  bool has_written() const { return !written_.empty(); }
  bool is_sparse(int64_t t) const { return tok_sparse_[t] != 0; }

  // Inside the forward pass (called by every thread; each is one or more ops of the pool).
  void refresh_summaries(ParallelContext& pc, KVCache& kv, int32_t layer);
  // q: the step's queries, token t's head h at q + t * q_stride + h * head_dim (post-RoPE);
  // writes the attention output of sparse tokens at the same offsets of out.
  void select(ParallelContext& pc, KVCache& kv, int32_t layer, const float* q, int64_t q_stride, float scale);
  void attend(ParallelContext& pc, KVCache& kv, int32_t layer, const float* q, int64_t q_stride, float scale,
              float* out);

 private:
  struct SparseToken {
    int64_t t;
    int32_t seq;
    int64_t lo, pos;
  };
  struct WrittenBlock {
    int32_t seq;
    int64_t block;
    int64_t n_valid;
  };

  SparseAttentionConfig config_;
  SparseCounters counters_;
  int32_t n_layers_, n_kv_heads_, group_, head_dim_, page_size_;
  int64_t score_blocks_;  // candidates per scoring work item
  std::vector<uint8_t> tok_sparse_;
  std::vector<SparseToken> tokens_;
  int64_t n_sparse_ = 0;
  std::vector<WrittenBlock> written_;
  int64_t cap_blocks_ = 0;  // most candidate blocks of any sparse token this step
  int32_t n_splits_ = 1;
  int n_threads_ = 0;
  // Grown only:
  std::vector<int32_t> selected_;    // [sparse token][kv head][cap_blocks]
  std::vector<float> scores_;        // [sparse token][kv head][cap_blocks]: candidates' scores
  std::vector<int32_t> n_selected_;  // [sparse token][kv head]
  std::vector<float> part_out_;      // [sparse token][kv head][split][group][head_dim]
  std::vector<float> part_m_;        // [sparse token][kv head][split][group]: running max
  std::vector<float> part_l_;        // [sparse token][kv head][split][group]: sum of exponentials
  std::vector<float> thread_scratch_;
  int64_t thread_scratch_len_ = 0;
};

}  // namespace lme
