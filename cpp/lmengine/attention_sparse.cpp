#include "lmengine/attention_sparse.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "lmengine/attention_vec.h"
#include "lmengine/kv_summaries.h"
#include "lmengine/ops.h"

namespace lme {

namespace {

constexpr int32_t kMaxSplits = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using attention_vec::load8;
using attention_vec::v8f;

}  // namespace

Status sparse_config_validate(const SparseAttentionConfig& c) {
  if (!(c.keep > 0.0 && c.keep <= 1.0)) {
    return Status::Error(StatusCode::kInvalidArgument, "sparse attention keep must be in (0, 1], got " +
                                                           std::to_string(c.keep));
  }
  if (c.n_min < 0 || c.n_local < 0 || c.n_sink < 0) {
    return Status::Error(StatusCode::kInvalidArgument, "sparse attention n_min, n_local and n_sink must be >= 0");
  }
  return Status::Ok();
}

int64_t sparse_blocks_kept(const SparseAttentionConfig& c, int64_t n_blocks) {
  if (n_blocks <= 0) return 0;
  // The epsilon keeps exact products (30 * 0.1 = 3.0000000000000004 in binary) from rounding up.
  int64_t n = static_cast<int64_t>(std::ceil(static_cast<double>(n_blocks) * c.keep - 1e-9));
  n = std::max(n, std::min<int64_t>(n_blocks, c.n_min));
  const int64_t forced = std::min<int64_t>(n_blocks, c.n_sink) + std::min<int64_t>(n_blocks, c.n_local);
  n = std::max(n, std::min(forced, n_blocks));
  return std::min(n, n_blocks);
}

namespace {

constexpr int64_t kSummaryPrefetch = 8;

// sum_d max(q[d] * mn[d], q[d] * mx[d]) in 8 lanes (fp32; one serial chain over d was latency
// bound at ~4 cycles per element), the summary read in the pool's element type.
template <typename T>
float summary_score(const float* q, const T* mn, const T* mx, int64_t hd) {
  v8f acc = {};
  int64_t d = 0;
  for (; d + 8 <= hd; d += 8) {
    const v8f qv = load8(q + d), a = qv * load8(mn + d), b = qv * load8(mx + d);
    acc += a > b ? a : b;
  }
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; d < hd; ++d)
    s += std::max(q[d] * attention_vec::to_f32(mn[d]), q[d] * attention_vec::to_f32(mx[d]));
  return s;
}

template <typename T>
void score_blocks(const SparseAttentionConfig& c, const float* q_mean, KVCache& kv,
                  const int32_t* pages, int32_t layer, int32_t head, int64_t b_lo, int64_t n_cand,
                  int64_t i0, int64_t i1, float* scores) {
  const int64_t hd = kv.config().head_dim;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t i = i0; i < i1; ++i) {
    if (i < c.n_sink || i >= n_cand - c.n_local) {
      scores[i - i0] = inf;
      continue;
    }
    if (i + kSummaryPrefetch < i1) {
      attention_vec::prefetch_block(
          kv.block_summary(pages[b_lo + i + kSummaryPrefetch], layer, head), kv.summary_bytes());
    }
    const T* mn = reinterpret_cast<const T*>(kv.block_summary(pages[b_lo + i], layer, head));
    scores[i - i0] = summary_score(q_mean, mn, mn + hd, hd);
  }
}

}  // namespace

void sparse_pooled_query(const float* q, int32_t group, int32_t head_dim, float scale,
                         float* q_mean) {
  const float w = scale / static_cast<float>(group);
  for (int64_t d = 0; d < head_dim; ++d) {
    float acc = 0.f;
    for (int32_t g = 0; g < group; ++g) acc += q[g * head_dim + d];
    q_mean[d] = acc * w;
  }
}

void sparse_score_blocks(const SparseAttentionConfig& c, const float* q_mean, KVCache& kv,
                         const int32_t* pages, int32_t layer, int32_t head, int64_t b_lo,
                         int64_t n_cand, int64_t i0, int64_t i1, float* scores) {
  switch (kv.config().dtype) {
    case KVDType::F32:
      return score_blocks<float>(c, q_mean, kv, pages, layer, head, b_lo, n_cand, i0, i1, scores);
    case KVDType::F16:
      return score_blocks<attention_vec::Half>(c, q_mean, kv, pages, layer, head, b_lo, n_cand, i0,
                                               i1, scores);
    case KVDType::BF16:
      return score_blocks<attention_vec::BHalf>(c, q_mean, kv, pages, layer, head, b_lo, n_cand, i0,
                                                i1, scores);
  }
}

