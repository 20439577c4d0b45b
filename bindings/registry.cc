#include "registry.h"

#include <algorithm>
#include <string>
#include <vector>

namespace kvagent::py {

namespace {
struct Entry {
  std::string name;
  int order;
  RegisterFn fn;
};
std::vector<Entry>& Entries() {
  static std::vector<Entry> e;
  return e;
}
}  // namespace

Registration::Registration(const char* name, int order, RegisterFn fn) { Entries().push_back({name, order, fn}); }

void RegisterAll(nanobind::module_& m) {
  auto& e = Entries();
  std::stable_sort(e.begin(), e.end(), [](const Entry& a, const Entry& b) {
    return a.order != b.order ? a.order < b.order : a.name < b.name;
  });
  for (const Entry& x : e) x.fn(m);
}

}  // namespace kvagent::py
