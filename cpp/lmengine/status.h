// Status values returned across the framework-free core; the binding layer turns them into
// Python exceptions. Nothing in cpp/lmengine throws.
#pragma once

#include <string>
#include <utility>

namespace lme {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // bad shapes, ids or values from the caller
  kOutOfPages = 2,       // the KV pool cannot hold the request
  kContextOverflow = 3,  // a sequence would exceed the model's context
  kUnsupported = 4,      // a format or feature the core does not implement
  kBadModel = 5,         // weights inconsistent with the model's own config
};

struct Status {
  StatusCode code = StatusCode::kOk;
  std::string message;

  static Status Ok() { return {}; }
  static Status Error(StatusCode c, std::string m) { return {c, std::move(m)}; }
  bool ok() const { return code == StatusCode::kOk; }
};

}  // namespace lme
