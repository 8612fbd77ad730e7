// Block-sparse decode attention (ReSA) over the paged KV cache: per (sequence, KV head) a block
// selection from the key min/max summaries, then flash-decoding over the kept blocks only, with a
// log-sum-exp merge of the splits. The CPU twin is cpp/lmengine/attention_sparse.cpp; the rules
// (q̄, score bound, kept count, forced sink/local blocks, ties to the lower block) are the same.
//
// Kernel 1 (select): grid (kv_head, seq), block kSelectThreads.
//   q̄ = scale * mean of the group's queries (shared memory); each thread scores its blocks
//   (s = sum_d max(q̄_d kmin_d, q̄_d kmax_d), +inf for forced blocks) into order-preserving
//   uint32 keys; a 32-round radix select finds the n-th largest key T; an ordered compaction
//   writes the blocks with key > T and the lowest-numbered ones with key == T, ascending.
//   No host round trip: counts stay on the device (n_selected), capacity is fixed by max_seq_len.
// Kernel 2 (attend): grid (split, kv_head, seq), block (32, group): one warp per query head,
//   each lane holding head_dim / 32 dims. Split s of a (seq, head) takes kept blocks
//   [n * s / S, n * (s + 1) / S) and runs an online softmax over their valid slots.
// Kernel 3 (merge): grid (q_head, seq), block head_dim: rescales the splits by exp2(lse - max).
//
// Napkin math per (seq, KV head): reads M summaries (2 * head_dim * 4 bytes each) and the n kept
// blocks of K and V (2 * page_size * head_dim * sizeof(KV) bytes each): summaries are
// 8 / (2 * page_size * sizeof(KV)) of the dense KV bytes (12.5% for fp16 and page 16), the kept
// blocks `keep` of them. K is read along dims with stride page_size (the cache's transposed page
// layout): the slots of one dim row share sectors through L1 as the warp walks the block.
#include <algorithm>
#include <cmath>

#include "kernels.cuh"

namespace lme {
namespace {

using namespace cuda_detail;

constexpr int kSelectThreads = 256;
constexpr int kMaxDimsPerLane = 8;  // head_dim <= 256
constexpr int kMaxSplits = 32;

struct SparsePlan {
  int32_t max_blocks = 0;
  int32_t n_splits = 1;
  int64_t keys_bytes = 0, partial_bytes = 0;
};

struct SparseKernelParams {
  CudaSparseDecodeArgs args;
  int32_t max_blocks;
  int32_t n_splits;
  float q_scale;     // args.scale * log2(e)
  uint32_t* keys;    // [n_seqs, n_kv_heads, max_blocks]
  float* part_out;   // [n_seqs, n_q_heads, n_splits, head_dim], normalised
  float* part_lse;   // [n_seqs, n_q_heads, n_splits], log2 units; -inf: empty split
};

__device__ __forceinline__ int32_t blocks_kept(const CudaSparseDecodeArgs& a, int32_t m) {
  if (m <= 0) return 0;
  int32_t n = static_cast<int32_t>(ceil(static_cast<double>(m) * a.keep - 1e-9));
  n = max(n, min(m, a.n_min));
  n = max(n, min(m, min(m, a.n_sink) + min(m, a.n_local)));
  return min(n, m);
}

// Order-preserving map of a float to uint32 (larger float, larger key; +inf the largest).
__device__ __forceinline__ uint32_t float_key(float s) {
  const uint32_t b = __float_as_uint(s);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ int block_count(int local, int* s_count) {
  __syncthreads();
  if (threadIdx.x == 0) *s_count = 0;
  __syncthreads();
  if (local) atomicAdd(s_count, local);
  __syncthreads();
  return *s_count;
}

// Exclusive prefix sum over the block of `flag` (0/1); returns this thread's offset and the total.
__device__ __forceinline__ int block_exclusive_scan(int flag, int* s_scan, int* total) {
  const int tid = threadIdx.x;
  __syncthreads();
  s_scan[tid] = flag;
  __syncthreads();
  for (int offset = 1; offset < blockDim.x; offset *= 2) {
    const int add = tid >= offset ? s_scan[tid - offset] : 0;
    __syncthreads();
    s_scan[tid] += add;
    __syncthreads();
  }
  *total = s_scan[blockDim.x - 1];
  return s_scan[tid] - flag;
}

__global__ void __launch_bounds__(kSelectThreads) sparse_select_kernel(const SparseKernelParams p) {
  const CudaSparseDecodeArgs& a = p.args;
  const int kv_head = blockIdx.x, seq = blockIdx.y, tid = threadIdx.x;
  const int group = a.n_q_heads / a.n_kv_heads;
  const int32_t len = min(max(a.seq_lens[seq], 1), a.max_seq_len);
  const int32_t m = (len + a.page_size - 1) / a.page_size;
  const int32_t n = blocks_kept(a, m);
  const int64_t row = static_cast<int64_t>(seq) * a.n_kv_heads + kv_head;
  int32_t* out = a.selected + row * p.max_blocks;
  if (n >= m) {
    for (int i = tid; i < m; i += blockDim.x) out[i] = i;
    if (tid == 0) a.n_selected[row] = m;
    return;  // uniform over the block
  }

  extern __shared__ float s_qbar[];  // [head_dim]
  __shared__ int s_count;
  __shared__ int s_scan[kSelectThreads];
  const float w = a.scale / static_cast<float>(group);
  for (int d = tid; d < a.head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int g = 0; g < group; ++g) {
      acc += a.q[(static_cast<int64_t>(seq) * a.n_q_heads + kv_head * group + g) * a.head_dim + d];
    }
    s_qbar[d] = acc * w;
  }
  __syncthreads();

  const int32_t* pages = a.page_table + seq * a.page_table_stride;
  const int64_t summary_stride = static_cast<int64_t>(a.n_layers) * a.n_kv_heads * 2 * a.head_dim;
  const int64_t summary_offset = (static_cast<int64_t>(a.layer) * a.n_kv_heads + kv_head) * 2 * a.head_dim;
  uint32_t* keys = p.keys + row * p.max_blocks;
  for (int i = tid; i < m; i += blockDim.x) {
    float s;
    if (i < a.n_sink || i >= m - a.n_local) {
      s = INFINITY;
    } else {
      const float* mn = a.summaries + static_cast<int64_t>(pages[i]) * summary_stride + summary_offset;
      const float* mx = mn + a.head_dim;
      s = 0.f;
      for (int d = 0; d < a.head_dim; ++d) s += fmaxf(s_qbar[d] * mn[d], s_qbar[d] * mx[d]);
    }
    keys[i] = float_key(s);
  }
  __syncthreads();

  // The n-th largest key: the largest T with count(key >= T) >= n, built bit by bit.
  uint32_t t = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = t | (1u << bit);
    int local = 0;
    for (int i = tid; i < m; i += blockDim.x) local += keys[i] >= cand;
    if (block_count(local, &s_count) >= n) t = cand;
  }
  int local = 0;
  for (int i = tid; i < m; i += blockDim.x) local += keys[i] > t;
  const int need_equal = n - block_count(local, &s_count);

