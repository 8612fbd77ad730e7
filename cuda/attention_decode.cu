// Decode attention over the paged KV cache: one query token per sequence, GQA, fp32/fp16/bf16 KV,
// flash-decoding split over the context with a log-sum-exp merge.
//
// Pools (kv_cache.h): one (page, layer, kv_head) block holds page_size * head_dim elements,
//   K transposed, [head_dim][page_size]: (slot s, dim d) at block + d * page_size + s;
//   V by rows,    [page_size][head_dim]: (slot s, dim d) at block + s * head_dim + d.
//
// Kernel 1 (chunk): grid (chunk, kv_head, seq); block (kLanes, group, n_pos).
//   * threadIdx.x: kVec elements of the head vector, so kLanes adjacent threads cover one position:
//     - V: dims [lane * kVec, +kVec), contiguous in the row: one 16-byte load (two for fp32 with
//       kVec 8), and kLanes adjacent threads read the whole row;
//     - q and K: dims lane + j * kLanes, j < kVec (see the K access napkin below);
//   * threadIdx.y: the query head within the GQA group; all heads of a group read the same K/V
//     elements in the same block, so the group shares each DRAM read (through L1);
//   * threadIdx.z: which position of the chunk, n_pos positions in flight per step.
//   Each thread keeps an online softmax (running max m, denominator d, output o[kVec]) in
//   registers; the n_pos partial states are merged in shared memory at the end. A chunk writes its
//   normalised output and log2-sum-exp; a sequence that fits one chunk writes `out` directly.
// Kernel 2 (merge): grid (q_head, seq); block head_dim. Rescales the chunks by exp2(lse - max).
//
// Scores are kept in log2 units (q is pre-multiplied by scale * log2(e)) so every exponential is
// one exp2f.
//
// Napkin math: reads every attended K and V element once:
//   2 * sum_s(attended_len_s) * n_kv_heads * head_dim * sizeof(KV) bytes,
// e.g. 32 sequences x 4096 positions x 8 KV heads x 128 x fp16 = 537 MB, ~112 us at 4.8 TB/s.
// The chunk partials add 2 * n_seqs * n_q_heads * n_chunks * (head_dim + 1) * 4 bytes, a few % at
// most. FLOPs are 4 per KV element per query head of the group: far below the compute roofline.
//
// K access napkin (element (s, d) of a page block at d * page_size + s): a thread needs kVec dims
// of ONE slot, page_size elements apart, so it makes kVec scalar loads. The dims are interleaved
// across lanes (lane + j * kLanes), so load j of a warp reads dim rows [j * kLanes, +kLanes) at the
// warp's slots: kLanes sectors inside one contiguous span of kLanes * page_size elements (fp16,
// page 16, D 128: 16 sectors in 4 lines), not kLanes rows page_size * kVec apart. The other slots
// of those sectors are the positions of the other z and of the next steps, so every sector comes
// from DRAM once and is then hit in L1: DRAM bytes are as for row-major K. What grows is L1 work:
// per position, K is D / P sector reads (P positions per warp: 32 / (kLanes * group), at least 1)
// instead of D * sizeof(KV) / 32, 4-16x more, and kVec load instructions instead of 1-2. If that
// shows up as L1-bound on a GPU, the fix is a page-tiled score pass (lanes over slots, 16-byte
// loads along a dim row, scores handed to the V pass through shared memory).
#include <algorithm>
#include <cmath>

#include "kernels.cuh"

