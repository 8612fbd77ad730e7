// lmengine._core.kernels: the CPU row kernels (lmengine/ops.h) and paged attention
// (lmengine/attention.h) on numpy arrays, so tests/test_cpu_kernels.py can check each one against
// a plain reference. Every shape and dtype is checked before a pointer reaches the core; problems
// raise ValueError. Outputs are fresh float32 arrays; inputs are never modified.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "lmengine/attention.h"
#include "lmengine/attention_chunk.h"
#include "lmengine/attention_sparse.h"
#include "lmengine/kv_cache.h"
#include "lmengine/ops.h"

namespace py = pybind11;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// ndim < 0: any number of dimensions.
void check_array(const py::array& a, const py::dtype& dtype, int ndim, const char* what) {
  if (!a.dtype().is(dtype)) {
    throw py::value_error(std::string(what) + " must have dtype " +
                          py::str(dtype).cast<std::string>() + ", got " +
                          py::str(a.dtype()).cast<std::string>());
  }
  if (ndim >= 0 && a.ndim() != ndim) {
    throw py::value_error(std::string(what) + " must be " + std::to_string(ndim) +
                          "-D, got shape " + shape_str(a));
  }
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(what) + " must be C-contiguous");
}

void check_dim(const py::array& a, int axis, int64_t expected, const char* what, const char* name) {
  if (a.shape(axis) != expected) {
    throw py::value_error(std::string(what) + " has shape " + shape_str(a) + "; axis " +
                          std::to_string(axis) + " must be " + name + " = " +
                          std::to_string(expected));
  }
}

const float* f32_in(const py::array& a) { return static_cast<const float*>(a.data()); }

// y[t] = rmsnorm_row(x[t], w).
py::array_t<float> rmsnorm(const py::array& x, const py::array& w, float eps) {
  check_array(x, py::dtype::of<float>(), 2, "x");
  check_array(w, py::dtype::of<float>(), 1, "w");
  const int64_t T = x.shape(0), n = x.shape(1);
  if (n < 1) throw py::value_error("x rows must have at least one element");
  check_dim(w, 0, n, "w", "x.shape[1]");
  py::array_t<float> y({T, n});
  const float *xp = f32_in(x), *wp = f32_in(w);
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t t = 0; t < T; ++t) lme::rmsnorm_row(xp + t * n, wp, yp + t * n, n, eps);
  }
  return y;
}

// Rotates every head of every token with the cos/sin tables Engine::step builds: the angle is
// float(pos) * inv_freq[j] in fp32, then std::cos / std::sin of that float.
py::array_t<float> rope(const py::array& x, const py::array& positions, const py::array& inv_freq,
                        bool interleaved) {
  check_array(x, py::dtype::of<float>(), 3, "x");
  check_array(positions, py::dtype::of<int32_t>(), 1, "positions");
  check_array(inv_freq, py::dtype::of<float>(), 1, "inv_freq");
  const int64_t T = x.shape(0), H = x.shape(1), D = x.shape(2);
  if (D < 2 || D % 2 != 0 || D > std::numeric_limits<int32_t>::max()) {
    throw py::value_error("x head_dim (axis 2) must be even and positive, got shape " +
                          shape_str(x));
  }
  check_dim(positions, 0, T, "positions", "x.shape[0]");
  check_dim(inv_freq, 0, D / 2, "inv_freq", "x.shape[2] / 2");
  py::array_t<float> y({T, H, D});
  const float* xp = f32_in(x);
  const int32_t* pp = static_cast<const int32_t*>(positions.data());
  const float* fp = f32_in(inv_freq);
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    const int64_t half = D / 2;
    std::vector<float> cos_table(half), sin_table(half);
    std::copy(xp, xp + T * H * D, yp);
    for (int64_t t = 0; t < T; ++t) {
      const float pos = static_cast<float>(pp[t]);
      for (int64_t j = 0; j < half; ++j) {
        const float angle = pos * fp[j];
        cos_table[j] = std::cos(angle);
        sin_table[j] = std::sin(angle);
      }
      for (int64_t h = 0; h < H; ++h) {
        lme::rope_row(yp + (t * H + h) * D, cos_table.data(), sin_table.data(),
                      static_cast<int32_t>(D), interleaved);
      }
    }
  }
  return y;
}

