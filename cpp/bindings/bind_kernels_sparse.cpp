// lmengine._core.kernels, block-sparse part: block summaries, selection and block-sparse
// attention (lmengine/kv_summaries.h, lmengine/attention_sparse.h) on numpy arrays, for
// tests/test_resa.py. One query token at position L-1 over keys/values 0..L-1 of a one-layer,
// one-KV-head cache; logical page i lives in pool page page_order[i] and the slots past L-1 hold
// NaN, as a reused page holds stale data. Shapes are checked before a pointer reaches the core;
// problems raise ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "lmengine/attention.h"
#include "lmengine/attention_sparse.h"
#include "lmengine/kv_cache.h"
#include "lmengine/kv_summaries.h"
#include "lmengine/ops.h"

namespace py = pybind11;

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

lme::KVDType kv_dtype_of(const std::string& name) {
  if (name == "f32") return lme::KVDType::F32;
  if (name == "f16") return lme::KVDType::F16;
  if (name == "bf16") return lme::KVDType::BF16;
  throw py::value_error("kv_dtype must be 'f32', 'f16' or 'bf16', got '" + name + "'");
}

// A one-layer, one-head cache holding k, v (v may be empty: zeros) for one sequence of length L,
// with block summaries refreshed from the stored keys.
struct OneHeadCache {
  std::unique_ptr<lme::KVCache> kv;
  int32_t seq = -1;
  std::vector<int32_t> pages;
};

OneHeadCache make_cache(const F32Array& k, const F32Array* v, int64_t page_size, const std::string& kv_dtype,
                        const I32Array& page_order) {
  if (k.ndim() != 2 || k.shape(0) < 1 || k.shape(1) < 1) throw py::value_error("k must be [L >= 1, D >= 1]");
  const int64_t L = k.shape(0), D = k.shape(1);
  if (v && (v->ndim() != 2 || v->shape(0) != L || v->shape(1) != D)) throw py::value_error("v must have k's shape");
  if (page_size < 1 || page_size > 4096) throw py::value_error("page_size must be in [1, 4096]");
  const int64_t n_logical = (L + page_size - 1) / page_size;
  if (page_order.ndim() != 1 || page_order.shape(0) != n_logical) {
    throw py::value_error("page_order must be int32[ceil(L / page_size)] = [" + std::to_string(n_logical) + "]");
  }
  std::vector<bool> used(n_logical, false);
  for (int64_t i = 0; i < n_logical; ++i) {
    const int32_t p = page_order.data()[i];
    if (p < 0 || p >= n_logical || used[p]) throw py::value_error("page_order must be a permutation");
    used[p] = true;
  }
  lme::KVCacheConfig config;
  config.n_layers = 1;
  config.n_kv_heads = 1;
  config.head_dim = static_cast<int32_t>(D);
  config.page_size = static_cast<int32_t>(page_size);
  config.n_pages = n_logical;
  config.dtype = kv_dtype_of(kv_dtype);
  config.block_summaries = true;
  OneHeadCache c;
  c.kv = std::make_unique<lme::KVCache>(config);
  if (!c.kv->allocated()) throw py::value_error("could not allocate the KV pool");
  // Take the pool's pages in page_order: pop every page, then hand them to the sequence in order.
  c.seq = c.kv->seq_create();
  c.kv->seq_reserve(c.seq, L);
  const std::vector<int32_t>& given = c.kv->seq_pages(c.seq);
  c.pages.assign(given.begin(), given.end());
  for (int64_t i = 0; i < n_logical; ++i) c.pages[i] = page_order.data()[i];
  const std::vector<float> stale(D, std::numeric_limits<float>::quiet_NaN()), zeros(D, 0.f);
  for (int64_t t = 0; t < n_logical * page_size; ++t) {
    const float* kr = t < L ? k.data() + t * D : stale.data();
    const float* vr = t < L ? (v ? v->data() + t * D : zeros.data()) : stale.data();
    lme::kv_store_token(*c.kv, c.pages[t / page_size], 0, 0, t % page_size, kr, vr);
  }
  for (int64_t b = 0; b < n_logical; ++b) {
    lme::kv_summary_refresh(*c.kv, c.pages[b], 0, 0, std::min<int64_t>(page_size, L - b * page_size));
  }
  return c;
}

lme::SparseAttentionConfig sparse_config(double keep, int32_t n_min, int32_t n_local, int32_t n_sink) {
  lme::SparseAttentionConfig c;
  c.keep = keep;
  c.n_min = n_min;
  c.n_local = n_local;
  c.n_sink = n_sink;
  const lme::Status s = lme::sparse_config_validate(c);
  if (!s.ok()) throw py::value_error(s.message);
  return c;
}

float scale_of(const py::object& scale, int64_t D) {
  return scale.is_none() ? 1.0f / std::sqrt(static_cast<float>(D)) : scale.cast<float>();
}

py::array_t<float> block_summaries(const F32Array& k, int64_t page_size, const std::string& kv_dtype,
                                   const I32Array& page_order) {
  OneHeadCache c = make_cache(k, nullptr, page_size, kv_dtype, page_order);
  const int64_t D = k.shape(1), n = static_cast<int64_t>(c.pages.size());
  py::array_t<float> out({n, int64_t(2), D});
  for (int64_t b = 0; b < n; ++b) {
    lme::kv_to_f32(static_cast<int32_t>(c.kv->config().dtype), c.kv->block_summary(c.pages[b], 0, 0),
                   out.mutable_data() + b * 2 * D, 2 * D);
  }
  return out;
}

