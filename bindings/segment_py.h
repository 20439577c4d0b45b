// Python-facing Segment wrapper shared by segment_py.cc and store_py.cc.
#pragma once

#include <nanobind/nanobind.h>

#include "kvagent/segment.h"

namespace kvagent::py {

// The Python `Segment` object: an immutable handle. Arrays exported from it keep the Python
// object (and therefore the handle and its payload) alive.
struct PySegment {
  SegmentHandle seg;
};

}  // namespace kvagent::py
