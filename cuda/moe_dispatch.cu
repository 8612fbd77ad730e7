// Mixture-of-Experts feed-forward on the device: the CUDA twin of cpp/lmengine/moe_dispatch.cpp
// (same routing, same grouping of the (token, slot) pairs by expert, same slot-order sum), with
// fp32 activations where the CPU converts them to 8-bit or two-level rows.
//
// One stream, no host round trip; every grid is sized from host-known bounds and blocks past a
// device-side count exit at once:
//   1. product_kernel           router logits [T, E] (every token row)
//   2. product_kernel x2        shared expert, when present: silu(gate)·up [T, ffs], down [T, d]
//   3. route_kernel             one warp per token: scores, group-limited top-k, weights; the
//                               per-expert counts by integer atomics (order-free); the shared gate
//   4. group_kernel             one block: counts out, prefix sum -> offsets, work items
//                               (expert, first pair, <= kPairTile pairs)
//   5. place_kernel             one block per expert: its pairs in (token, slot) order
//   6. product_kernel<GateUp>   per work item x row tile: silu(gate·x)·(up·x) -> h [P, ff]
//   7. product_kernel           down: h -> y [P, d]
//   8. combine_kernel           out[t] = shared_scale·shared + Σ_slot weight·y, slots in order
// No float atomics anywhere, and each (pair, row) product runs the same instructions whatever the
// other rows of its tile, so a token's output does not depend on the batch.
//
// Napkin math (decode, T = 1, k = 8, d = 2048, ff = 768, Q4_K): the 8 chosen experts hold
// 8 · 3 · 768 · 2048 weights · 0.5625 B ≈ 21 MB, ~4.4 us at 4.8 TB/s; activations are KBs. In a
// prefill step a work item reads each weight row once per kRowsPerPass pairs, the first time from
// DRAM and then from L1/L2: this is a correct tiled GEMV, not yet a tensor-core grouped GEMM.
#include <algorithm>
#include <cmath>

#include "dequant_formats.cuh"
#include "kernels.cuh"
#include "lmengine/moe_group_score.h"
#include "lmengine/quant.h"

