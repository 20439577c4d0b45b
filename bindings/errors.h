// Maps kvagent::Status codes to Python exceptions: one class per code, all subclasses of
// kv_agent.KvAgentError (itself a RuntimeError). NotFound also subclasses KeyError,
// InvalidArgument also ValueError, so idiomatic `except` clauses work.
#pragma once

#include <nanobind/nanobind.h>

#include "kvagent/status.h"

namespace kvagent::py {

// Creates the exception classes on module `m`.
void RegisterErrors(nanobind::module_& m);

// Raises the exception for a non-OK status (throws nanobind::python_error); no-op on OK.
void ThrowIfError(const Status& status);

template <typename T>
T ValueOrThrow(StatusOr<T>&& s) {
  ThrowIfError(s.status());
  return std::move(s).value();
}

}  // namespace kvagent::py
