// Inner loops of LatentIndex::Search on raw pointers (internal to src/index).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvagent::index_internal {

// out[j] = sum_i q[j * w + i] * row[i] for j in [0, nq). `row` holds w elements, f16 bit
// patterns when `f16`, else f32.
using DotRowsFn = void (*)(const void* row, bool f16, const float* q, int nq, int w, float* out);

// The fastest implementation for width `w` on this CPU (AVX+FMA+F16C when present and w % 8 == 0).
DotRowsFn SelectDotRows(int w);
// The portable implementation (reference for tests of the vectorised one).
void DotRowsScalar(const void* row, bool f16, const float* q, int nq, int w, float* out);

// DotRowsFn for two rows at once: out0[j] = q_j . row0, out1[j] = q_j . row1 (each query vector
// is loaded once for both rows).
using DotRows2Fn = void (*)(const void* row0, const void* row1, bool f16, const float* q, int nq, int w, float* out0,
                            float* out1);
DotRows2Fn SelectDotRows2(int w);

// x[i] = exp(x[i] - shift[i]) for i < n, shift[i] finite, x[i] - shift[i] <= 0 expected (values
// below -87 flush to 0). Relative error < 2e-7 on the vectorised path.
void ExpShifted(float* x, const float* shift, size_t n);

// dst[i] = f16 bits of src[i], rounded toward -inf (direction < 0), +inf (> 0) or to nearest
// even (0). Values must be finite; beyond the f16 range they become +-inf.
void ToF16(const float* src, uint16_t* dst, size_t n, int direction);

}  // namespace kvagent::index_internal