namespace lme {
namespace {

using namespace cuda_detail;

constexpr int kDecodeThreads = 128;       // threads per block when the group is small
constexpr int kMinAutoSplitTokens = 128;  // an automatic chunk is never shorter than this
constexpr int kAutoSplitRound = 16;
constexpr int kAutoBlocksPerSm = 8;  // enough warps in flight to cover DRAM latency

// Elements per thread and threads per head vector. kVec gives 16-byte loads for fp16/bf16 and
// keeps kLanes <= 32 (a power of two, so a head vector's lanes sit in one aligned warp segment).
template <typename KV, int kHeadDim>
struct DecodeTile {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(KV)) > kHeadDim / kWarpSize
                                  ? 16 / static_cast<int>(sizeof(KV))
                                  : kHeadDim / kWarpSize;
  static constexpr int kLanes = kHeadDim / kVec;
  static_assert(kLanes <= kWarpSize && (kLanes & (kLanes - 1)) == 0, "lanes must be a power of 2");
  static_assert(kVec == 4 || kVec == 8, "vector loads cover 4 or 8 elements");
};

// kVec consecutive elements at p (16-byte aligned): a V row slice.
template <typename KV, int kVec>
__device__ __forceinline__ void load_kv_vec(const KV* p, float out[kVec]) {
  if constexpr (kVec == 8) {
    load8_as_float(p, out);
  } else {
    static_assert(sizeof(KV) == 4, "4-element loads are for fp32 KV");
    const float4 v = load_float4(reinterpret_cast<const float*>(p));
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  }
}

// kVec elements `stride` apart starting at p: dims of one slot of a transposed K page.
template <typename KV, int kVec>
__device__ __forceinline__ void load_kv_strided(const KV* p, int64_t stride, float out[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_float(p[j * stride]);
}

struct DecodePlan {
  int32_t split_tokens = 1;
  int32_t max_splits = 1;  // chunks of the longest sequence: grid.x of kernel 1
  int64_t workspace_bytes = 0;
};

struct DecodeKernelParams {
  CudaDecodeAttentionArgs args;
  int32_t split_tokens;
  int32_t max_splits;
  float q_scale;       // args.scale * log2(e)
  float* partial_out;  // [n_seqs, n_q_heads, max_splits, head_dim]
  float* partial_lse;  // [n_seqs, n_q_heads, max_splits], log2 units
};

// First attended position and number of chunks of sequence `seq`.
__device__ __forceinline__ void seq_range(const DecodeKernelParams& p, int seq, int32_t* len,
                                          int32_t* lo, int32_t* n_splits) {
  // Clamped so a length past the contract cannot index chunks the workspace does not hold.
  *len = min(max(p.args.seq_lens[seq], 0), p.args.max_seq_len);
  *lo = p.args.sliding_window > 0 ? max(0, *len - p.args.sliding_window) : 0;
  *n_splits = (*len - *lo + p.split_tokens - 1) / p.split_tokens;
}

template <typename KV, int kHeadDim>
__global__ void __launch_bounds__(1024) decode_attention_chunk_kernel(const DecodeKernelParams p) {
  using Tile = DecodeTile<KV, kHeadDim>;
  constexpr int kVec = Tile::kVec;
  constexpr int kLanes = Tile::kLanes;
  const CudaDecodeAttentionArgs& a = p.args;
  const int split = blockIdx.x, kv_head = blockIdx.y, seq = blockIdx.z;
  const int lane = threadIdx.x, g = threadIdx.y, z = threadIdx.z;
  const int group = blockDim.y, n_pos = blockDim.z;
  const int q_head = kv_head * group + g;
  const int64_t head_row = static_cast<int64_t>(seq) * a.n_q_heads + q_head;
  const int dim0 = lane * kVec;  // first element of this thread's V / output slice

  int32_t len, lo, n_splits;
  seq_range(p, seq, &len, &lo, &n_splits);
  if (split >= n_splits) {
    if (len == 0 && split == 0 && z == 0) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) a.out[head_row * kHeadDim + dim0 + j] = 0.f;
    }
    return;  // uniform over the block: no thread reaches a barrier
  }
  const int32_t begin = lo + split * p.split_tokens;
  const int32_t end = min(len, begin + p.split_tokens);

  // q in the K order: element j is dim lane + j * kLanes.
  float q[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) q[j] = a.q[head_row * kHeadDim + lane + j * kLanes] * p.q_scale;

  // Element offsets in the pools: page p, this layer and head, slot s:
  //   K: p * page_stride + head_offset + (lane + j * kLanes) * page_size + s,
  //   V: p * page_stride + head_offset + s * kHeadDim + dim0 + j.
  const int64_t head_block = static_cast<int64_t>(a.page_size) * kHeadDim;
  const int64_t page_stride = static_cast<int64_t>(a.n_layers) * a.n_kv_heads * head_block;
  const int64_t head_offset = (static_cast<int64_t>(a.layer) * a.n_kv_heads + kv_head) * head_block;
  const int64_t k_lane_offset = static_cast<int64_t>(lane) * a.page_size;   // dim `lane`'s row
  const int64_t k_dim_stride = static_cast<int64_t>(kLanes) * a.page_size;  // to dim + kLanes
  const int32_t* pages = a.page_table + seq * a.page_table_stride;
  const KV* k_pool = static_cast<const KV*>(a.k_pool);
  const KV* v_pool = static_cast<const KV*>(a.v_pool);