namespace lme {
namespace {

using namespace cuda_detail;

constexpr int kProductWarps = 4;  // weight rows per product block
constexpr int kProductThreads = kProductWarps * kWarpSize;
constexpr int kPairTile = 32;    // pairs (activation rows) per work item
constexpr int kRowsPerPass = 4;  // activation rows sharing one pass over a weight row
constexpr int kRouteWarps = 4;   // tokens per routing block
constexpr int kGroupThreads = 1024;
constexpr int kPlaceThreads = 256;
constexpr int kCombineThreads = 256;
constexpr int kMaxExperts = 4096;  // as validate_moe_config
constexpr int kMaxGroups = 256;
constexpr int64_t kAlignBytes = 256;

struct WorkItem {
  int32_t expert, first_pair, n_pairs, unused;
};

// ---------------------------------------------------------------------------------------------
// Products. For each work item and weight row r: y[p * ld_y + r] = W[r] · a(p) over the item's
// pairs p, or silu(W_gate[r] · a(p)) * (W_up[r] · a(p)) with kGateUp; a(p) is the activation row
// x + src(p) * ld_x, src(p) = pair_token[p] (routed gate/up) or p.
struct ProductArgs {
  const WorkItem* items = nullptr;  // routed experts: the work list, *n_items entries
  const int32_t* n_items = nullptr;
  const void* const* experts_a = nullptr;  // [E] gate (or down) matrices
  const void* const* experts_b = nullptr;  // [E] up matrices (kGateUp)
  const void* single_a = nullptr;  // items == nullptr: one matrix (router, shared expert) ...
  const void* single_b = nullptr;
  int32_t n_single_rows = 0;  // ... over activation rows [0, n_single_rows) in tiles of kPairTile
  int64_t rows = 0;           // rows of W (outputs per pair)
  int64_t n_blocks = 0;       // format blocks per weight row
  int64_t row_bytes = 0;
  const float* x = nullptr;
  int64_t ld_x = 0;
  const int32_t* pair_token = nullptr;
  float* y = nullptr;
  int64_t ld_y = 0;
};

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// grid (work items, row tiles of kProductWarps); warp w of a block computes one weight row for
// every pair of the item, kRowsPerPass pairs per pass (a short last pass repeats its last row, so
// every pair goes through the same instructions; the repeats are not stored).
template <class Format, bool kGateUp>
__global__ void __launch_bounds__(kProductThreads) product_kernel(const ProductArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kProductWarps + threadIdx.x / kWarpSize;
  int32_t first, n;
  const uint8_t* wa;
  const uint8_t* wb = nullptr;
  if (a.items != nullptr) {
    if (static_cast<int32_t>(blockIdx.x) >= *a.n_items) return;
    const WorkItem item = a.items[blockIdx.x];
    first = item.first_pair;
    n = item.n_pairs;
    wa = static_cast<const uint8_t*>(a.experts_a[item.expert]);
    if (kGateUp) wb = static_cast<const uint8_t*>(a.experts_b[item.expert]);
  } else {
    first = static_cast<int32_t>(blockIdx.x) * kPairTile;
    n = min(kPairTile, a.n_single_rows - first);
    wa = static_cast<const uint8_t*>(a.single_a);
    if (kGateUp) wb = static_cast<const uint8_t*>(a.single_b);
  }
  if (row >= a.rows) return;  // whole warps: the reductions stay warp-uniform
  wa += row * a.row_bytes;
  if (kGateUp) wb += row * a.row_bytes;
  const int64_t n_parts = a.n_blocks * Format::kParts;
  for (int32_t c0 = 0; c0 < n; c0 += kRowsPerPass) {
    const float* act[kRowsPerPass];
#pragma unroll
    for (int j = 0; j < kRowsPerPass; ++j) {
      const int32_t p = first + min(c0 + j, n - 1);
      const int64_t src = a.pair_token != nullptr ? a.pair_token[p] : p;
      act[j] = a.x + src * a.ld_x;
    }
    float acc_a[kRowsPerPass], acc_b[kRowsPerPass];
#pragma unroll
    for (int j = 0; j < kRowsPerPass; ++j) acc_a[j] = acc_b[j] = 0.f;
    for (int64_t i = lane; i < n_parts; i += kWarpSize) {
      const int64_t block = i / Format::kParts;
      const int part = static_cast<int>(i % Format::kParts);
      const uint8_t* block_a = wa + block * Format::kBytes;
#pragma unroll
      for (int j = 0; j < kRowsPerPass; ++j) {
        const float* xb = act[j] + block * Format::kElems;
        acc_a[j] += Format::dot_part(block_a, part, xb);
        if (kGateUp) acc_b[j] += Format::dot_part(wb + block * Format::kBytes, part, xb);
      }
    }
#pragma unroll
    for (int j = 0; j < kRowsPerPass; ++j) {
      acc_a[j] = warp_sum(acc_a[j]);
      if (kGateUp) acc_b[j] = warp_sum(acc_b[j]);
    }
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < kRowsPerPass; ++j) {
        if (c0 + j < n) {
          const float v = kGateUp ? silu(acc_a[j]) * acc_b[j] : acc_a[j];
          a.y[static_cast<int64_t>(first + c0 + j) * a.ld_y + row] = v;
        }
      }
    }
  }
}

// Calls f(Format{}) with the reader of ggml_type for rows of `cols` elements: float rows whose
// length is a multiple of 8 take the 16-byte loads, other float rows the scalar reader.
template <class F>
int with_format(int32_t ggml_type, int64_t cols, F&& f) {
  switch (static_cast<DType>(ggml_type)) {
    case DType::F32:
      return cols % 8 == 0 ? f(FormatFloat<float>{}) : f(FormatFloatScalar<float>{});
    case DType::F16:
      return cols % 8 == 0 ? f(FormatFloat<__half>{}) : f(FormatFloatScalar<__half>{});
    case DType::BF16:
      return cols % 8 == 0 ? f(FormatFloat<__nv_bfloat16>{})
                           : f(FormatFloatScalar<__nv_bfloat16>{});
    case DType::Q4_0:
      return f(FormatQ4_0{});
    case DType::Q4_1:
      return f(FormatQ4_1{});
    case DType::Q5_0:
      return f(FormatQ5_0{});
    case DType::Q8_0:
      return f(FormatQ8_0{});
    case DType::Q4_K:
      return f(FormatQ4_K{});
    case DType::Q6_K:
      return f(FormatQ6_K{});
  }
  return record_status(kCudaUnsupported, "cuda_moe_forward: unsupported weight type");
}