// out[t] = act(gate[t]) * up[t] for a gated-MLP activation row kernel.
py::array_t<float> gated_mul(const py::array& gate, const py::array& up, void (*row)(float*, const float*, int64_t)) {
  check_array(gate, py::dtype::of<float>(), 2, "gate");
  check_array(up, py::dtype::of<float>(), 2, "up");
  const int64_t T = gate.shape(0), n = gate.shape(1);
  check_dim(up, 0, T, "up", "gate.shape[0]");
  check_dim(up, 1, n, "up", "gate.shape[1]");
  py::array_t<float> out({T, n});
  const float *gp = f32_in(gate), *upp = f32_in(up);
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::copy(gp, gp + T * n, op);
    for (int64_t t = 0; t < T; ++t) row(op + t * n, upp + t * n, n);
  }
  return out;
}

py::array_t<float> silu_mul(const py::array& gate, const py::array& up) {
  return gated_mul(gate, up, lme::silu_mul_row);
}

py::array_t<float> gelu_tanh_mul(const py::array& gate, const py::array& up) {
  return gated_mul(gate, up, lme::gelu_tanh_mul_row);
}

// exp_inplace over a copy of x, any shape.
py::array exp_copy(const py::array& x) {
  check_array(x, py::dtype::of<float>(), -1, "x");
  py::array out(x.dtype(), std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  const float* xp = f32_in(x);
  float* op = static_cast<float*>(out.mutable_data());
  const int64_t n = x.size();
  {
    py::gil_scoped_release release;
    std::copy(xp, xp + n, op);
    lme::exp_inplace(op, n);
  }
  return out;
}

py::tuple log_sum_exp(const py::array& x) {
  check_array(x, py::dtype::of<float>(), 1, "x");
  if (x.size() == 0) throw py::value_error("log_sum_exp: x is empty");
  const float* xp = f32_in(x);
  float peak = 0.f;
  double lse = 0.0;
  {
    py::gil_scoped_release release;
    lme::log_sum_exp(xp, x.size(), &peak, &lse);
  }
  return py::make_tuple(peak, lse);
}

lme::KVDType parse_kv_dtype(const std::string& name) {
  if (name == "f32") return lme::KVDType::F32;
  if (name == "f16") return lme::KVDType::F16;
  if (name == "bf16") return lme::KVDType::BF16;
  throw py::value_error("kv_dtype must be 'f32', 'f16' or 'bf16', got '" + name + "'");
}

// One query token at position L-1 over keys/values 0..L-1 stored in a one-layer, one-KV-head
// cache: logical page i lives in pool page page_order[i]. Slots of those pages past L-1 hold NaN,
// as a reused page holds stale data the kernel must ignore.
py::array_t<float> attention_paged(const py::array& q, const py::array& k, const py::array& v,
                                   int64_t lo, int64_t page_size, const std::string& kv_dtype,
                                   const py::array& page_order, py::object scale_arg) {
  check_array(q, py::dtype::of<float>(), 2, "q");
  check_array(k, py::dtype::of<float>(), 2, "k");
  check_array(v, py::dtype::of<float>(), 2, "v");
  check_array(page_order, py::dtype::of<int32_t>(), 1, "page_order");
  const lme::KVDType dtype = parse_kv_dtype(kv_dtype);
  const int64_t group = q.shape(0), D = q.shape(1), L = k.shape(0);
  if (group < 1 || group > std::numeric_limits<int32_t>::max())
    throw py::value_error("q must hold at least one query head, got shape " + shape_str(q));
  if (D < 1 || D > std::numeric_limits<int32_t>::max())
    throw py::value_error("q head_dim must be positive, got shape " + shape_str(q));
  if (L < 1) throw py::value_error("k must hold at least one token, got shape " + shape_str(k));
  check_dim(k, 1, D, "k", "q.shape[1]");
  check_dim(v, 0, L, "v", "k.shape[0]");
  check_dim(v, 1, D, "v", "q.shape[1]");
  if (page_size < 1 || page_size > 4096) {
    throw py::value_error("page_size must be in [1, 4096], got " + std::to_string(page_size));
  }
  if (lo < 0 || lo > L - 1) {
    throw py::value_error("lo must be in [0, L - 1] = [0, " + std::to_string(L - 1) + "], got " +
                          std::to_string(lo));
  }
  const int64_t n_logical = (L + page_size - 1) / page_size;
  check_dim(page_order, 0, n_logical, "page_order", "ceil(L / page_size)");
  const int32_t* order = static_cast<const int32_t*>(page_order.data());
  std::vector<bool> used(static_cast<size_t>(n_logical), false);
  for (int64_t i = 0; i < n_logical; ++i) {
    if (order[i] < 0 || order[i] >= n_logical || used[order[i]]) {
      throw py::value_error("page_order must be a permutation of range(" +
                            std::to_string(n_logical) + "); entry " + std::to_string(i) + " is " +
                            std::to_string(order[i]));
    }
    used[order[i]] = true;
  }
  const float scale =
      scale_arg.is_none() ? 1.0f / std::sqrt(static_cast<float>(D)) : scale_arg.cast<float>();

  lme::KVCacheConfig config;
  config.n_layers = 1;
  config.n_kv_heads = 1;
  config.head_dim = static_cast<int32_t>(D);
  config.page_size = static_cast<int32_t>(page_size);
  config.n_pages = n_logical;
  config.dtype = dtype;
  lme::KVCache cache(config);
  if (!cache.allocated()) throw py::value_error("could not allocate the KV pool");

  py::array_t<float> out({group, D});
  const float *qp = f32_in(q), *kp = f32_in(k), *vp = f32_in(v);
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t t = 0; t < L; ++t) {
      lme::kv_store_token(cache, order[t / page_size], 0, 0, t % page_size, kp + t * D, vp + t * D);
    }
    const std::vector<float> stale(static_cast<size_t>(D), std::numeric_limits<float>::quiet_NaN());
    for (int64_t t = L; t < n_logical * page_size; ++t) {
      lme::kv_store_token(cache, order[t / page_size], 0, 0, t % page_size, stale.data(),
                          stale.data());
    }
    // The engine's decode kernel over all pages from lo's on (unsplit), then normalised.
    const int64_t b0 = lo / page_size;
    std::vector<int32_t> blocks(static_cast<size_t>(n_logical - b0));
    for (size_t i = 0; i < blocks.size(); ++i)
      blocks[i] = static_cast<int32_t>(b0 + static_cast<int64_t>(i));
    std::vector<float> work(static_cast<size_t>(lme::attention_partial_work_floats(
        static_cast<int32_t>(group), static_cast<int32_t>(page_size))));
    std::vector<float> m(static_cast<size_t>(group)), l(static_cast<size_t>(group));
    lme::attention_sparse_partial(qp, static_cast<int32_t>(group), scale, cache, order, 0, 0,
                                  blocks.data(), static_cast<int32_t>(blocks.size()), lo, L - 1,
                                  work.data(), op, m.data(), l.data());
    lme::attention_partial_normalize(op, l.data(), static_cast<int32_t>(group),
                                     static_cast<int32_t>(D));
  }
  return out;
}

