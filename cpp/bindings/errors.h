// Raises lmengine.errors classes from the binding layer, so a typed exception reaches the user
// straight from the C++ boundary.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "lmengine/status.h"

namespace lme_py {

[[noreturn]] inline void raise_error(const char* cls, const std::string& message) {
  namespace py = pybind11;
  py::object type = py::module_::import("lmengine.errors").attr(cls);
  PyErr_SetString(type.ptr(), message.c_str());
  throw py::error_already_set();
}

inline void raise_if_error(const lme::Status& s) {
  switch (s.code) {
    case lme::StatusCode::kOk:
      return;
    case lme::StatusCode::kOutOfPages:
      raise_error("KVCacheFullError", s.message);
    case lme::StatusCode::kContextOverflow:
      raise_error("ContextLengthError", s.message);
    case lme::StatusCode::kBadModel:
      raise_error("ModelFileError", s.message);
    case lme::StatusCode::kUnsupported:
      raise_error("UnsupportedModelError", s.message);
    case lme::StatusCode::kInvalidArgument:
    default:
      raise_error("InvalidRequestError", s.message);
  }
}

}  // namespace lme_py