// Host check of one weight role: a supported type whose block size divides the row length.
int check_weight_type(int32_t ggml_type, int64_t cols, const char* message) {
  if (!cuda_gemv_supports(ggml_type)) return record_status(kCudaUnsupported, message);
  return with_format(ggml_type, cols, [&](auto format) {
    using Format = decltype(format);
    return cols % Format::kElems == 0 ? static_cast<int>(kCudaOk)
                                      : record_status(kCudaInvalidArgument, message);
  });
}

// n_work: grid.x (work items or activation-row tiles); cols: elements per weight row.
template <bool kGateUp>
int launch_product(int32_t ggml_type, ProductArgs a, int64_t cols, int64_t n_work,
                   cudaStream_t stream) {
  if (n_work == 0 || a.rows == 0) return kCudaOk;
  return with_format(ggml_type, cols, [&](auto format) {
    using Format = decltype(format);
    a.n_blocks = cols / Format::kElems;
    a.row_bytes = a.n_blocks * Format::kBytes;
    const dim3 grid(static_cast<unsigned>(n_work),
                    static_cast<unsigned>(ceil_div(a.rows, kProductWarps)));
    product_kernel<Format, kGateUp><<<grid, kProductThreads, 0, stream>>>(a);
    LME_CUDA_CHECK_LAUNCH();
    return static_cast<int>(kCudaOk);
  });
}

