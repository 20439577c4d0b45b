// Self-registration of binding units, so each component's bindings live in one file that
// nobody else edits: a *_py.cc defines `static Registration r("name", fn);`.
#pragma once

#include <nanobind/nanobind.h>

#include <functional>

namespace kvagent::py {

using RegisterFn = void (*)(nanobind::module_&);

struct Registration {
  // `order`: lower registers first (types other units refer to use 0).
  Registration(const char* name, int order, RegisterFn fn);
};

void RegisterAll(nanobind::module_& m);

}  // namespace kvagent::py