int32_t sparse_pick_blocks(const float* scores, int64_t n_cand, int64_t n_keep, int64_t b_lo,
                           float* tmp, int32_t* blocks) {
  // Higher score first, then lower block (a strict order, so the kept set is unique): the
  // n_keep-th largest score is the threshold; every block above it is kept, and of the blocks
  // equal to it the lowest ones fill the rest. One pass in block order then writes the kept
  // blocks ascending (a selection on plain floats, no comparator through an index, no sort).
  std::copy(scores, scores + n_cand, tmp);
  std::nth_element(tmp, tmp + (n_keep - 1), tmp + n_cand, std::greater<float>());
  const float thr = tmp[n_keep - 1];
  int64_t above = 0;
  for (int64_t i = 0; i < n_cand; ++i) above += scores[i] > thr;
  int64_t ties = n_keep - above, n = 0;
  for (int64_t i = 0; i < n_cand; ++i) {
    const bool keep = scores[i] > thr || (scores[i] == thr && ties-- > 0);
    if (keep) blocks[n++] = static_cast<int32_t>(b_lo + i);
  }
  return static_cast<int32_t>(n);
}

int32_t sparse_select_blocks(const SparseAttentionConfig& c, const float* q, int32_t group,
                             float scale, KVCache& kv, const int32_t* pages, int32_t layer,
                             int32_t head, int64_t lo, int64_t pos, float* q_mean, float* scores,
                             int32_t* blocks) {
  const int64_t hd = kv.config().head_dim, ps = kv.config().page_size;
  const int64_t b_lo = lo / ps, n_cand = pos / ps - b_lo + 1;
  const int64_t n_keep = sparse_blocks_kept(c, n_cand);
  if (n_keep >= n_cand) {
    for (int64_t i = 0; i < n_cand; ++i) blocks[i] = static_cast<int32_t>(b_lo + i);
    return static_cast<int32_t>(n_cand);
  }
  sparse_pooled_query(q, group, static_cast<int32_t>(hd), scale, q_mean);
  sparse_score_blocks(c, q_mean, kv, pages, layer, head, b_lo, n_cand, 0, n_cand, scores);
  return sparse_pick_blocks(scores, n_cand, n_keep, b_lo, scores + n_cand, blocks);
}

int64_t attention_partial_work_floats(int32_t group, int32_t page_size) {
  return int64_t(group) * (int64_t(kPartialPages) * page_size + 1);
}