  // A block of kLanes * group * n_pos threads may end in a partial warp (e.g. 8 * 3 * 5 = 120).
  const unsigned lanes_mask = existing_lanes_mask();
  float m = -INFINITY, d = 0.f, o[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) o[j] = 0.f;

  // Every thread runs the same number of steps (every lane of the mask must join the shuffles);
  // positions past the chunk's end load nothing and leave the state unchanged.
  for (int32_t base = begin; base < end; base += n_pos) {
    const int32_t t = base + z;
    const bool valid = t < end;
    float k[kVec], v[kVec];
    if (valid) {
      const int32_t page_index = t / a.page_size;
      const int32_t slot = t - page_index * a.page_size;
      const int64_t block = static_cast<int64_t>(pages[page_index]) * page_stride + head_offset;
      load_kv_strided<KV, kVec>(k_pool + block + k_lane_offset + slot, k_dim_stride, k);
      load_kv_vec<KV, kVec>(v_pool + block + static_cast<int64_t>(slot) * kHeadDim + dim0, v);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) k[j] = v[j] = 0.f;
    }
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) s = fmaf(q[j], k[j], s);
    s = warp_sum<kLanes>(s, lanes_mask);
    if (valid) {
      const float m_new = fmaxf(m, s);
      const float alpha = exp2f(m - m_new);  // 0 on the first position (m = -inf)
      const float weight = exp2f(s - m_new);
      d = d * alpha + weight;
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = fmaf(o[j], alpha, weight * v[j]);
      m = m_new;
    }
  }

  if (n_pos > 1) {
    // Merge the n_pos partial states of each query head. Shared memory:
    //   o [n_pos][group][kHeadDim] | m [n_pos][group] | d [n_pos][group]
    extern __shared__ float smem[];
    float* s_o = smem;
    float* s_m = s_o + n_pos * group * kHeadDim;
    float* s_d = s_m + n_pos * group;
    const int state = z * group + g;
#pragma unroll
    for (int j = 0; j < kVec; ++j) s_o[state * kHeadDim + dim0 + j] = o[j];
    if (lane == 0) s_m[state] = m, s_d[state] = d;
    __syncthreads();
    if (z != 0) return;
    float m_all = -INFINITY;
    for (int zz = 0; zz < n_pos; ++zz) m_all = fmaxf(m_all, s_m[zz * group + g]);
    d = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) o[j] = 0.f;
    for (int zz = 0; zz < n_pos; ++zz) {
      const float m_z = s_m[zz * group + g];
      if (m_z == -INFINITY) continue;  // this slot saw no position (short chunk)
      const float w = exp2f(m_z - m_all);
      d = fmaf(s_d[zz * group + g], w, d);
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        o[j] = fmaf(s_o[(zz * group + g) * kHeadDim + dim0 + j], w, o[j]);
    }
    m = m_all;
  }

  // Every chunk holds at least one position, so m is finite and d >= 1.
  const float inv_d = 1.f / d;
  if (n_splits == 1) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) a.out[head_row * kHeadDim + dim0 + j] = o[j] * inv_d;
  } else {
    const int64_t part = head_row * p.max_splits + split;
#pragma unroll
    for (int j = 0; j < kVec; ++j) p.partial_out[part * kHeadDim + dim0 + j] = o[j] * inv_d;
    if (lane == 0) p.partial_lse[part] = m + log2f(d);
  }
}