// ---------------------------------------------------------------------------------------------
// Routing: as route_token in moe_dispatch.cpp, one warp per token.
struct RouteArgs {
  float* scores = nullptr;  // [T, E]: router logits in, scores out
  float* choice = nullptr;  // [T, E] scratch: the values experts are chosen by
  const float* score_bias = nullptr;
  const float* x = nullptr;  // [T, d]
  int64_t d = 0;
  const float* shared_gate_inp = nullptr;  // [d] or nullptr
  float* shared_scale = nullptr;           // [T], nullptr without a shared expert
  int32_t* sel_expert = nullptr;           // [T, k]
  float* sel_weight = nullptr;             // [T, k]
  int32_t* counts = nullptr;               // [E], zero on entry
  int32_t n_tokens = 0, n_experts = 0, top_k = 0, n_group = 1, topk_group = 1;
  bool sigmoid = false, norm_topk_prob = false;
  float routed_scaling_factor = 1.f;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Lanes own experts e = lane (mod 32): each lane writes only its own entries of score and choice,
// so __syncwarp is needed only where a lane reads another's (groups, the chosen score).
__global__ void __launch_bounds__(kRouteWarps* kWarpSize) route_kernel(const RouteArgs a) {
  __shared__ float group_score[kRouteWarps][kMaxGroups];
  __shared__ bool group_kept[kRouteWarps][kMaxGroups];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= a.n_tokens) return;  // whole warps
  const int32_t E = a.n_experts, k = a.top_k;
  float* score = a.scores + t * E;
  float* choice = a.choice + t * E;
  if (!a.sigmoid) {
    float m = -INFINITY;
    for (int32_t e = lane; e < E; e += kWarpSize) m = fmaxf(m, score[e]);
    m = warp_max(m);
    float sum = 0.f;
    for (int32_t e = lane; e < E; e += kWarpSize) {
      const float v = expf(score[e] - m);
      score[e] = v;
      sum += v;
    }
    sum = warp_sum(sum);
    for (int32_t e = lane; e < E; e += kWarpSize) choice[e] = (score[e] /= sum);
  } else {
    for (int32_t e = lane; e < E; e += kWarpSize) {
      const float s = 1.f / (1.f + expf(-score[e]));
      score[e] = s;
      choice[e] = s + (a.score_bias != nullptr ? a.score_bias[e] : 0.f);
    }
  }
  __syncwarp();
  if (a.n_group > 1 && a.topk_group < a.n_group) {
    // A group's score is the sum of its two best choice values; only the topk_group best groups
    // (ties: lower group) keep their experts.
    const int32_t gs = E / a.n_group;
    for (int32_t g = lane; g < a.n_group; g += kWarpSize) {
      group_score[warp][g] = moe_group_score(choice + g * gs, gs);
      group_kept[warp][g] = false;
    }
    __syncwarp();
    if (lane == 0) {
      for (int32_t j = 0; j < a.topk_group; ++j) {
        int32_t best = -1;
        for (int32_t g = 0; g < a.n_group; ++g) {
          if (!group_kept[warp][g] &&
              (best < 0 || group_score[warp][g] > group_score[warp][best])) {
            best = g;
          }
        }
        group_kept[warp][best] = true;
      }
    }
    __syncwarp();
    for (int32_t e = lane; e < E; e += kWarpSize) {
      if (!group_kept[warp][e / gs]) choice[e] = -INFINITY;
    }
  }
  // k rounds of a warp argmax (ties: lower expert); a chosen expert's choice becomes NaN, which
  // no comparison prefers, as on the CPU.
  float weight_sum = 0.f;
  float* weights = a.sel_weight + t * k;
  int32_t* experts = a.sel_expert + t * k;
  for (int32_t j = 0; j < k; ++j) {
    int32_t best = -1;
    float best_v = 0.f;
    for (int32_t e = lane; e < E; e += kWarpSize) {
      const float v = choice[e];
      if (!isnan(v) && (best < 0 || v > best_v)) {
        best = e;
        best_v = v;
      }
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other_v = __shfl_xor_sync(0xffffffffu, best_v, offset);
      const int32_t other = __shfl_xor_sync(0xffffffffu, best, offset);
      if (other >= 0 && (best < 0 || other_v > best_v || (other_v == best_v && other < best))) {
        best = other;
        best_v = other_v;
      }
    }
    if (best < 0) best = 0;  // every value NaN (NaN logits): stay in bounds
    if (lane == best % kWarpSize) choice[best] = NAN;
    if (lane == 0) {
      const float w = score[best];
      experts[j] = best;
      weights[j] = w;
      weight_sum += w;
      atomicAdd(&a.counts[best], 1);
    }
  }
  if (lane == 0) {
    if (a.norm_topk_prob) {
      const float denom = a.sigmoid ? weight_sum + 1e-20f : weight_sum;
      for (int32_t j = 0; j < k; ++j) weights[j] /= denom;
    }
    if (a.routed_scaling_factor != 1.f) {
      for (int32_t j = 0; j < k; ++j) weights[j] *= a.routed_scaling_factor;
    }
  }
  if (a.shared_scale != nullptr) {
    float s = 1.f;
    if (a.shared_gate_inp != nullptr) {
      const float* xr = a.x + t * a.d;
      float dot = 0.f;
      for (int64_t i = lane; i < a.d; i += kWarpSize) dot = fmaf(a.shared_gate_inp[i], xr[i], dot);
      s = 1.f / (1.f + expf(-warp_sum(dot)));
    }
    if (lane == 0) a.shared_scale[t] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Grouping.

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, every thread calls it);
// *total gets the block's sum. scratch: 32 ints of shared memory, reusable after the call.
__device__ int32_t block_exclusive_scan(int32_t v, int32_t* scratch, int32_t* total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  int32_t inclusive = v;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int32_t other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int32_t w = lane < n_warps ? scratch[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int32_t other = __shfl_up_sync(0xffffffffu, w, offset);
      if (lane >= offset) w += other;
    }
    scratch[lane] = w;
  }
  __syncthreads();
  const int32_t base = warp > 0 ? scratch[warp - 1] : 0;
  *total = scratch[n_warps - 1];
  __syncthreads();
  return base + inclusive - v;
}

