#include "kvagent/dtype.h"

#include <string>

namespace kvagent {

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kF16:
    case DType::kBF16: return 2;
    case DType::kI8: return 1;
  }
  return 0;
}

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
    case DType::kI8: return "i8";
  }
  return "?";
}

StatusOr<DType> DTypeFromName(std::string_view name) {
  if (name == "f32" || name == "float32") return DType::kF32;
  if (name == "f16" || name == "float16") return DType::kF16;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "i8" || name == "int8") return DType::kI8;
  return InvalidArgumentError("unknown dtype '" + std::string(name) + "' (expected f32, f16, bf16)");
}

}  // namespace kvagent
