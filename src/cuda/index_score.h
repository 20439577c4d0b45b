// CUDA scoring of LatentIndex rows (framework-free kernel layer: raw device pointers + stream).
// Same arithmetic as index_internal::DotRowsScalar over every (row, block) of a dense matrix; the
// index's CPU path stays the reference. Only built when KVAGENT_CUDA is on.
#pragma once

#include <cstddef>

#include "kvagent/status.h"

namespace kvagent::cuda {

// rows: device, [num_rows][blocks][width] elements, f16 bit patterns when `f16` else f32.
// q: device, [blocks][nq][width] f32. out: device, [num_rows][blocks][nq] f32:
//   out[(r * blocks + b) * nq + j] = sum_i q[(b * nq + j) * width + i] * rows[(r * blocks + b) * width + i].
// stream: a cudaStream_t (nullptr = default stream); the call only enqueues work.
// InvalidArgument on bad sizes or null pointers; Internal on a launch error.
Status ScoreRows(const void* rows, bool f16, size_t num_rows, int blocks, int width, const float* q, int nq, float* out,
                 void* stream);

}  // namespace kvagent::cuda