py::array_t<int32_t> sparse_select(const F32Array& q, const F32Array& k, int64_t lo, int64_t page_size,
                                   const std::string& kv_dtype, const I32Array& page_order, double keep,
                                   int32_t n_min, int32_t n_local, int32_t n_sink, const py::object& scale) {
  if (q.ndim() != 2 || q.shape(0) < 1 || k.ndim() != 2 || q.shape(1) != k.shape(1)) {
    throw py::value_error("q must be [group >= 1, D] with k's D");
  }
  const int64_t L = k.shape(0), D = k.shape(1);
  if (lo < 0 || lo > L - 1) throw py::value_error("lo must be in [0, L - 1]");
  const lme::SparseAttentionConfig cfg = sparse_config(keep, n_min, n_local, n_sink);
  OneHeadCache c = make_cache(k, nullptr, page_size, kv_dtype, page_order);
  const int64_t n_cand = (L - 1) / page_size - lo / page_size + 1;
  std::vector<float> q_mean(D), scores(2 * n_cand);
  std::vector<int32_t> blocks(n_cand);
  const int32_t n = lme::sparse_select_blocks(cfg, q.data(), static_cast<int32_t>(q.shape(0)), scale_of(scale, D),
                                              *c.kv, c.pages.data(), 0, 0, lo, L - 1, q_mean.data(), scores.data(),
                                              blocks.data());
  py::array_t<int32_t> out(n);
  std::copy(blocks.begin(), blocks.begin() + n, out.mutable_data());
  return out;
}

py::array_t<float> attention_sparse(const F32Array& q, const F32Array& k, const F32Array& v, const I32Array& blocks,
                                    int64_t lo, int64_t page_size, const std::string& kv_dtype,
                                    const I32Array& page_order, int32_t n_splits, const py::object& scale) {
  if (q.ndim() != 2 || q.shape(0) < 1 || k.ndim() != 2 || q.shape(1) != k.shape(1)) {
    throw py::value_error("q must be [group >= 1, D] with k's D");
  }
  const int64_t L = k.shape(0), D = k.shape(1), group = q.shape(0);
  if (lo < 0 || lo > L - 1) throw py::value_error("lo must be in [0, L - 1]");
  if (n_splits < 1 || n_splits > 64) throw py::value_error("n_splits must be in [1, 64]");
  const int64_t n_logical = (L + page_size - 1) / page_size;
  if (blocks.ndim() != 1) throw py::value_error("blocks must be 1-D");
  for (int64_t i = 0; i < blocks.shape(0); ++i) {
    if (blocks.data()[i] < 0 || blocks.data()[i] >= n_logical) {
      throw py::value_error("blocks must be logical block numbers in [0, " + std::to_string(n_logical) + ")");
    }
  }
  OneHeadCache c = make_cache(k, &v, page_size, kv_dtype, page_order);
  const int32_t n = static_cast<int32_t>(blocks.shape(0));
  std::vector<float> work(static_cast<size_t>(lme::attention_partial_work_floats(
      static_cast<int32_t>(group), static_cast<int32_t>(page_size))));
  std::vector<float> part_out(n_splits * group * D), part_m(n_splits * group), part_l(n_splits * group);
  const float sc = scale_of(scale, D);
  for (int32_t s = 0; s < n_splits; ++s) {
    const int32_t b0 = int64_t(n) * s / n_splits, b1 = int64_t(n) * (s + 1) / n_splits;
    lme::attention_sparse_partial(q.data(), static_cast<int32_t>(group), sc, *c.kv, c.pages.data(), 0, 0,
                                  blocks.data() + b0, b1 - b0, lo, L - 1, work.data(), &part_out[s * group * D],
                                  &part_m[s * group], &part_l[s * group]);
  }
  py::array_t<float> out({group, D});
  lme::attention_sparse_merge(part_out.data(), part_m.data(), part_l.data(), n_splits, static_cast<int32_t>(group),
                              static_cast<int32_t>(D), out.mutable_data());
  return out;
}

}  // namespace

void bind_kernels_sparse(py::module_& m) {
  py::module_ k = m.attr("kernels").cast<py::module_>();
  k.def("block_summaries", &block_summaries, py::arg("k"), py::arg("page_size"), py::arg("kv_dtype"),
        py::arg("page_order"),
        "block_summaries(k: float32[L, D], page_size, kv_dtype, page_order) -> float32[ceil(L/page_size), 2, D]:"
        " per block, min and max over its valid positions of the keys as stored in kv_dtype.");
  k.def("sparse_select", &sparse_select, py::arg("q"), py::arg("k"), py::arg("lo"), py::arg("page_size"),
        py::arg("kv_dtype"), py::arg("page_order"), py::arg("keep"), py::arg("n_min"), py::arg("n_local"),
        py::arg("n_sink"), py::arg("scale") = py::none(),
        "sparse_select(q: float32[group, D], k: float32[L, D], lo, page_size, kv_dtype, page_order, keep, n_min,"
        " n_local, n_sink, scale=1/sqrt(D)) -> int32[n]: the kept blocks (ascending) of the query at L-1.");
  k.def("attention_sparse", &attention_sparse, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("blocks"),
        py::arg("lo"), py::arg("page_size"), py::arg("kv_dtype"), py::arg("page_order"), py::arg("n_splits") = 1,
        py::arg("scale") = py::none(),
        "attention_sparse(q: float32[group, D], k, v: float32[L, D], blocks: int32[n], lo, page_size, kv_dtype,"
        " page_order, n_splits=1, scale=1/sqrt(D)) -> float32[group, D]: softmax attention of the query at L-1 over"
        " the positions of `blocks` within [lo, L-1], computed in n_splits partials merged by log-sum-exp.");
}
