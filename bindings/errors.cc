#include "errors.h"

#include <nanobind/stl/string.h>

#include <array>
#include <string>

namespace nb = nanobind;

namespace kvagent::py {

namespace {
std::array<PyObject*, 16> g_classes{};
PyObject* g_base = nullptr;
}  // namespace

void RegisterErrors(nb::module_& m) {
  std::string modname = nb::cast<std::string>(m.attr("__name__"));
  g_base = PyErr_NewException((modname + ".KvAgentError").c_str(), PyExc_RuntimeError, nullptr);
  m.attr("KvAgentError") = nb::borrow(g_base);
  for (int c = 1; c <= 15; ++c) {
    auto code = static_cast<StatusCode>(c);
    std::string name = std::string(StatusCodeName(code)) + "Error";
    PyObject* bases;
    if (code == StatusCode::kNotFound) {
      bases = PyTuple_Pack(2, g_base, PyExc_KeyError);
    } else if (code == StatusCode::kInvalidArgument) {
      bases = PyTuple_Pack(2, g_base, PyExc_ValueError);
    } else {
      bases = PyTuple_Pack(1, g_base);
    }
    PyObject* cls = PyErr_NewException((modname + "." + name).c_str(), bases, nullptr);
    Py_DECREF(bases);
    g_classes[c] = cls;
    m.attr(name.c_str()) = nb::borrow(cls);
  }
}

void ThrowIfError(const Status& status) {
  if (status.ok()) return;
  int c = static_cast<int>(status.code());
  PyObject* cls = (c >= 1 && c <= 15 && g_classes[c] != nullptr) ? g_classes[c] : g_base;
  PyErr_SetString(cls, status.message().c_str());
  throw nb::python_error();
}

}  // namespace kvagent::py
