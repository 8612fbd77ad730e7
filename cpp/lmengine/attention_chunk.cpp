#include "lmengine/attention_chunk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "lmengine/attention_vec.h"
#include "lmengine/ops.h"

namespace lme {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using attention_vec::block_pv;
using attention_vec::page_scores;

}  // namespace

// Pages per softmax block: the per-row bookkeeping (mask, max, rescale) is paid once per block.
constexpr int64_t kBlockPages = 4;
static_assert(kBlockPages <= 8, "PVBlock holds up to 8 pages");

int64_t attention_chunk_scratch_floats(int32_t rows, int32_t page_size, int32_t head_dim) {
  const int64_t block = kBlockPages * page_size;
  return 2 * int64_t(rows) * head_dim + int64_t(rows) * block + 3 * int64_t(rows);
}

namespace {

// attention_chunk_tile for pool elements of type T (float, Half, BHalf), read in place: the K and
// V pages are used by every row of the tile straight from the pool, not through converted copies
// (which also kept the tile's working set past L1).
template <typename T>
void chunk_tile(const ChunkAttentionTile& t, KVCache& kv, float* scratch, float* out,
                int64_t out_stride, float* lse) {
  const KVCacheConfig& c = kv.config();
  const int64_t hd = c.head_dim, ps = c.page_size, bw = kBlockPages * ps;
  const int32_t G = t.group, R = t.n_q * t.group;
  float* qs = scratch;           // [R][hd] the tile's queries, contiguous
  float* o = qs + R * hd;        // [R][hd] running output (unnormalised)
  float* s = o + R * hd;         // [R][bw] scores of a block of pages, then probabilities
  float* m = s + R * bw;         // [R] running max of the scaled scores
  float* l = m + R;              // [R] running sum of exp(score - m)
  float* alpha = l + R;          // [R] rescale of o and l for the current block

  // Per token: the keys it may see, [lo, hi]; the tile visits the union [kmin, kmax].
  int64_t lo[kChunkTileTokensMax], hi[kChunkTileTokensMax];
  int64_t kmin = std::numeric_limits<int64_t>::max(), kmax = -1;
  for (int32_t i = 0; i < t.n_q; ++i) {
    const int64_t pos = t.positions[i];
    const int64_t w_lo = t.sliding_window > 0 ? std::max<int64_t>(0, pos - t.sliding_window + 1) : 0;
    lo[i] = std::max(w_lo, t.key_begin);
    hi[i] = std::min(pos, t.key_end - 1);
    if (lo[i] <= hi[i]) {
      kmin = std::min(kmin, lo[i]);
      kmax = std::max(kmax, hi[i]);
    }
  }
  for (int32_t r = 0; r < R; ++r) {
    const float* qr = t.q + (r / G) * t.q_stride + (r % G) * hd;
    std::copy(qr, qr + hd, qs + r * hd);
    m[r] = kNegInf;
    l[r] = 0.f;
  }
  std::fill(o, o + R * hd, 0.f);

  const T* vp[kBlockPages] = {};
  // Blocks sit at absolute multiples of bw (pages before kmin are skipped, their columns masked):
  // with the same block grid and lanes, a row's arithmetic does not depend on which other tokens
  // share its tile, so chunking a prompt differently changes no bit of an unsegmented row.
  for (int64_t b0 = kmax < 0 ? 0 : kmin - kmin % bw; kmax >= 0 && b0 <= kmax; b0 += bw) {
    const int64_t n_pages = std::min(kBlockPages, (kmax - b0) / ps + 1);
    // Union of the rows' ranges within this block: every slot in it holds a written position.
    // Columns before jlo (skipped pages included) are masked for every row.
    const int64_t jlo = std::max(kmin, b0) - b0, jhi = std::min(kmax, b0 + n_pages * ps - 1) - b0;
    // The next block's K/V pages are scattered over the pool (one block per page, layer and
    // head): asking for them now overlaps their latency with this block's arithmetic.
    for (int64_t p = b0 + bw; p <= std::min(kmax, b0 + 2 * bw - 1); p += ps) {
      attention_vec::prefetch_block(kv.k_block(t.pages[p / ps], t.layer, t.head), kv.block_bytes());
      attention_vec::prefetch_block(kv.v_block(t.pages[p / ps], t.layer, t.head), kv.block_bytes());
    }
    for (int64_t b = 0; b < n_pages; ++b) {
      if (b0 + (b + 1) * ps <= kmin) continue;  // before every row's range: masked below
      const int32_t page = t.pages[(b0 + b * ps) / ps];
      vp[b] = reinterpret_cast<const T*>(kv.v_block(page, t.layer, t.head));
      page_scores(qs, R, hd, reinterpret_cast<const T*>(kv.k_block(page, t.layer, t.head)), ps,
                  s + b * ps, bw);
    }

    // Mask each row to its range (a select, so stale NaN scores vanish; -inf stays -inf through
    // scale and shift and gives p = 0), then the online-softmax update.
    const int64_t width = n_pages * ps;
    for (int32_t r = 0; r < R; ++r) {
      const int32_t i = r / G;
      float* row = s + r * bw;
      const int64_t rlo = std::max(lo[i], b0) - b0, rhi = std::min(hi[i], b0 + width - 1) - b0;
      for (int64_t j = 0; j < std::min(rlo, width); ++j) row[j] = kNegInf;
      for (int64_t j = std::max<int64_t>(rhi + 1, 0); j < width; ++j) row[j] = kNegInf;
    }
    attention_vec::online_softmax_step(s, R, bw, width, t.scale, m, l, alpha);
    attention_vec::PVBlockT<T> blk;
    blk.n_pages = n_pages;
    blk.ps = ps;
    for (int64_t b = 0; b < n_pages; ++b) {
      blk.v[b] = vp[b];
      blk.j0[b] = std::max<int64_t>(jlo - b * ps, 0);
      blk.j1[b] = std::min<int64_t>(jhi - b * ps, ps - 1);
    }
    block_pv(s, R, bw, alpha, blk, hd, o);
  }

  for (int32_t r = 0; r < R; ++r) {
    float* dst = out + (r / G) * out_stride + (r % G) * hd;
    const float inv = l[r] > 0.f ? 1.0f / l[r] : 0.f;
    for (int64_t d = 0; d < hd; ++d) dst[d] = o[r * hd + d] * inv;
    if (lse != nullptr) lse[r] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
  }
}

}  // namespace

