// Python-facing DeviceSegment wrapper shared by cuda_py.cc (the class) and store_py.cc
// (Store.get_device returns it).
#pragma once

#include "kvagent/store.h"

namespace kvagent::py {

// The Python `DeviceSegment`: a segment's payload resident in device memory. Tensors exported
// from it keep the Python object (and so the device bytes) alive.
struct PyDeviceSegment {
  DeviceSegment d;
};

}  // namespace kvagent::py
