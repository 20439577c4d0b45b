// The device RoPE table comes from the positioner's frequencies (kvagent/rope.h): one
// implementation of HF's rope_type rules serves the CPU and the CUDA paths.
#include <string>

#include "kvagent/cuda_kv.h"
#include "kvagent/rope.h"

namespace kvagent::cuda {

StatusOr<RopeTable> ComputeRopeTable(const RopeSpec& spec, int head_dim) {
  RopeTable t;
  t.style = spec.style;
  if (!spec.enabled) return t;
  if (head_dim <= 0) return InvalidArgumentError("head_dim must be positive");
  KVAGENT_ASSIGN_OR_RETURN(RopeFrequencies f, ComputeRopeFrequencies(spec, head_dim));
  t.rotary_dim = f.rotary_dim;
  t.style = f.style;
  t.attention_factor = f.attention_factor;
  t.inv_freq.assign(f.inv_freq.begin(), f.inv_freq.end());  // fp32 values, angles evaluated in double
  return t;
}

}  // namespace kvagent::cuda