void attention_chunk_tile(const ChunkAttentionTile& tile, KVCache& kv, float* scratch, float* out,
                          int64_t out_stride, float* lse) {
  switch (kv.config().dtype) {
    case KVDType::F32:
      return chunk_tile<float>(tile, kv, scratch, out, out_stride, lse);
    case KVDType::F16:
      return chunk_tile<attention_vec::Half>(tile, kv, scratch, out, out_stride, lse);
    case KVDType::BF16:
      return chunk_tile<attention_vec::BHalf>(tile, kv, scratch, out, out_stride, lse);
  }
}

void attention_chunk_merge(const float* const* part_o, const float* const* part_lse, int32_t n_parts,
                           int32_t n_q, int32_t group, int32_t head_dim, float* out, int64_t out_stride) {
  const int32_t R = n_q * group;
  float w[kChunkMaxSegments + 1];
  for (int32_t r = 0; r < R; ++r) {
    float* dst = out + (r / group) * out_stride + (r % group) * head_dim;
    float mx = kNegInf;
    for (int32_t p = 0; p < n_parts; ++p) mx = std::max(mx, part_lse[p][r]);
    if (mx == kNegInf) {
      std::fill(dst, dst + head_dim, 0.f);
      continue;
    }
    float sum = 0.f;
    for (int32_t p = 0; p < n_parts; ++p) {
      w[p] = part_lse[p][r] == kNegInf ? 0.f : std::exp(part_lse[p][r] - mx);
      sum += w[p];
    }
    const float inv = 1.0f / sum;
    std::fill(dst, dst + head_dim, 0.f);
    for (int32_t p = 0; p < n_parts; ++p) {
      if (w[p] == 0.f) continue;
      const float wp = w[p] * inv;
      const float* src = part_o[p] + int64_t(r) * head_dim;
      for (int32_t d = 0; d < head_dim; ++d) dst[d] += wp * src[d];
    }
  }
}

int64_t chunk_attention_partial_floats(int32_t group, int32_t head_dim) {
  const int64_t rows = int64_t(chunk_tile_tokens(group)) * group;
  return rows * head_dim + rows;
}