__global__ void decode_attention_merge_kernel(const DecodeKernelParams p) {
  const int q_head = blockIdx.x, seq = blockIdx.y, dim = threadIdx.x;
  const int head_dim = p.args.head_dim;
  int32_t len, lo, n_splits;
  seq_range(p, seq, &len, &lo, &n_splits);
  if (n_splits <= 1) return;  // written by the chunk kernel
  const int64_t head_row = static_cast<int64_t>(seq) * p.args.n_q_heads + q_head;
  const float* lse = p.partial_lse + head_row * p.max_splits;
  const float* part = p.partial_out + head_row * p.max_splits * head_dim + dim;
  float lse_max = -INFINITY;
  for (int s = 0; s < n_splits; ++s) lse_max = fmaxf(lse_max, lse[s]);
  float weight_sum = 0.f, acc = 0.f;
  for (int s = 0; s < n_splits; ++s) {
    const float w = exp2f(lse[s] - lse_max);
    weight_sum += w;
    acc = fmaf(w, part[static_cast<int64_t>(s) * head_dim], acc);
  }
  p.args.out[head_row * head_dim + dim] = acc / weight_sum;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Validates what the host can see and picks the chunk size. Returns a status.
int plan_decode(const CudaDecodeAttentionArgs& a, DecodePlan* plan) {
  LME_CUDA_REQUIRE(a.n_seqs >= 0 && a.n_q_heads >= 0 && a.n_kv_heads > 0,
                   "cuda_attention_decode: need n_seqs >= 0, n_q_heads >= 0, n_kv_heads > 0");
  LME_CUDA_REQUIRE(a.n_q_heads % a.n_kv_heads == 0,
                   "cuda_attention_decode: n_q_heads must be a multiple of n_kv_heads");
  LME_CUDA_REQUIRE(a.head_dim == 64 || a.head_dim == 128 || a.head_dim == 256,
                   "cuda_attention_decode: head_dim must be 64, 128 or 256");
  LME_CUDA_REQUIRE(a.kv_dtype >= 0 && a.kv_dtype <= 2,
                   "cuda_attention_decode: kv_dtype must be 0, 1 or 2");
  LME_CUDA_REQUIRE(a.page_size > 0 && a.n_layers > 0 && a.layer >= 0 && a.layer < a.n_layers,
                   "cuda_attention_decode: need page_size > 0 and 0 <= layer < n_layers");
  LME_CUDA_REQUIRE(a.max_seq_len >= 0 && a.sliding_window >= 0 && a.split_tokens >= 0,
                   "cuda_attention_decode: negative max_seq_len, sliding_window or split_tokens");
  LME_CUDA_REQUIRE(a.page_table_stride >= ceil_div(a.max_seq_len, a.page_size),
                   "cuda_attention_decode: page_table_stride < pages of max_seq_len");
  LME_CUDA_REQUIRE(std::isfinite(a.scale), "cuda_attention_decode: scale must be finite");
  LME_CUDA_REQUIRE(a.n_seqs <= 65535 && a.n_kv_heads <= 65535,
                   "cuda_attention_decode: grid too large");
  const int64_t group = a.n_q_heads / a.n_kv_heads;
  LME_CUDA_REQUIRE(group * (a.head_dim / 8) <= 1024,
                   "cuda_attention_decode: GQA group too large for one block");

  const int64_t attended =
      a.sliding_window > 0 ? std::min<int64_t>(a.max_seq_len, a.sliding_window) : a.max_seq_len;
  int64_t split_tokens = a.split_tokens;
  if (split_tokens == 0) {
    // Enough chunks for ~kAutoBlocksPerSm blocks per SM, none shorter than kMinAutoSplitTokens.
    int sm_count = 0;
    const int status = cuda_sm_count(&sm_count);
    if (status != kCudaOk) return status;
    const int64_t blocks_per_chunk = std::max<int64_t>(1, int64_t(a.n_seqs) * a.n_kv_heads);
    int64_t splits = ceil_div(kAutoBlocksPerSm * int64_t(sm_count), blocks_per_chunk);
    splits = std::max<int64_t>(1, std::min(splits, ceil_div(attended, kMinAutoSplitTokens)));
    split_tokens = ceil_div(ceil_div(std::max<int64_t>(attended, 1), splits), kAutoSplitRound) *
                   kAutoSplitRound;
  }
  plan->split_tokens = static_cast<int32_t>(std::min<int64_t>(split_tokens, 0x7fffffff));
  plan->max_splits =
      static_cast<int32_t>(std::max<int64_t>(1, ceil_div(attended, plan->split_tokens)));
  plan->workspace_bytes = plan->max_splits > 1
                              ? int64_t(a.n_seqs) * a.n_q_heads * plan->max_splits *
                                    (a.head_dim + 1) * int64_t(sizeof(float))
                              : 0;
  return kCudaOk;
}

template <typename KV, int kHeadDim>
int launch_decode(const DecodeKernelParams& p, cudaStream_t stream) {
  using Tile = DecodeTile<KV, kHeadDim>;
  const CudaDecodeAttentionArgs& a = p.args;
  const int group = a.n_q_heads / a.n_kv_heads;
  LME_CUDA_REQUIRE(group * Tile::kLanes <= 1024,
                   "cuda_attention_decode: GQA group too large for one block");
  const int n_pos = std::max(1, kDecodeThreads / (Tile::kLanes * group));
  const dim3 block(Tile::kLanes, group, n_pos);
  const dim3 grid(p.max_splits, a.n_kv_heads, a.n_seqs);
  const size_t smem = n_pos > 1 ? size_t(n_pos) * group * (kHeadDim + 2) * sizeof(float) : 0;
  decode_attention_chunk_kernel<KV, kHeadDim><<<grid, block, smem, stream>>>(p);
  LME_CUDA_CHECK_LAUNCH();
  if (p.max_splits > 1) {
    decode_attention_merge_kernel<<<dim3(a.n_q_heads, a.n_seqs), kHeadDim, 0, stream>>>(p);
    LME_CUDA_CHECK_LAUNCH();
  }
  return kCudaOk;
}

template <typename KV>
int launch_decode_for_dtype(const DecodeKernelParams& p, cudaStream_t stream) {
  switch (p.args.head_dim) {
    case 64: return launch_decode<KV, 64>(p, stream);
    case 128: return launch_decode<KV, 128>(p, stream);
    case 256: return launch_decode<KV, 256>(p, stream);
  }
  return record_status(kCudaUnsupported, "cuda_attention_decode: unsupported head_dim");
}

}  // namespace