  // Ordered compaction: chunks of blockDim indices, ties at T taken lowest index first.
  int written = 0, equal_seen = 0;
  for (int base = 0; base < m; base += blockDim.x) {
    const int i = base + tid;
    const uint32_t k = i < m ? keys[i] : 0u;
    const int is_equal = i < m && k == t;
    int n_equal;
    const int equal_rank = equal_seen + block_exclusive_scan(is_equal, s_scan, &n_equal);
    equal_seen += n_equal;
    const int keep = i < m && (k > t || (is_equal && equal_rank < need_equal));
    int n_keep;
    const int slot = written + block_exclusive_scan(keep, s_scan, &n_keep);
    if (keep) out[slot] = i;
    written += n_keep;
  }
  if (tid == 0) a.n_selected[row] = n;
}

template <typename KV>
__global__ void __launch_bounds__(1024) sparse_attend_kernel(const SparseKernelParams p) {
  const CudaSparseDecodeArgs& a = p.args;
  const int split = blockIdx.x, kv_head = blockIdx.y, seq = blockIdx.z;
  const int lane = threadIdx.x, g = threadIdx.y;
  const int group = blockDim.y;
  const int q_head = kv_head * group + g;
  const int64_t head_row = static_cast<int64_t>(seq) * a.n_q_heads + q_head;
  const int64_t row = static_cast<int64_t>(seq) * a.n_kv_heads + kv_head;
  const int per_lane = a.head_dim / kWarpSize;
  const int32_t len = min(max(a.seq_lens[seq], 1), a.max_seq_len);
  const int32_t n = a.n_selected[row];
  const int32_t b0 = static_cast<int32_t>(static_cast<int64_t>(n) * split / p.n_splits);
  const int32_t b1 = static_cast<int32_t>(static_cast<int64_t>(n) * (split + 1) / p.n_splits);
  const int32_t* blocks = a.selected + row * p.max_blocks;
  const int32_t* pages = a.page_table + seq * a.page_table_stride;

  float q[kMaxDimsPerLane], o[kMaxDimsPerLane];
  for (int j = 0; j < per_lane; ++j) {
    q[j] = a.q[head_row * a.head_dim + lane + j * kWarpSize] * p.q_scale;
    o[j] = 0.f;
  }
  const int64_t head_block = static_cast<int64_t>(a.page_size) * a.head_dim;
  const int64_t page_stride = static_cast<int64_t>(a.n_layers) * a.n_kv_heads * head_block;
  const int64_t head_offset = (static_cast<int64_t>(a.layer) * a.n_kv_heads + kv_head) * head_block;
  const KV* k_pool = static_cast<const KV*>(a.k_pool);
  const KV* v_pool = static_cast<const KV*>(a.v_pool);
  float m = -INFINITY, d = 0.f;
  for (int32_t bi = b0; bi < b1; ++bi) {
    const int32_t b = blocks[bi];
    const int64_t base = static_cast<int64_t>(pages[b]) * page_stride + head_offset;
    const int32_t n_valid = min(a.page_size, len - b * a.page_size);
    for (int32_t slot = 0; slot < n_valid; ++slot) {
      float s = 0.f;
      for (int j = 0; j < per_lane; ++j) {
        s = fmaf(q[j], to_float(k_pool[base + static_cast<int64_t>(lane + j * kWarpSize) * a.page_size + slot]), s);
      }
      s = warp_sum(s);
      const float m_new = fmaxf(m, s);
      const float alpha = exp2f(m - m_new);
      const float weight = exp2f(s - m_new);
      d = d * alpha + weight;
      for (int j = 0; j < per_lane; ++j) {
        const float v = to_float(v_pool[base + static_cast<int64_t>(slot) * a.head_dim + lane + j * kWarpSize]);
        o[j] = fmaf(o[j], alpha, weight * v);
      }
      m = m_new;
    }
  }
  const int64_t part = head_row * p.n_splits + split;
  const float inv_d = d > 0.f ? 1.f / d : 0.f;
  for (int j = 0; j < per_lane; ++j) p.part_out[part * a.head_dim + lane + j * kWarpSize] = o[j] * inv_d;
  if (lane == 0) p.part_lse[part] = d > 0.f ? m + log2f(d) : -INFINITY;
}

__global__ void sparse_merge_kernel(const SparseKernelParams p) {
  const int q_head = blockIdx.x, seq = blockIdx.y, dim = threadIdx.x;
  const int head_dim = p.args.head_dim;
  const int64_t head_row = static_cast<int64_t>(seq) * p.args.n_q_heads + q_head;
  const float* lse = p.part_lse + head_row * p.n_splits;
  const float* part = p.part_out + head_row * p.n_splits * head_dim + dim;
  float lse_max = -INFINITY;
  for (int s = 0; s < p.n_splits; ++s) lse_max = fmaxf(lse_max, lse[s]);
  float weight_sum = 0.f, acc = 0.f;
  for (int s = 0; s < p.n_splits; ++s) {
    if (lse[s] == -INFINITY) continue;
    const float w = exp2f(lse[s] - lse_max);
    weight_sum += w;
    acc = fmaf(w, part[static_cast<int64_t>(s) * head_dim], acc);
  }
  p.args.out[head_row * head_dim + dim] = weight_sum > 0.f ? acc / weight_sum : 0.f;
}

int plan_sparse(const CudaSparseDecodeArgs& a, SparsePlan* plan) {
  LME_CUDA_REQUIRE(a.n_seqs >= 0 && a.n_q_heads >= 0 && a.n_kv_heads > 0,
                   "cuda_attention_sparse_decode: need n_seqs >= 0, n_q_heads >= 0, n_kv_heads > 0");
  LME_CUDA_REQUIRE(a.n_q_heads % a.n_kv_heads == 0 && a.n_q_heads / a.n_kv_heads <= 32,
                   "cuda_attention_sparse_decode: n_q_heads must be a multiple of n_kv_heads, group <= 32");
  LME_CUDA_REQUIRE(a.head_dim >= 32 && a.head_dim <= 256 && a.head_dim % 32 == 0,
                   "cuda_attention_sparse_decode: head_dim must be a multiple of 32 in [32, 256]");
  LME_CUDA_REQUIRE(a.kv_dtype >= 0 && a.kv_dtype <= 2, "cuda_attention_sparse_decode: kv_dtype must be 0, 1 or 2");
  LME_CUDA_REQUIRE(a.page_size > 0 && a.n_layers > 0 && a.layer >= 0 && a.layer < a.n_layers,
                   "cuda_attention_sparse_decode: need page_size > 0 and 0 <= layer < n_layers");
  LME_CUDA_REQUIRE(a.max_seq_len >= 1 && a.page_table_stride >= ceil_div(a.max_seq_len, a.page_size),
                   "cuda_attention_sparse_decode: need max_seq_len >= 1 and page_table_stride >= its pages");
  LME_CUDA_REQUIRE(a.keep > 0.0 && a.keep <= 1.0 && a.n_min >= 0 && a.n_local >= 0 && a.n_sink >= 0,
                   "cuda_attention_sparse_decode: keep must be in (0, 1], n_min/n_local/n_sink >= 0");
  LME_CUDA_REQUIRE(std::isfinite(a.scale), "cuda_attention_sparse_decode: scale must be finite");
  LME_CUDA_REQUIRE(a.n_seqs <= 65535 && a.n_kv_heads <= 65535, "cuda_attention_sparse_decode: grid too large");
  LME_CUDA_REQUIRE(a.n_splits >= 0 && a.n_splits <= kMaxSplits,
                   "cuda_attention_sparse_decode: n_splits must be in [0, 32]");
  plan->max_blocks = static_cast<int32_t>(ceil_div(a.max_seq_len, a.page_size));
  int32_t splits = a.n_splits;
  if (splits == 0) {
    // Enough blocks for ~8 per SM, at least two kept blocks per split.
    int sm_count = 0;
    const int status = cuda_sm_count(&sm_count);
    if (status != kCudaOk) return status;
    const int64_t items = std::max<int64_t>(1, int64_t(a.n_seqs) * a.n_kv_heads);
    const int64_t kept_max = std::max<int64_t>(1, int64_t(std::ceil(plan->max_blocks * double(a.keep))));
    splits = static_cast<int32_t>(
        std::max<int64_t>(1, std::min<int64_t>({ceil_div(8 * int64_t(sm_count), items), kMaxSplits, kept_max / 2})));
  }
  plan->n_splits = splits;
  plan->keys_bytes = int64_t(a.n_seqs) * a.n_kv_heads * plan->max_blocks * int64_t(sizeof(uint32_t));
  plan->keys_bytes = ceil_div(plan->keys_bytes, 256) * 256;
  plan->partial_bytes = int64_t(a.n_seqs) * a.n_q_heads * splits * (a.head_dim + 1) * int64_t(sizeof(float));
  return kCudaOk;
}

}  // namespace