// One block: counts -> counts_out (optional), offsets [E + 1], the work items of the expert
// products (expert order, kPairTile pairs each, the last of an expert shorter) and their number.
__global__ void __launch_bounds__(kGroupThreads)
    group_kernel(const int32_t* __restrict__ counts, int32_t n_experts, int64_t* counts_out,
                 int32_t* offsets, WorkItem* items, int32_t* n_items) {
  __shared__ int32_t scratch[kWarpSize];
  const int32_t per = (n_experts + kGroupThreads - 1) / kGroupThreads;
  const int32_t e0 = min(n_experts, static_cast<int32_t>(threadIdx.x) * per);
  const int32_t e1 = min(n_experts, e0 + per);
  int32_t pairs = 0, tiles = 0;
  for (int32_t e = e0; e < e1; ++e) {
    const int32_t n = counts[e];
    pairs += n;
    tiles += (n + kPairTile - 1) / kPairTile;
    if (counts_out != nullptr) counts_out[e] = n;
  }
  int32_t total_pairs, total_tiles;
  int32_t pair = block_exclusive_scan(pairs, scratch, &total_pairs);
  int32_t tile = block_exclusive_scan(tiles, scratch, &total_tiles);
  for (int32_t e = e0; e < e1; ++e) {
    const int32_t n = counts[e];
    offsets[e] = pair;
    for (int32_t i = 0; i < n; i += kPairTile)
      items[tile++] = {e, pair + i, min(kPairTile, n - i), 0};
    pair += n;
  }
  if (threadIdx.x == 0) {
    offsets[n_experts] = total_pairs;
    *n_items = total_tiles;
  }
}

// Block e places expert e's pairs at offsets[e]... in (token, slot) order, as the CPU does:
// pair_token[p] = token of grouped pair p, pair_of_slot[t * k + j] = p.
__global__ void __launch_bounds__(kPlaceThreads)
    place_kernel(const int32_t* __restrict__ sel_expert, const int32_t* __restrict__ counts,
                 const int32_t* __restrict__ offsets, int32_t n_pairs, int32_t top_k,
                 int32_t* pair_token, int32_t* pair_of_slot) {
  __shared__ int32_t scratch[kWarpSize];
  const int32_t e = blockIdx.x;
  const int32_t n = counts[e];
  if (n == 0) return;
  const int32_t base = offsets[e];
  int32_t placed = 0;
  for (int32_t i0 = 0; i0 < n_pairs && placed < n; i0 += kPlaceThreads) {
    const int32_t i = i0 + static_cast<int32_t>(threadIdx.x);
    const bool hit = i < n_pairs && sel_expert[i] == e;
    int32_t found;
    const int32_t rank = block_exclusive_scan(hit ? 1 : 0, scratch, &found);
    if (hit) {
      const int32_t p = base + placed + rank;
      pair_token[p] = i / top_k;
      pair_of_slot[i] = p;
    }
    placed += found;
  }
}

