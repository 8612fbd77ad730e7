// lmengine._core.cuda: test and benchmark entry points for the CUDA kernels (cuda/kernels.h).
// Each takes numpy arrays, validates every shape and value the kernel trusts (ValueError), copies
// to the device, runs the kernel, and copies the result back; RuntimeError when no device is
// usable or CUDA fails. With iters > 0 the kernel is then run `iters` more times between CUDA
// events and the call returns (result, milliseconds per call); the result is always the first run.
//
// Only kernels.h is included (no CUDA headers), so g++ compiles this file. Without
// LMENGINE_WITH_CUDA the submodule holds just available() -> False.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

#ifdef LMENGINE_WITH_CUDA

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_moe.h"
#include "errors.h"
#include "kernels.h"
#include "lmengine/quant.h"

namespace {

bool cuda_device_available() { return lmengine_cuda_device_count() > 0; }

// Safe to call without the GIL: only C++ exceptions, translated once the GIL is back.
void check_status(int status) {
  if (status == lme::kCudaOk) return;
  const std::string message = lme::cuda_last_error();
  if (status == lme::kCudaInvalidArgument) throw py::value_error(message);
  throw std::runtime_error(message);
}

void require_device() {
  if (!cuda_device_available()) throw std::runtime_error("no CUDA device is available");
}

void check_array(const py::array& a, const py::dtype& dtype, int ndim, const char* what) {
  if (!a.dtype().is(dtype)) {
    throw py::value_error(std::string(what) + " must have dtype " +
                          py::str(dtype).cast<std::string>() + ", got " +
                          py::str(a.dtype()).cast<std::string>());
  }
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(what) + " must be " + std::to_string(ndim) + "-D, got " +
                          std::to_string(a.ndim()) + "-D");
  }
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(what) + " must be C-contiguous");
}

void check_dim(const py::array& a, int axis, int64_t expected, const char* what) {
  if (a.shape(axis) != expected) {
    throw py::value_error(std::string(what) + ".shape[" + std::to_string(axis) + "] is " +
                          std::to_string(a.shape(axis)) + ", expected " + std::to_string(expected));
  }
}