// Queries of a chunk at `positions` over keys/values 0..L-1 of a one-layer cache with Hkv KV
// heads, through the engine's plan (tiles x KV heads x key segments, then merges). Logical page
// i lives in pool page page_order[i]; slots past L-1 hold NaN.
py::array_t<float> attention_chunk(const py::array& q, const py::array& k, const py::array& v,
                                   const py::array& positions, int64_t page_size,
                                   const std::string& kv_dtype, const py::array& page_order,
                                   int64_t sliding_window, py::object scale_arg,
                                   int64_t segment_keys) {
  check_array(q, py::dtype::of<float>(), 3, "q");
  check_array(k, py::dtype::of<float>(), 3, "k");
  check_array(v, py::dtype::of<float>(), 3, "v");
  check_array(positions, py::dtype::of<int32_t>(), 1, "positions");
  check_array(page_order, py::dtype::of<int32_t>(), 1, "page_order");
  const lme::KVDType dtype = parse_kv_dtype(kv_dtype);
  const int64_t n = q.shape(0), H = q.shape(1), D = q.shape(2), L = k.shape(0), Hkv = k.shape(1);
  if (n < 1 || n > (1 << 20)) throw py::value_error("q must hold 1 .. 2^20 tokens, got shape " + shape_str(q));
  if (D < 1 || D > 4096) throw py::value_error("head_dim must be in [1, 4096], got shape " + shape_str(q));
  if (L < 1) throw py::value_error("k must hold at least one token, got shape " + shape_str(k));
  if (Hkv < 1 || H < 1 || H % Hkv != 0 || H / Hkv > 256) {
    throw py::value_error("q heads must be a positive multiple (<= 256x) of k heads, got q " + shape_str(q) +
                          ", k " + shape_str(k));
  }
  check_dim(k, 2, D, "k", "q.shape[2]");
  check_dim(v, 0, L, "v", "k.shape[0]");
  check_dim(v, 1, Hkv, "v", "k.shape[1]");
  check_dim(v, 2, D, "v", "q.shape[2]");
  check_dim(positions, 0, n, "positions", "q.shape[0]");
  if (page_size < 1 || page_size > 4096) {
    throw py::value_error("page_size must be in [1, 4096], got " + std::to_string(page_size));
  }
  if (sliding_window < 0 || sliding_window > std::numeric_limits<int32_t>::max()) {
    throw py::value_error("sliding_window must be >= 0");
  }
  if (segment_keys < 1) throw py::value_error("segment_keys must be >= 1");
  const int32_t* pos = static_cast<const int32_t*>(positions.data());
  for (int64_t i = 0; i < n; ++i) {
    if (pos[i] < 0 || pos[i] >= L) {
      throw py::value_error("positions must lie in [0, L - 1] = [0, " + std::to_string(L - 1) + "]; entry " +
                            std::to_string(i) + " is " + std::to_string(pos[i]));
    }
  }
  const int64_t n_logical = (L + page_size - 1) / page_size;
  check_dim(page_order, 0, n_logical, "page_order", "ceil(L / page_size)");
  const int32_t* order = static_cast<const int32_t*>(page_order.data());
  std::vector<bool> used(static_cast<size_t>(n_logical), false);
  for (int64_t i = 0; i < n_logical; ++i) {
    if (order[i] < 0 || order[i] >= n_logical || used[order[i]]) {
      throw py::value_error("page_order must be a permutation of range(" + std::to_string(n_logical) +
                            "); entry " + std::to_string(i) + " is " + std::to_string(order[i]));
    }
    used[order[i]] = true;
  }
  const float scale =
      scale_arg.is_none() ? 1.0f / std::sqrt(static_cast<float>(D)) : scale_arg.cast<float>();

  lme::KVCacheConfig config;
  config.n_layers = 1;
  config.n_kv_heads = static_cast<int32_t>(Hkv);
  config.head_dim = static_cast<int32_t>(D);
  config.page_size = static_cast<int32_t>(page_size);
  config.n_pages = n_logical;
  config.dtype = dtype;
  lme::KVCache cache(config);
  if (!cache.allocated()) throw py::value_error("could not allocate the KV pool");

  py::array_t<float> out({n, H, D});
  const float *qp = f32_in(q), *kp = f32_in(k), *vp = f32_in(v);
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    const std::vector<float> stale(static_cast<size_t>(D), std::numeric_limits<float>::quiet_NaN());
    for (int64_t t = 0; t < n_logical * page_size; ++t) {
      for (int64_t h = 0; h < Hkv; ++h) {
        const float* kr = t < L ? kp + (t * Hkv + h) * D : stale.data();
        const float* vr = t < L ? vp + (t * Hkv + h) * D : stale.data();
        lme::kv_store_token(cache, order[t / page_size], 0, static_cast<int32_t>(h), t % page_size, kr, vr);
      }
    }
    const int32_t group = static_cast<int32_t>(H / Hkv);
    lme::ChunkAttentionPlan plan;
    lme::chunk_attention_plan_add(plan, order, 0, pos, static_cast<int32_t>(n),
                                  static_cast<int32_t>(Hkv), group, static_cast<int32_t>(page_size),
                                  static_cast<int32_t>(sliding_window), segment_keys);
    std::vector<float> scratch(static_cast<size_t>(lme::attention_chunk_scratch_floats(
        lme::chunk_tile_tokens(group) * group, static_cast<int32_t>(page_size),
        static_cast<int32_t>(D))));
    std::vector<float> partials(static_cast<size_t>(
        plan.n_partials * lme::chunk_attention_partial_floats(group, static_cast<int32_t>(D))));
    const lme::ChunkAttentionStep step = {qp, H * D, op, H * D, pos, group, 0, scale,
                                          static_cast<int32_t>(sliding_window)};
    for (size_t i = 0; i < plan.items.size(); ++i) {
      lme::chunk_attention_run_item(plan, static_cast<int64_t>(i), cache, step, scratch.data(), partials.data());
    }
    for (size_t i = 0; i < plan.merges.size(); ++i) {
      lme::chunk_attention_run_merge(plan, static_cast<int64_t>(i), static_cast<int32_t>(D), step,
                                     partials.data());
    }
  }
  return out;
}

}  // namespace