// One block per token: out[t] = shared_scale[t] * shared_out[t] + Σ_j weight[t, j] * y[pair(t, j)],
// the slots in order (the CPU's order).
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const float* __restrict__ y, int64_t ld_y,
                   const int32_t* __restrict__ pair_of_slot, const float* __restrict__ sel_weight,
                   int32_t top_k, const float* __restrict__ shared_out, int64_t ld_shared,
                   const float* __restrict__ shared_scale, float* __restrict__ out, int64_t d) {
  const int64_t t = blockIdx.x;
  const float scale = shared_out != nullptr ? shared_scale[t] : 0.f;
  const int32_t* pairs = pair_of_slot + t * top_k;
  const float* weights = sel_weight + t * top_k;
  for (int64_t i = threadIdx.x; i < d; i += kCombineThreads) {
    float v = shared_out != nullptr ? scale * shared_out[t * ld_shared + i] : 0.f;
    for (int32_t j = 0; j < top_k; ++j)
      v += weights[j] * y[static_cast<int64_t>(pairs[j]) * ld_y + i];
    out[t * d + i] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Workspace: every array kAlignBytes-aligned; fp32 rows padded to 4 floats (16-byte row starts).

int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

struct Layout {
  int64_t ld_ff = 0, ld_ffs = 0, ld_d = 0, max_items = 0;
  int64_t scores = 0, choice = 0, sel_expert = 0, sel_weight = 0, pair_of_slot = 0, pair_token = 0,
          counts = 0, offsets = 0, items = 0, n_items = 0, h = 0, y = 0, shared_h = 0,
          shared_out = 0, shared_scale = 0, total = 0;
};

Layout make_layout(int64_t T, int64_t d, int64_t ff, int64_t ffs, int64_t E, int64_t k) {
  Layout L;
  const int64_t P = T * k;
  L.ld_ff = align_up(ff, 4);
  L.ld_ffs = align_up(ffs, 4);
  L.ld_d = align_up(d, 4);
  L.max_items = ceil_div(P, kPairTile) + std::min(E, P);
  auto take = [&](int64_t bytes) {
    const int64_t at = L.total;
    L.total += align_up(bytes, kAlignBytes);
    return at;
  };
  L.scores = take(4 * T * E);
  L.choice = take(4 * T * E);
  L.sel_expert = take(4 * P);
  L.sel_weight = take(4 * P);
  L.pair_of_slot = take(4 * P);
  L.pair_token = take(4 * P);
  L.counts = take(4 * E);
  L.offsets = take(4 * (E + 1));
  L.items = take(static_cast<int64_t>(sizeof(WorkItem)) * L.max_items);
  L.n_items = take(4);
  L.h = take(4 * P * L.ld_ff);
  L.y = take(4 * P * L.ld_d);
  L.shared_h = take(4 * T * L.ld_ffs);
  L.shared_out = take(ffs > 0 ? 4 * T * L.ld_d : 0);
  L.shared_scale = take(ffs > 0 ? 4 * T : 0);
  return L;
}

bool aligned(const void* p, int64_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

template <typename T>
T* at(void* base, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(base) + offset);
}

}  // namespace

int64_t cuda_moe_workspace_bytes(int64_t n_tokens, int64_t d, int64_t d_ff, int64_t d_ff_shared,
                                 int64_t n_experts, int64_t top_k) {
  if (n_tokens < 0 || d < 1 || d_ff < 1 || d_ff_shared < 0 || n_experts < 1 ||
      n_experts > kMaxExperts || top_k < 1 || top_k > n_experts ||
      n_tokens * top_k > INT32_MAX - kPlaceThreads) {
    return -1;
  }
  return make_layout(n_tokens, d, d_ff, d_ff_shared, n_experts, top_k).total;
}

int cuda_moe_forward(const CudaMoEArgs& a, void* stream) {
  const int64_t T = a.n_tokens, d = a.d, ff = a.d_ff, ffs = a.d_ff_shared, E = a.n_experts,
                k = a.top_k;
  const int64_t need = cuda_moe_workspace_bytes(T, d, ff, ffs, E, k);
  LME_CUDA_REQUIRE(need >= 0,
                   "cuda_moe_forward: need n_tokens >= 0, d, d_ff >= 1, d_ff_shared >= 0, "
                   "1 <= top_k <= n_experts <= 4096 and n_tokens * top_k < 2^31 - 256");
  LME_CUDA_REQUIRE(a.scoring == 0 || a.scoring == 1, "cuda_moe_forward: unknown scoring function");
  LME_CUDA_REQUIRE(a.n_group >= 1 && a.n_group <= kMaxGroups && E % a.n_group == 0,
                   "cuda_moe_forward: n_group must be in [1, 256] and divide n_experts");
  LME_CUDA_REQUIRE(a.topk_group >= 1 && a.topk_group <= a.n_group,
                   "cuda_moe_forward: topk_group must be in [1, n_group]");
  LME_CUDA_REQUIRE(int64_t(a.topk_group) * (E / a.n_group) >= k,
                   "cuda_moe_forward: topk_group groups hold fewer than top_k experts");
  LME_CUDA_REQUIRE(a.routed_scaling_factor > 0.f && std::isfinite(a.routed_scaling_factor),
                   "cuda_moe_forward: routed_scaling_factor must be positive and finite");
  LME_CUDA_REQUIRE(a.score_bias == nullptr || a.scoring == 1,
                   "cuda_moe_forward: score_bias is only used with sigmoid scoring");
  LME_CUDA_REQUIRE(a.shared_gate_inp == nullptr || ffs > 0,
                   "cuda_moe_forward: a shared-expert gate needs a shared expert");
  // Row tiles are grid.y.
  LME_CUDA_REQUIRE(ceil_div(std::max({E, ff, ffs, d}), kProductWarps) <= 65535,
                   "cuda_moe_forward: a weight matrix has more than 262140 rows");
  // Each weight matrix: its type, its row length, and what to call it in the error.
  const struct {
    int32_t type;
    int64_t cols;
    const char* message;
  } matrices[] = {
      {a.router_type, d,
       "cuda_moe_forward: router type unsupported or its block size does not divide d"},
      {a.gate_up_type, d,
       "cuda_moe_forward: expert gate/up type unsupported or its block size does not divide d"},
      {a.down_type, ff,
       "cuda_moe_forward: expert down type unsupported or its block size does not divide d_ff"},
      {a.shared_gate_up_type, d,
       "cuda_moe_forward: shared gate/up type unsupported or its block size does not divide d"},
      {a.shared_down_type, ffs,
       "cuda_moe_forward: shared down type unsupported or its block size does not divide "
       "d_ff_shared"},
  };
  for (int i = 0; i < (ffs > 0 ? 5 : 3); ++i) {  // the last two only with a shared expert
    const int status = check_weight_type(matrices[i].type, matrices[i].cols, matrices[i].message);
    if (status != kCudaOk) return status;
  }
  int s;
  const cudaStream_t st = as_stream(stream);
  if (T == 0) {
    if (a.counts != nullptr) LME_CUDA_TRY(cudaMemsetAsync(a.counts, 0, 8 * E, st));
    return kCudaOk;
  }
  LME_CUDA_REQUIRE(a.x != nullptr && a.out != nullptr && a.router != nullptr && a.gate != nullptr &&
                       a.up != nullptr && a.down != nullptr && a.workspace != nullptr,
                   "cuda_moe_forward: null pointer");
  LME_CUDA_REQUIRE(
      ffs == 0 || (a.shared_gate != nullptr && a.shared_up != nullptr && a.shared_down != nullptr),
      "cuda_moe_forward: d_ff_shared > 0 needs the shared expert's matrices");
  LME_CUDA_REQUIRE(aligned(a.x, 16) && aligned(a.router, 16) && aligned(a.workspace, kAlignBytes),
                   "cuda_moe_forward: x and router must be 16-byte aligned, the workspace "
                   "256-byte aligned");
  LME_CUDA_REQUIRE(ffs == 0 || (aligned(a.shared_gate, 16) && aligned(a.shared_up, 16) &&
                                aligned(a.shared_down, 16)),
                   "cuda_moe_forward: shared-expert matrices must be 16-byte aligned");
  LME_CUDA_REQUIRE(a.workspace_bytes >= need, "cuda_moe_forward: workspace too small");

  const Layout L = make_layout(T, d, ff, ffs, E, k);
  void* ws = a.workspace;
  float* scores = at<float>(ws, L.scores);
  int32_t* counts = at<int32_t>(ws, L.counts);
  int32_t* sel_expert = at<int32_t>(ws, L.sel_expert);
  float* sel_weight = at<float>(ws, L.sel_weight);
  int32_t* pair_of_slot = at<int32_t>(ws, L.pair_of_slot);
  int32_t* pair_token = at<int32_t>(ws, L.pair_token);
  int32_t* offsets = at<int32_t>(ws, L.offsets);
  WorkItem* items = at<WorkItem>(ws, L.items);
  int32_t* n_items = at<int32_t>(ws, L.n_items);
  float* h = at<float>(ws, L.h);
  float* y = at<float>(ws, L.y);
  float* shared_h = at<float>(ws, L.shared_h);
  float* shared_out = ffs > 0 ? at<float>(ws, L.shared_out) : nullptr;
  float* shared_scale = ffs > 0 ? at<float>(ws, L.shared_scale) : nullptr;
  const int64_t token_tiles = ceil_div(T, kPairTile);
  const int32_t T32 = static_cast<int32_t>(T), P32 = static_cast<int32_t>(T * k);

  LME_CUDA_TRY(cudaMemsetAsync(counts, 0, 4 * E, st));

  ProductArgs router;
  router.single_a = a.router;
  router.n_single_rows = T32;
  router.rows = E;
  router.x = a.x;
  router.ld_x = d;
  router.y = scores;
  router.ld_y = E;
  if ((s = launch_product<false>(a.router_type, router, d, token_tiles, st)) != kCudaOk) return s;

  if (ffs > 0) {
    ProductArgs gate_up;
    gate_up.single_a = a.shared_gate;
    gate_up.single_b = a.shared_up;
    gate_up.n_single_rows = T32;
    gate_up.rows = ffs;
    gate_up.x = a.x;
    gate_up.ld_x = d;
    gate_up.y = shared_h;
    gate_up.ld_y = L.ld_ffs;
    if ((s = launch_product<true>(a.shared_gate_up_type, gate_up, d, token_tiles, st)) != kCudaOk)
      return s;
    ProductArgs down;
    down.single_a = a.shared_down;
    down.n_single_rows = T32;
    down.rows = d;
    down.x = shared_h;
    down.ld_x = L.ld_ffs;
    down.y = shared_out;
    down.ld_y = L.ld_d;
    if ((s = launch_product<false>(a.shared_down_type, down, ffs, token_tiles, st)) != kCudaOk)
      return s;
  }

  RouteArgs r;
  r.scores = scores;
  r.choice = at<float>(ws, L.choice);
  r.score_bias = a.score_bias;
  r.x = a.x;
  r.d = d;
  r.shared_gate_inp = a.shared_gate_inp;
  r.shared_scale = shared_scale;
  r.sel_expert = sel_expert;
  r.sel_weight = sel_weight;
  r.counts = counts;
  r.n_tokens = T32;
  r.n_experts = static_cast<int32_t>(E);
  r.top_k = static_cast<int32_t>(k);
  r.n_group = a.n_group;
  r.topk_group = a.topk_group;
  r.sigmoid = a.scoring == 1;
  r.norm_topk_prob = a.norm_topk_prob;
  r.routed_scaling_factor = a.routed_scaling_factor;
  route_kernel<<<static_cast<unsigned>(ceil_div(T, kRouteWarps)), kRouteWarps * kWarpSize, 0, st>>>(
      r);
  LME_CUDA_CHECK_LAUNCH();

  group_kernel<<<1, kGroupThreads, 0, st>>>(counts, static_cast<int32_t>(E), a.counts, offsets,
                                            items, n_items);
  LME_CUDA_CHECK_LAUNCH();
  place_kernel<<<static_cast<unsigned>(E), kPlaceThreads, 0, st>>>(
      sel_expert, counts, offsets, P32, static_cast<int32_t>(k), pair_token, pair_of_slot);
  LME_CUDA_CHECK_LAUNCH();

  ProductArgs gate_up;
  gate_up.items = items;
  gate_up.n_items = n_items;
  gate_up.experts_a = a.gate;
  gate_up.experts_b = a.up;
  gate_up.rows = ff;
  gate_up.x = a.x;
  gate_up.ld_x = d;
  gate_up.pair_token = pair_token;
  gate_up.y = h;
  gate_up.ld_y = L.ld_ff;
  if ((s = launch_product<true>(a.gate_up_type, gate_up, d, L.max_items, st)) != kCudaOk) return s;
  ProductArgs down;
  down.items = items;
  down.n_items = n_items;
  down.experts_a = a.down;
  down.rows = d;
  down.x = h;
  down.ld_x = L.ld_ff;
  down.y = y;
  down.ld_y = L.ld_d;
  if ((s = launch_product<false>(a.down_type, down, ff, L.max_items, st)) != kCudaOk) return s;

  combine_kernel<<<static_cast<unsigned>(T), kCombineThreads, 0, st>>>(
      y, L.ld_d, pair_of_slot, sel_weight, static_cast<int32_t>(k), shared_out, L.ld_d,
      shared_scale, a.out, d);
  LME_CUDA_CHECK_LAUNCH();
  return kCudaOk;
}

}  // namespace lme