namespace {

// Blocks ahead whose K/V a step requests (one block per block computed): selected blocks lie
// anywhere in the pool, and even a dense walk only streams within a page group.
constexpr int32_t kPrefetchAhead = 8;

// attention_sparse_partial for pool elements of type T (float, Half, BHalf), read in place.
template <typename T>
void sparse_partial(const float* q, int32_t group, float scale, KVCache& kv, const int32_t* pages,
                    int32_t layer, int32_t head, const int32_t* blocks, int32_t n_blocks,
                    int64_t lo, int64_t pos, float* work, float* out, float* m, float* l) {
  const KVCacheConfig& c = kv.config();
  const int64_t hd = c.head_dim, ps = c.page_size, bw = kPartialPages * ps;
  const int64_t block_bytes = kv.block_bytes();
  float* s = work;                // [group][bw] scores of the step's pages, then probabilities
  float* alpha = s + group * bw;  // [group] rescale of out and l
  std::fill(out, out + int64_t(group) * hd, 0.f);
  for (int32_t g = 0; g < group; ++g) {
    m[g] = kNegInf;
    l[g] = 0.f;
  }
  // kPartialPages pages per online-softmax step: the per-row bookkeeping (max, rescale of out,
  // sum) is paid once per step, and the weighted sum over V keeps its accumulators in registers
  // across the step's pages.
  for (int32_t i0 = 0; i0 < n_blocks; i0 += kPartialPages) {
    const int32_t np = std::min<int32_t>(kPartialPages, n_blocks - i0);
    attention_vec::PVBlockT<T> blk;
    blk.n_pages = np;
    blk.ps = ps;
    int64_t n_valid = 0;
    for (int32_t b = 0; b < np; ++b) {
      const int64_t p0 = int64_t(blocks[i0 + b]) * ps;
      const int64_t j0 = std::max(p0, lo) - p0,
                    j1 = std::min(p0 + ps - 1, pos) - p0;  // valid slots
      const int32_t page = pages[blocks[i0 + b]];
      if (i0 + b + kPrefetchAhead < n_blocks) {
        const int32_t ahead = pages[blocks[i0 + b + kPrefetchAhead]];
        attention_vec::prefetch_block(kv.k_block(ahead, layer, head), block_bytes);
        attention_vec::prefetch_block(kv.v_block(ahead, layer, head), block_bytes);
      }
      blk.v[b] = reinterpret_cast<const T*>(kv.v_block(page, layer, head));
      blk.j0[b] = j0;
      blk.j1[b] = j1;
      if (j0 > j1) {
        for (int32_t g = 0; g < group; ++g)
          std::fill(s + g * bw + b * ps, s + g * bw + (b + 1) * ps, kNegInf);
        continue;
      }
      n_valid += j1 - j0 + 1;
      // The group's heads in one pass over the K page.
      attention_vec::page_scores(q, group, hd,
                                 reinterpret_cast<const T*>(kv.k_block(page, layer, head)), ps,
                                 s + b * ps, bw);
      if (j0 > 0 || j1 < ps - 1) {  // slots outside [lo, pos] (stale, NaN included) drop out
        for (int32_t g = 0; g < group; ++g) {
          float* row = s + g * bw + b * ps;
          for (int64_t j = 0; j < j0; ++j) row[j] = kNegInf;
          for (int64_t j = j1 + 1; j < ps; ++j) row[j] = kNegInf;
        }
      }
    }
    if (n_valid == 0) continue;
    attention_vec::online_softmax_step(s, group, bw, int64_t(np) * ps, scale, m, l, alpha);
    attention_vec::block_pv(s, group, bw, alpha, blk, hd, out);
  }
}

}  // namespace

void attention_sparse_partial(const float* q, int32_t group, float scale, KVCache& kv,
                              const int32_t* pages, int32_t layer, int32_t head,
                              const int32_t* blocks, int32_t n_blocks, int64_t lo, int64_t pos,
                              float* work, float* out, float* m, float* l) {
  switch (kv.config().dtype) {
    case KVDType::F32:
      return sparse_partial<float>(q, group, scale, kv, pages, layer, head, blocks, n_blocks, lo,
                                   pos, work, out, m, l);
    case KVDType::F16:
      return sparse_partial<attention_vec::Half>(q, group, scale, kv, pages, layer, head, blocks,
                                                 n_blocks, lo, pos, work, out, m, l);
    case KVDType::BF16:
      return sparse_partial<attention_vec::BHalf>(q, group, scale, kv, pages, layer, head, blocks,
                                                  n_blocks, lo, pos, work, out, m, l);
  }
}

void attention_partial_normalize(float* out, const float* l, int32_t group, int32_t head_dim) {
  for (int32_t g = 0; g < group; ++g) {
    const float inv = l[g] > 0.f ? 1.0f / l[g] : 0.f;
    for (int32_t d = 0; d < head_dim; ++d) out[int64_t(g) * head_dim + d] *= inv;
  }
}

void attention_sparse_merge(const float* part_out, const float* part_m, const float* part_l, int32_t n_parts,
                            int32_t group, int32_t head_dim, float* out) {
  for (int32_t g = 0; g < group; ++g) {
    float mx = kNegInf;
    for (int32_t p = 0; p < n_parts; ++p) {
      if (part_l[p * group + g] > 0.f) mx = std::max(mx, part_m[p * group + g]);
    }
    float* og = out + int64_t(g) * head_dim;
    std::fill(og, og + head_dim, 0.f);
    float total = 0.f;
    for (int32_t p = 0; p < n_parts; ++p) {
      const float lp = part_l[p * group + g];
      if (!(lp > 0.f)) continue;
      const float w = std::exp(part_m[p * group + g] - mx);
      total += w * lp;
      const float* op = part_out + (int64_t(p) * group + g) * head_dim;
      for (int32_t d = 0; d < head_dim; ++d) og[d] += w * op[d];
    }
    const float inv = total > 0.f ? 1.0f / total : 0.f;
    for (int32_t d = 0; d < head_dim; ++d) og[d] *= inv;
  }
}