int64_t cuda_attention_sparse_workspace_bytes(const CudaSparseDecodeArgs& args) {
  SparsePlan plan;
  return plan_sparse(args, &plan) == kCudaOk ? plan.keys_bytes + plan.partial_bytes : -1;
}

int cuda_attention_sparse_decode(const CudaSparseDecodeArgs& a, void* stream) {
  SparsePlan plan;
  const int status = plan_sparse(a, &plan);
  if (status != kCudaOk) return status;
  if (a.n_seqs == 0 || a.n_q_heads == 0) return kCudaOk;
  LME_CUDA_REQUIRE(a.q && a.out && a.seq_lens && a.page_table && a.k_pool && a.v_pool && a.summaries &&
                       a.selected && a.n_selected,
                   "cuda_attention_sparse_decode: null pointer argument");
  LME_CUDA_REQUIRE(a.workspace_bytes >= plan.keys_bytes + plan.partial_bytes && a.workspace,
                   "cuda_attention_sparse_decode: workspace smaller than cuda_attention_sparse_workspace_bytes()");
  SparseKernelParams p;
  p.args = a;
  p.max_blocks = plan.max_blocks;
  p.n_splits = plan.n_splits;
  p.q_scale = a.scale * kLog2e;
  p.keys = static_cast<uint32_t*>(a.workspace);
  p.part_out = reinterpret_cast<float*>(static_cast<uint8_t*>(a.workspace) + plan.keys_bytes);
  p.part_lse = p.part_out + int64_t(a.n_seqs) * a.n_q_heads * plan.n_splits * a.head_dim;
  const cudaStream_t s = as_stream(stream);
  const int group = a.n_q_heads / a.n_kv_heads;
  sparse_select_kernel<<<dim3(a.n_kv_heads, a.n_seqs), kSelectThreads, a.head_dim * sizeof(float), s>>>(p);
  LME_CUDA_CHECK_LAUNCH();
  const dim3 grid(plan.n_splits, a.n_kv_heads, a.n_seqs), block(kWarpSize, group);
  switch (a.kv_dtype) {
    case 0: sparse_attend_kernel<float><<<grid, block, 0, s>>>(p); break;
    case 1: sparse_attend_kernel<__half><<<grid, block, 0, s>>>(p); break;
    default: sparse_attend_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(p); break;
  }
  LME_CUDA_CHECK_LAUNCH();
  sparse_merge_kernel<<<dim3(a.n_q_heads, a.n_seqs), a.head_dim, 0, s>>>(p);
  LME_CUDA_CHECK_LAUNCH();
  return kCudaOk;
}

}  // namespace lme