int64_t cuda_attention_decode_workspace_bytes(const CudaDecodeAttentionArgs& args) {
  DecodePlan plan;
  return plan_decode(args, &plan) == kCudaOk ? plan.workspace_bytes : -1;
}

int cuda_attention_decode(const CudaDecodeAttentionArgs& a, void* stream) {
  DecodePlan plan;
  const int status = plan_decode(a, &plan);
  if (status != kCudaOk) return status;
  if (a.n_seqs == 0 || a.n_q_heads == 0) return kCudaOk;
  LME_CUDA_REQUIRE(a.q != nullptr && a.out != nullptr && a.seq_lens != nullptr,
                   "cuda_attention_decode: null q, out or seq_lens");
  LME_CUDA_REQUIRE(a.max_seq_len == 0 || (a.page_table != nullptr && aligned16(a.k_pool) &&
                                          aligned16(a.v_pool) && a.k_pool && a.v_pool),
                   "cuda_attention_decode: pools must be non-null and 16-byte aligned");
  LME_CUDA_REQUIRE(
      a.workspace_bytes >= plan.workspace_bytes && (plan.workspace_bytes == 0 || a.workspace),
      "cuda_attention_decode: workspace smaller than cuda_attention_decode_workspace_bytes()");

  DecodeKernelParams p;
  p.args = a;
  p.split_tokens = plan.split_tokens;
  p.max_splits = plan.max_splits;
  p.q_scale = a.scale * kLog2e;
  p.partial_out = static_cast<float*>(a.workspace);
  p.partial_lse = p.partial_out == nullptr ? nullptr
                                           : p.partial_out + int64_t(a.n_seqs) * a.n_q_heads *
                                                                 plan.max_splits * a.head_dim;
  switch (a.kv_dtype) {
    case 0: return launch_decode_for_dtype<float>(p, as_stream(stream));
    case 1: return launch_decode_for_dtype<__half>(p, as_stream(stream));
    case 2: return launch_decode_for_dtype<__nv_bfloat16>(p, as_stream(stream));
  }
  return record_status(kCudaUnsupported, "cuda_attention_decode: unsupported kv_dtype");
}

}  // namespace lme