BlockSparseDecode::BlockSparseDecode(int32_t n_layers, int32_t n_kv_heads, int32_t group,
                                     int32_t head_dim, int32_t page_size, int32_t score_blocks)
    : n_layers_(n_layers),
      n_kv_heads_(n_kv_heads),
      group_(group),
      head_dim_(head_dim),
      page_size_(page_size),
      score_blocks_(std::max(1, score_blocks)) {}

void BlockSparseDecode::begin_step(int64_t n_tokens) {
  if (static_cast<int64_t>(tok_sparse_.size()) < n_tokens) tok_sparse_.resize(n_tokens);
  std::fill(tok_sparse_.begin(), tok_sparse_.begin() + n_tokens, 0);
  tokens_.clear();
  written_.clear();
  n_sparse_ = 0;
  cap_blocks_ = 0;
}

void BlockSparseDecode::add_sparse_token(int64_t t, int32_t seq, int64_t lo, int64_t pos) {
  tokens_.push_back({t, seq, lo, pos});
  tok_sparse_[t] = 1;
  ++n_sparse_;
  cap_blocks_ = std::max(cap_blocks_, pos / page_size_ - lo / page_size_ + 1);
}

void BlockSparseDecode::add_written(int32_t seq, int64_t pos_begin, int64_t pos_end, int32_t page_size) {
  for (int64_t b = pos_begin / page_size; b <= (pos_end - 1) / page_size; ++b) {
    written_.push_back({seq, b, std::min<int64_t>(page_size, pos_end - b * page_size)});
  }
}

void BlockSparseDecode::finish_plan(int n_threads) {
  n_threads_ = n_threads;
  if (n_sparse_ == 0) return;
  const int64_t n_items = n_sparse_ * n_kv_heads_;
  int64_t max_kept = 0;
  for (const SparseToken& tok : tokens_) {
    const int64_t n_cand = tok.pos / page_size_ - tok.lo / page_size_ + 1;
    const int64_t kept = sparse_blocks_kept(config_, n_cand);
    max_kept = std::max(max_kept, kept);
    counters_.tokens += 1;
    counters_.blocks_candidate += n_cand * n_layers_ * n_kv_heads_;
    counters_.blocks_selected += kept * n_layers_ * n_kv_heads_;
  }
  // Enough work items for every thread (4 per thread to absorb uneven splits), a whole number of
  // items per thread where a few more splits give one (3 KV heads on 2 threads: 12 items, not 9,
  // one thread's extra item was a tenth of the step), but at least two blocks per split so the
  // partials stay small next to the blocks they summarise.
  int64_t want = (4 * int64_t(n_threads) + n_items - 1) / n_items;
  for (int64_t w = want; w < want + n_threads && w <= kMaxSplits; ++w) {
    if ((w * n_items) % n_threads == 0) {
      want = w;
      break;
    }
  }
  n_splits_ = static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>({want, kMaxSplits, max_kept / 2})));
  auto grow = [](auto& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  };
  grow(selected_, n_items * cap_blocks_);
  grow(scores_, n_items * cap_blocks_);
  grow(n_selected_, n_items);
  grow(part_out_, n_items * n_splits_ * group_ * head_dim_);
  grow(part_m_, n_items * n_splits_ * group_);
  grow(part_l_, n_items * n_splits_ * group_);
  thread_scratch_len_ =
      std::max<int64_t>(thread_scratch_len_, head_dim_ + cap_blocks_ +
                                                 attention_partial_work_floats(group_, page_size_));
  grow(thread_scratch_, n_threads * thread_scratch_len_);
}

void BlockSparseDecode::refresh_summaries(ParallelContext& pc, KVCache& kv, int32_t layer) {
  const int64_t n = static_cast<int64_t>(written_.size()) * n_kv_heads_;
  pc.for_chunks(n, 1, [&](int64_t i, int64_t) {
    const WrittenBlock& w = written_[i / n_kv_heads_];
    kv_summary_refresh(kv, kv.seq_pages(w.seq)[w.block], layer, static_cast<int32_t>(i % n_kv_heads_), w.n_valid);
  });
}

