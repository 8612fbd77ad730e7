// The CUDA kernels of lmengine, as plain C++ host functions: raw device pointers and shapes in, an
// int status out (0 = ok). Nothing here needs the CUDA headers, so the bindings (and any other
// g++-compiled caller) include this file without the toolkit. Device-side helpers shared by the
// .cu files live in kernels.cuh.
//
// Conventions:
//   * Every pointer argument is device memory unless its comment says "host".
//   * `stream` is a cudaStream_t passed as void*; nullptr is the default stream. Kernels are
//     enqueued asynchronously: a returned 0 means "launched", and errors raised while the kernel
//     runs appear at the next synchronizing call.
//   * Launchers check what they can see on the host (shapes, alignment, supported types) and never
//     read device memory to validate it: page ids, sequence lengths and positions are trusted, so
//     callers (the binding layer, the engine) validate those before they reach the GPU.
#pragma once

#include <cstddef>
#include <cstdint>

// Number of usable CUDA devices; 0 when the runtime reports none or fails to initialise.
extern "C" int lmengine_cuda_device_count();

namespace lme {

enum CudaStatus : int {
  kCudaOk = 0,
  kCudaInvalidArgument = 1,  // same value as StatusCode::kInvalidArgument
  kCudaUnsupported = 4,      // same value as StatusCode::kUnsupported
  kCudaRuntimeError = 100,   // a CUDA runtime call or a kernel launch failed
};

// Message for the last non-zero status returned on this thread ("" if none yet).
const char* cuda_last_error();

// ---------------------------------------------------------------------------------------------
// Device memory and timing, for the bindings, tests and benchmarks (the engine will own its own
// allocator). All act on the current device and the default stream.

int cuda_malloc(void** ptr, size_t bytes);
int cuda_free(void* ptr);
int cuda_copy_to_device(void* dst, const void* host_src, size_t bytes);
int cuda_copy_to_host(void* host_dst, const void* src, size_t bytes);
int cuda_copy_device_to_device(void* dst, const void* src, size_t bytes);
int cuda_synchronize();
// Streaming multiprocessors of the current device (cached per device).
int cuda_sm_count(int* count);
// Runs launch(ctx) `iters` times on the default stream between two CUDA events and stores the
// mean milliseconds per call. Stops at the first non-zero status launch returns.
int cuda_time_launches(int (*launch)(void* ctx), void* ctx, int iters, float* ms_per_call);

// ---------------------------------------------------------------------------------------------
// RMSNorm over rows, fp32: y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w  (as ops.h
// rmsnorm_row). x and y are [rows, n] with row strides in elements; y == x (in place) is allowed.
int cuda_rmsnorm(const float* x, int64_t x_row_stride, const float* w, float* y,
                 int64_t y_row_stride, int64_t rows, int64_t n, float eps, void* stream);

// RoPE in place, fp32. x holds n_tokens rows, token_stride elements apart; each row starts with
// n_heads head vectors of head_dim elements (so q or k can be rotated inside a fused QKV row).
// Pair i of token t turns by angle float(positions[t]) * inv_freq[i], i < head_dim / 2; the pairs
// are (2i, 2i+1) when interleaved, else (i, i + head_dim/2) (as ops.h rope_row).
int cuda_rope(float* x, int64_t token_stride, int64_t n_tokens, int32_t n_heads, int32_t head_dim,
              const int32_t* positions, const float* inv_freq, bool interleaved, void* stream);

// Decode attention over a paged KV cache (the layout below): one query token per sequence,
// GQA (n_q_heads / n_kv_heads query heads share a KV head), softmax(q k^T * scale) v over the
// positions [lo, seq_lens[s]) of sequence s, lo = max(0, len - sliding_window) when the window
// is set, else 0. A sequence of length 0 gets a zero output.
//
// The context is split into chunks of split_tokens positions (flash-decoding); each chunk writes a
// partial output and its log-sum-exp to the workspace and a second kernel merges them, so short
// batches with long contexts still fill the GPU.
struct CudaDecodeAttentionArgs {
  const float* q = nullptr;  // [n_seqs, n_q_heads, head_dim]
  float* out = nullptr;      // [n_seqs, n_q_heads, head_dim]
  // K and V pools of kv_dtype, 16-byte aligned, one (page, layer, head) block after another (the
  // CPU KVCache orders the same blocks in page groups, kv_cache.h; a GPU reads scattered 2 KiB
  // blocks at full speed, so the device pools keep the plain order):
  //   K: [n_pages][n_layers][n_kv_heads][head_dim][page_size]  (transposed within a page)
  //   V: [n_pages][n_layers][n_kv_heads][page_size][head_dim]
  const void* k_pool = nullptr;
  const void* v_pool = nullptr;
  int32_t kv_dtype = 0;                 // KVDType: 0 F32, 1 F16, 2 BF16
  const int32_t* page_table = nullptr;  // [n_seqs, page_table_stride]; page ids < n_pages
  int64_t page_table_stride = 0;        // >= pages of the longest sequence
  const int32_t* seq_lens = nullptr;    // [n_seqs], in [0, max_seq_len] (larger: clamped)
  int32_t n_seqs = 0;
  int32_t n_q_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;  // 64, 128 or 256
  int32_t page_size = 0;
  int32_t n_layers = 0;
  int32_t layer = 0;
  int32_t max_seq_len = 0;     // host-side bound on seq_lens; sizes the grid and the workspace
  int32_t sliding_window = 0;  // 0: attend to the whole context
  float scale = 0.f;           // softmax scale, usually 1/sqrt(head_dim)
  int32_t split_tokens = 0;    // positions per chunk; 0 picks a size that fills the GPU
  void* workspace = nullptr;   // cuda_attention_decode_workspace_bytes(args) bytes
  int64_t workspace_bytes = 0;
};

// Workspace the call needs (0 when every sequence fits one chunk), or -1 for invalid arguments.
int64_t cuda_attention_decode_workspace_bytes(const CudaDecodeAttentionArgs& args);
int cuda_attention_decode(const CudaDecodeAttentionArgs& args, void* stream);

// Block-sparse decode attention (ReSA; the CPU twin is cpp/lmengine/attention_sparse.h): for
// each sequence (one query token at position seq_lens[s] - 1) and KV head, selects blocks (= KV
// pages) from the key min/max summaries and attends over those only. Selection: q̄ = scale *
// mean of the group's queries, block score sum_d max(q̄_d kmin_d, q̄_d kmax_d); of the M blocks of
// the sequence keep n = max(ceil(M * keep), min(M, n_min)), at least the first n_sink and the last
// n_local, the rest by score (ties: lower block first). No sliding window. Outputs, besides out:
// the kept blocks of (s, h), ascending, at selected[(s * n_kv_heads + h) * max_blocks ...] and
// their count at n_selected[s * n_kv_heads + h], max_blocks = ceil(max_seq_len / page_size).
struct CudaSparseDecodeArgs {
  const float* q = nullptr;  // [n_seqs, n_q_heads, head_dim]
  float* out = nullptr;      // [n_seqs, n_q_heads, head_dim]
  const void* k_pool = nullptr;  // as CudaDecodeAttentionArgs
  const void* v_pool = nullptr;
  int32_t kv_dtype = 0;
  const float* summaries = nullptr;  // [n_pages][n_layers][n_kv_heads][2][head_dim]: min, max
  const int32_t* page_table = nullptr;  // [n_seqs, page_table_stride]
  int64_t page_table_stride = 0;
  const int32_t* seq_lens = nullptr;  // [n_seqs], in [1, max_seq_len]
  int32_t n_seqs = 0;
  int32_t n_q_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;  // a multiple of 32, <= 256
  int32_t page_size = 0;
  int32_t n_layers = 0;
  int32_t layer = 0;
  int32_t max_seq_len = 0;
  float scale = 0.f;
  double keep = 0.1;
  int32_t n_min = 16;
  int32_t n_local = 1;
  int32_t n_sink = 0;
  int32_t n_splits = 0;            // splits of each kept list (0: fill the GPU), <= 32
  int32_t* selected = nullptr;     // [n_seqs, n_kv_heads, max_blocks]
  int32_t* n_selected = nullptr;   // [n_seqs, n_kv_heads]
  void* workspace = nullptr;       // cuda_attention_sparse_workspace_bytes(args) bytes
  int64_t workspace_bytes = 0;
};

int64_t cuda_attention_sparse_workspace_bytes(const CudaSparseDecodeArgs& args);
int cuda_attention_sparse_decode(const CudaSparseDecodeArgs& args, void* stream);

// Dequantizing GEMV: y[t, r] = sum_i W[r, i] * x[t, i], fp32 accumulation, for t < n_tokens.
// W: rows rows of k elements in a GGML weight format (quant.h DType), w_row_stride bytes apart,
// 16-byte aligned base; x: [n_tokens, k] fp32; y: [n_tokens, rows] fp32. k must be a multiple of
// the format's block size. Each token re-reads W, so this is for decode batches of a few tokens.
bool cuda_gemv_supports(int32_t ggml_type);
int cuda_gemv(int32_t ggml_type, const void* w, int64_t w_row_stride, int64_t rows, int64_t k,
              const float* x, int64_t n_tokens, float* y, void* stream);

// Mixture-of-Experts feed-forward over T token rows (the CPU twin is cpp/lmengine/moe_dispatch.h,
// which states the maths): router product, softmax or sigmoid(+ selection-only bias) scores with
// group-limited top-k (ties to the lower expert), optional renormalisation, x
// routed_scaling_factor; the (token, slot) pairs grouped by expert on the device; per expert
// silu(gate x) * (up x) then down over its gathered rows; out[t] = Σ_slot weight * expert output in
// slot order, plus the shared expert (x sigmoid(shared_gate_inp . x) when given). fp32 activations
// and accumulation, no float atomics: the output is deterministic and a token's row does not depend
// on the batch.
//
// Weights are row-major matrices of a type cuda_gemv_supports, rows contiguous
// (dtype_row_bytes(type, cols) apart), every matrix 16-byte aligned (trusted: the per-expert
// pointers live in device memory and are not read on the host). Expert gate and up share one type,
// downs another; the row length must be a multiple of the type's block size.
struct CudaMoEArgs {
  const float* x = nullptr;   // [n_tokens, d], 16-byte aligned
  float* out = nullptr;       // [n_tokens, d]
  int64_t* counts = nullptr;  // [n_experts] optional: pairs (= tokens) each expert received
  int64_t n_tokens = 0;
  int64_t d = 0;
  int64_t d_ff = 0;         // inner width of a routed expert
  int64_t d_ff_shared = 0;  // inner width of the shared expert, 0: none
  int64_t n_experts = 0;    // <= 4096
  int64_t top_k = 0;
  int32_t scoring = 0;  // MoEScoring: 0 softmax, 1 sigmoid
  bool norm_topk_prob = false;
  int32_t n_group = 1;     // experts in n_group equal groups; only the topk_group groups with the
  int32_t topk_group = 1;  // best sum of their top-2 choice values compete (n_group <= 256)
  float routed_scaling_factor = 1.f;
  int32_t router_type = 0;
  const void* router = nullptr;       // [n_experts, d]
  const float* score_bias = nullptr;  // [n_experts], sigmoid scoring only (optional)
  int32_t gate_up_type = 0;
  const void* const* gate = nullptr;  // [n_experts] device pointers to [d_ff, d] matrices
  const void* const* up = nullptr;    // [n_experts] device pointers to [d_ff, d] matrices
  int32_t down_type = 0;
  const void* const* down = nullptr;  // [n_experts] device pointers to [d, d_ff] matrices
  int32_t shared_gate_up_type = 0;
  const void* shared_gate = nullptr;  // [d_ff_shared, d]
  const void* shared_up = nullptr;    // [d_ff_shared, d]
  int32_t shared_down_type = 0;
  const void* shared_down = nullptr;       // [d, d_ff_shared]
  const float* shared_gate_inp = nullptr;  // [d] optional: shared output x sigmoid(w . x)
  void* workspace = nullptr;               // cuda_moe_workspace_bytes(...) bytes, 256-byte aligned
  int64_t workspace_bytes = 0;
};

// Scratch for up to n_tokens rows (monotone in every argument, so one workspace sized for the
// largest step serves every smaller one), or -1 for invalid sizes.
int64_t cuda_moe_workspace_bytes(int64_t n_tokens, int64_t d, int64_t d_ff, int64_t d_ff_shared,
                                 int64_t n_experts, int64_t top_k);
// Enqueues the layer on `stream`. Checks the config, types, block sizes, the alignment of x, the
// router, the shared matrices and the workspace, and its size; trusts the expert pointer arrays.
int cuda_moe_forward(const CudaMoEArgs& args, void* stream);

}  // namespace lme