void chunk_attention_plan_add(ChunkAttentionPlan& plan, const int32_t* pages, int64_t t0,
                              const int32_t* positions, int32_t n_tokens, int32_t n_kv_heads,
                              int32_t group, int32_t page_size, int32_t sliding_window,
                              int64_t min_segment_keys) {
  const int32_t max_tile = chunk_tile_tokens(group);
  const int32_t n_tiles = (n_tokens + max_tile - 1) / max_tile;
  const int32_t tile_len = (n_tokens + n_tiles - 1) / n_tiles;
  for (int32_t tile = 0; tile < n_tiles; ++tile) {
    const int32_t a = tile * tile_len;
    const int32_t n_q = std::min(tile_len, n_tokens - a);
    if (n_q <= 0) break;
    int64_t kmin = std::numeric_limits<int64_t>::max(), kmax = 0;
    for (int32_t i = a; i < a + n_q; ++i) {
      const int64_t pos = positions[i];
      kmin = std::min(kmin, sliding_window > 0 ? std::max<int64_t>(0, pos - sliding_window + 1) : 0);
      kmax = std::max(kmax, pos);
    }
    int64_t seg_len = 0, first = 0, n_seg = 1;
    if (n_tiles < kChunkTilesWithoutSegments) {
      // Segments of at least min_segment_keys, at most kChunkMaxSegments (+1 for alignment) per
      // tile, page-aligned and aligned to absolute positions.
      const int64_t range = kmax - kmin + 1;
      seg_len = std::max<int64_t>(std::max<int64_t>(min_segment_keys, 1),
                                  (range + kChunkMaxSegments - 1) / kChunkMaxSegments);
      seg_len = (seg_len + page_size - 1) / page_size * page_size;
      first = kmin / seg_len;
      n_seg = kmax / seg_len - first + 1;
    }
    for (int32_t h = 0; h < n_kv_heads; ++h) {
      if (n_seg == 1) {
        plan.items.push_back({pages, t0 + a, n_q, h, kmin, kmax + 1, -1});
        continue;
      }
      plan.merges.push_back({t0 + a, n_q, h, plan.n_partials, static_cast<int32_t>(n_seg)});
      for (int64_t sgm = 0; sgm < n_seg; ++sgm) {
        const int64_t kb = (first + sgm) * seg_len;
        plan.items.push_back({pages, t0 + a, n_q, h, std::max(kb, kmin), std::min(kb + seg_len, kmax + 1),
                              plan.n_partials++});
      }
    }
  }
}

void chunk_attention_run_item(const ChunkAttentionPlan& plan, int64_t item, KVCache& kv,
                              const ChunkAttentionStep& step, float* scratch, float* partials) {
  const ChunkAttentionItem& it = plan.items[static_cast<size_t>(item)];
  const int64_t hd = kv.config().head_dim;
  const int64_t head_off = int64_t(it.head) * step.group * hd;
  const ChunkAttentionTile tile = {step.q + it.t0 * step.q_stride + head_off,
                                   step.q_stride,
                                   step.positions + it.t0,
                                   it.n_q,
                                   step.group,
                                   step.scale,
                                   step.sliding_window,
                                   it.pages,
                                   step.layer,
                                   it.head,
                                   it.key_begin,
                                   it.key_end};
  if (it.partial < 0) {
    attention_chunk_tile(tile, kv, scratch, step.out + it.t0 * step.out_stride + head_off, step.out_stride, nullptr);
    return;
  }
  // Partial slot: rows [R][hd] (token i's heads at i * group * hd), then lse[R].
  float* slot = partials + it.partial * chunk_attention_partial_floats(step.group, static_cast<int32_t>(hd));
  const int64_t rows_max = int64_t(chunk_tile_tokens(step.group)) * step.group;
  attention_chunk_tile(tile, kv, scratch, slot, step.group * hd, slot + rows_max * hd);
}

void chunk_attention_run_merge(const ChunkAttentionPlan& plan, int64_t merge, int32_t head_dim,
                               const ChunkAttentionStep& step, const float* partials) {
  const ChunkAttentionMerge& mg = plan.merges[static_cast<size_t>(merge)];
  const int64_t slot_floats = chunk_attention_partial_floats(step.group, head_dim);
  const int64_t rows_max = int64_t(chunk_tile_tokens(step.group)) * step.group;
  const float* part_o[kChunkMaxSegments + 1];
  const float* part_lse[kChunkMaxSegments + 1];
  for (int32_t p = 0; p < mg.n_parts; ++p) {
    part_o[p] = partials + (mg.first_partial + p) * slot_floats;
    part_lse[p] = part_o[p] + rows_max * head_dim;
  }
  attention_chunk_merge(part_o, part_lse, mg.n_parts, mg.n_q, step.group, head_dim,
                        step.out + mg.t0 * step.out_stride + int64_t(mg.head) * step.group * head_dim,
                        step.out_stride);
}

}  // namespace lme