void BlockSparseDecode::select(ParallelContext& pc, KVCache& kv, int32_t layer, const float* q,
                               int64_t q_stride, float scale) {
  // Scoring is spread over (token, KV head, run of score_blocks_ candidates): with one token and
  // 3 KV heads on 2 threads, one item per (token, head) left a thread idle a third of the time.
  const int64_t n_items = n_sparse_ * n_kv_heads_;
  const int64_t runs = (cap_blocks_ + score_blocks_ - 1) / score_blocks_;
  auto candidates = [&](const SparseToken& tok, int64_t& b_lo, int64_t& n_cand) {
    b_lo = tok.lo / page_size_;
    n_cand = tok.pos / page_size_ - b_lo + 1;
    return sparse_blocks_kept(config_, n_cand);
  };
  pc.for_chunks(n_items * runs, 1, [&](int64_t j, int64_t) {
    const int64_t i = j / runs, i0 = (j % runs) * score_blocks_;
    const SparseToken& tok = tokens_[i / n_kv_heads_];
    const int32_t h = static_cast<int32_t>(i % n_kv_heads_);
    int64_t b_lo, n_cand;
    if (candidates(tok, b_lo, n_cand) >= n_cand || i0 >= n_cand) return;
    float* q_mean = &thread_scratch_[int64_t(pc.tid()) * thread_scratch_len_];
    sparse_pooled_query(q + tok.t * q_stride + int64_t(h) * group_ * head_dim_, group_, head_dim_,
                        scale, q_mean);
    sparse_score_blocks(config_, q_mean, kv, kv.seq_pages(tok.seq).data(), layer, h, b_lo, n_cand,
                        i0, std::min(n_cand, i0 + score_blocks_), &scores_[i * cap_blocks_ + i0]);
  });
  pc.for_chunks(n_items, 1, [&](int64_t i, int64_t) {
    const SparseToken& tok = tokens_[i / n_kv_heads_];
    int64_t b_lo, n_cand;
    const int64_t n_keep = candidates(tok, b_lo, n_cand);
    int32_t* blocks = &selected_[i * cap_blocks_];
    if (n_keep >= n_cand) {
      for (int64_t b = 0; b < n_cand; ++b) blocks[b] = static_cast<int32_t>(b_lo + b);
      n_selected_[i] = static_cast<int32_t>(n_cand);
      return;
    }
    float* tmp = &thread_scratch_[int64_t(pc.tid()) * thread_scratch_len_] + head_dim_;
    n_selected_[i] =
        sparse_pick_blocks(&scores_[i * cap_blocks_], n_cand, n_keep, b_lo, tmp, blocks);
  });
}

void BlockSparseDecode::attend(ParallelContext& pc, KVCache& kv, int32_t layer, const float* q, int64_t q_stride,
                               float scale, float* out) {
  const int64_t n_items = n_sparse_ * n_kv_heads_;
  const int64_t part_elems = int64_t(group_) * head_dim_;
  pc.for_chunks(n_items * n_splits_, 1, [&](int64_t j, int64_t) {
    const int64_t i = j / n_splits_, split = j % n_splits_;
    const SparseToken& tok = tokens_[i / n_kv_heads_];
    const int32_t h = static_cast<int32_t>(i % n_kv_heads_);
    const int64_t n = n_selected_[i];
    const int64_t b0 = n * split / n_splits_, b1 = n * (split + 1) / n_splits_;
    float* work = &thread_scratch_[int64_t(pc.tid()) * thread_scratch_len_] + head_dim_ + cap_blocks_;
    attention_sparse_partial(q + tok.t * q_stride + int64_t(h) * part_elems, group_, scale, kv,
                             kv.seq_pages(tok.seq).data(), layer, h, &selected_[i * cap_blocks_] + b0,
                             static_cast<int32_t>(b1 - b0), tok.lo, tok.pos, work, &part_out_[j * part_elems],
                             &part_m_[j * group_], &part_l_[j * group_]);
  });
  pc.for_chunks(n_items, 1, [&](int64_t i, int64_t) {
    const SparseToken& tok = tokens_[i / n_kv_heads_];
    const int32_t h = static_cast<int32_t>(i % n_kv_heads_);
    attention_sparse_merge(&part_out_[i * n_splits_ * part_elems], &part_m_[i * n_splits_ * group_],
                           &part_l_[i * n_splits_ * group_], n_splits_, group_, head_dim_,
                           out + tok.t * q_stride + int64_t(h) * part_elems);
  });
}

}  // namespace lme
