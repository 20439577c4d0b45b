// The kv_agent._core extension: registration only. Each component's declarations live in
// bindings/<component>_py.cc and are registered here.
#include <nanobind/nanobind.h>

#include "errors.h"
#include "registry.h"

NB_MODULE(_core, m) {
  m.doc() = "kv-agent C++ core (store, positioner, latent index)";
  kvagent::py::RegisterErrors(m);
  kvagent::py::RegisterAll(m);
}
