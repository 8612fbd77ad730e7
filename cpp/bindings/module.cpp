// The compiled module lmengine._core: thin bindings that validate Python inputs, release the GIL
// and call the framework-free core in cpp/lmengine.
#include <pybind11/pybind11.h>

#include "lmengine/quant.h"

namespace py = pybind11;

void bind_quant(py::module_& m);
void bind_engine(py::module_& m);
void bind_cuda(py::module_& m);
void bind_kernels(py::module_& m);
void bind_counters(py::module_& m);
void bind_moe(py::module_& m);
void bind_kernels_sparse(py::module_& m);

#ifndef LMENGINE_VERSION
#define LMENGINE_VERSION "dev"
#endif

bool lmengine_cuda_compiled() {
#ifdef LMENGINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef LMENGINE_WITH_CUDA
extern "C" int lmengine_cuda_device_count();
#endif

PYBIND11_MODULE(_core, m) {
  m.doc() = "lmengine compiled core";
  m.attr("__version__") = LMENGINE_VERSION;
  m.def("cuda_compiled", &lmengine_cuda_compiled, "True if the CUDA kernels were built into this module.");
  m.def(
      "cuda_available",
      []() {
#ifdef LMENGINE_WITH_CUDA
        return lmengine_cuda_device_count() > 0;
#else
        return false;
#endif
      },
      "True if CUDA kernels were built and a CUDA device is usable now.");
  m.def("simd", &lme::matmul_simd_name, "Instruction set the CPU kernels were compiled for.");
  bind_quant(m);
  bind_engine(m);
  bind_cuda(m);
  bind_kernels(m);
  bind_counters(m);
  bind_moe(m);  // adds to m.kernels
  bind_kernels_sparse(m);
}
