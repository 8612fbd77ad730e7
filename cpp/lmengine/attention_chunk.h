// Query-tiled causal attention for multi-token chunks (prefill chunks, ReSA rectification).
//
// The decode kernel (attention_sparse_partial) serves one query token: a chunk of n tokens would
// read the sequence's KV pages n times and do matrix-vector work. Here one work item takes a tile
// of up to chunk_tile_tokens(group) tokens x the `group` query heads of one KV head (R = tile *
// group rows) and walks the pages once with an online softmax (flash-attention style): per page,
// scores S[R][page_size] = Q · K^T, running max / sum per row, O[R][head_dim] = alpha * O + P · V.
//
// Napkin math per (tile, KV head, key): 4 * R * head_dim FLOPs against 2 * head_dim * elem bytes
// read, so with R = 99 (a ReSA rectification chunk of SmolLM2: 33 tokens x 3 heads) the kernel
// is compute-bound where one decode token (R = 3) is bandwidth-bound.
//
// Long contexts with few tiles are cut into key segments computed as separate work items, each
// giving a normalised partial output and its log-sum-exp, merged afterwards. Which segments a
// chunk gets depends only on the chunk itself (its length and positions), never on the batch or
// the thread count, so a token's result does not change with what else shares the step.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lmengine/kv_cache.h"

namespace lme {

// A tile holds at most kChunkTileRows rows (tokens x group heads) and kChunkTileTokensMax tokens:
// 64 tokens at SmolLM2's group of 3, so a 33-token rectification chunk walks the keys once; fewer
// tokens for larger groups, so the tile's queries, scores and running output stay in L2. Chunks
// are cut into equal tiles (33 tokens at a 16-token limit: 11 + 11 + 11, not 16 + 16 + 1, whose
// last pass would be a bandwidth-bound one-token pass).
constexpr int32_t kChunkTileRows = 192;
constexpr int32_t kChunkTileTokensMax = 64;
inline int32_t chunk_tile_tokens(int32_t group) {
  return std::clamp(kChunkTileRows / std::max(group, 1), 1, kChunkTileTokensMax);
}
// Chunks with at least this many tiles give every thread enough work without key segments.
constexpr int32_t kChunkTilesWithoutSegments = 8;
// Smallest key segment of a split tile (positions); at most kChunkMaxSegments per tile.
constexpr int64_t kChunkSegmentKeys = 2048;
constexpr int64_t kChunkMaxSegments = 16;

// One tile for one KV head. Row r = i * group + g is query head g of the group for tile token i.
struct ChunkAttentionTile {
  const float* q;             // q[i * q_stride + g * head_dim + d], post-RoPE, unscaled
  int64_t q_stride;
  const int32_t* positions;   // [n_q] position of each tile token
  int32_t n_q;                // 1 .. chunk_tile_tokens(group)
  int32_t group;
  float scale;
  int32_t sliding_window;     // 0: attend to the whole prefix
  const int32_t* pages;       // the sequence's page table
  int32_t layer;
  int32_t head;
  int64_t key_begin, key_end;  // visit only keys in [key_begin, key_end)
};

// Floats of per-thread scratch that attention_chunk_tile needs for tiles of up to `rows` rows.
int64_t attention_chunk_scratch_floats(int32_t rows, int32_t page_size, int32_t head_dim);

// For each row (token at position p): the keys visited are those in [lo(p), p] ∩ [key_begin,
// key_end), lo(p) = max(0, p - window + 1) with a sliding window, else 0. Writes
// o = softmax(scale * q · K) · V over them to out[i * out_stride + g * head_dim] and, when lse is
// not null, lse[r] = log sum exp(scale * q · K) (-inf, with o = 0, for a row with no keys).
// Slots of a page outside every row's range are never read into the result (they may hold stale
// data, NaN included).
void attention_chunk_tile(const ChunkAttentionTile& tile, KVCache& kv, float* scratch, float* out,
                          int64_t out_stride, float* lse);

// Combines per-segment partials of one tile: out row r = sum_s w_s[r] o_s[r] with
// w_s[r] = exp(lse_s[r] - max) / sum exp(lse_s[r] - max), in segment order.
// part_o[s]: [rows][head_dim] (row r at part_o[s] + r * head_dim), part_lse[s]: [rows].
void attention_chunk_merge(const float* const* part_o, const float* const* part_lse, int32_t n_parts,
                           int32_t n_q, int32_t group, int32_t head_dim, float* out, int64_t out_stride);

// ---- Work plan of one step --------------------------------------------------------------------

struct ChunkAttentionItem {
  const int32_t* pages;  // the sequence's page table
  int64_t t0;            // first step token of the tile
  int32_t n_q;
  int32_t head;
  int64_t key_begin, key_end;
  int64_t partial;  // -1: writes the final output; else the partial slot it fills
};

struct ChunkAttentionMerge {
  int64_t t0;
  int32_t n_q;
  int32_t head;
  int64_t first_partial;  // the tile's segments fill slots first_partial .. + n_parts - 1
  int32_t n_parts;
};

// Built single-threaded before a step; clear() keeps the vectors' capacity, so steady-state
// steps allocate nothing.
struct ChunkAttentionPlan {
  std::vector<ChunkAttentionItem> items;
  std::vector<ChunkAttentionMerge> merges;
  int64_t n_partials = 0;
  void clear() {
    items.clear();
    merges.clear();
    n_partials = 0;
  }
};

// Adds the work of one sequence's chunk: step tokens [t0, t0 + n_tokens) at `positions`
// (positions[0 .. n_tokens)) over the page table `pages`, for every KV head.
// min_segment_keys: smallest key segment when the chunk has too few tiles to keep all threads
// busy (kChunkSegmentKeys in the engine; tests pass small values to exercise the merge).
void chunk_attention_plan_add(ChunkAttentionPlan& plan, const int32_t* pages, int64_t t0,
                              const int32_t* positions, int32_t n_tokens, int32_t n_kv_heads,
                              int32_t group, int32_t page_size, int32_t sliding_window,
                              int64_t min_segment_keys);

// Floats of one partial slot: chunk_tile_tokens(group) * group rows of head_dim outputs plus their
// lse.
int64_t chunk_attention_partial_floats(int32_t group, int32_t head_dim);

// Where the step's queries and outputs live. Token t, KV head h: q + t * q_stride + h * group *
// head_dim (the group's heads follow each other), likewise out.
struct ChunkAttentionStep {
  const float* q;
  int64_t q_stride;
  float* out;
  int64_t out_stride;
  const int32_t* positions;  // [step tokens]
  int32_t group;
  int32_t layer;
  float scale;
  int32_t sliding_window;
};

void chunk_attention_run_item(const ChunkAttentionPlan& plan, int64_t item, KVCache& kv,
                              const ChunkAttentionStep& step, float* scratch, float* partials);
void chunk_attention_run_merge(const ChunkAttentionPlan& plan, int64_t merge, int32_t head_dim,
                               const ChunkAttentionStep& step, const float* partials);

}  // namespace lme