void bind_kernels(py::module_& m) {
  py::module_ k = m.def_submodule(
      "kernels", "CPU kernels on numpy arrays, for tests against plain references.");
  k.def("rmsnorm", &rmsnorm, py::arg("x"), py::arg("w"), py::arg("eps"),
        "rmsnorm(x: float32[T, n], w: float32[n], eps) -> float32[T, n]");
  k.def(
      "rope", &rope, py::arg("x"), py::arg("positions"), py::arg("inv_freq"),
      py::arg("interleaved"),
      "rope(x: float32[T, H, D], positions: int32[T], inv_freq: float32[D/2], interleaved: bool)"
      " -> float32[T, H, D]. interleaved rotates pairs (2i, 2i+1), else (i, i + D/2); the angle is"
      " float32(pos) * inv_freq[i] in float32.");
  k.def("silu_mul", &silu_mul, py::arg("gate"), py::arg("up"),
        "silu_mul(gate: float32[T, n], up: float32[T, n]) -> float32[T, n] = silu(gate) * up");
  k.def("gelu_tanh_mul", &gelu_tanh_mul, py::arg("gate"), py::arg("up"),
        "gelu_tanh_mul(gate: float32[T, n], up: float32[T, n]) -> float32[T, n] = gelu_tanh(gate) * up");
  k.def("exp", &exp_copy, py::arg("x"),
        "exp(x: float32[...]) -> float32[...]; inputs below -87.3 give 0.");
  k.def("log_sum_exp", &log_sum_exp, py::arg("x"),
        "log_sum_exp(x: float32[n], n >= 1) -> (max(x), max + log(sum(exp(x - max)))); max is NaN"
        " if any x is NaN, and the second value equals the first when the max is not finite.");
  k.def("attention_paged", &attention_paged, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("lo"), py::arg("page_size"), py::arg("kv_dtype"), py::arg("page_order"),
        py::arg("scale") = py::none(),
        "attention_paged(q: float32[group, D], k: float32[L, D], v: float32[L, D], lo, page_size,"
        " kv_dtype: 'f32'|'f16'|'bf16', page_order: int32[ceil(L/page_size)], scale=1/sqrt(D))"
        " -> float32[group, D]: softmax(scale * q . K[lo..L-1]) . V[lo..L-1] for the query at "
        "position"
        " L-1, K/V stored in kv_dtype with logical page i in pool page page_order[i].");
  k.def("attention_chunk", &attention_chunk, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("positions"), py::arg("page_size"), py::arg("kv_dtype"), py::arg("page_order"),
        py::arg("sliding_window") = 0, py::arg("scale") = py::none(),
        py::arg("segment_keys") = lme::kChunkSegmentKeys,
        "attention_chunk(q: float32[n, H, D], k: float32[L, Hkv, D], v: float32[L, Hkv, D],"
        " positions: int32[n], page_size, kv_dtype, page_order: int32[ceil(L/page_size)],"
        " sliding_window=0, scale=1/sqrt(D), segment_keys=2048) -> float32[n, H, D]: causal"
        " attention of query i (at positions[i]) over keys [lo, positions[i]] with the"
        " query-tiled kernel and the engine's work plan (segment_keys: smallest key segment of"
        " split tiles). Query head j uses KV head j // (H / Hkv).");
}
