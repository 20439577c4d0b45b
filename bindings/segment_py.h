// Python-facing Segment wrapper shared by segment_py.cc and store_py.cc.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <vector>

#include "kvagent/segment.h"

namespace kvagent::py {

// The Python `Segment` object: an immutable handle. Arrays exported from it keep the Python
// object (and therefore the handle and its payload) alive.
struct PySegment {
  SegmentHandle seg;
};

// A read-only numpy view of `v` (tokens, positions); `owner` stays alive as long as it does.
template <typename T>
nanobind::object ExportVector(nanobind::handle owner, const std::vector<T>& v) {
  size_t n = v.size();
  nanobind::ndarray<nanobind::numpy, const T> arr(v.data(), 1, &n, owner);
  return nanobind::cast(arr, nanobind::rv_policy::reference);
}

}  // namespace kvagent::py
