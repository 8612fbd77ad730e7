// Python access to the weight formats (lmengine/quant.h), for tests and tools. Every argument is
// checked here, before any pointer reaches the kernels; problems raise ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "lmengine/quant.h"

namespace py = pybind11;

namespace {

using lme::DType;

DType checked_type(int64_t ggml_type) {
  if (ggml_type < INT32_MIN || ggml_type > INT32_MAX ||
      !lme::dtype_is_supported(static_cast<int32_t>(ggml_type))) {
    throw py::value_error("unsupported ggml type " + std::to_string(ggml_type));
  }
  return static_cast<DType>(ggml_type);
}

void check_length(DType t, int64_t n, const char* what) {
  const int64_t bs = lme::dtype_block_size(t);
  if (n < 0 || n % bs != 0) {
    throw py::value_error(std::string(what) + " = " + std::to_string(n) +
                          " is not a non-negative multiple of " + lme::dtype_name(t) +
                          "'s block size " + std::to_string(bs));
  }
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

py::array_t<float> dequantize(int64_t ggml_type, const py::array& data, int64_t n_elements) {
  const DType t = checked_type(ggml_type);
  check_length(t, n_elements, "n_elements");
  check_array(data, py::dtype::of<uint8_t>(), 1, "data");
  const int64_t need = lme::dtype_row_bytes(t, n_elements);
  if (data.shape(0) < need) {
    throw py::value_error("data holds " + std::to_string(data.shape(0)) + " bytes; " +
                          std::to_string(n_elements) + " " + lme::dtype_name(t) +
                          " elements need " + std::to_string(need));
  }
  py::array_t<float> out(n_elements);
  const void* src = data.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    lme::dequantize_row(t, src, dst, n_elements);
  }
  return out;
}

// Y[T, rows] = X[T, k] @ W[rows, k]^T, with X converted by quantize_activation_row first.
py::array_t<float> quant_matmul(int64_t ggml_type, const py::array& weights, int64_t k,
                                const py::array& x, bool reference, bool fp32_activations,
                                int64_t activation_bits) {
  if (reference && fp32_activations) {
    throw py::value_error("reference=True runs the 8-bit kernels; it excludes fp32_activations");
  }
  if (activation_bits != 8 && activation_bits != 16) {
    throw py::value_error("activation_bits must be 8 or 16, got " + std::to_string(activation_bits));
  }
  if (activation_bits == 16 && fp32_activations) {
    throw py::value_error("activation_bits=16 selects wide integer rows; it excludes fp32_activations");
  }
  const DType t = checked_type(ggml_type);
  check_length(t, k, "k");
  if (k == 0) throw py::value_error("k must be positive");
  check_array(weights, py::dtype::of<uint8_t>(), 2, "weights");
  check_array(x, py::dtype::of<float>(), 2, "x");
  const int64_t rows = weights.shape(0), row_bytes = lme::dtype_row_bytes(t, k);
  if (weights.shape(1) != row_bytes) {
    throw py::value_error("weights rows hold " + std::to_string(weights.shape(1)) + " bytes; " +
                          std::to_string(k) + " " + lme::dtype_name(t) + " elements need " +
                          std::to_string(row_bytes));
  }
  if (x.shape(1) != k) {
    throw py::value_error("x has " + std::to_string(x.shape(1)) +
                          " columns, expected k = " + std::to_string(k));
  }
  const int64_t n_tokens = x.shape(0);
  py::array_t<float> y({n_tokens, rows});
  const uint8_t* w = static_cast<const uint8_t*>(weights.data());
  const float* xf = static_cast<const float*>(x.data());
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    if (fp32_activations) {
      std::vector<const float*> x_rows(static_cast<size_t>(n_tokens));
      for (int64_t i = 0; i < n_tokens; ++i) x_rows[i] = xf + i * k;
      lme::matmul_rows_f32(t, k, w, row_bytes, rows, x_rows.data(), n_tokens, yp, rows);
      return y;
    }
    if (activation_bits == 16) {
      // Even stride: K-quants' residual rows sit in each token row's second half.
      const int64_t stride = (lme::activation_row_bytes_wide(t, k) + 1) / 2 * 2;
      std::vector<uint8_t> act(static_cast<size_t>(n_tokens * stride));
      std::vector<float> scratch(static_cast<size_t>(std::max<int64_t>(k, 2 * n_tokens * rows)));
      for (int64_t i = 0; i < n_tokens; ++i)
        lme::quantize_activation_row_wide(t, xf + i * k, act.data() + i * stride, stride,
                                          scratch.data(), k);
      if (rows > 0 && n_tokens > 0) {
        (reference ? lme::matmul_rows_wide_reference : lme::matmul_rows_wide)(
            t, k, w, row_bytes, rows, act.data(), stride, n_tokens, yp, rows, scratch.data());
      }
      return y;
    }
    const int64_t act_bytes = lme::activation_row_bytes(t, k);
    std::vector<uint8_t> act(static_cast<size_t>(n_tokens * act_bytes));
    for (int64_t i = 0; i < n_tokens; ++i)
      lme::quantize_activation_row(t, xf + i * k, act.data() + i * act_bytes, k);
    if (rows > 0 && n_tokens > 0) {
      if (reference) {
        lme::matmul_rows_reference(t, k, w, row_bytes, rows, act.data(), act_bytes, n_tokens, yp,
                                   rows);
      } else {
        lme::matmul_rows(t, k, w, row_bytes, rows, act.data(), act_bytes, n_tokens, yp, rows);
      }
    }
  }
  return y;
}

}  // namespace

void bind_quant(py::module_& m) {
  m.def(
      "dtype_is_supported",
      [](int64_t ggml_type) {
        return ggml_type >= INT32_MIN && ggml_type <= INT32_MAX &&
               lme::dtype_is_supported(static_cast<int32_t>(ggml_type));
      },
      py::arg("ggml_type"), "Whether the core reads weights of this GGML type id.");
  m.def(
      "dtype_row_bytes",
      [](int64_t ggml_type, int64_t n) {
        const DType t = checked_type(ggml_type);
        check_length(t, n, "n");
        return lme::dtype_row_bytes(t, n);
      },
      py::arg("ggml_type"), py::arg("n"), "Bytes of one row of n elements of this GGML type.");
  m.def("dequantize", &dequantize, py::arg("ggml_type"), py::arg("data"), py::arg("n_elements"),
        "dequantize(ggml_type, data: uint8[>= row bytes], n_elements) -> float32[n_elements]");
  m.def("quant_matmul", &quant_matmul, py::arg("ggml_type"), py::arg("weights"), py::arg("k"),
        py::arg("x"), py::arg("reference") = false, py::arg("fp32_activations") = false,
        py::arg("activation_bits") = 8,
        "quant_matmul(ggml_type, weights: uint8[rows, row_bytes], k, x: float32[T, k], "
        "reference=False, fp32_activations=False, activation_bits=8)"
        " -> float32[T, rows]. x is converted to the 8-bit activation format first (activation_bits"
        "=16: the engine's wide rows, 16-bit or value + residual 8-bit); reference=True runs the"
        " scalar kernels instead of the SIMD ones; fp32_activations=True runs the prompt-chunk"
        " kernel (weights dequantized panel by panel, x used as fp32).");
}