// Device memory owned for the duration of one call.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    check_status(lme::cuda_malloc(&ptr_, bytes));
  }
  DeviceBuffer(const void* host, size_t bytes) : DeviceBuffer(bytes) {
    check_status(lme::cuda_copy_to_device(ptr_, host, bytes));
  }
  ~DeviceBuffer() { lme::cuda_free(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  void copy_to_host(void* host) const { check_status(lme::cuda_copy_to_host(host, ptr_, bytes_)); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

size_t nbytes(const py::array& a) { return static_cast<size_t>(a.nbytes()); }

// Runs launch() once more per iteration between CUDA events; milliseconds per call.
template <class Launch>
float time_launches(Launch& launch, int iters) {
  float ms = 0.f;
  auto trampoline = [](void* ctx) { return (*static_cast<Launch*>(ctx))(); };
  check_status(lme::cuda_time_launches(trampoline, &launch, iters, &ms));
  return ms;
}

py::object with_time(const py::array& result, int iters, float ms) {
  if (iters > 0) return py::make_tuple(result, ms);
  return result;
}

// The kernels trust lengths and page ids: checks that every sequence's length is in
// [min_len, page_table.shape[1] * page_size] and every page it will read is a page of the pool.
// Returns the longest length.
int32_t check_page_table(const py::array& page_table, const py::array& seq_lens, int64_t n_seqs,
                         int64_t page_size, int64_t n_pages, int32_t min_len) {
  const int64_t max_pages = page_table.shape(1);
  const int32_t* lens = static_cast<const int32_t*>(seq_lens.data());
  const int32_t* table = static_cast<const int32_t*>(page_table.data());
  int32_t max_len = 0;
  for (int64_t s = 0; s < n_seqs; ++s) {
    if (lens[s] < min_len || lens[s] > max_pages * page_size) {
      throw py::value_error("seq_lens[" + std::to_string(s) + "] = " + std::to_string(lens[s]) +
                            " is outside [" + std::to_string(min_len) +
                            ", page_table.shape[1] * page_size]");
    }
    max_len = std::max(max_len, lens[s]);
    for (int64_t i = 0; i < (lens[s] + page_size - 1) / page_size; ++i) {
      const int32_t page = table[s * max_pages + i];
      if (page < 0 || page >= n_pages) {
        throw py::value_error("page_table[" + std::to_string(s) + ", " + std::to_string(i) +
                              "] = " + std::to_string(page) + " is not a page of the pool");
      }
    }
  }
  return max_len;
}

void check_iters(int iters) {
  if (iters < 0) throw py::value_error("iters must be >= 0");
}

// ---------------------------------------------------------------------------------------------

py::object rmsnorm(const py::array& x, const py::array& w, float eps, int iters) {
  check_array(x, py::dtype::of<float>(), 2, "x");
  check_array(w, py::dtype::of<float>(), 1, "w");
  const int64_t rows = x.shape(0), n = x.shape(1);
  if (n == 0) throw py::value_error("x must have at least one column");
  check_dim(w, 0, n, "w");
  check_iters(iters);
  require_device();
  py::array_t<float> y({rows, n});
  float* y_host = y.mutable_data();
  float ms = 0.f;
  {
    py::gil_scoped_release release;
    const DeviceBuffer dx(x.data(), nbytes(x)), dw(w.data(), nbytes(w)), dy(nbytes(x));
    auto launch = [&] {
      return lme::cuda_rmsnorm(dx.as<float>(), n, dw.as<float>(), dy.as<float>(), n, rows, n, eps,
                               nullptr);
    };
    check_status(launch());
    dy.copy_to_host(y_host);
    if (iters > 0) ms = time_launches(launch, iters);
  }
  return with_time(y, iters, ms);
}

// Rotates the first n_heads * head_dim elements of each row of x (a copy; the rest is unchanged).
py::object rope(const py::array& x, const py::array& positions, const py::array& inv_freq,
                int n_heads, bool interleaved, int iters) {
  check_array(x, py::dtype::of<float>(), 2, "x");
  check_array(positions, py::dtype::of<int32_t>(), 1, "positions");
  check_array(inv_freq, py::dtype::of<float>(), 1, "inv_freq");
  const int64_t n_tokens = x.shape(0), width = x.shape(1);
  const int64_t head_dim = 2 * inv_freq.shape(0);
  if (head_dim == 0) throw py::value_error("inv_freq must not be empty");
  if (n_heads < 0 || n_heads * head_dim > width) {
    throw py::value_error("n_heads * head_dim = " + std::to_string(n_heads * head_dim) +
                          " does not fit in rows of " + std::to_string(width));
  }
  check_dim(positions, 0, n_tokens, "positions");
  check_iters(iters);
  require_device();
  py::array_t<float> y({n_tokens, width});
  float* y_host = y.mutable_data();
  float ms = 0.f;
  {
    py::gil_scoped_release release;
    const DeviceBuffer dx(x.data(), nbytes(x)), dpos(positions.data(), nbytes(positions)),
        dfreq(inv_freq.data(), nbytes(inv_freq));
    auto launch = [&] {
      return lme::cuda_rope(dx.as<float>(), width, n_tokens, n_heads,
                            static_cast<int32_t>(head_dim), dpos.as<int32_t>(), dfreq.as<float>(),
                            interleaved, nullptr);
    };
    check_status(launch());
    dx.copy_to_host(y_host);
    if (iters > 0) ms = time_launches(launch, iters);  // keeps rotating dx; the result is taken
  }
  return with_time(y, iters, ms);
}

// KV storage from the numpy dtype: float32 -> F32, float16 -> F16, uint16 -> BF16 (raw bits).
int32_t kv_dtype_of(const py::array& pool) {
  if (pool.dtype().is(py::dtype::of<float>())) return 0;
  if (pool.dtype().is(py::dtype("float16"))) return 1;
  if (pool.dtype().is(py::dtype::of<uint16_t>())) return 2;
  throw py::value_error("KV pools must be float32, float16 or uint16 (bf16 bits), got " +
                        py::str(pool.dtype()).cast<std::string>());
}

py::object attention_decode(const py::array& q, const py::array& k_pool, const py::array& v_pool,
                            const py::array& page_table, const py::array& seq_lens, int layer,
                            float scale, int sliding_window, int split_tokens, int iters) {
  check_array(q, py::dtype::of<float>(), 3, "q");
  const int32_t kv_dtype = kv_dtype_of(k_pool);
  check_array(k_pool, k_pool.dtype(), 5, "k_pool");
  check_array(v_pool, k_pool.dtype(), 5, "v_pool");
  check_array(page_table, py::dtype::of<int32_t>(), 2, "page_table");
  check_array(seq_lens, py::dtype::of<int32_t>(), 1, "seq_lens");
  const int64_t n_seqs = q.shape(0), n_q_heads = q.shape(1), head_dim = q.shape(2);
  // The CUDA pool layout (cuda/kernels.h): k_pool [pages, layers, Hkv, D, page_size], v_pool
  // [pages, layers, Hkv, page_size, D].
  const int64_t n_pages = k_pool.shape(0), n_layers = k_pool.shape(1), n_kv_heads = k_pool.shape(2);
  const int64_t page_size = k_pool.shape(4);
  check_dim(k_pool, 3, head_dim, "k_pool");
  for (int axis = 0; axis < 3; ++axis) check_dim(v_pool, axis, k_pool.shape(axis), "v_pool");
  check_dim(v_pool, 3, page_size, "v_pool");
  check_dim(v_pool, 4, head_dim, "v_pool");
  check_dim(page_table, 0, n_seqs, "page_table");
  check_dim(seq_lens, 0, n_seqs, "seq_lens");
  if (head_dim != 64 && head_dim != 128 && head_dim != 256)
    throw py::value_error("head_dim must be 64, 128 or 256");
  if (n_kv_heads == 0 || n_q_heads % n_kv_heads != 0) {
    throw py::value_error("n_q_heads must be a positive multiple of n_kv_heads");
  }
  if (page_size == 0 || n_layers == 0)
    throw py::value_error("KV pools need page_size > 0 and n_layers > 0");
  if (layer < 0 || layer >= n_layers) throw py::value_error("layer out of range");
  if (sliding_window < 0 || split_tokens < 0)
    throw py::value_error("sliding_window and split_tokens must be >= 0");
  if (!std::isfinite(scale)) throw py::value_error("scale must be finite");
  if (n_seqs > 65535 || n_kv_heads > 65535 || n_pages > INT32_MAX)
    throw py::value_error("too many sequences, heads or pages");
  check_iters(iters);
  const int64_t max_pages = page_table.shape(1);
  const int32_t max_len = check_page_table(page_table, seq_lens, n_seqs, page_size, n_pages, 0);
  require_device();

  lme::CudaDecodeAttentionArgs a;
  a.kv_dtype = kv_dtype;
  a.page_table_stride = max_pages;
  a.n_seqs = static_cast<int32_t>(n_seqs);
  a.n_q_heads = static_cast<int32_t>(n_q_heads);
  a.n_kv_heads = static_cast<int32_t>(n_kv_heads);
  a.head_dim = static_cast<int32_t>(head_dim);
  a.page_size = static_cast<int32_t>(page_size);
  a.n_layers = static_cast<int32_t>(n_layers);
  a.layer = layer;
  a.max_seq_len = max_len;
  a.sliding_window = sliding_window;
  a.scale = scale;
  a.split_tokens = split_tokens;

  py::array_t<float> out({n_seqs, n_q_heads, head_dim});
  float* out_host = out.mutable_data();
  float ms = 0.f;
  {
    py::gil_scoped_release release;
    const int64_t workspace_bytes = lme::cuda_attention_decode_workspace_bytes(a);
    if (workspace_bytes < 0) check_status(lme::kCudaInvalidArgument);
    const DeviceBuffer dq(q.data(), nbytes(q)), dk(k_pool.data(), nbytes(k_pool)),
        dv(v_pool.data(), nbytes(v_pool)), dtable(page_table.data(), nbytes(page_table)),
        dlens(seq_lens.data(), nbytes(seq_lens)), dout(nbytes(q)),
        dwork(static_cast<size_t>(workspace_bytes));
    a.q = dq.as<float>();
    a.out = dout.as<float>();
    a.k_pool = dk.as<void>();
    a.v_pool = dv.as<void>();
    a.page_table = dtable.as<int32_t>();
    a.seq_lens = dlens.as<int32_t>();
    a.workspace = dwork.as<void>();
    a.workspace_bytes = workspace_bytes;
    auto launch = [&] { return lme::cuda_attention_decode(a, nullptr); };
    check_status(launch());
    dout.copy_to_host(out_host);
    if (iters > 0) ms = time_launches(launch, iters);
  }
  return with_time(out, iters, ms);
}

// Block-sparse decode attention (ReSA) as cuda_attention_sparse_decode: returns (out, selected,
// n_selected) [+ ms], selected int32[S, Hkv, ceil(max(seq_lens) / page_size)] (the first
// n_selected[s, h] entries valid).
py::object attention_sparse_decode(const py::array& q, const py::array& k_pool, const py::array& v_pool,
                                   const py::array& summaries, const py::array& page_table,
                                   const py::array& seq_lens, int layer, float scale, double keep, int n_min,
                                   int n_local, int n_sink, int n_splits, int iters) {
  check_array(q, py::dtype::of<float>(), 3, "q");
  const int32_t kv_dtype = kv_dtype_of(k_pool);
  check_array(k_pool, k_pool.dtype(), 5, "k_pool");
  check_array(v_pool, k_pool.dtype(), 5, "v_pool");
  check_array(summaries, py::dtype::of<float>(), 5, "summaries");
  check_array(page_table, py::dtype::of<int32_t>(), 2, "page_table");
  check_array(seq_lens, py::dtype::of<int32_t>(), 1, "seq_lens");
  const int64_t n_seqs = q.shape(0), n_q_heads = q.shape(1), head_dim = q.shape(2);
  const int64_t n_pages = k_pool.shape(0), n_layers = k_pool.shape(1), n_kv_heads = k_pool.shape(2);
  const int64_t page_size = k_pool.shape(4);
  check_dim(k_pool, 3, head_dim, "k_pool");
  for (int axis = 0; axis < 3; ++axis) {
    check_dim(v_pool, axis, k_pool.shape(axis), "v_pool");
    check_dim(summaries, axis, k_pool.shape(axis), "summaries");
  }
  check_dim(v_pool, 3, page_size, "v_pool");
  check_dim(v_pool, 4, head_dim, "v_pool");
  check_dim(summaries, 3, 2, "summaries");
  check_dim(summaries, 4, head_dim, "summaries");
  check_dim(page_table, 0, n_seqs, "page_table");
  check_dim(seq_lens, 0, n_seqs, "seq_lens");
  if (head_dim < 32 || head_dim > 256 || head_dim % 32 != 0)
    throw py::value_error("head_dim must be a multiple of 32 in [32, 256]");
  if (n_kv_heads == 0 || n_q_heads % n_kv_heads != 0 || n_q_heads / n_kv_heads > 32)
    throw py::value_error("n_q_heads must be a multiple of n_kv_heads, at most 32 times it");
  if (page_size == 0 || n_layers == 0) throw py::value_error("KV pools need page_size > 0 and n_layers > 0");
  if (layer < 0 || layer >= n_layers) throw py::value_error("layer out of range");
  if (!(keep > 0.0 && keep <= 1.0)) throw py::value_error("keep must be in (0, 1]");
  if (n_min < 0 || n_local < 0 || n_sink < 0) throw py::value_error("n_min, n_local and n_sink must be >= 0");
  if (n_splits < 0 || n_splits > 32) throw py::value_error("n_splits must be in [0, 32]");
  if (!std::isfinite(scale)) throw py::value_error("scale must be finite");
  if (n_seqs < 1 || n_seqs > 65535 || n_kv_heads > 65535 || n_pages > INT32_MAX)
    throw py::value_error("need 1 to 65535 sequences and heads");
  check_iters(iters);
  const int64_t max_pages = page_table.shape(1);
  const int32_t max_len = check_page_table(page_table, seq_lens, n_seqs, page_size, n_pages, 1);
  require_device();

  lme::CudaSparseDecodeArgs a;
  a.kv_dtype = kv_dtype;
  a.page_table_stride = max_pages;
  a.n_seqs = static_cast<int32_t>(n_seqs);
  a.n_q_heads = static_cast<int32_t>(n_q_heads);
  a.n_kv_heads = static_cast<int32_t>(n_kv_heads);
  a.head_dim = static_cast<int32_t>(head_dim);
  a.page_size = static_cast<int32_t>(page_size);
  a.n_layers = static_cast<int32_t>(n_layers);
  a.layer = layer;
  a.max_seq_len = max_len;
  a.scale = scale;
  a.keep = keep;
  a.n_min = n_min;
  a.n_local = n_local;
  a.n_sink = n_sink;
  a.n_splits = n_splits;
  const int64_t max_blocks = (max_len + page_size - 1) / page_size;

  py::array_t<float> out({n_seqs, n_q_heads, head_dim});
  py::array_t<int32_t> selected({n_seqs, n_kv_heads, max_blocks});
  py::array_t<int32_t> n_selected({n_seqs, n_kv_heads});
  float ms = 0.f;
  {
    py::gil_scoped_release release;
    const int64_t workspace_bytes = lme::cuda_attention_sparse_workspace_bytes(a);
    if (workspace_bytes < 0) check_status(lme::kCudaInvalidArgument);
    const DeviceBuffer dq(q.data(), nbytes(q)), dk(k_pool.data(), nbytes(k_pool)),
        dv(v_pool.data(), nbytes(v_pool)), dsum(summaries.data(), nbytes(summaries)),
        dtable(page_table.data(), nbytes(page_table)), dlens(seq_lens.data(), nbytes(seq_lens)),
        dout(nbytes(q)), dsel(static_cast<size_t>(nbytes(selected))), dnsel(static_cast<size_t>(nbytes(n_selected))),
        dwork(static_cast<size_t>(workspace_bytes));
    a.q = dq.as<float>();
    a.out = dout.as<float>();
    a.k_pool = dk.as<void>();
    a.v_pool = dv.as<void>();
    a.summaries = dsum.as<float>();
    a.page_table = dtable.as<int32_t>();
    a.seq_lens = dlens.as<int32_t>();
    a.selected = dsel.as<int32_t>();
    a.n_selected = dnsel.as<int32_t>();
    a.workspace = dwork.as<void>();
    a.workspace_bytes = workspace_bytes;
    auto launch = [&] { return lme::cuda_attention_sparse_decode(a, nullptr); };
    check_status(launch());
    dout.copy_to_host(out.mutable_data());
    dsel.copy_to_host(selected.mutable_data());
    dnsel.copy_to_host(n_selected.mutable_data());
    if (iters > 0) ms = time_launches(launch, iters);
  }
  if (iters > 0) return py::make_tuple(out, selected, n_selected, ms);
  return py::make_tuple(out, selected, n_selected);
}

// Y[T, rows] = X[T, k] @ W[rows, k]^T with W in a GGML weight format, as _core.quant_matmul.
py::object gemv(int64_t ggml_type, const py::array& weights, int64_t k, const py::array& x,
                int iters) {
  if (ggml_type < INT32_MIN || ggml_type > INT32_MAX ||
      !lme::cuda_gemv_supports(static_cast<int32_t>(ggml_type))) {
    throw py::value_error("unsupported ggml type " + std::to_string(ggml_type));
  }
  const auto t = static_cast<lme::DType>(ggml_type);
  const int64_t block = lme::dtype_block_size(t);
  if (k <= 0 || k % block != 0) {
    throw py::value_error("k = " + std::to_string(k) + " is not a positive multiple of " +
                          lme::dtype_name(t) + "'s block size " + std::to_string(block));
  }
  check_array(weights, py::dtype::of<uint8_t>(), 2, "weights");
  check_array(x, py::dtype::of<float>(), 2, "x");
  const int64_t rows = weights.shape(0), row_bytes = lme::dtype_row_bytes(t, k),
                n_tokens = x.shape(0);
  check_dim(weights, 1, row_bytes, "weights");
  check_dim(x, 1, k, "x");
  if (n_tokens > 65535) throw py::value_error("at most 65535 tokens per call");
  check_iters(iters);
  require_device();
  py::array_t<float> y({n_tokens, rows});
  float* y_host = y.mutable_data();
  float ms = 0.f;
  {
    py::gil_scoped_release release;
    const DeviceBuffer dw(weights.data(), nbytes(weights)), dx(x.data(), nbytes(x)),
        dy(static_cast<size_t>(n_tokens * rows) * sizeof(float));
    auto launch = [&] {
      return lme::cuda_gemv(static_cast<int32_t>(ggml_type), dw.as<void>(), row_bytes, rows, k,
                            dx.as<float>(), n_tokens, dy.as<float>(), nullptr);
    };
    check_status(launch());
    dy.copy_to_host(y_host);
    if (iters > 0) ms = time_launches(launch, iters);
  }
  return with_time(y, iters, ms);
}

// One MoE layer as cuda_moe_forward. The arguments are kernels.moe_forward's (weight tuples,
// checked by the same validate_moe_layer, so bad layers raise the same typed errors); every tensor
// is copied into one device arena at 256-byte aligned offsets, the per-expert pointer tables
// after it. Returns (out float32[T, d], counts int64[E]) [+ milliseconds per call].
py::object moe_forward(const py::array& x_in, const py::handle& router, const py::sequence& gate,
                       const py::sequence& up, const py::sequence& down, int32_t top_k,
                       const std::string& scoring, bool norm_topk_prob, int32_t n_group,
                       int32_t topk_group, float routed_scaling_factor,
                       const py::object& score_bias, const py::object& shared,
                       const py::object& shared_gate_inp, int iters) {
  lme_py::MoELayerArgs layer;
  lme_py::moe_layer_from_python(router, gate, up, down, top_k, scoring, norm_topk_prob, n_group,
                                topk_group, routed_scaling_factor, score_bias, shared,
                                shared_gate_inp, layer);
  const lme::MoEConfig& c = layer.config;
  const lme::MoELayerWeights& w = layer.weights;
  const int64_t d = layer.d_model, E = c.n_experts;
  auto x = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(x_in);
  if (!x || x.ndim() != 2 || x.shape(0) < 1 || x.shape(1) != d) {
    lme_py::raise_error("InvalidRequestError",
                        "x must be float32 [T >= 1, d = " + std::to_string(d) + "]");
  }
  check_iters(iters);
  const int64_t T = x.shape(0);
  const lme::WeightTensor* all[] = {&w.router, &w.gate[0], &w.down[0], &w.shared_gate,
                                    &w.shared_down};
  for (const lme::WeightTensor* t : all) {
    if (t->data != nullptr && !lme::cuda_gemv_supports(static_cast<int32_t>(t->type))) {
      lme_py::raise_error("UnsupportedModelError", std::string("the CUDA MoE path has no ") +
                                                       lme::dtype_name(t->type) + " products");
    }
  }
  const int64_t workspace_bytes =
      lme::cuda_moe_workspace_bytes(T, d, c.d_ff_expert, c.d_ff_shared, E, c.top_k);
  if (workspace_bytes < 0) {
    lme_py::raise_error("InvalidRequestError", "too many tokens for one call (T * top_k)");
  }
  require_device();

  // Host tensors and their offsets in the device arena.
  struct Piece {
    const void* host;
    size_t bytes, offset;
  };
  std::vector<Piece> pieces;
  size_t arena_bytes = 0;
  auto place = [&](const void* host, size_t bytes) {
    pieces.push_back({host, bytes, arena_bytes});
    arena_bytes += (bytes + 255) / 256 * 256;
    return pieces.back().offset;
  };
  auto place_tensor = [&](const lme::WeightTensor& t) -> int64_t {
    if (t.data == nullptr) return -1;
    return static_cast<int64_t>(
        place(t.data, static_cast<size_t>(t.rows * lme::dtype_row_bytes(t.type, t.cols))));
  };
  const int64_t off_router = place_tensor(w.router), off_bias = place_tensor(w.score_bias);
  const int64_t off_sg = place_tensor(w.shared_gate), off_su = place_tensor(w.shared_up),
                off_sd = place_tensor(w.shared_down), off_sgi = place_tensor(w.shared_gate_inp);
  std::vector<int64_t> off_experts(3 * E);  // gate, up, down of expert e at 3e, 3e + 1, 3e + 2
  for (int64_t e = 0; e < E; ++e) {
    off_experts[3 * e] = place_tensor(w.gate[e]);
    off_experts[3 * e + 1] = place_tensor(w.up[e]);
    off_experts[3 * e + 2] = place_tensor(w.down[e]);
  }
  const size_t table_offset = arena_bytes;
  arena_bytes += 3 * E * sizeof(void*);

  lme::CudaMoEArgs a;
  a.n_tokens = T;
  a.d = d;
  a.d_ff = c.d_ff_expert;
  a.d_ff_shared = c.d_ff_shared;
  a.n_experts = E;
  a.top_k = c.top_k;
  a.scoring = static_cast<int32_t>(c.scoring);
  a.norm_topk_prob = c.norm_topk_prob;
  a.n_group = c.n_group;
  a.topk_group = c.topk_group;
  a.routed_scaling_factor = c.routed_scaling_factor;
  a.router_type = static_cast<int32_t>(w.router.type);
  a.gate_up_type = static_cast<int32_t>(w.gate[0].type);
  a.down_type = static_cast<int32_t>(w.down[0].type);
  a.shared_gate_up_type = static_cast<int32_t>(w.shared_gate.type);
  a.shared_down_type = static_cast<int32_t>(w.shared_down.type);
  a.workspace_bytes = workspace_bytes;

  py::array_t<float> out({T, d});
  py::array_t<int64_t> counts(E);
  float* out_host = out.mutable_data();
  int64_t* counts_host = counts.mutable_data();
  float ms = 0.f;
  {
    py::gil_scoped_release release;
    const DeviceBuffer arena(arena_bytes), dx(x.data(), nbytes(x)), dout(nbytes(out)),
        dcounts(nbytes(counts)), dwork(static_cast<size_t>(workspace_bytes));
    uint8_t* base = arena.as<uint8_t>();
    for (const Piece& p : pieces)
      check_status(lme::cuda_copy_to_device(base + p.offset, p.host, p.bytes));
    auto device = [&](int64_t offset) -> const void* {
      return offset < 0 ? nullptr : base + offset;
    };
    std::vector<const void*> tables(3 * E);  // gates, ups, downs
    for (int64_t e = 0; e < E; ++e) {
      for (int j = 0; j < 3; ++j) tables[j * E + e] = device(off_experts[3 * e + j]);
    }
    check_status(lme::cuda_copy_to_device(base + table_offset, tables.data(),
                                          tables.size() * sizeof(void*)));
    const void* const* device_tables = reinterpret_cast<const void* const*>(base + table_offset);
    a.x = dx.as<float>();
    a.out = dout.as<float>();
    a.counts = dcounts.as<int64_t>();
    a.router = device(off_router);
    a.score_bias = static_cast<const float*>(device(off_bias));
    a.gate = device_tables;
    a.up = device_tables + E;
    a.down = device_tables + 2 * E;
    a.shared_gate = device(off_sg);
    a.shared_up = device(off_su);
    a.shared_down = device(off_sd);
    a.shared_gate_inp = static_cast<const float*>(device(off_sgi));
    a.workspace = dwork.as<void>();
    auto launch = [&] { return lme::cuda_moe_forward(a, nullptr); };
    check_status(launch());
    dout.copy_to_host(out_host);
    dcounts.copy_to_host(counts_host);
    if (iters > 0) ms = time_launches(launch, iters);
  }
  if (iters > 0) return py::make_tuple(out, counts, ms);
  return py::make_tuple(out, counts);
}

// Device-to-device copy of nbytes, for the benchmarks' bandwidth peer: milliseconds per copy.
float memcpy_ms(int64_t n_bytes, int iters) {
  if (n_bytes <= 0 || iters <= 0) throw py::value_error("n_bytes and iters must be positive");
  require_device();
  py::gil_scoped_release release;
  const DeviceBuffer src(static_cast<size_t>(n_bytes)), dst(static_cast<size_t>(n_bytes));
  auto launch = [&] {
    return lme::cuda_copy_device_to_device(dst.as<void>(), src.as<void>(), n_bytes);
  };
  check_status(launch());
  return time_launches(launch, iters);
}

}  // namespace

void bind_cuda(py::module_& m) {
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernel entry points for tests and benchmarks.");
  cuda.def("available", &cuda_device_available, "True if a CUDA device is usable now.");
  cuda.def("device_count", &lmengine_cuda_device_count);
  cuda.def(
      "gemv_supports",
      [](int64_t t) {
        return t >= INT32_MIN && t <= INT32_MAX && lme::cuda_gemv_supports(int32_t(t));
      },
      py::arg("ggml_type"));
  cuda.def("rmsnorm", &rmsnorm, py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("iters") = 0,
           "rmsnorm(x: float32[rows, n], w: float32[n], eps, iters=0) -> float32[rows, n]");
  cuda.def("rope", &rope, py::arg("x"), py::arg("positions"), py::arg("inv_freq"),
           py::arg("n_heads"), py::arg("interleaved"), py::arg("iters") = 0,
           "rope(x: float32[T, width], positions: int32[T], inv_freq: float32[head_dim/2],"
           " n_heads, interleaved, iters=0) -> float32[T, width]: the first n_heads * head_dim"
           " columns rotated, the rest copied.");
  cuda.def(
      "attention_decode", &attention_decode, py::arg("q"), py::arg("k_pool"), py::arg("v_pool"),
      py::arg("page_table"), py::arg("seq_lens"), py::arg("layer"), py::arg("scale"),
      py::arg("sliding_window") = 0, py::arg("split_tokens") = 0, py::arg("iters") = 0,
      "attention_decode(q: float32[S, Hq, D], k_pool: [pages, layers, Hkv, D, page_size],"
      " v_pool: [pages, layers, Hkv, page_size, D] (K transposed within a page, as the KV cache)"
      " of float32 | float16 | uint16 (bf16 bits), page_table: int32[S, max_pages],"
      " seq_lens: int32[S], layer, scale, sliding_window=0, split_tokens=0 (auto), iters=0)"
      " -> float32[S, Hq, D]");
  cuda.def("attention_sparse_decode", &attention_sparse_decode, py::arg("q"), py::arg("k_pool"),
           py::arg("v_pool"), py::arg("summaries"), py::arg("page_table"), py::arg("seq_lens"), py::arg("layer"),
           py::arg("scale"), py::arg("keep"), py::arg("n_min"), py::arg("n_local"), py::arg("n_sink"),
           py::arg("n_splits") = 0, py::arg("iters") = 0,
           "attention_sparse_decode(q: float32[S, Hq, D], k_pool, v_pool (as attention_decode), summaries:"
           " float32[pages, layers, Hkv, 2, D] (key min, max per page), page_table: int32[S, max_pages],"
           " seq_lens: int32[S] (>= 1), layer, scale, keep, n_min, n_local, n_sink, n_splits=0 (auto), iters=0)"
           " -> (out float32[S, Hq, D], selected int32[S, Hkv, max_blocks], n_selected int32[S, Hkv])");
  cuda.def("gemv", &gemv, py::arg("ggml_type"), py::arg("weights"), py::arg("k"), py::arg("x"),
           py::arg("iters") = 0,
           "gemv(ggml_type, weights: uint8[rows, row_bytes], k, x: float32[T, k], iters=0)"
           " -> float32[T, rows]");
  cuda.def("moe_forward", &moe_forward, py::arg("x"), py::arg("router"), py::arg("gate"),
           py::arg("up"), py::arg("down"), py::arg("top_k"), py::arg("scoring") = "softmax",
           py::arg("norm_topk_prob") = false, py::arg("n_group") = 1, py::arg("topk_group") = 1,
           py::arg("routed_scaling_factor") = 1.0f, py::arg("score_bias") = py::none(),
           py::arg("shared") = py::none(), py::arg("shared_gate_inp") = py::none(),
           py::arg("iters") = 0,
           "moe_forward(x: float32[T, d], router, gate, up, down, top_k, scoring='softmax',"
           " norm_topk_prob=False, n_group=1, topk_group=1, routed_scaling_factor=1.0,"
           " score_bias=None, shared=None, shared_gate_inp=None, iters=0) -> (out float32[T, d],"
           " counts int64[E]): one MoE layer on the device, arguments as kernels.moe_forward"
           " ((ggml_type, array, rows, cols) weight tuples).");
  cuda.def(
      "moe_workspace_bytes",
      [](int64_t n_tokens, int64_t d, int64_t d_ff, int64_t d_ff_shared, int64_t n_experts,
         int64_t top_k) {
        return lme::cuda_moe_workspace_bytes(n_tokens, d, d_ff, d_ff_shared, n_experts, top_k);
      },
      py::arg("n_tokens"), py::arg("d"), py::arg("d_ff"), py::arg("d_ff_shared"),
      py::arg("n_experts"), py::arg("top_k"),
      "Device scratch bytes cuda_moe_forward needs for up to n_tokens rows; -1 if invalid.");
  cuda.def("memcpy_ms", &memcpy_ms, py::arg("n_bytes"), py::arg("iters"),
           "Milliseconds per device-to-device copy of n_bytes (reads and writes n_bytes each).");
}

#else  // !LMENGINE_WITH_CUDA

void bind_cuda(py::module_& m) {
  py::module_ cuda = m.def_submodule("cuda", "Built without CUDA: no kernels.");
  cuda.def("available", []() { return false; }, "Always False: this build has no CUDA kernels.");
}

#endif
